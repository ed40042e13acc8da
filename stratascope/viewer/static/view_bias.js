/* Bias probe (after Ecco's bias article, at every depth): an occupations × depth heatmap of the
   mean log p(female) − log p(male) over each occupation's prompts, and, at one depth, a scatter
   of that mean against the occupation statistic (e.g. the share of women) with the stored
   Pearson / Spearman correlation; below, the correlation at every depth. Click a depth to pick it. */
(function () {
  'use strict';
  const S = window.Stratascope;
  const FEMALE = '#e6550d', MALE = '#3182bd';
  const fmt = (v, n) => (v === null || v === undefined ? '–' : v.toFixed(n));
  const pfmt = v => (v === null || v === undefined ? '–' : v.toPrecision(2));
  S.views.bias = {
    render: function (body, ctx) {
      const st = ctx.state, pairs = ctx.meta.bias_pairs || [];
      const pair = pairs.includes(st.pair) ? st.pair : pairs[0];
      return ctx.get('bias', {pair: pair}).then(d => {
        if (ctx.stale()) return;
        const D = d.depths.length, n = d.occupations.length, stat = d.statistic_values;
        const di = d.depths.indexOf(+st.depth), depthIndex = st.depth === undefined || di < 0 ? D - 1 : di;
        const depth = d.depths[depthIndex];
        const sorts = [['value', `log-ratio at depth ${depth}`], ['name', 'name'], ['corpus', 'corpus order']];
        if (stat) sorts.unshift(['statistic', d.statistic]);
        const sort = sorts.some(([k]) => k === st.sort) ? st.sort : sorts[0][0];
        const idx = d.occupations.map((_, i) => i);
        const key = {statistic: i => (stat[i] === null ? Infinity : -stat[i]), value: i => -d.means[i][depthIndex],
                     name: i => d.occupations[i], corpus: i => i}[sort];
        idx.sort((a, b) => { const x = key(a), y = key(b); return x < y ? -1 : x > y ? 1 : a - b; });
        const ratio = `log p(${S.tokenLabel(d.female)}) / p(${S.tokenLabel(d.male)})`;
        const heat = S.el('div', {class: 'ss-plot ss-heat ss-bias-heat'});
        const scatter = S.el('div', {class: 'ss-plot ss-bias-scatter'});
        const curve = S.el('div', {class: 'ss-plot ss-bias-corr'});
        const name = what => () => S.fileName('bias', what, d.pair.replace(/[^\w]+/g, '_'), 'd' + depth);
        const controls = [];
        if (pairs.length > 1) {
          controls.push(S.select('ss-pair', 'Pair (female/male)', pairs.map(p => [p, p.split('/').map(S.tokenLabel).join('/')]), pair, v => ctx.set({pair: v})));
        }
        // 'centred' subtracts each depth's mean over occupations: a shift that every occupation
        // shares (e.g. " he" favoured at middle depths) then no longer hides their order.
        const colour = st.colour === 'centred' ? 'centred' : 'raw';
        controls.push(S.select('ss-depth', 'Depth', d.depths.map(x => [x, String(x)]), depth, v => ctx.set({depth: +v})),
                      S.select('ss-sort', 'Rows by', sorts, sort, v => ctx.set({sort: v})),
                      S.select('ss-colour', 'Colour', [['raw', 'log-ratio'], ['centred', 'centred per depth']], colour,
                               v => ctx.set({colour: v})));
        const c = d.correlation;
        const at = c ? `Pearson r = ${fmt(c.pearson_r[depthIndex], 3)} (p = ${pfmt(c.pearson_p[depthIndex])}), ` +
          `Spearman ρ = ${fmt(c.spearman_rho[depthIndex], 3)} (p = ${pfmt(c.spearman_p[depthIndex])}), n = ${c.n[depthIndex]}` : '';
        const summary = S.el('p', {class: 'ss-hint ss-bias-summary', 'data-depth': depth,
          text: `${n} occupations × ${d.n_templates} templates; ${ratio} at each prompt's last token, averaged over ` +
                `its templates (> 0: leans to ${JSON.stringify(d.female)}). ` +
                (c ? `Against ${d.statistic} at depth ${depth}: ${at}.` :
                 stat ? '' : 'No statistic is stored with this probe, so there is no scatter.')});
        body.append(S.el('div', {class: 'ss-row'}, controls), summary,
                    S.el('div', {class: 'ss-row'}, [S.el('span', {class: 'ss-caption', text: 'heatmap:'}), S.plotlyButtons(heat, name('heatmap'))]),
                    S.el('div', {class: 'ss-scroll'}, [heat]));
        const y = idx.map((_, r) => r), ticks = idx.map(i => S.ptext(S.short(d.occupations[i], 36)));
        const centre = d.depths.map((_, j) => {
          const col = d.means.map(m => m[j]).filter(v => v !== null);
          return colour === 'centred' && col.length ? col.reduce((a, b) => a + b, 0) / col.length : 0;
        });
        const z = idx.map(i => d.means[i].map((v, j) => (v === null ? null : v - centre[j])));
        const zmax = Math.max(1e-6, ...z.flat().filter(v => v !== null).map(Math.abs));
        const hover = idx.map(i => d.depths.map((x, j) => S.ptext(`${d.occupations[i]} · depth ${x}: ${fmt(d.means[i][j], 3)}` +
          (stat ? ` · ${d.statistic} ${fmt(stat[i], 1)}` : '') + ` · ${d.counts[i]} prompts`)));
        window.Plotly.newPlot(heat, [{type: 'heatmap', z: z, x: d.depths, y: y, customdata: hover, zmid: 0, zmin: -zmax, zmax: zmax,
          colorscale: [[0, MALE], [0.5, '#ffffff'], [1, FEMALE]], xgap: 1, ygap: 1,
          colorbar: {title: {text: S.ptext(ratio), side: 'right'}}, hovertemplate: '%{customdata}<extra></extra>'}], {
          title: {text: S.ptext(`mean ${ratio} per occupation and depth` + (colour === 'centred' ? ', minus each depth\'s mean' : '') + (d.lens === 'tuned' ? ' (tuned lens)' : ''))},
          xaxis: {title: {text: 'depth (click to pick)'}, dtick: 1}, yaxis: {tickvals: y, ticktext: ticks, autorange: 'reversed', automargin: true},
          shapes: [{type: 'rect', xref: 'x', yref: 'paper', x0: depth - 0.5, x1: depth + 0.5, y0: 0, y1: 1, line: {color: '#222', width: 2}}],
          width: S.fitWidth(heat, D, 18, 30, 420), height: Math.max(260, 16 * n + 140), margin: {t: 50}}, S.plotlyConfig(name('heatmap')()));
        heat.on('plotly_click', ev => ctx.set({depth: ev.points[0].x}));
        if (stat) {
          const pts = idx.filter(i => stat[i] !== null && d.means[i][depthIndex] !== null);
          body.append(S.el('div', {class: 'ss-row'}, [S.el('span', {class: 'ss-caption', text: 'scatter:'}), S.plotlyButtons(scatter, name('scatter'))]), scatter);
          window.Plotly.newPlot(scatter, [{type: 'scatter', mode: pts.length <= 40 ? 'markers+text' : 'markers',
            x: pts.map(i => stat[i]), y: pts.map(i => d.means[i][depthIndex]), text: pts.map(i => S.ptext(S.short(d.occupations[i], 24))),
            customdata: pts.map(i => S.ptext(d.occupations[i])), textposition: 'top center', textfont: {size: 10}, cliponaxis: false,
            marker: {size: 8, color: pts.map(i => d.means[i][depthIndex]), colorscale: [[0, MALE], [0.5, '#bbbbbb'], [1, FEMALE]], cmid: 0},
            hovertemplate: `%{customdata}<br>${S.ptext(d.statistic)} %{x}<br>log-ratio %{y:.3f}<extra></extra>`}], {
            title: {text: S.ptext(`depth ${depth}: ${c ? at : ''}`)}, xaxis: {title: {text: S.ptext(d.statistic)}},
            yaxis: {title: {text: S.ptext(ratio)}, zeroline: true}, width: 760, height: 480, margin: {t: 60}}, S.plotlyConfig(name('scatter')()));
        }
        if (c) {
          body.append(S.el('div', {class: 'ss-row'}, [S.el('span', {class: 'ss-caption', text: 'correlation by depth:'}), S.plotlyButtons(curve, name('correlation'))]), curve);
          window.Plotly.newPlot(curve, [
            {type: 'scatter', mode: 'lines+markers', name: 'Spearman ρ', meta: 'spearman_rho', x: d.depths, y: c.spearman_rho},
            {type: 'scatter', mode: 'lines+markers', name: 'Pearson r', meta: 'pearson_r', x: d.depths, y: c.pearson_r}], {
            title: {text: S.ptext(`correlation with ${d.statistic} across occupations (n = ${Math.max(0, ...c.n.filter(v => v !== null))})`)},
            xaxis: S.depthAxis(d.depths, 'depth (click to pick)'), yaxis: {range: [-1.05, 1.05], zeroline: true},
            shapes: [{type: 'line', xref: 'x', yref: 'paper', x0: depth, x1: depth, y0: 0, y1: 1, line: {color: '#222', dash: 'dot'}}],
            width: 760, height: 320, margin: {t: 50}}, S.plotlyConfig(name('correlation')()));
          curve.on('plotly_click', ev => ctx.set({depth: ev.points[0].x}));
        }
      });
    }
  };
})();
