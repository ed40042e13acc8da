/* Prompts & tokens: each prompt's text and its tokens as chips (spaces shown as ␣). */
(function () {
  'use strict';
  const S = window.Stratascope;
  const PAGE = 10;
  S.views.tokens = {
    render: function (body, ctx) {
      const m = ctx.meta, st = ctx.state;
      const all = m.prompt_list ? m.prompt_list.map(p => p.index) : null;
      const count = all ? all.length : m.n_prompts;
      const at = all ? Math.max(0, all.indexOf(+st.prompt)) : +st.prompt;
      const page = Math.floor(at / PAGE), lo = page * PAGE, hi = Math.min(count, lo + PAGE);
      const indices = [];
      for (let i = lo; i < hi; i++) indices.push(all ? all[i] : i);
      return Promise.all(indices.map(p => ctx.get('tokens', {prompt: p}))).then(list => {
        if (ctx.stale()) return;
        const go = i => ctx.set({prompt: all ? all[i] : i});
        body.appendChild(S.el('div', {class: 'ss-row ss-pager'}, [
          S.el('button', {class: 'ss-prev', text: '◀ previous', disabled: lo > 0 ? null : '', onclick: () => go(lo - PAGE)}),
          S.el('span', {text: ` prompts ${lo + 1}-${hi} of ${count} listed `}),
          S.el('button', {class: 'ss-next', text: 'next ▶', disabled: hi < count ? null : '', onclick: () => go(hi)})]));
        for (const d of list) {
          const chips = S.el('div', {class: 'ss-chips'});
          d.labels.forEach((label, i) => chips.appendChild(S.el('span', {
            class: 'ss-chip' + (d.generated[i] ? ' ss-gen' : ''), text: label,
            title: `position ${i} · id ${d.ids[i]} · ${JSON.stringify(d.tokens[i])}` + (d.generated[i] ? ' · generated' : '')})));
          body.appendChild(S.el('article', {class: 'ss-prompt' + (d.prompt === +st.prompt ? ' ss-current' : ''), 'data-prompt': d.prompt}, [
            S.el('h3', {text: `prompt ${d.prompt} · ${d.n} tokens`}),
            S.el('p', {class: 'ss-text', text: d.text}), chips]));
        }
      });
    }
  };
})();
