/* Similarity: the stored depth × depth matrix (analysis/similarity) as a heatmap, rows the run's
   depths (or layers), columns those of the run it was compared with; click a cell to read its two
   depths and value (kept in the URL as cell=a,b) and that row's profile below. */
(function () {
  'use strict';
  const S = window.Stratascope;
  const NAMES = {cka: 'linear CKA', svcca: 'SVCCA', pwcca: 'PWCCA'};
  const fmt = v => (v === null || v === undefined ? '–' : v.toFixed(3));
  S.views.similarity = {
    render: function (body, ctx) {
      const st = ctx.state;
      return ctx.get('similarity', {}).then(d => {
        if (ctx.stale()) return;
        const method = NAMES[d.method] || d.method, ax = d.axis;
        const A = d.depths_a.length, B = d.depths_b.length;
        const side = (run, model) => `${run} (${model})`;
        const rowsOf = side(d.run_a, d.model_a), colsOf = d.same_run ? rowsOf : side(d.run_b, d.model_b);
        const [ca, cb] = String(st.cell || '').split(',').map(Number);
        let i = d.depths_a.indexOf(ca), j = d.depths_b.indexOf(cb);
        if (i < 0 || j < 0) {  // default: the least similar pair, where the picture is most telling
          i = 0; j = 0;
          d.values.forEach((row, r) => row.forEach((v, c) => { if (v !== null && (d.values[i][j] === null || v < d.values[i][j])) { i = r; j = c; } }));
        }
        const heat = S.el('div', {class: 'ss-plot ss-heat ss-sim-heat'});
        const profile = S.el('div', {class: 'ss-plot ss-sim-row'});
        const name = what => () => S.fileName('similarity', d.method, d.array, what);
        const dims = d.dims_a ? ` Kept dimensions (${d.method === 'svcca' ? 'for the variance share' : 'rank'}): ` +
          `${ax} ${d.depths_a[i]}: ${d.dims_a[i]}, ${ax} ${d.depths_b[j]}: ${d.dims_b[j]}.` : '';
        const cell = S.el('p', {class: 'ss-sim-cell', 'data-a': d.depths_a[i], 'data-b': d.depths_b[j],
          text: `${ax} ${d.depths_a[i]} of ${d.run_a} × ${ax} ${d.depths_b[j]} of ${d.same_run ? d.run_a : d.run_b}: ` +
                `${method} = ${fmt(d.values[i][j])}.${dims}`});
        const facts = `${method} of ${d.array} over ${d.n_rows} rows (${d.rows}); rows: ${ax}s of ${rowsOf}, columns: ${ax}s of ` +
          `${colsOf}. ${d.definition}. Click a cell to read it.`;
        body.append(S.el('p', {class: 'ss-hint ss-sim-facts', text: facts}), cell,
                    S.el('div', {class: 'ss-row'}, [S.el('span', {class: 'ss-caption', text: 'heatmap:'}), S.plotlyButtons(heat, name('heatmap'))]),
                    S.el('div', {class: 'ss-scroll'}, [heat]),
                    S.el('div', {class: 'ss-row'}, [S.el('span', {class: 'ss-caption', text: `${ax} ${d.depths_a[i]} against every ${ax}:`}),
                                                   S.plotlyButtons(profile, name(`row${d.depths_a[i]}`))]), profile);
        const small = A * B <= 16 * 16;
        const size = Math.max(12, Math.min(56, Math.floor(480 / Math.max(A, B))));  // 31 depths fit a laptop screen unscrolled
        window.Plotly.newPlot(heat, [{
          type: 'heatmap', x: d.depths_b, y: d.depths_a, z: d.values, zmin: 0, zmax: 1, colorscale: 'Viridis', xgap: 1, ygap: 1,
          text: d.values.map(row => row.map(v => (v === null ? '' : v.toFixed(2)))), texttemplate: small ? '%{text}' : '',
          textfont: {size: 9}, colorbar: {title: {text: S.ptext(method)}},
          hovertemplate: `${ax} %{y} × ${ax} %{x}: %{z:.3f}<extra></extra>`}], {
          title: {text: S.ptext(`${method} of ${d.array}: ${ax} × ${ax}`)},
          xaxis: {title: {text: S.ptext(`${ax} (${S.short(d.same_run ? d.run_a : d.run_b, 40)})`)}, dtick: B > 16 ? 2 : 1, constrain: 'domain'},
          yaxis: {title: {text: S.ptext(`${ax} (${S.short(d.run_a, 40)})`)}, dtick: A > 16 ? 2 : 1, autorange: 'reversed', scaleanchor: 'x'},
          shapes: [{type: 'rect', xref: 'x', yref: 'y', x0: d.depths_b[j] - 0.5, x1: d.depths_b[j] + 0.5,
                    y0: d.depths_a[i] - 0.5, y1: d.depths_a[i] + 0.5, line: {color: '#d62728', width: 3}}],
          width: Math.max(480, size * B + 260), height: Math.max(360, size * A + 180), margin: {t: 70}}, S.plotlyConfig(name('heatmap')()));
        window.Plotly.newPlot(profile, [{type: 'scatter', mode: 'lines+markers', x: d.depths_b, y: d.values[i], meta: 'row',
                                         line: {color: '#1f77b4'}, hovertemplate: `${ax} %{x}: %{y:.3f}<extra></extra>`}], {
          xaxis: {title: {text: S.ptext(`${ax} (${S.short(d.same_run ? d.run_a : d.run_b, 40)})`)}, dtick: B > 16 ? 2 : 1},
          yaxis: {title: {text: S.ptext(method)}, range: [0, 1.02]}, width: Math.max(520, 22 * B + 200), height: 300,
          margin: {t: 20}}, S.plotlyConfig(name(`row${d.depths_a[i]}`)()));
        heat.on('plotly_click', ev => {
          const p = ev.points[0];
          ctx.set({cell: `${p.y},${p.x}`});
        });
      });
    }
  };
})();
