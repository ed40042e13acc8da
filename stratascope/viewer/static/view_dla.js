/* Logit attribution: for one position of one prompt, what the embedding, each attention layer and each
   MLP layer add to the target's logit (or target − contrast), as bars per layer, with the sum of the
   contributions and the true logit (their gap is float error). From analysis/dla. */
(function () {
  'use strict';
  const S = window.Stratascope;
  const ATTN = '#1f77b4', MLP = '#ff7f0e', OTHER = '#7f7f7f';
  S.views.dla = {
    render: function (body, ctx) {
      const st = ctx.state;
      return ctx.get('dla', {prompt: st.prompt}).then(d => {
        if (ctx.stale()) return;
        if (!d.positions.length) {
          body.append(S.el('p', {class: 'ss-hint ss-dla-facts', text: `Prompt ${d.prompt} has no row in analysis/dla ` +
            '(rows without a target are left out); run `stratascope dla` with --positions all, or pick another prompt.'}));
          return;
        }
        const wanted = st.position === undefined || st.position === null ? -1 : d.positions.indexOf(+st.position);
        const r = wanted < 0 ? d.positions.length - 1 : wanted;
        const vals = d.values[r], comp = d.components, L = comp.filter(c => c.startsWith('attn.')).length;
        const get = name => vals[comp.indexOf(name)];
        const layers = Array.from({length: L}, (_, l) => String(l));
        const vs = d.contrasts[r] === null ? '' : ` − «${d.contrasts[r]}»`;
        const name = () => S.fileName('dla', 'p' + d.prompt, 'pos' + d.positions[r]);
        const div = S.el('div', {class: 'ss-plot ss-dla-plot'});
        const ranked = comp.filter(c => c !== 'bias').map(c => [c, get(c)]).sort((a, b) => Math.abs(b[1]) - Math.abs(a[1]));
        const f2 = v => (v === null ? '–' : (v >= 0 ? '+' : '') + v.toFixed(2));
        const facts = `After «${d.labels[r]}» (position ${d.positions[r]}), the logit of «${d.targets[r]}»${vs} is ` +
          `${f2(d.logit[r])}; the contributions sum to ${f2(d.total[r])} (gap ${d.gap[r].toExponential(1)}). ` +
          `Largest: ${ranked.slice(0, 4).map(([c, v]) => `${c} ${f2(v)}`).join(', ')}. ${d.convention}.`;
        const options = d.positions.map((p, i) => [p, `${p}: ${S.short(d.labels[i], 24)} → ${S.short(d.targets[i], 16)}`]);
        body.append(S.el('div', {class: 'ss-row'}, [
          S.select('ss-position', 'Position', options, d.positions[r], v => ctx.set({position: +v})),
          S.plotlyButtons(div, name)]),
          S.el('p', {class: 'ss-hint ss-dla-facts', text: facts}), S.el('div', {class: 'ss-scroll'}, [div]));
        const bar = (meta, x, y, color, label) => ({type: 'bar', meta: meta, x: x, y: y, name: label, marker: {color: color},
                                                    hovertemplate: `${label} %{x}: %{y:.3f}<extra></extra>`});
        const traces = [bar('embed', ['embed'], [get('embed')], OTHER, 'embedding'),
                        bar('attn', layers, layers.map(l => get('attn.' + l)), ATTN, 'attention layer'),
                        bar('mlp', layers, layers.map(l => get('mlp.' + l)), MLP, 'MLP layer'),
                        bar('bias', ['bias'], [get('bias')], '#bbbbbb', 'final norm + unembedding bias')];
        const order = ['embed'].concat(layers, ['bias']);
        window.Plotly.newPlot(div, traces, {
          title: {text: S.ptext(`prompt ${d.prompt}, position ${d.positions[r]}: «${d.targets[r]}»${vs}, ` +
                               `logit ${f2(d.logit[r])} = sum ${f2(d.total[r])}`)},
          barmode: 'group', bargap: 0.15, legend: {orientation: 'h', y: -0.22},
          xaxis: {title: {text: 'layer'}, type: 'category', categoryorder: 'array', categoryarray: order},
          yaxis: {title: {text: 'contribution to the logit'}, zeroline: true},
          width: Math.max(640, Math.min(1400, 30 * L + 300)), height: 480, margin: {t: 60}}, S.plotlyConfig(name()));
      });
    }
  };
})();
