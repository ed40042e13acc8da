/* NMF factors (after Ecco's NMF explorer): the text with each token coloured by its weight on a
   factor (opacity = weight / the factor's largest weight in this prompt), or, with "all", by its
   dominant factor; a factor picker and the corpus's top tokens of the chosen factor. */
(function () {
  'use strict';
  const S = window.Stratascope;
  S.views.nmf = {
    render: function (body, ctx) {
      const st = ctx.state;
      return ctx.get('nmf', {prompt: st.prompt}).then(d => {
        if (ctx.stale()) return;
        const K = d.n_factors;
        const factor = st.factor === 'all' ? 'all' : Math.max(0, Math.min(K - 1, st.factor === undefined ? 0 : +st.factor));
        const colour = f => S.headColor(f);
        const picker = S.el('div', {class: 'ss-heads ss-factors', role: 'group', 'aria-label': 'factors'});
        [['all', 'all (dominant)']].concat(Array.from({length: K}, (_, f) => [f, 'factor ' + f])).forEach(([f, text]) => {
          picker.appendChild(S.el('button', {class: 'ss-head-toggle ss-factor', 'data-factor': f, 'aria-pressed': String(f) === String(factor),
                                             style: `--head:${f === 'all' ? '#23303f' : colour(f)}`, text: text, onclick: () => ctx.set({factor: f})}));
        });
        const W = Math.max(480, Math.min(1100, body.clientWidth || 900));
        const flow = S.flowBoxes(d.labels, W);
        const H = flow.height + 40;
        const svg = S.svg('svg', {width: W, height: H, class: 'ss-nmf-svg', 'font-family': S.TEXT_FONT, 'font-size': 12, 'data-factor': factor});
        svg.appendChild(S.svg('rect', {width: W, height: H, fill: '#fff'}));
        const w = d.weights;
        let max, value, fill;
        if (factor === 'all') {
          const best = w.map(row => row.reduce((b, v, f) => (v > row[b] ? f : b), 0));
          value = i => w[i][best[i]];
          max = Math.max(0, ...d.labels.map((_, i) => value(i)));
          fill = i => S.rgba(colour(best[i]), max > 0 ? value(i) / max : 0);
        } else {
          value = i => w[i][factor];
          max = Math.max(0, ...w.map(row => row[factor]));
          fill = i => S.rgba(colour(factor), max > 0 ? value(i) / max : 0);
        }
        d.labels.forEach((label, i) => {
          const b = flow.boxes[i];
          const g = S.svg('g', {class: 'ss-nmf-tok', 'data-i': i});
          g.append(S.svg('rect', {x: b.x, y: b.y, width: b.w, height: b.h, rx: 3, class: 'ss-nmf-box', fill: fill(i), stroke: '#ddd', 'data-value': value(i)}),
                   S.svg('text', {x: b.x + 4, y: b.y + 15, fill: '#111', text: S.short(label, 30)}),
                   S.svg('title', {text: `${i}: ${JSON.stringify(d.tokens[i])} · ` + w[i].map((v, f) => `f${f} ${v.toFixed(3)}`).join(' ')}));
          svg.appendChild(g);
        });
        if (factor === 'all') {
          svg.appendChild(S.svg('text', {x: 8, y: H - 18, 'font-size': 11, class: 'ss-legend-text',
                                         text: `each token in its dominant factor's colour; opacity = weight / ${max.toPrecision(3)}`}));
        } else {
          S.legend(svg, 8, H - 28, [[0, '#fff'], [1, colour(factor)]], `weight on factor ${factor}: 0 … ${max.toPrecision(3)}`);
        }
        const shown = factor === 'all' ? [] : d.top[factor];
        const listed = p => S.mode !== 'report' || (S.meta.prompt_list || []).some(x => x.index === p);
        const table = S.el('table', {class: 'ss-top'}, [S.el('tr', {}, ['#', 'token', 'prompt', 'position', 'weight'].map(t => S.el('th', {text: t})))]);
        shown.forEach((t, r) => table.appendChild(S.el('tr', {class: 'ss-top-row'}, [
          S.el('td', {text: String(r + 1)}), S.el('td', {class: 'ss-chip', text: t.label, title: JSON.stringify(t.token)}),
          S.el('td', {}, [listed(t.prompt) ? S.el('button', {class: 'ss-link', text: String(t.prompt), title: 'show this prompt',
                                                            onclick: () => ctx.set({prompt: t.prompt})}) : String(t.prompt)]),
          S.el('td', {text: String(t.position)}), S.el('td', {text: t.weight.toFixed(3)})])));
        const facts = `${K} factors of the MLP activations of layers ${d.layers.join(', ')}` +
          (d.relative_error === null ? '' : `; relative error ${d.relative_error.toFixed(3)}`);
        body.append(picker, S.el('div', {class: 'ss-row'}, [S.saveButtons(() => svg, () => S.fileName('nmf', 'p' + st.prompt, 'f' + factor))]),
                    S.el('p', {class: 'ss-hint', text: facts + '. Hover a token for its weight on every factor.'}),
                    S.el('div', {class: 'ss-scroll'}, [svg]),
                    factor === 'all' ? S.el('p', {class: 'ss-hint', text: 'Pick a factor to list its top tokens.'})
                      : S.el('div', {class: 'ss-top-box'}, [S.el('h3', {text: `top tokens of factor ${factor} in the corpus`}), table]));
      });
    }
  };
})();
