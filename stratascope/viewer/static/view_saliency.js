/* Saliency (after Ecco): the text with each token shaded by its attribution to the prediction made
   at a chosen token; hover a token to preview it as the target, click to keep it. */
(function () {
  'use strict';
  const S = window.Stratascope;
  const ROWH = 26, CHAR = 7.3, PAD = 8;
  const colour = v => (v >= 0 ? `rgba(230,85,13,${Math.min(1, v).toFixed(3)})` : `rgba(49,130,189,${Math.min(1, -v).toFixed(3)})`);
  S.views.saliency = {
    render: function (body, ctx) {
      const st = ctx.state, method = st.method || ctx.meta.methods[0];
      return ctx.get('saliency', {prompt: st.prompt, method: method}).then(d => {
        if (ctx.stale()) return;
        let target = S.clampPosition(d, st.target);
        const W = Math.max(480, Math.min(1100, body.clientWidth || 900));
        // Lay tokens out left to right, wrapping at W.
        const boxes = [];
        let x = PAD, row = 0;
        d.labels.forEach((label, i) => {
          const w = S.short(label, 30).length * CHAR + 8;
          if (x + w > W - PAD && x > PAD) { x = PAD; row++; }
          boxes.push({x: x, y: PAD + row * ROWH, w: w});
          x += w + 3;
        });
        const H = PAD * 2 + (row + 1) * ROWH + 40;
        const svg = S.svg('svg', {width: W, height: H, class: 'ss-sal-svg', 'font-family': 'DejaVu Sans Mono, Menlo, Consolas, monospace', 'font-size': 12});
        svg.appendChild(S.svg('rect', {width: W, height: H, fill: '#fff'}));
        const rects = [], texts = [];
        d.labels.forEach((label, i) => {
          const b = boxes[i];
          const g = S.svg('g', {class: 'ss-sal-tok', 'data-i': i, cursor: 'pointer'});
          const r = S.svg('rect', {x: b.x, y: b.y, width: b.w, height: ROWH - 4, rx: 3, class: 'ss-sal-box'});
          const t = S.svg('text', {x: b.x + 4, y: b.y + 15, text: S.short(label, 30)});
          g.append(r, t);
          g.appendChild(S.svg('title', {text: `${i}: ${JSON.stringify(d.tokens[i])}`}));
          g.addEventListener('mouseenter', () => shade(i));
          g.addEventListener('mouseleave', () => shade(target));
          g.addEventListener('click', () => { target = i; ctx.set({target: i}); });
          rects.push(r); texts.push(t);
          svg.appendChild(g);
        });
        // Legend: the colour scale, relative to the target row's largest |attribution|.
        const ly = H - 28, grad = S.svg('linearGradient', {id: 'ss-sal-grad'});
        [[0, colour(-1)], [0.5, 'rgba(255,255,255,1)'], [1, colour(1)]].forEach(([o, c]) => grad.appendChild(S.svg('stop', {offset: o, 'stop-color': c})));
        svg.appendChild(S.svg('defs', {}, [grad]));
        svg.appendChild(S.svg('rect', {x: PAD, y: ly, width: 200, height: 10, fill: 'url(#ss-sal-grad)', stroke: '#999'}));
        const legendText = S.svg('text', {x: PAD + 210, y: ly + 9, class: 'ss-sal-legend'});
        svg.appendChild(legendText);
        const caption = S.el('p', {class: 'ss-caption'});
        function shade(t) {
          const vals = d.rows[t];
          d.labels.forEach((_, j) => {
            const after = j > t;
            rects[j].setAttribute('fill', after ? '#fff' : colour(vals[j]));
            rects[j].setAttribute('stroke', j === t ? '#000' : '#ddd');
            rects[j].setAttribute('stroke-width', j === t ? 2 : 1);
            rects[j].setAttribute('data-value', after ? '' : vals[j]);
            texts[j].setAttribute('fill', after ? '#bbb' : '#111');
          });
          const next = t + 1 < d.n ? `«${d.labels[t + 1]}»` : 'the next token';
          legendText.textContent = `blue −${d.row_max[t].toPrecision(3)} · 0 · +${d.row_max[t].toPrecision(3)} orange`;
          caption.textContent = `Attribution (${d.method}) of the prediction made at token ${t} «${d.labels[t]}» (which was followed by ${next}) over tokens 0-${t}.`;
          svg.setAttribute('data-target', t);
        }
        shade(target);
        body.append(S.el('div', {class: 'ss-row'}, [
          d.methods.length > 1 ? S.select('ss-method', 'Method', d.methods.map(m => [m, m]), method, v => ctx.set({method: v})) : null,
          S.select('ss-target', 'Prediction at', S.positionOptions(d), target, v => ctx.set({target: +v})),
          S.saveButtons(() => svg, () => S.fileName('saliency', method, 'p' + st.prompt, 't' + target))]),
          caption, S.el('div', {class: 'ss-scroll'}, [svg]));
      });
    }
  };
})();
