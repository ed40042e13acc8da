/* DLA heads: layers × heads heatmap of each head's mean direct contribution to the target's logit (or
   target − contrast) over every row of the newest dla result (analysis/dla, by_head), on a diverging scale
   centred at 0; click a head to open its lines in the head view at that layer. */
(function () {
  'use strict';
  const S = window.Stratascope;
  const SCALE = [[0, '#2166ac'], [0.25, '#92c5de'], [0.5, '#f7f7f7'], [0.75, '#f4a582'], [1, '#b2182b']];
  S.views.dla_heads = {
    render: function (body, ctx) {
      return ctx.get('dla_heads', {}).then(d => {
        if (ctx.stale()) return;
        const L = d.layers.length, H = d.heads.length;
        const flat = [];
        d.mean.forEach((row, li) => row.forEach((v, hi) => { if (v !== null) flat.push([v, d.layers[li], d.heads[hi]]); }));
        const max = Math.max(1e-9, ...flat.map(([v]) => Math.abs(v)));
        // Decimals for the largest |mean| to show three significant digits (a tiny random model's are ~0.01).
        const digits = Math.min(6, Math.max(1, 2 - Math.floor(Math.log10(max))));
        const f2 = v => (v === null ? '–' : (v >= 0 ? '+' : '') + v.toFixed(digits));
        const ranked = flat.slice().sort((a, b) => Math.abs(b[0]) - Math.abs(a[0])).slice(0, 5);
        const canOpen = ctx.meta.views.some(v => v.name === 'head' && v.available);
        const div = S.el('div', {class: 'ss-plot ss-heat ss-dla-heads'});
        const name = () => S.fileName('dla_heads');
        const rows = `${d.n_rows} row${d.n_rows === 1 ? '' : 's'} (${d.positions} positions of ${d.n_prompts} prompt${d.n_prompts === 1 ? '' : 's'})`;
        const facts = `Mean over ${rows} of each head's direct contribution (z·W_O, without the output projection's bias) ` +
          `to the logit of ${d.target}, final-norm scale frozen at the last depth` +
          (d.linearised ? ' (linearised: the family normalizes the attention output before the residual add)' : '') +
          `. Largest (layer.head): ${ranked.map(([v, l, h]) => `${l}.${h} ${f2(v)}`).join(', ')}. ` +
          (canOpen ? 'Click a head to see its lines.' : 'Capture with --capture attention to open a head\'s lines from here.');
        body.append(S.el('div', {class: 'ss-row'}, [S.plotlyButtons(div, name)]),
                    S.el('p', {class: 'ss-hint ss-dla-heads-facts', text: facts}), S.el('div', {class: 'ss-scroll'}, [div]));
        const hover = d.mean.map((row, li) => row.map((v, hi) =>
          `layer ${d.layers[li]}, head ${d.heads[hi]}: mean ${f2(v)}, sd ${d.sd[li][hi] === null ? '–' : d.sd[li][hi].toFixed(digits)}`));
        const small = L * H <= 24 * 16;
        window.Plotly.newPlot(div, [{
          type: 'heatmap', x: d.heads, y: d.layers, z: d.mean, zmin: -max, zmax: max, zmid: 0, colorscale: SCALE,
          xgap: 1, ygap: 1, customdata: hover, hovertemplate: '%{customdata}<extra></extra>',
          text: d.mean.map(row => row.map(v => (v === null ? '' : f2(v)))), texttemplate: small ? '%{text}' : '',
          textfont: {size: 10}, colorbar: {title: {text: 'mean contribution<br>to the logit', side: 'right'}}}], {
          title: {text: S.ptext(`mean head contribution over ${d.n_rows} rows`) + '<br><sup>' +
                        S.ptext(`to the logit of ${S.short(d.target, 70)}`) + '</sup>'},
          xaxis: {title: {text: 'head'}, dtick: 1, showgrid: false, zeroline: false},
          yaxis: {title: {text: 'layer'}, dtick: L > 24 ? 2 : 1, autorange: 'reversed', showgrid: false, zeroline: false},
          width: Math.max(560, 40 * H + 300), height: Math.max(340, 22 * L + 160), margin: {t: 80}}, S.plotlyConfig(name()));
        if (canOpen) {
          div.on('plotly_click', ev => {
            const p = ev.points[0];
            ctx.set({view: 'head', layer: p.y, heads: String(p.x)});
          });
        }
      });
    }
  };
})();
