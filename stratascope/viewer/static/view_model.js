/* Model view (after BertViz model_view): layers × heads grid of attention thumbnails drawn as
   one SVG; click a thumbnail for the head-view detail of that head. */
(function () {
  'use strict';
  const S = window.Stratascope;
  const CELL = 64, GAP = 8, LEFT = 64, TOP = 24, BINS = [0.05, 0.15, 0.3, 0.5, 1.01];
  function thumb(d, h, x0, y0) {
    const g = S.svg('g', {class: 'ss-thumb', transform: `translate(${x0},${y0})`, 'data-head': h, cursor: 'pointer'});
    g.appendChild(S.svg('rect', {width: CELL, height: CELL, fill: '#fff', stroke: '#ccc', class: 'ss-thumb-bg'}));
    const nk = d.nk || d.n;  // cross-attention: decoder queries, source keys
    const at = (i, n) => 4 + (n > 1 ? i * (CELL - 8) / (n - 1) : (CELL - 8) / 2);
    // Lines bucketed by weight into a few paths, so a thumbnail stays a handful of elements.
    const paths = BINS.map(() => []);
    const {q, k, w} = d.heads[h];
    for (let j = 0; j < q.length; j++) {
      const b = BINS.findIndex(t => w[j] < t);
      paths[b].push(`M10 ${at(q[j], d.n).toFixed(1)}L${CELL - 10} ${at(k[j], nk).toFixed(1)}`);
    }
    paths.forEach((p, b) => {
      if (p.length) g.appendChild(S.svg('path', {d: p.join(''), stroke: S.headColor(h), fill: 'none', 'stroke-width': 1,
                                                 'stroke-opacity': Math.min(1, (b ? BINS[b - 1] : 0.02) + 0.1)}));
    });
    return g;
  }
  S.views.model = {
    render: function (body, ctx) {
      const st = ctx.state, layers = ctx.meta.layers;
      return Promise.all(layers.map(l => S.getAttention(ctx, l))).then(all => {
        if (ctx.stale()) return;
        const H = all[0].n_heads, W = LEFT + H * (CELL + GAP), Ht = TOP + layers.length * (CELL + GAP);
        const svg = S.svg('svg', {width: W, height: Ht, class: 'ss-model-svg', 'font-family': 'sans-serif', 'font-size': 11});
        svg.appendChild(S.svg('rect', {width: W, height: Ht, fill: '#fff'}));
        for (let h = 0; h < H; h++) svg.appendChild(S.svg('text', {x: LEFT + h * (CELL + GAP) + CELL / 2, y: 14, 'text-anchor': 'middle', text: 'head ' + h}));
        const detail = S.el('div', {class: 'ss-detail'});
        const show = (li, h) => {
          svg.querySelectorAll('.ss-thumb-bg').forEach(r => r.setAttribute('stroke', '#ccc'));
          const sel = svg.querySelector(`.ss-thumb[data-layer="${layers[li]}"][data-head="${h}"] .ss-thumb-bg`);
          if (sel) sel.setAttribute('stroke', '#000');
          const one = S.attentionSvg(all[li], {heads: new Set([h])});
          detail.replaceChildren(S.el('h3', {text: `layer ${layers[li]}, head ${h}`}),
                                 S.saveButtons(() => one, () => S.fileName('head', 'p' + st.prompt, 'L' + layers[li], 'H' + h)),
                                 S.el('div', {class: 'ss-scroll'}, [one]));
          detail.setAttribute('data-layer', layers[li]);
          detail.setAttribute('data-head', h);
        };
        all.forEach((d, li) => {
          const y0 = TOP + li * (CELL + GAP);
          svg.appendChild(S.svg('text', {x: LEFT - 8, y: y0 + CELL / 2 + 4, 'text-anchor': 'end', text: 'layer ' + layers[li]}));
          for (let h = 0; h < H; h++) {
            const g = thumb(d, h, LEFT + h * (CELL + GAP), y0);
            g.setAttribute('data-layer', layers[li]);
            g.appendChild(S.svg('title', {text: `layer ${layers[li]}, head ${h}: click for the detail`}));
            g.addEventListener('click', () => show(li, h));
            svg.appendChild(g);
          }
        });
        body.append(S.el('div', {class: 'ss-row'}, [S.stackSelect(ctx), S.saveButtons(() => svg, () => S.fileName('model', 'p' + st.prompt, S.stackOf(ctx) || ''))]),
                    S.el('p', {class: 'ss-hint', text: `Each thumbnail: tokens top to bottom, left attends to right; weights ≥ ${all[0].min_weight}. Click one for its detail.`}),
                    S.el('div', {class: 'ss-scroll ss-model'}, [svg]), detail);
      });
    }
  };
})();
