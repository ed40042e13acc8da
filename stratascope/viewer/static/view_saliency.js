/* Saliency (after Ecco): pick a predicted token (a target); the tokens before it are shaded by their
   share of its attribution (the stored row scaled to sum to 1). Hover a token to preview it as the
   target, click to keep it. Only tokens whose prediction was attributed can be targets. */
(function () {
  'use strict';
  const S = window.Stratascope;
  S.views.saliency = {
    render: function (body, ctx) {
      const st = ctx.state, methods = ctx.meta.methods, method = st.method || methods[0];
      if (!methods.includes(method)) {  // e.g. a link made for another run: say so, offer the captured ones
        body.append(S.el('div', {class: 'ss-row'}, [S.select('ss-method', 'Method', [['', '—']].concat(methods.map(m => [m, m])), '',
                                                             v => ctx.set({method: v || null}))]),
                    S.el('p', {class: 'ss-notice ss-unavailable', text: `Attribution method ${JSON.stringify(method)} was not captured ` +
                      `in this run; it has ${methods.join(', ')} (capture others with --capture attribution --attribution NAMES).`}));
        return Promise.resolve();
      }
      return ctx.get('saliency', {prompt: st.prompt, method: method}).then(d => {
        if (ctx.stale()) return;
        const targets = new Set(d.targets);
        const methodSel = d.methods.length > 1 ? S.select('ss-method', 'Method', d.methods.map(m => [m, m]), method, v => ctx.set({method: v})) : null;
        if (!d.targets.length) {
          body.append(S.el('div', {class: 'ss-row'}, [methodSel]),
                      S.el('p', {class: 'ss-caption', text: `No prediction of prompt ${st.prompt} was attributed (${d.method}); capture with --attribute all to attribute every token.`}));
          return;
        }
        let target = targets.has(+st.target) ? +st.target : d.targets[d.targets.length - 1];
        const W = Math.max(480, Math.min(1100, body.clientWidth || 900));
        // encoder-decoder runs: the source, then a marker, then the decoder tokens
        const first = d.is_decoder ? d.is_decoder.indexOf(true) : -1;
        const flow = S.flowBoxes(d.labels, W, first > 0 ? {gapBefore: first, gap: 22} : {});
        const H = flow.height + 40;
        const svg = S.svg('svg', {width: W, height: H, class: 'ss-sal-svg', 'font-family': S.TEXT_FONT, 'font-size': 12});
        svg.appendChild(S.svg('rect', {width: W, height: H, fill: '#fff'}));
        const rects = [], texts = [];
        if (first > 0) {
          const b = flow.boxes[first];
          svg.appendChild(S.svg('text', {x: b.x - 16, y: b.y + 15, class: 'ss-stack-sep', 'font-weight': 'bold', text: '→',
                                         fill: '#555'}, [S.svg('title', {text: 'source (encoder) tokens | decoder tokens'})]));
        }
        d.labels.forEach((label, i) => {
          const b = flow.boxes[i], can = targets.has(i);
          const g = S.svg('g', {class: 'ss-sal-tok' + (can ? ' ss-target-ok' : ''), 'data-i': i, cursor: can ? 'pointer' : 'default'});
          const r = S.svg('rect', {x: b.x, y: b.y, width: b.w, height: b.h, rx: 3, class: 'ss-sal-box'});
          const t = S.svg('text', {x: b.x + 4, y: b.y + 15, text: S.short(label, 30)});
          g.append(r, t);
          g.appendChild(S.svg('title', {text: `${i}: ${JSON.stringify(d.tokens[i])}` + (can ? ' · click: attribute this prediction' : '')}));
          if (can) {
            g.addEventListener('mouseenter', () => shade(i));
            g.addEventListener('mouseleave', () => shade(target));
            g.addEventListener('click', () => { target = i; ctx.set({target: i}); });
          }
          rects.push(r); texts.push(t);
          svg.appendChild(g);
        });
        // Stored attributions are L2 norms (>= 0): a one-sided scale unless some method gives signed values.
        const signed = d.rows.some(r => r && r.some(v => v < 0));
        const legend = S.legend(svg, 8, H - 28, signed ? [[0, S.diverging(-1, 1)], [0.5, '#fff'], [1, S.diverging(1, 1)]]
                                                       : [[0, '#fff'], [1, S.diverging(1, 1)]], '');
        const caption = S.el('p', {class: 'ss-caption'});
        function shade(t) {
          const vals = d.rows[t - 1];
          const max = Math.max(...vals.map(Math.abs));
          d.labels.forEach((_, j) => {
            const before = j < t;
            rects[j].setAttribute('fill', before ? S.diverging(vals[j], max) : '#fff');
            rects[j].setAttribute('stroke', j === t ? '#000' : '#ddd');
            rects[j].setAttribute('stroke-width', j === t ? 2 : 1);
            rects[j].setAttribute('data-value', before ? vals[j] : '');
            texts[j].setAttribute('fill', before || j === t ? '#111' : '#bbb');
          });
          legend.caption.textContent = signed ? `share of the attribution: −${max.toPrecision(3)} · 0 · +${max.toPrecision(3)}`
                                              : `share of the attribution: 0 … ${max.toPrecision(3)}`;
          const gap = d.delta && d.delta[t - 1] !== null && d.delta[t - 1] !== undefined ? `; completeness gap ${d.delta[t - 1].toPrecision(3)}` : '';
          caption.textContent = `Attribution (${d.method}) of the prediction of token ${t} «${d.labels[t]}» (made at position ${t - 1}) ` +
            `over tokens 0-${t - 1}, each as a share of the row's total ${d.row_sum[t - 1].toPrecision(4)}${gap}.`;
          svg.setAttribute('data-target', t);
        }
        shade(target);
        body.append(S.el('div', {class: 'ss-row'}, [
          methodSel,
          S.select('ss-target', 'Target token', d.targets.map(t => [t, t + ': ' + S.short(d.labels[t], 30)]), target, v => ctx.set({target: +v})),
          S.saveButtons(() => svg, () => S.fileName('saliency', method, 'p' + st.prompt, 't' + target))]),
          caption, S.el('div', {class: 'ss-scroll'}, [svg]));
      });
    }
  };
})();
