/* DLA neurons: for one layer (picker), the neurons with the largest mean |direct contribution| to the target's
   logit over the rows of the newest dla result that kept neurons (a row where a neuron is not among its top k
   counts 0), as bars, each with the tokens of the store on which its activation (mlp) is largest in absolute
   value: beside the bars (saved with the chart) and in context in the table below. */
(function () {
  'use strict';
  const S = window.Stratascope;
  const POS = '#d62728', NEG = '#1f77b4', ABS = '#bbbbbb', SHOWN = 4;
  // Three significant digits: real models' contributions are ~0.1-5, a tiny random model's ~1e-4.
  const g3 = v => (v >= 0 ? '+' : '') + Number(v.toPrecision(3));
  S.views.dla_neurons = {
    render: function (body, ctx) {
      const st = ctx.state, layers = ctx.meta.layers;
      const layer = layers.includes(+st.layer) ? +st.layer : layers[layers.length - 1];
      return ctx.get('dla_neurons', {layer: layer}).then(d => {
        if (ctx.stale()) return;
        const div = S.el('div', {class: 'ss-plot ss-dla-neurons'});
        const name = () => S.fileName('dla_neurons', 'L' + layer);
        const facts = `Layer ${layer}: the ${d.neurons.length} neurons with the largest mean |contribution| to the logit of ` +
          `${d.target} over ${d.n_rows} rows (${d.positions} positions of ${d.n_prompts} prompts; the result kept each row's ` +
          `top ${d.k} neurons per layer, a row where a neuron is not among them counts 0). Tokens: where its activation ` +
          `(the store's mlp) is largest in absolute value, over all ${d.n_tokens} tokens.`;
        body.append(S.el('div', {class: 'ss-row'}, [
          S.select('ss-layer', 'Layer', layers.map(l => [l, 'layer ' + l]), layer, v => ctx.set({layer: +v})),
          S.plotlyButtons(div, name)]), S.el('p', {class: 'ss-hint ss-dla-neurons-facts', text: facts}));
        if (!d.neurons.length) {
          body.append(S.el('p', {class: 'ss-hint', text: `No neuron of layer ${layer} is among any row's top ${d.k}.`}));
          return;
        }
        body.append(S.el('div', {class: 'ss-scroll'}, [div]));
        const ys = d.neurons.map(n => 'neuron ' + n.neuron);
        const tok = t => `«${S.short(t.label, 12)}» ${g3(t.activation)}`;
        const hover = d.neurons.map(n => S.ptext(`neuron ${n.neuron}: in the top ${d.k} of ${n.n_top} rows<br>` +
          n.tokens.map(t => `${t.context.join('')}[${t.label}] ${g3(t.activation)}`).join('<br>')));
        window.Plotly.newPlot(div, [
          {type: 'bar', orientation: 'h', meta: 'mean_abs', y: ys, x: d.neurons.map(n => n.mean_abs), name: 'mean |contribution|',
           marker: {color: ABS}, customdata: hover, hovertemplate: 'mean |contribution| %{x:.3g}<br>%{customdata}<extra></extra>'},
          {type: 'bar', orientation: 'h', meta: 'mean', y: ys, x: d.neurons.map(n => n.mean), name: 'mean contribution',
           marker: {color: d.neurons.map(n => (n.mean >= 0 ? POS : NEG))}, customdata: hover,
           hovertemplate: 'mean contribution %{x:.3g}<br>%{customdata}<extra></extra>'}], {
          title: {text: S.ptext(`layer ${layer}: top neurons by mean |contribution| over ${d.n_rows} rows`) + '<br><sup>' +
                        S.ptext(`to the logit of ${S.short(d.target, 70)}; right: tokens of largest |activation|`) + '</sup>'},
          barmode: 'group', bargap: 0.25, legend: {orientation: 'h', y: -0.12, x: 0},
          xaxis: {title: {text: 'contribution to the logit'}, zeroline: true, domain: [0, 0.42]},
          yaxis: {autorange: 'reversed', automargin: true},
          annotations: d.neurons.map((n, i) => ({xref: 'paper', yref: 'y', x: 0.45, y: ys[i], xanchor: 'left', showarrow: false,
            align: 'left', font: {size: 11, family: S.TEXT_FONT}, text: S.ptext(n.tokens.slice(0, SHOWN).map(tok).join('  '))})),
          width: 1080, height: Math.max(320, 44 * d.neurons.length + 170), margin: {t: 80, r: 20}}, S.plotlyConfig(name()));
        const cell = (tag, text, cls) => S.el(tag, {text: text, class: cls});
        const table = S.el('table', {class: 'ss-top ss-dla-neurons-table'}, [S.el('thead', {}, [S.el('tr', {}, [
          cell('th', 'neuron'), cell('th', 'mean |contribution|'), cell('th', 'mean contribution'), cell('th', `rows (top ${d.k})`),
          cell('th', `tokens of largest |activation| (activation; prompt:position)`)])])]);
        const rows = S.el('tbody');
        d.neurons.forEach(n => {
          const toks = S.el('td', {class: 'ss-dla-tokens'});
          n.tokens.forEach(t => toks.append(S.el('span', {class: 'ss-dla-token', title: JSON.stringify(t.token)}, [
            S.el('span', {class: 'ss-dla-context', text: t.context.join('')}), S.el('b', {text: t.label}),
            ` ${g3(t.activation)} (${t.prompt}:${t.position})`])));
          rows.append(S.el('tr', {'data-neuron': n.neuron}, [cell('td', String(n.neuron)), cell('td', String(Number(n.mean_abs.toPrecision(3)))),
            cell('td', g3(n.mean)), cell('td', String(n.n_top)), toks]));
        });
        table.append(rows);
        body.append(S.el('div', {class: 'ss-scroll'}, [table]));
      });
    }
  };
})();
