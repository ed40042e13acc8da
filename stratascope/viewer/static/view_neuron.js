/* Neuron view (after BertViz neuron_view): one head, one query token. A row per key token: its key
   vector, the elementwise products query × key (colour bands over d_head), their sum × scale (q·k)
   and the softmax over the keys the query may see. Hover a token to preview it as the query, click
   to keep it; layer and head selectors. */
(function () {
  'use strict';
  const S = window.Stratascope;
  const ROW = 18, PAD = 10, TOP = 40, CHAR = 7.3, GAP = 14, NUM = 70, BAR = 120;
  S.views.neuron = {
    render: function (body, ctx) {
      const st = ctx.state, head = st.head === undefined ? 0 : +st.head;
      const layers = (ctx.meta.view_layers || {}).neuron || ctx.meta.layers;  // a report may hold fewer layers here
      const layer = layers.includes(+st.layer) ? +st.layer : layers[0];
      return ctx.get('qk', {prompt: st.prompt, layer: layer, head: head}).then(d => {
        if (ctx.stale()) return;
        let query = S.clampPosition(d, st.query);
        const n = d.n, dh = d.d_head, cw = Math.max(2, Math.min(18, Math.floor(300 / dh)));
        const band = dh * cw;
        const labelW = Math.min(24, Math.max(4, ...d.labels.map(l => l.length))) * CHAR + 30;
        const xQ = labelW + GAP, xK = xQ + band + GAP, xP = xK + band + GAP, xS = xP + band + GAP, xW = xS + NUM + GAP;
        const W = xW + BAR + 60, H = TOP + n * ROW + PAD + 40;
        const svg = S.svg('svg', {width: W, height: H, class: 'ss-nv-svg', 'font-family': S.TEXT_FONT, 'font-size': 12});
        svg.appendChild(S.svg('rect', {width: W, height: H, fill: '#fff'}));
        const hl = S.svg('rect', {x: 2, y: 0, width: W - 4, height: ROW, fill: '#fff6d5', class: 'ss-nv-sel', 'pointer-events': 'none'});
        svg.appendChild(hl);  // under the labels, so it never takes their hover
        [[xQ, 'query q'], [xK, 'key k'], [xP, 'q × k (elementwise)'], [xS, 'q·k × scale'], [xW, 'softmax']].forEach(([x, t]) =>
          svg.appendChild(S.svg('text', {x: x, y: TOP - 10, 'font-family': 'sans-serif', 'font-weight': 'bold', text: t})));
        const y = i => TOP + i * ROW;
        const kmax = Math.max(...d.k.flat().map(Math.abs), ...d.q.flat().map(Math.abs));
        const labels = [];
        d.labels.forEach((label, i) => {
          const t = S.svg('text', {x: labelW - 4, y: y(i) + 13, 'text-anchor': 'end', class: 'ss-nv-tok', 'data-i': i, cursor: 'pointer',
                                   fill: d.generated[i] ? '#8a4b00' : '#222', text: S.short(label, 24)});
          t.appendChild(S.svg('title', {text: `${i}: ${JSON.stringify(d.tokens[i])} · click: make it the query`}));
          t.addEventListener('mouseenter', () => draw(i));
          t.addEventListener('mouseleave', () => draw(query));
          t.addEventListener('click', () => { query = i; ctx.set({query: i}); });
          labels.push(t);
          svg.appendChild(t);
          const g = S.svg('g', {class: 'ss-nv-krow', 'data-i': i});
          for (let c = 0; c < dh; c++) {
            g.appendChild(S.svg('rect', {x: xK + c * cw, y: y(i) + 2, width: cw, height: ROW - 4, class: 'ss-nv-k', fill: S.diverging(d.k[i][c], kmax)}));
          }
          svg.appendChild(g);
        });
        const dyn = S.svg('g', {class: 'ss-nv-dyn', 'pointer-events': 'none'});
        svg.appendChild(dyn);
        const legend = S.legend(svg, PAD, H - 26, [[0, S.diverging(-1, 1)], [0.5, '#fff'], [1, S.diverging(1, 1)]], '');
        const caption = S.el('p', {class: 'ss-caption'});
        function draw(i) {
          dyn.replaceChildren();
          labels.forEach((t, j) => t.setAttribute('font-weight', j === i ? 'bold' : 'normal'));
          const q = d.q[i];
          const seen = j => !d.causal || j <= i;
          const prods = d.k.map(k => k.map((v, c) => v * q[c]));
          const scores = prods.map((p, j) => (seen(j) ? p.reduce((a, b) => a + b, 0) * d.scale : -Infinity));
          const top = Math.max(...scores), ex = scores.map(s => (s === -Infinity ? 0 : Math.exp(s - top)));
          const total = ex.reduce((a, b) => a + b, 0), weights = ex.map(e => e / total);
          const pmax = Math.max(1e-12, ...prods.filter((_, j) => seen(j)).flat().map(Math.abs));
          hl.setAttribute('y', y(i));
          for (let c = 0; c < dh; c++) {
            dyn.appendChild(S.svg('rect', {x: xQ + c * cw, y: y(i) + 2, width: cw, height: ROW - 4, class: 'ss-nv-q', fill: S.diverging(q[c], kmax)}));
          }
          for (let j = 0; j < n; j++) {
            const g = S.svg('g', {class: 'ss-nv-prow', 'data-i': j, opacity: seen(j) ? 1 : 0.25});
            for (let c = 0; c < dh; c++) {
              g.appendChild(S.svg('rect', {x: xP + c * cw, y: y(j) + 2, width: cw, height: ROW - 4, class: 'ss-nv-p', fill: S.diverging(prods[j][c], pmax)}));
            }
            dyn.appendChild(g);
            dyn.appendChild(S.svg('text', {x: xS + NUM - 6, y: y(j) + 13, 'text-anchor': 'end', class: 'ss-nv-score', 'data-i': j,
                                           'data-value': seen(j) ? scores[j] : '', fill: seen(j) ? '#111' : '#aaa',
                                           text: seen(j) ? scores[j].toFixed(2) : 'masked'}));
            dyn.appendChild(S.svg('rect', {x: xW, y: y(j) + 3, width: Math.max(0.5, BAR * weights[j]), height: ROW - 6, fill: '#3182bd',
                                           class: 'ss-nv-w', 'data-i': j, 'data-value': weights[j]}));
            dyn.appendChild(S.svg('text', {x: xW + BAR + 4, y: y(j) + 13, 'font-size': 11, fill: '#333', text: weights[j].toFixed(3)}));
          }
          legend.caption.textContent = `q, k: ±${kmax.toPrecision(3)} · q × k: ±${pmax.toPrecision(3)} (orange +, blue −)`;
          caption.textContent = `Layer ${d.layer}, head ${d.head}, query ${i} «${d.labels[i]}»: softmax(q·k × ${d.scale.toPrecision(4)}` +
            (d.causal ? ' over keys 0-' + i + ')' : ' over every key)') + ' gives the attention weights.';
          svg.setAttribute('data-query', i);
        }
        draw(query);
        body.append(S.el('div', {class: 'ss-row'}, [
          S.select('ss-layer', 'Layer', layers.map(l => [l, 'layer ' + l]), layer, v => ctx.set({layer: +v})),
          S.select('ss-head', 'Head', Array.from({length: d.n_heads}, (_, h) => [h, 'head ' + h]), head, v => ctx.set({head: +v})),
          S.select('ss-query', 'Query', S.positionOptions(d), query, v => ctx.set({query: +v})),
          S.saveButtons(() => svg, () => S.fileName('neuron', 'p' + st.prompt, 'L' + layer, 'H' + head, 'q' + query))]),
          caption, S.el('p', {class: 'ss-hint', text: 'Hover a token to preview it as the query; click to keep it. Each band has one cell per dimension of the head.'}),
          S.el('div', {class: 'ss-scroll'}, [svg]));
      });
    }
  };
})();
