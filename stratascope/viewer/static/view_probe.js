/* Probe accuracy: a linear probe's cross-validated accuracy (R² for a regression) at every depth,
   with a ± sd band over folds, the control task (random label per type; selectivity = the gap)
   and the baseline (majority class; R² 0 = predicting the mean). */
(function () {
  'use strict';
  const S = window.Stratascope;
  const fmt = v => (v === null || v === undefined ? '–' : v.toFixed(3));
  S.views.probe = {
    render: function (body, ctx) {
      const st = ctx.state, labels = ctx.meta.probe_labels || [];
      const label = labels.includes(st.label) ? st.label : labels[0];
      return ctx.get('probe', {label: label}).then(d => {
        if (ctx.stale()) return;
        const classify = d.task === 'classify', what = classify ? 'accuracy' : 'R²';
        const div = S.el('div', {class: 'ss-plot ss-probe-plot'});
        const name = () => S.fileName('probe', d.label.replace(/[^\w]+/g, '_'));
        const lo = d.score.map((v, i) => (v === null || d.score_sd[i] === null ? null : v - d.score_sd[i]));
        const hi = d.score.map((v, i) => (v === null || d.score_sd[i] === null ? null : v + d.score_sd[i]));
        const traces = [
          {meta: 'score_lo', y: lo, line: {width: 0}, hoverinfo: 'skip', showlegend: false},
          {meta: 'score_hi', y: hi, line: {width: 0}, fill: 'tonexty', fillcolor: 'rgba(31,119,180,0.18)', hoverinfo: 'skip',
           name: `± sd over ${d.folds} folds`},
          {meta: 'score', y: d.score, mode: 'lines+markers', line: {color: '#1f77b4', width: 2.5}, name: what,
           customdata: d.score_sd, hovertemplate: `depth %{x}: ${what} %{y:.3f} ± %{customdata:.3f}<extra></extra>`}];
        if (d.control) traces.push({meta: 'control', y: d.control, mode: 'lines+markers', line: {color: '#d62728', dash: 'dot'},
                                    name: `control ${what}`});
        traces.push({meta: 'baseline', y: d.depths.map(() => d.baseline), mode: 'lines', line: {color: '#7f7f7f', dash: 'dash'},
                     name: classify ? 'majority baseline' : 'baseline (predict the mean)'});
        traces.forEach(t => Object.assign(t, {type: 'scatter', x: d.depths}, t.mode ? {} : {mode: 'lines'}));
        const sel = d.control ? d.score.map((v, i) => (v === null || d.control[i] === null ? null : v - d.control[i])) : null;
        let best = 0;
        d.score.forEach((v, i) => { if (v !== null && (d.score[best] === null || v > d.score[best])) best = i; });
        const rows = d.level === 'token' ? 'token rows' : `prompt rows (${d.params.at === 'mean' ? 'mean over tokens' : 'last prompt token'})`;
        const facts = `${d.label}: ${classify ? `${d.classes.length}-class classifier (classes ${d.classes.map(c => JSON.stringify(c)).join(', ')})` : 'linear regression'} ` +
          `on ${d.n_rows} ${rows}, ${d.n_groups} groups, ${d.folds}-fold cross-validation by group. Best ${what} ${fmt(d.score[best])} at depth ${d.depths[best]}` +
          (sel ? `; selectivity there ${fmt(sel[best])}` : '') + `; ${classify ? 'majority baseline' : 'baseline'} ${fmt(d.baseline)}.`;
        const controls = labels.length > 1 ? [S.select('ss-label', 'Label', labels.map(l => [l, l]), label, v => ctx.set({label: v}))] : [];
        body.append(S.el('div', {class: 'ss-row'}, controls.concat([S.plotlyButtons(div, name)])),
                    S.el('p', {class: 'ss-hint ss-probe-facts', text: facts}), div);
        window.Plotly.newPlot(div, traces, {
          title: {text: S.ptext(`probe of ${d.label}: ${what} by depth`)}, xaxis: S.depthAxis(d.depths, 'depth'),
          yaxis: {title: {text: what}, range: classify ? [0, 1.02] : undefined}, legend: {orientation: 'h', y: -0.2},
          width: Math.max(560, Math.min(1100, 24 * d.depths.length + 400)), height: 460, margin: {t: 50}}, S.plotlyConfig(name()));
      });
    }
  };
})();
