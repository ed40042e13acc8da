/* Rankings watch (after Ecco's rankings_watch): ranks of chosen tokens at every depth for one position. */
(function () {
  'use strict';
  const S = window.Stratascope;
  S.views.rankings_watch = {
    render: function (body, ctx) {
      const st = ctx.state;
      return ctx.get('lens', S.lensParams(st)).then(d => {
        if (ctx.stale()) return;
        const pos = S.clampPosition(d, st.position);
        const div = S.el('div', {class: 'ss-plot ss-heat'});
        const name = () => S.fileName('rankings_watch', d.lens, 'p' + st.prompt, 'pos' + pos);
        body.append(S.el('div', {class: 'ss-row'}, [S.lensToggle(st),
          S.select('ss-position', 'Position', S.positionOptions(d), pos, v => ctx.set({position: +v})), S.plotlyButtons(div, name)]),
          S.el('p', {class: 'ss-hint', text: 'Rank of each watched token after this position at every depth (1 = top).'}),
          S.el('div', {class: 'ss-scroll'}, [div]));
        const x = d.watch.map((_, i) => i);
        const z = d.depths.map((_, di) => x.map(w => d.watch_rank[pos][di][w]));
        const hover = d.depths.map(() => d.watch.map(w => S.ptext(`«${w}»`)));
        S.rankHeatmap(div, z, x, d.watch, d.depths, hover,
                      S.ptext(`prompt ${st.prompt}, after position ${pos} «${d.labels[pos]}» (${d.lens} lens)`), 'watched token', name(), d.vocab_size);
      });
    }
  };
})();
