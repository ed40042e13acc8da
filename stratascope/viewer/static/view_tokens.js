/* Prompts & tokens: each prompt's metadata, its text and its tokens as chips (invisible characters
   shown as ␣ ↵ ⇥ or ⟨U+…⟩); a column and a value picker keep the prompts whose metadata has that value. */
(function () {
  'use strict';
  const S = window.Stratascope;
  const PAGE = 10;
  const shown = v => (v === null || v === undefined ? '(missing)' : String(v));  // = data.shown_value

  /* The prompts listed: the page's prompt list (a report's, or the app's up to 500), filtered here;
     an app over more prompts asks the server (prompt_filter) for the values and the matching prompts. */
  function listing(ctx, column) {
    const m = ctx.meta, st = ctx.state;
    const listed = m.prompt_list ? m.prompt_list.map(p => p.index) : null;
    if (!column) return Promise.resolve({all: listed});
    if (m.prompt_list) {
      const counts = new Map();
      m.prompt_list.forEach(p => { const k = shown(p.meta[column]); counts.set(k, (counts.get(k) || 0) + 1); });
      const values = [...counts.entries()], value = counts.has(st.mval) ? st.mval : (values.length ? values[0][0] : '');
      return Promise.resolve({values: values, value: value, more: 0,
                              all: m.prompt_list.filter(p => shown(p.meta[column]) === value).map(p => p.index)});
    }
    return ctx.get('prompt_filter', {column: column, value: ''}).then(f => {
      const value = f.values.some(([k]) => k === st.mval) ? st.mval : (f.values.length ? f.values[0][0] : '');
      return ctx.get('prompt_filter', {column: column, value: value}).then(g => (
        {values: f.values, value: value, all: g.prompts, more: f.n_values - f.values.length}));
    });
  }

  S.views.tokens = {
    render: function (body, ctx) {
      const m = ctx.meta, st = ctx.state, columns = m.metadata_columns || [];
      const column = columns.includes(st.mcol) ? st.mcol : '';
      return listing(ctx, column).then(({all, values, value, more}) => {
        const filters = [];
        if (columns.length) {
          filters.push(S.select('ss-meta-column', 'Filter by', [['', '(all prompts)']].concat(columns.map(c => [c, c])), column,
                                v => ctx.set({mcol: v || null, mval: null})));
        }
        if (values) {
          filters.push(S.select('ss-meta-value', '=', values.map(([k, c]) => [k, `${S.short(k, 60)} (${c})`]), value,
                                v => ctx.set({mval: v})));
          if (more) filters.push(S.el('span', {class: 'ss-hint', text: `the ${values.length} most common values (${more} more)`}));
        }
        const count = all ? all.length : m.n_prompts;
        const at = all ? Math.max(0, all.indexOf(+st.prompt)) : +st.prompt;
        const page = Math.floor(at / PAGE), lo = page * PAGE, hi = Math.min(count, lo + PAGE);
        const indices = [];
        for (let i = lo; i < hi; i++) indices.push(all ? all[i] : i);
        return Promise.all(indices.map(p => ctx.get('tokens', {prompt: p}))).then(list => {
          if (ctx.stale()) return;
          const go = i => ctx.set({prompt: all ? all[i] : i});
          if (filters.length) body.appendChild(S.el('div', {class: 'ss-row ss-filter'}, filters));
          body.appendChild(S.el('div', {class: 'ss-row ss-pager'}, [
            S.el('button', {class: 'ss-prev', text: '◀ previous', disabled: lo > 0 ? null : '', onclick: () => go(lo - PAGE)}),
            S.el('span', {text: count ? ` prompts ${lo + 1}-${hi} of ${count} listed ` : ' no prompt has this value '}),
            S.el('button', {class: 'ss-next', text: 'next ▶', disabled: hi < count ? null : '', onclick: () => go(hi)})]));
          for (const d of list) {
            const chips = S.el('div', {class: 'ss-chips'});
            // encoder-decoder runs: the source tokens, then the decoder's, told apart by a marker
            const first = d.is_decoder ? d.is_decoder.indexOf(true) : -1;
            if (first >= 0) chips.appendChild(S.el('span', {class: 'ss-stack-sep', text: 'source:'}));
            d.labels.forEach((label, i) => {
              if (i === first) chips.appendChild(S.el('span', {class: 'ss-stack-sep', text: '→ decoder:'}));
              chips.appendChild(S.el('span', {
                class: 'ss-chip' + (d.generated[i] ? ' ss-gen' : ''), text: label,
                title: `position ${first >= 0 && i >= first ? i - first : i} · id ${d.ids[i]} · ${JSON.stringify(d.tokens[i])}` + (d.generated[i] ? ' · generated' : '')}));
            });
            const meta = Object.entries(d.meta || {});
            body.appendChild(S.el('article', {class: 'ss-prompt' + (d.prompt === +st.prompt ? ' ss-current' : ''), 'data-prompt': d.prompt}, [
              S.el('h3', {text: `prompt ${d.prompt} · ${d.n} tokens`}),
              meta.length ? S.el('p', {class: 'ss-meta'}, meta.map(([k, v]) => S.el('span', {class: 'ss-meta-item', 'data-column': k}, [
                S.el('b', {text: k + ': '}), shown(v)]))) : null,
              S.el('p', {class: 'ss-text', text: d.text}), chips]));
          }
        });
      });
    }
  };
})();
