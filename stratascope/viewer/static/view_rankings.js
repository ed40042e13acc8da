/* Rankings (after Ecco): rank of the token that actually came next, at every depth × position;
   rank 1 = the lens's top prediction. */
(function () {
  'use strict';
  const S = window.Stratascope;
  S.rankHeatmap = function (div, z, x, labels, y, hover, title, xtitle, name) {
    const ticktext = labels.map(l => S.ptext(S.short(l, 40)));
    const bottom = Math.min(260, 40 + 5 * Math.max(...labels.map(l => Math.min(40, l.length))));
    const logz = z.map(row => row.map(r => (r === null ? null : Math.log10(r))));
    const maxlog = Math.max(1, ...logz.flat().filter(v => v !== null));
    const tickvals = [], ticks = [];
    for (let e = 0; e <= Math.ceil(maxlog); e++) { tickvals.push(e); ticks.push(e < 3 ? String(10 ** e) : (10 ** (e - 3)) + 'k'); }
    window.Plotly.newPlot(div, [{
      type: 'heatmap', z: logz, x: x, y: y, text: z.map(row => row.map(r => (r === null ? '' : String(r)))), customdata: hover,
      texttemplate: '%{text}', textfont: {size: 10}, zmin: 0, zmax: Math.ceil(maxlog), colorscale: 'YlGnBu', reversescale: true,
      colorbar: {title: {text: 'rank'}, tickvals: tickvals, ticktext: ticks},
      hovertemplate: '%{customdata}<br>depth %{y}: rank %{text}<extra></extra>'}], {
      title: {text: title}, xaxis: {title: {text: xtitle}, tickvals: x, ticktext: ticktext, tickangle: -45, automargin: true},
      yaxis: {title: {text: 'depth'}, dtick: 1}, height: Math.max(200, 26 * y.length) + bottom + 90,
      width: Math.max(600, 44 * x.length + 220), margin: {t: 50, b: bottom}}, S.plotlyConfig(name));
  };
  S.views.rankings = {
    render: function (body, ctx) {
      const st = ctx.state;
      return ctx.get('lens', {prompt: st.prompt}).then(d => {
        if (ctx.stale()) return;
        const div = S.el('div', {class: 'ss-plot ss-heat'});
        const name = () => S.fileName('rankings', 'p' + st.prompt);
        body.append(S.el('div', {class: 'ss-row'}, [S.plotlyButtons(div, name)]),
                    S.el('p', {class: 'ss-hint', text: 'Each column: a position and the token that came next; each cell: that token\'s rank in the lens at that depth (1 = top). Scroll sideways for long prompts.'}),
                    S.el('div', {class: 'ss-scroll'}, [div]));
        const x = d.labels.map((_, i) => i);
        const hover = d.depths.map(() => x.map(i => S.ptext(`${i}: «${d.labels[i]}» → «${i + 1 < d.n ? d.labels[i + 1] : ''}»`)));
        S.rankHeatmap(div, d.target_rank, x, d.labels, d.depths, hover,
                      S.ptext(`prompt ${st.prompt}: rank of the next token`), 'position (token)', name());
      });
    }
  };
})();
