/* stratascope viewer core: state in the URL hash, data access (embedded in a report, fetched
   in the app), safe DOM helpers, SVG/PNG export, and the attention drawing shared by views.
   Text from the store is only ever set with textContent or setAttribute, never parsed as HTML. */
(function () {
  'use strict';
  const S = window.Stratascope = window.Stratascope || {};
  S.views = S.views || {};
  const SVGNS = 'http://www.w3.org/2000/svg';

  function setAttrs(e, attrs) {
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === undefined || v === null) continue;
      if (k === 'text') e.textContent = String(v);
      else if (k === 'class') e.setAttribute('class', v);
      else if (k.startsWith('on')) { if (typeof v === 'function') e.addEventListener(k.slice(2), v); }
      else e.setAttribute(k, String(v));
    }
    return e;
  }
  S.el = function (tag, attrs, children) {
    const e = setAttrs(document.createElement(tag), attrs);
    for (const c of children || []) if (c) e.appendChild(typeof c === 'string' ? document.createTextNode(c) : c);
    return e;
  };
  S.svg = function (tag, attrs, children) {
    const e = setAttrs(document.createElementNS(SVGNS, tag), attrs);
    for (const c of children || []) if (c) e.appendChild(c);
    return e;
  };
  /* Plotly renders a little HTML in its strings; entities keep store text literal there. */
  S.ptext = s => String(s).replace(/&/g, '&amp;').replace(/</g, '&lt;').replace(/>/g, '&gt;');
  S.short = (s, n) => (s.length > n ? s.slice(0, n - 1) + '…' : s);
  /* The twin of render.token_label: space ␣, newline ↵, tab ⇥, carriage return ␍, any other control,
     format (zero-width, BOM, bidi), lone surrogate or Unicode space as ⟨U+XXXX⟩; the empty token ∅. */
  const SYMBOLS = {' ': '␣', '\n': '↵', '\t': '⇥', '\r': '␍'};
  const INVISIBLE = /^[\p{Cc}\p{Cf}\p{Cs}\p{Zs}\p{Zl}\p{Zp}]$/u;
  S.tokenLabel = function (token) {
    const s = String(token);
    if (!s) return '∅';
    let out = '';
    for (const c of s) {
      out += SYMBOLS[c] || (INVISIBLE.test(c) ? '⟨U+' + c.codePointAt(0).toString(16).toUpperCase().padStart(4, '0') + '⟩' : c);
    }
    return out;
  };
  /* A chart's width for n columns of `most` px each plus `extra` (axes, colour bar), narrowed to fit the
     box it is in while a column keeps `least` px: short charts fit whole, long ones scroll sideways. */
  S.fitWidth = (div, n, least, most, extra) => {
    const room = (div.parentElement && div.parentElement.clientWidth) || 1200;
    return Math.max(520, Math.round(Math.min(most * n, Math.max(least * n, room - 4 - extra))) + extra);
  };
  /* A depth axis with readable integer ticks: every depth up to 12, then every 2nd, then every 5th. */
  S.depthAxis = (depths, title) => {
    const n = depths.length;
    return {title: {text: title}, tick0: 0, dtick: n <= 12 ? 1 : n <= 24 ? 2 : 5, tickformat: 'd'};
  };

  const PALETTE = ['#1f77b4', '#ff7f0e', '#2ca02c', '#d62728', '#9467bd', '#8c564b', '#e377c2', '#7f7f7f',
                   '#bcbd22', '#17becf', '#393b79', '#ad494a', '#637939', '#8c6d31', '#7b4173', '#3182bd'];
  S.headColor = h => (h < PALETTE.length ? PALETTE[h] : `hsl(${(h * 137.5) % 360},65%,42%)`);

  /* ---- data: the report looks payloads up, the app fetches them ---- */
  S.key = (endpoint, params) => endpoint + '?' + Object.keys(params).sort().map(k => k + '=' + params[k]).join('&');
  const cache = new Map();
  S.get = function (endpoint, params) {
    const key = S.key(endpoint, params);
    if (S.mode === 'report') {
      if (Object.prototype.hasOwnProperty.call(S.data, key)) return Promise.resolve(S.data[key]);
      const what = Object.entries(params).map(([k, v]) => k + ' ' + v).join(', ');
      return Promise.reject(new Error(`${what} is not in this report. ${S.meta.included_note || ''}`));
    }
    if (!cache.has(key)) {
      if (cache.size > 64) cache.delete(cache.keys().next().value);
      cache.set(key, fetch('/api/' + endpoint + '?' + new URLSearchParams(params)).then(r => r.json().then(j => {
        if (!r.ok) throw new Error(j.error || ('HTTP ' + r.status));
        return j;
      })));
      cache.get(key).catch(() => cache.delete(key));
    }
    return cache.get(key);
  };

  /* ---- saving: SVG as written, PNG through a canvas; plotly charts through Plotly.downloadImage ---- */
  function download(href, name) {
    const a = S.el('a', {href: href, download: name});
    document.body.appendChild(a); a.click(); a.remove();
  }
  function serialize(svg) {
    const clone = svg.cloneNode(true);
    clone.setAttribute('xmlns', SVGNS);
    return new XMLSerializer().serializeToString(clone);
  }
  S.saveSvg = (svg, name) => download('data:image/svg+xml;charset=utf-8,' + encodeURIComponent(serialize(svg)), name + '.svg');
  S.savePng = function (svg, name) {
    const w = +svg.getAttribute('width'), h = +svg.getAttribute('height'), scale = 2;
    const img = new Image();
    img.onload = () => {
      const c = S.el('canvas', {width: w * scale, height: h * scale});
      const g = c.getContext('2d');
      g.fillStyle = '#fff'; g.fillRect(0, 0, c.width, c.height);
      g.drawImage(img, 0, 0, c.width, c.height);
      download(c.toDataURL('image/png'), name + '.png');
    };
    img.src = 'data:image/svg+xml;charset=utf-8,' + encodeURIComponent(serialize(svg));
  };
  S.saveButtons = (getSvg, name) => S.el('span', {class: 'ss-save'}, [
    S.el('button', {class: 'ss-save-svg', text: 'Save SVG', onclick: () => S.saveSvg(getSvg(), name())}),
    S.el('button', {class: 'ss-save-png', text: 'Save PNG', onclick: () => S.savePng(getSvg(), name())})]);
  S.plotlyConfig = name => ({
    displaylogo: false, responsive: true, toImageButtonOptions: {format: 'png', filename: name, scale: 2},
    modeBarButtonsToAdd: [{name: 'Download plot as SVG', icon: window.Plotly.Icons.camera,
                           click: gd => window.Plotly.downloadImage(gd, {format: 'svg', filename: name})}]});
  S.plotlyButtons = (gd, name) => S.el('span', {class: 'ss-save'}, [
    S.el('button', {class: 'ss-save-svg', text: 'Save SVG', onclick: () => window.Plotly.downloadImage(gd, {format: 'svg', filename: name()})}),
    S.el('button', {class: 'ss-save-png', text: 'Save PNG', onclick: () => window.Plotly.downloadImage(gd, {format: 'png', filename: name(), scale: 2})})]);
  S.fileName = (...parts) => [S.meta.store.replace(/[^\w.-]+/g, '_')].concat(parts.filter(p => p !== null && p !== '')).join('_');

  /* ---- controls ---- */
  S.select = function (cls, label, options, value, onchange) {
    const sel = S.el('select', {class: cls, 'aria-label': label, onchange: () => onchange(sel.value)});
    for (const [v, text] of options) sel.appendChild(S.el('option', {value: v, text: text}));
    sel.value = String(value);
    return S.el('label', {class: 'ss-control'}, [label + ' ', sel]);
  };
  /* The lens the lens views read out through: the state's if the run stores it, else the first stored
     (logit before tuned). The toggle shows when both are stored; a tuned-only run names its lens. */
  S.lensKind = st => {
    const kinds = S.meta.lens_kinds && S.meta.lens_kinds.length ? S.meta.lens_kinds : ['logit'];
    return kinds.includes(st.lens) ? st.lens : kinds[0];
  };
  S.lensParams = st => ({prompt: st.prompt, lens: S.lensKind(st)});
  S.lensToggle = function (st) {
    const kinds = S.meta.lens_kinds || [], current = S.lensKind(st);
    if (kinds.length < 2) return current === 'logit' ? null : S.el('span', {class: 'ss-control', text: current + ' lens'});
    return S.el('span', {class: 'ss-control ss-lens', role: 'group', 'aria-label': 'lens'}, ['Lens '].concat(kinds.map(k =>
      S.el('button', {class: 'ss-lens-toggle', 'data-lens': k, 'aria-pressed': k === current,
                      title: k === 'tuned' ? 'each depth read through its tuned-lens translator' : 'final norm and unembedding',
                      text: k, onclick: () => S.set({lens: k})}))));
  };
  S.positionOptions = d => d.labels.map((l, i) => [i, i + ': ' + S.short(l, 30)]);
  S.clampPosition = (d, p) => {
    const v = p === undefined || p === null || p === '' ? d.n - 1 : +p;
    return v < 0 ? Math.max(0, d.n + v) : Math.min(v, d.n - 1);
  };

  /* ---- colours and token layout shared by the text views (saliency, NMF) and the neuron view ---- */
  S.rgba = (hex, a) => `rgba(${parseInt(hex.slice(1, 3), 16)},${parseInt(hex.slice(3, 5), 16)},${parseInt(hex.slice(5, 7), 16)},${Math.max(0, Math.min(1, a)).toFixed(3)})`;
  /* Diverging: orange for positive, blue for negative, opacity = |v| / max. */
  S.diverging = (v, max) => (max > 0 ? (v >= 0 ? S.rgba('#e6550d', v / max) : S.rgba('#3182bd', -v / max)) : 'rgba(0,0,0,0)');
  S.TEXT_FONT = 'DejaVu Sans Mono, Menlo, Consolas, monospace';
  /* Token boxes laid out left to right, wrapping at width W: [{x, y, w}], and the rows used.
     opts.gapBefore: an index before which a gap of opts.gap is left (where a marker is drawn). */
  S.flowBoxes = function (labels, W, opts) {
    const o = Object.assign({rowh: 26, char: 7.3, pad: 8, max: 30, gapBefore: -1, gap: 0}, opts || {});
    const boxes = [];
    let x = o.pad, row = 0;
    labels.forEach((label, i) => {
      if (i === o.gapBefore) x += o.gap;
      const w = S.short(label, o.max).length * o.char + 8;
      if (x + w > W - o.pad && x > o.pad) { x = o.pad; row++; }
      boxes.push({x: x, y: o.pad + row * o.rowh, w: w, h: o.rowh - 4});
      x += w + 3;
    });
    return {boxes: boxes, height: 2 * o.pad + (row + 1) * o.rowh};
  };
  /* A horizontal colour legend: gradient from `stops` with a caption; returns the <g>. */
  // Gradient ids are document-wide: a prefix per namespace keeps two notebook widgets' legends apart.
  const GRADIENT = 'ss-grad-' + Math.random().toString(36).slice(2, 8) + '-';
  let gradients = 0;
  S.legend = function (svg, x, y, stops, caption) {
    const id = GRADIENT + (++gradients), grad = S.svg('linearGradient', {id: id});
    stops.forEach(([o, c]) => grad.appendChild(S.svg('stop', {offset: o, 'stop-color': c})));
    const text = S.svg('text', {x: x + 210, y: y + 9, class: 'ss-legend-text', 'font-size': 11, text: caption});
    const g = S.svg('g', {class: 'ss-legend'}, [S.svg('defs', {}, [grad]),
      S.svg('rect', {x: x, y: y, width: 200, height: 10, fill: `url(#${id})`, stroke: '#999'}), text]);
    svg.appendChild(g);
    g.caption = text;
    return g;
  };

  /* ---- attention lines (head view and model view detail), BertViz style ---- */
  const ROW = 20, PAD = 10, GAP = 200, CHAR = 7.3;
  S.attentionSvg = function (d, opts) {
    // opts: {heads: Set of visible heads, segment: 'all' | 'AA' | 'AB' | 'BA' | 'BB'}; hovering a
    // label keeps only the lines from (left) or to (right) that token. Keys other than the queries
    // (an encoder-decoder run's cross-attention: decoder tokens -> source tokens) come as d.key_labels.
    const side = {q: {labels: d.labels, tokens: d.tokens, generated: d.generated},
                  k: d.key_labels ? {labels: d.key_labels, tokens: d.key_tokens, generated: d.key_generated}
                                  : {labels: d.labels, tokens: d.tokens, generated: d.generated}};
    const width = Math.min(24, Math.max(4, ...side.q.labels.concat(side.k.labels).map(l => l.length))) * CHAR + 12;
    const HEAD = d.stack ? ROW : 0;  // encoder-decoder runs: each side is headed by its stack
    const W = 2 * width + GAP, H = Math.max(side.q.labels.length, side.k.labels.length) * ROW + 2 * PAD + HEAD;
    const svg = S.svg('svg', {width: W, height: H, class: 'ss-attn-svg', 'font-family': 'DejaVu Sans Mono, Menlo, Consolas, monospace',
                              'font-size': 12, viewBox: `0 0 ${W} ${H}`});
    svg.appendChild(S.svg('rect', {x: 0, y: 0, width: W, height: H, fill: '#fff'}));
    const lines = S.svg('g', {class: 'ss-lines'});
    svg.appendChild(lines);
    const y = i => PAD + HEAD + i * ROW + ROW / 2;
    if (d.stack) {
      const names = {encoder: ['source', 'source'], decoder: ['target', 'target'], cross: ['target', 'source']}[d.stack];
      svg.appendChild(S.svg('text', {x: width - 4, y: PAD + 10, 'text-anchor': 'end', 'font-weight': 'bold', class: 'ss-side-head', text: names[0]}));
      svg.appendChild(S.svg('text', {x: width + GAP + 4, y: PAD + 10, 'font-weight': 'bold', class: 'ss-side-head', text: names[1]}));
    }
    let hover = null;
    const labels = {q: [], k: []};
    for (const s of ['q', 'k']) {
      side[s].labels.forEach((label, i) => {
        const t = S.svg('text', {x: s === 'q' ? width - 4 : width + GAP + 4, y: y(i) + 4, class: 'ss-tok ss-tok-' + s,
                                 'text-anchor': s === 'q' ? 'end' : 'start', 'data-i': i, fill: side[s].generated[i] ? '#8a4b00' : '#222'});
        t.textContent = S.short(label, 24);
        t.appendChild(S.svg('title')).textContent = `${i}: ${JSON.stringify(side[s].tokens[i])}`;
        t.addEventListener('mouseenter', () => { hover = {side: s, i: i}; draw(); });
        t.addEventListener('mouseleave', () => { hover = null; draw(); });
        labels[s].push(t);
        svg.appendChild(t);
      });
    }
    const seg = d.segments;
    const keep = (q, k) => {
      if (hover && ((hover.side === 'q' && q !== hover.i) || (hover.side === 'k' && k !== hover.i))) return false;
      if (!seg || !opts.segment || opts.segment === 'all') return true;
      return (seg[q] ? 'B' : 'A') + (seg[k] ? 'B' : 'A') === opts.segment;
    };
    function draw() {
      lines.replaceChildren();
      for (const side of ['q', 'k']) labels[side].forEach((t, i) => t.setAttribute('font-weight', hover && hover.side === side && hover.i === i ? 'bold' : 'normal'));
      for (let h = 0; h < d.heads.length; h++) {
        if (!opts.heads.has(h)) continue;
        const {q, k, w} = d.heads[h], color = S.headColor(h);
        for (let j = 0; j < q.length; j++) {
          if (!keep(q[j], k[j])) continue;
          lines.appendChild(S.svg('line', {x1: width, y1: y(q[j]), x2: width + GAP, y2: y(k[j]), stroke: color,
                                           'stroke-width': 2, 'stroke-opacity': w[j], class: 'ss-line',
                                           'data-h': h, 'data-q': q[j], 'data-k': k[j]}));
        }
      }
    }
    draw();
    svg.redraw = draw;
    return svg;
  };
  /* Encoder-decoder runs: which attention the head and model views draw, and the payload for it. */
  const STACK_TITLES = {encoder: 'encoder (source → source)', decoder: 'decoder (target → target)',
                        cross: 'cross (target → source)'};
  S.stackSelect = function (ctx) {
    const stacks = ctx.meta.stacks;
    if (!stacks) return null;
    return S.select('ss-stack', 'Attention', stacks.map(s => [s, STACK_TITLES[s] || s]), S.stackOf(ctx), v => ctx.set({stack: v}));
  };
  S.stackOf = ctx => (ctx.meta.stacks ? (ctx.meta.stacks.includes(ctx.state.stack) ? ctx.state.stack : ctx.meta.stacks[0]) : null);
  S.getAttention = function (ctx, layer) {
    const stack = S.stackOf(ctx), p = {prompt: ctx.state.prompt, layer: layer};
    return stack ? ctx.get('attention_stack', Object.assign(p, {stack: stack})) : ctx.get('attention', p);
  };
  S.headToggles = function (nHeads, visible, onchange) {
    const box = S.el('div', {class: 'ss-heads', role: 'group', 'aria-label': 'heads'});
    for (let h = 0; h < nHeads; h++) {
      const b = S.el('button', {class: 'ss-head-toggle', 'data-head': h, 'aria-pressed': visible.has(h),
                                title: 'click: show/hide head ' + h + '; double-click: only this head',
                                style: `--head:${S.headColor(h)}`, text: 'head ' + h});
      b.addEventListener('click', () => { visible.has(h) ? visible.delete(h) : visible.add(h); sync(); });
      b.addEventListener('dblclick', () => { visible.clear(); visible.add(h); sync(); });
      box.appendChild(b);
    }
    const sync = () => { box.querySelectorAll('button').forEach((b, h) => b.setAttribute('aria-pressed', visible.has(h))); onchange(); };
    return box;
  };

  /* ---- state and layout ---- */
  function readHash() {
    const p = new URLSearchParams(location.hash.slice(1)), st = {};
    for (const [k, v] of p) st[k] = v;
    return st;
  }
  S.set = function (patch) {
    Object.assign(S.state, patch);
    for (const k of Object.keys(S.state)) if (S.state[k] === null || S.state[k] === undefined) delete S.state[k];
    history.replaceState(null, '', '#' + new URLSearchParams(S.state));
    render();
  };
  /* Keep a setting (e.g. visible heads) in the state and URL without redrawing. */
  S.remember = function (patch) {
    Object.assign(S.state, patch);
    history.replaceState(null, '', '#' + new URLSearchParams(S.state));
  };
  let renderCount = 0;
  function render() {
    const mine = ++renderCount, st = S.state, view = S.views[st.view];
    document.querySelectorAll('.ss-tab').forEach(t => t.setAttribute('aria-selected', t.dataset.view === st.view));
    const promptSel = document.getElementById('ss-prompt');
    if (promptSel && promptSel.value !== String(st.prompt)) promptSel.value = st.prompt;
    const info = S.meta.views.find(v => v.name === st.view);
    // Corpus-wide views (heads map, bias, probe) do not depend on a prompt: no prompt picker on them.
    if (promptSel) promptSel.closest('.ss-control').hidden = !!info && info.prompt === false;
    const box = document.getElementById('ss-view');
    box.replaceChildren();
    box.removeAttribute('data-ready');
    box.setAttribute('data-view', st.view);
    if (info) box.appendChild(S.el('p', {class: 'ss-desc', text: info.title + ': ' + info.description}));
    const body = S.el('div', {class: 'ss-body'});
    box.appendChild(body);
    if (!view) { body.appendChild(S.el('p', {class: 'ss-error', text: 'unknown view ' + st.view})); return; }
    if (info && !info.available) {  // a link to a view this run cannot show says why, instead of another view
      body.appendChild(S.el('p', {class: 'ss-notice ss-unavailable', text: `${info.title} cannot be shown: ${info.reason}.`}));
      box.setAttribute('data-ready', '1');
      return;
    }
    const ctx = {meta: S.meta, state: st, get: S.get, set: S.set, stale: () => mine !== renderCount};
    Promise.resolve().then(() => view.render(body, ctx)).then(() => {
      if (mine === renderCount) box.setAttribute('data-ready', '1');
    }).catch(err => {
      if (mine !== renderCount) return;
      body.replaceChildren(S.el('p', {class: 'ss-error', text: String(err && err.message ? err.message : err)}));
      box.setAttribute('data-ready', 'error');
    });
  }
  function promptControl() {
    const m = S.meta;
    if (m.prompt_list) {
      return S.select('ss-prompt-select', 'Prompt', m.prompt_list.map(p => [p.index, `${p.index}: ${S.short(p.preview, 60)} (${p.n_tokens} tokens)`]),
                      S.state.prompt, v => S.set({prompt: +v, position: null, target: null}));
    }
    const input = S.el('input', {type: 'number', min: 0, max: m.n_prompts - 1, value: S.state.prompt, class: 'ss-prompt-select'});
    input.addEventListener('change', () => S.set({prompt: Math.max(0, Math.min(m.n_prompts - 1, +input.value || 0)), position: null, target: null}));
    return S.el('label', {class: 'ss-control'}, [`Prompt (0-${m.n_prompts - 1}) `, input]);
  }
  S.boot = function () {
    S.meta = JSON.parse(document.getElementById('ss-meta').textContent);
    const dataEl = document.getElementById('ss-data');
    S.data = dataEl ? JSON.parse(dataEl.textContent) : {};
    S.mode = S.meta.mode;
    const available = S.meta.views.filter(v => v.available && S.views[v.name]);
    const st = Object.assign({}, S.meta.start || {}, readHash());
    const known = S.meta.views.some(v => v.name === st.view && S.views[v.name]);  // unavailable ones say why
    if (!known) st.view = available.length ? available[0].name : 'tokens';
    const first = S.meta.prompt_list && S.meta.prompt_list.length ? S.meta.prompt_list[0].index : 0;
    st.prompt = st.prompt === undefined ? first : +st.prompt;
    if (st.layer === undefined && S.meta.layers.length) st.layer = S.meta.layers[0];
    S.state = st;
    const root = document.getElementById('ss-root');
    const tabs = S.el('nav', {class: 'ss-tabs', role: 'tablist'});
    for (const v of S.meta.views) {
      tabs.appendChild(S.el('button', {class: 'ss-tab', role: 'tab', 'data-view': v.name, text: v.title,
                                       title: v.available ? v.description : v.reason, disabled: v.available ? null : '',
                                       onclick: () => S.set({view: v.name})}));
    }
    root.append(tabs, S.el('div', {class: 'ss-controls', id: 'ss-controls'}, [promptControl()]),
                S.el('section', {id: 'ss-view', class: 'ss-view'}));
    const sel = root.querySelector('.ss-prompt-select');
    sel.id = 'ss-prompt';
    render();
  };
  // A page (report, app) boots from its #ss-meta; a notebook widget (widget.js) drives the views itself.
  const boot = () => { if (document.getElementById('ss-meta')) S.boot(); };
  if (document.readyState === 'loading') document.addEventListener('DOMContentLoaded', boot);
  else setTimeout(boot);
})();
