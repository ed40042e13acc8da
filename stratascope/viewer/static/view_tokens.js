/* Prompts & tokens: each prompt's metadata, its text and its tokens as chips (invisible characters
   shown as ␣ ↵ ⇥ or ⟨U+…⟩); a column and a value picker keep the prompts whose metadata has that value. */
(function () {
  'use strict';
  const S = window.Stratascope;
  const PAGE = 10;
  const shown = v => (v === null || v === undefined ? '(missing)' : String(v));
  S.views.tokens = {
    render: function (body, ctx) {
      const m = ctx.meta, st = ctx.state, columns = m.metadata_columns || [];
      let all = m.prompt_list ? m.prompt_list.map(p => p.index) : null;
      const filters = [];
      if (columns.length && m.prompt_list) {
        const column = columns.includes(st.mcol) ? st.mcol : '';
        filters.push(S.select('ss-meta-column', 'Filter by', [['', '(all prompts)']].concat(columns.map(c => [c, c])), column,
                              v => ctx.set({mcol: v || null, mval: null})));
        if (column) {
          const counts = new Map();
          m.prompt_list.forEach(p => { const k = shown(p.meta[column]); counts.set(k, (counts.get(k) || 0) + 1); });
          const values = [...counts.keys()];
          const value = values.includes(st.mval) ? st.mval : values[0];
          filters.push(S.select('ss-meta-value', '=', values.map(k => [k, `${S.short(k, 60)} (${counts.get(k)})`]), value,
                                v => ctx.set({mval: v})));
          all = m.prompt_list.filter(p => shown(p.meta[column]) === value).map(p => p.index);
        }
      } else if (columns.length) {
        filters.push(S.el('span', {class: 'ss-hint', text: `Filtering by metadata needs the prompt list: this app lists up to 500 prompts; ` +
                                                           'a report (--prompts) lists its own.'}));
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
          d.labels.forEach((label, i) => chips.appendChild(S.el('span', {
            class: 'ss-chip' + (d.generated[i] ? ' ss-gen' : ''), text: label,
            title: `position ${i} · id ${d.ids[i]} · ${JSON.stringify(d.tokens[i])}` + (d.generated[i] ? ' · generated' : '')})));
          const meta = Object.entries(d.meta || {});
          body.appendChild(S.el('article', {class: 'ss-prompt' + (d.prompt === +st.prompt ? ' ss-current' : ''), 'data-prompt': d.prompt}, [
            S.el('h3', {text: `prompt ${d.prompt} · ${d.n} tokens`}),
            meta.length ? S.el('p', {class: 'ss-meta'}, meta.map(([k, v]) => S.el('span', {class: 'ss-meta-item', 'data-column': k}, [
              S.el('b', {text: k + ': '}), shown(v)]))) : null,
            S.el('p', {class: 'ss-text', text: d.text}), chips]));
        }
      });
    }
  };
})();
