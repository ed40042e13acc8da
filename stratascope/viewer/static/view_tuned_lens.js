/* Tuned lens: held-out KL(p_final || p_depth) (or cross-entropy of the next token, or entropy) at
   every depth, the logit lens against the tuned lens, from analysis/tuned_lens. */
(function () {
  'use strict';
  const S = window.Stratascope;
  const METRICS = [['kl', 'KL to the output (nats)'], ['cross_entropy', 'cross-entropy of the next token (nats)'],
                   ['entropy', 'entropy (nats)']];
  const COLORS = {logit: '#7f7f7f', tuned: '#1f77b4'};
  S.views.tuned_lens = {
    render: function (body, ctx) {
      const st = ctx.state;
      const metric = METRICS.some(m => m[0] === st.metric) ? st.metric : 'kl';
      const what = METRICS.find(m => m[0] === metric)[1];
      return ctx.get('tuned_lens', {}).then(d => {
        if (ctx.stale()) return;
        const div = S.el('div', {class: 'ss-plot ss-tuned-plot'});
        const name = () => S.fileName('tuned_lens', metric);
        const traces = ['logit', 'tuned'].map(lens => ({
          type: 'scatter', mode: 'lines+markers', meta: lens, x: d.depths, y: d[metric][lens], name: `${lens} lens`,
          line: {color: COLORS[lens], width: 2.5, dash: lens === 'logit' ? 'dot' : 'solid'},
          hovertemplate: `${lens} lens, depth %{x}: %{y:.3f}<extra></extra>`}));
        const p = d.params;
        const facts = `${d.model}: translators trained ${p.steps} steps of ${p.batch_rows} token rows (lr ${p.lr}, seed ${p.seed}) ` +
          `on ${d.n_train_prompts} prompts; measured on ${d.n_heldout_prompts} held-out prompts (${d.n_heldout_tokens} tokens). ` +
          `Depth ${d.depths[d.depths.length - 1]} is the model's output (no translator).`;
        const controls = [S.select('ss-metric', 'Metric', METRICS, metric, v => ctx.set({metric: v})), S.plotlyButtons(div, name)];
        body.append(S.el('div', {class: 'ss-row'}, controls), S.el('p', {class: 'ss-hint ss-tuned-facts', text: facts}), div);
        window.Plotly.newPlot(div, traces, {
          title: {text: S.ptext(`held-out ${what} by depth`)}, xaxis: {title: {text: 'depth'}, dtick: d.depths.length > 20 ? 2 : 1},
          yaxis: {title: {text: what}, rangemode: 'tozero'}, legend: {orientation: 'h', y: -0.2},
          width: Math.max(560, Math.min(1100, 24 * d.depths.length + 400)), height: 460, margin: {t: 50}}, S.plotlyConfig(name()));
      });
    }
  };
})();
