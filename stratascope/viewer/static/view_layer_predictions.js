/* Layer predictions (after Ecco): the logit lens's top-k tokens at every depth for one position,
   as a depth × rank heatmap of probabilities, and probability bars for one chosen depth. */
(function () {
  'use strict';
  const S = window.Stratascope;
  S.views.layer_predictions = {
    render: function (body, ctx) {
      const st = ctx.state;
      return ctx.get('lens', S.lensParams(st)).then(d => {
        if (ctx.stale()) return;
        const pos = S.clampPosition(d, st.position);
        const labels = d.topk_labels[pos], probs = d.topk_probs[pos], k = probs[0].length;
        const di = st.depth === undefined ? d.depths.length - 1 : Math.max(0, d.depths.indexOf(+st.depth));
        const heat = S.el('div', {class: 'ss-plot ss-heat'}), bars = S.el('div', {class: 'ss-plot ss-bars'});
        const name = () => S.fileName('layer_predictions', d.lens, 'p' + st.prompt, 'pos' + pos);
        body.append(S.el('div', {class: 'ss-row'}, [S.lensToggle(st),
          S.select('ss-position', 'Position', S.positionOptions(d), pos, v => ctx.set({position: +v})),
          S.select('ss-depth', 'Bars at depth', d.depths.map(x => [x, 'depth ' + x]), d.depths[di], v => ctx.set({depth: +v})),
          S.plotlyButtons(heat, name)]),
          S.el('p', {class: 'ss-hint', text: `What the model would predict after «${d.labels[pos]}» (position ${pos}) if it stopped at each depth. Click a row for its bars.`}),
          S.el('div', {class: 'ss-scroll'}, [heat]), bars);
        const text = labels.map(row => row.map(l => S.ptext(S.short(l, 16)))), full = labels.map(row => row.map(S.ptext));
        window.Plotly.newPlot(heat, [{
          type: 'heatmap', z: probs, x: Array.from({length: k}, (_, i) => i + 1), y: d.depths, text: text, customdata: full,
          texttemplate: '%{text}', textfont: {size: 12}, zmin: 0, zmax: 1, colorscale: 'Blues', reversescale: true, colorbar: {title: {text: 'probability'}},
          hovertemplate: 'depth %{y}, rank %{x}: %{customdata}<br>p = %{z:.3f}<extra></extra>'}], {
          title: {text: S.ptext(`prompt ${st.prompt}, position ${pos}: «${d.labels[pos]}» (${d.lens} lens)`)},
          xaxis: {title: {text: 'rank (1 = top)'}, dtick: 1}, yaxis: {title: {text: 'depth'}, dtick: 1},
          height: Math.max(320, 22 * d.depths.length + 140), width: Math.max(640, 110 * k + 220), margin: {t: 50}},
          S.plotlyConfig(name()));
        heat.on('plotly_click', ev => ctx.set({depth: ev.points[0].y}));
        window.Plotly.newPlot(bars, [{
          type: 'bar', orientation: 'h', x: probs[di].slice().reverse(), y: labels[di].map((l, i) => i).reverse(),
          text: labels[di].map(S.ptext).reverse(), textposition: 'outside', cliponaxis: false, marker: {color: '#3182bd'},
          hovertemplate: '%{text}: %{x:.3f}<extra></extra>'}], {
          title: {text: `top ${k} at depth ${d.depths[di]} (${d.lens} lens)`}, height: 60 + 26 * k, width: 640,
          xaxis: {title: {text: 'probability'}, range: [0, 1.15]}, yaxis: {showticklabels: false}, margin: {t: 40, l: 20, r: 20}},
          S.plotlyConfig(name() + '_depth' + d.depths[di]));
      });
    }
  };
})();
