/* Head view (after BertViz head_view): one layer, lines from each token (left) to the tokens it
   attends to (right), one colour per head; toggle heads, hover a token to keep only its lines. */
(function () {
  'use strict';
  const S = window.Stratascope;
  S.views.head = {
    render: function (body, ctx) {
      const st = ctx.state, layer = +st.layer;
      return S.getAttention(ctx, layer).then(d => {
        if (ctx.stale()) return;
        const visible = new Set(st.heads ? st.heads.split(',').filter(x => x !== '').map(Number) : d.heads.map((_, h) => h));
        const opts = {heads: visible, segment: st.segment || 'all'};
        const svg = S.attentionSvg(d, opts);
        const controls = S.el('div', {class: 'ss-row'}, [
          S.select('ss-layer', 'Layer', ctx.meta.layers.map(l => [l, 'layer ' + l]), layer, v => ctx.set({layer: +v})),
          S.stackSelect(ctx),
          d.segments ? S.select('ss-segment', 'Sentences', [['all', 'all'], ['AA', 'A → A'], ['AB', 'A → B'], ['BA', 'B → A'], ['BB', 'B → B']],
                                opts.segment, v => { opts.segment = v; svg.redraw(); }) : null,
          S.saveButtons(() => svg, () => S.fileName('head', 'p' + st.prompt, 'L' + layer, S.stackOf(ctx) || ''))]);
        const toggles = S.headToggles(d.n_heads, visible, () => { S.remember({heads: [...visible].sort((a, b) => a - b).join(',')}); svg.redraw(); });
        body.append(controls, toggles,
                    S.el('p', {class: 'ss-hint', text: `${d.stack === 'cross' ? 'Left: each decoder (target) token; right: the source tokens it attends to.' : 'Left: each token; right: the tokens it attends to.'} Lines for weights ≥ ${d.min_weight} (opacity = weight). Hover a token to keep only its lines.`}),
                    S.el('div', {class: 'ss-scroll'}, [svg]));
      });
    }
  };
})();
