/* Rankings (after Ecco): rank of the token that actually came next, at every depth, one column per
   token that came next (the token it followed above); rank 1 = the lens's top prediction. */
(function () {
  'use strict';
  const S = window.Stratascope;
  /* Ticks of a log10 colour bar from rank 1 to the vocabulary size: the decades, and the size itself. */
  S.rankTicks = function (vocab) {
    const top = Math.log10(Math.max(2, vocab)), vals = [], text = [];
    for (let e = 0; e < top - 0.25; e++) { vals.push(e); text.push(e < 3 ? String(10 ** e) : (10 ** (e - 3)) + 'k'); }
    vals.push(top); text.push(vocab.toLocaleString('en-US') + ' (vocab)');
    return {max: top, vals: vals, text: text};
  };
  /* A depth × column heatmap of ranks (1 = top), coloured on a log scale from 1 to the vocabulary size.
     `top` (optional) labels the columns again above the plot. */
  S.rankHeatmap = function (div, z, x, labels, y, hover, title, xtitle, name, vocab, top) {
    const ticktext = labels.map(l => S.ptext(S.short(l, 40)));
    const longest = ls => Math.max(0, ...ls.map(l => Math.min(40, l.length)));
    const bottom = Math.min(260, 40 + 5 * longest(labels)), above = top ? Math.min(260, 40 + 5 * longest(top)) : 0;
    const logz = z.map(row => row.map(r => (r === null ? null : Math.log10(r))));
    const ticks = S.rankTicks(vocab || Math.max(10, ...z.flat().filter(v => v !== null)));
    const layout = {
      title: {text: title, y: 0.995, yanchor: 'top'},
      xaxis: {title: {text: xtitle}, tickvals: x, ticktext: ticktext, tickangle: -45, automargin: true, range: [-0.5, x.length - 0.5]},
      yaxis: {title: {text: 'depth'}, dtick: 1}, height: Math.max(200, 26 * y.length) + bottom + above + 90,
      width: S.fitWidth(div, x.length, 28, 44, 260), margin: {t: 50 + above, b: bottom}};
    const traces = [{
      type: 'heatmap', z: logz, x: x, y: y, text: z.map(row => row.map(r => (r === null ? '' : String(r)))), customdata: hover,
      texttemplate: '%{text}', textfont: {size: 10}, zmin: 0, zmax: ticks.max, colorscale: 'YlGnBu', reversescale: true,
      colorbar: {title: {text: 'rank (1 = top)', side: 'right'}, tickvals: ticks.vals, ticktext: ticks.text},
      hovertemplate: '%{customdata}<br>depth %{y}: rank %{text}<extra></extra>'}];
    if (top) {
      layout.xaxis2 = {overlaying: 'x', side: 'top', tickvals: x, ticktext: top.map(l => S.ptext(S.short(l, 40))), tickangle: -45,
                       range: layout.xaxis.range, automargin: true, showgrid: false, zeroline: false,
                       title: {text: 'the token it came after', standoff: 4}};
      // An axis shows only with a trace on it: an invisible point, on a hidden y axis so the depths keep their range.
      layout.yaxis2 = {overlaying: 'y', visible: false};
      traces.push({type: 'scatter', x: [x[0]], y: [0], xaxis: 'x2', yaxis: 'y2', mode: 'markers', marker: {opacity: 0},
                   hoverinfo: 'skip', showlegend: false});
    }
    window.Plotly.newPlot(div, traces, layout, S.plotlyConfig(name));
  };
  S.views.rankings = {
    render: function (body, ctx) {
      const st = ctx.state;
      return ctx.get('lens', S.lensParams(st)).then(d => {
        if (ctx.stale()) return;
        if (d.n < 2) {
          body.append(S.el('p', {class: 'ss-hint', text: `Prompt ${st.prompt} has one token: no token came next.`}));
          return;
        }
        const div = S.el('div', {class: 'ss-plot ss-heat'});
        const name = () => S.fileName('rankings', d.lens, 'p' + st.prompt);
        body.append(S.el('div', {class: 'ss-row'}, [S.lensToggle(st), S.plotlyButtons(div, name)]),
                    S.el('p', {class: 'ss-hint ss-rank-caption', text: 'Each column: the token that came next (labelled below; above: ' +
                      'the token it came after); each cell: its rank in the lens at that depth (1 = top). Long prompts scroll sideways.'}),
                    S.el('div', {class: 'ss-scroll'}, [div]));
        // Column i: the prediction made at position i of token i + 1 (the last position predicts nothing).
        const x = d.labels.slice(1).map((_, i) => i);
        const next = x.map(i => `${i + 1}: ${d.labels[i + 1]}`), after = x.map(i => `${i}: ${d.labels[i]}`);
        const hover = d.depths.map(() => x.map(i => S.ptext(`«${d.labels[i + 1]}» (position ${i + 1}) after «${d.labels[i]}»`)));
        S.rankHeatmap(div, d.target_rank.map(row => row.slice(0, d.n - 1)), x, next, d.depths, hover,
                      S.ptext(`prompt ${st.prompt}: rank of the token that came next (${d.lens} lens)`), 'the token that came next', name(),
                      d.vocab_size, after);
      });
    }
  };
})();
