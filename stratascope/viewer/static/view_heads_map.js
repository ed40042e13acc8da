/* Heads map: layers × heads coloured by the heads job's pattern label or one of its scores
   (analysis/heads); click a head to open its lines in the head view (or the model view). */
(function () {
  'use strict';
  const S = window.Stratascope;
  const LABEL_COLOURS = {'previous-token': '#d62728', 'first-token': '#1f77b4', 'self': '#2ca02c', 'broad': '#ff7f0e', 'mixed': '#c7c7c7'};
  const ABBR = {'previous-token': 'prev', 'first-token': 'first'};
  const SCORES = [['label', 'pattern label'], ['first_token', 'first token'], ['previous_token', 'previous token'], ['self', 'self'],
                  ['entropy_norm', 'entropy (normalized)'], ['entropy', 'entropy (nats)']];
  S.views.heads_map = {
    render: function (body, ctx) {
      const st = ctx.state;
      return ctx.get('heads', {}).then(d => {
        if (ctx.stale()) return;
        const options = SCORES.filter(([k]) => k === 'label' || d.scores[k]);
        const score = options.some(([k]) => k === st.score) ? st.score : 'label';
        const div = S.el('div', {class: 'ss-plot ss-heat ss-heads-map'});
        const name = () => S.fileName('heads_map', score);
        const names = d.label_names, L = d.layers.length, H = d.heads.length;
        const hover = d.layers.map((l, li) => d.heads.map((h, hi) => S.ptext(`layer ${l}, head ${h}: ${d.labels[li][hi]}<br>` +
          SCORES.slice(1).filter(([k]) => d.scores[k]).map(([k, t]) => `${t} ${d.scores[k][li][hi] === null ? '–' : d.scores[k][li][hi].toFixed(3)}`).join('<br>'))));
        let trace;
        if (score === 'label') {
          // Categorical: z = label index, a stepped colour scale, the label's first letters in each cell.
          const z = d.labels.map(row => row.map(x => names.indexOf(x)));
          const k = names.length, scale = [];
          names.forEach((x, i) => { const c = LABEL_COLOURS[x] || S.headColor(i); scale.push([i / k, c], [(i + 1) / k, c]); });
          trace = {z: z, zmin: -0.5, zmax: k - 0.5, colorscale: scale, text: d.labels.map(row => row.map(x => S.ptext(ABBR[x] || S.short(x, 6)))),
                   colorbar: {title: {text: 'label'}, tickvals: names.map((_, i) => i), ticktext: names.map(S.ptext)}};
        } else {
          const z = d.scores[score], bounded = score !== 'entropy';
          trace = {z: z, zmin: 0, zmax: bounded ? 1 : undefined, colorscale: 'Viridis',
                   text: z.map(row => row.map(v => (v === null ? '' : v.toFixed(2)))), colorbar: {title: {text: S.ptext(score)}}};
        }
        const counts = names.map(x => [x, d.labels.flat().filter(y => y === x).length]).filter(([, c]) => c);
        body.append(S.el('div', {class: 'ss-row'}, [
          S.select('ss-score', 'Colour by', options, score, v => ctx.set({score: v})), S.plotlyButtons(div, name)]),
          S.el('p', {class: 'ss-hint', text: `${counts.map(([x, c]) => `${c} ${x}`).join(' · ')}. Rule: ${d.rule}. Click a head to see its lines.`}),
          S.el('div', {class: 'ss-scroll'}, [div]));
        window.Plotly.newPlot(div, [Object.assign({type: 'heatmap', x: d.heads, y: d.layers, customdata: hover, texttemplate: '%{text}',
          textfont: {size: 10}, xgap: 1, ygap: 1, hovertemplate: '%{customdata}<extra></extra>'}, trace)], {
          title: {text: score === 'label' ? 'pattern label of every head' : S.ptext(score) + ' of every head'},
          xaxis: {title: {text: 'head'}, dtick: 1}, yaxis: {title: {text: 'layer'}, dtick: 1, autorange: 'reversed'},
          width: Math.max(420, 34 * H + 260), height: Math.max(300, 20 * L + 140), margin: {t: 50}}, S.plotlyConfig(name()));
        const target = ctx.meta.views.some(v => v.name === 'head' && v.available) ? 'head' : 'model';
        div.on('plotly_click', ev => {
          const p = ev.points[0];
          ctx.set(target === 'head' ? {view: 'head', layer: p.y, heads: String(p.x)} : {view: 'model'});
        });
      });
    }
  };
})();
