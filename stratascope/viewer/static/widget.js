/* stratascope notebook widget: an anywidget front-end module (export default {render}).
   widget.py puts core.js and the view's renderer inside makeStratascope() ahead of this code (and
   plotly.js first, for the views that draw with it), so every widget view gets a Stratascope
   namespace of its own: several widgets share a notebook page without sharing meta or state.
   The renderers are the report's and the app's; where the app fetches /api/<endpoint>, ctx.get here
   sends the kernel a custom message and the widget answers with the same data function. */

const TIMEOUT_MS = 120000;  // a slice the kernel has not answered by then is reported, not awaited forever
const SVGNS = 'http://www.w3.org/2000/svg';

function svgText(svg) {
  const clone = svg.cloneNode(true);
  clone.setAttribute('xmlns', SVGNS);
  return new XMLSerializer().serializeToString(clone);
}

function dataUrlText(url) {
  const comma = url.indexOf(',');
  const head = url.slice(0, comma), body = url.slice(comma + 1);
  return head.endsWith(';base64') ? atob(body) : decodeURIComponent(body);
}

function render({ model, el }) {
  const S = makeStratascope();
  const meta = model.get('meta');
  S.meta = meta;
  S.mode = 'widget';
  const info = meta.views[0];
  const tag = Math.random().toString(36).slice(2);  // message ids of this view (a widget may be shown twice)
  let state = Object.assign({}, model.get('state'));
  if (state.layer === undefined && meta.layers.length) state.layer = meta.layers[0];

  /* ---- slices from the kernel ---- */
  const pending = new Map(), cache = new Map();
  let seq = 0;
  function get(endpoint, params) {
    const key = S.key(endpoint, params);
    if (!cache.has(key)) {
      if (cache.size >= 32) cache.delete(cache.keys().next().value);
      const id = tag + ':' + (++seq);
      const answer = new Promise((resolve, reject) => {
        const timer = setTimeout(() => {
          pending.delete(id);
          reject(new Error(`the kernel did not answer for ${endpoint} in ${TIMEOUT_MS / 1000} s; is it still running?`));
        }, TIMEOUT_MS);
        pending.set(id, {resolve: resolve, reject: reject, timer: timer});
      });
      cache.set(key, answer);
      answer.catch(() => cache.delete(key));
      model.send({type: 'get', id: id, endpoint: endpoint, params: params});
    }
    return cache.get(key);
  }
  function onMessage(msg) {
    const waiting = msg && pending.get(msg.id);
    if (!waiting) return;
    pending.delete(msg.id);
    clearTimeout(waiting.timer);
    if (msg.type === 'data') waiting.resolve(msg.data);
    else waiting.reject(new Error(msg.error || 'the kernel could not read this slice'));
  }
  model.on('msg:custom', onMessage);

  /* ---- state: kept in the model (Python reads w.state), never in the page's URL ---- */
  let local = false;
  function commit() {
    local = true;
    model.set('state', Object.assign({}, state));
    local = false;
    model.save_changes();
  }
  S.set = function (patch) {
    Object.assign(state, patch);
    for (const k of Object.keys(state)) if (state[k] === null || state[k] === undefined) delete state[k];
    commit();
    draw();
  };
  S.remember = function (patch) {  // a setting that needs no redraw (visible heads)
    Object.assign(state, patch);
    commit();
    pushDrawing();
  };
  function onState() {  // set from Python (w.state = ...) or by another view of this widget
    if (local) return;
    state = Object.assign({}, model.get('state'));
    draw();
  }
  model.on('change:state', onState);

  /* ---- what w.save("x.svg") writes: the drawing the view's first Save SVG button saves ---- */
  let drawings = [];
  const saveButtons = S.saveButtons, plotlyButtons = S.plotlyButtons;
  S.saveButtons = (getSvg, name) => { drawings.push({svg: getSvg}); return saveButtons(getSvg, name); };
  S.plotlyButtons = (gd, name) => { drawings.push({plot: gd}); return plotlyButtons(gd, name); };
  let pushTimer = null, pushes = 0;
  function pushDrawing() {
    clearTimeout(pushTimer);
    pushTimer = setTimeout(() => {
      const first = drawings[0], drawn = Object.assign({}, state);
      const text = !first ? Promise.resolve(null)
        : first.svg ? Promise.resolve(svgText(first.svg()))
          : window.Plotly.toImage(first.plot, {format: 'svg'}).then(dataUrlText);
      text.then(svg => model.send({type: 'svg', svg: svg, state: drawn}))
        .catch(err => model.send({type: 'svg', svg: null, state: drawn, error: String(err && err.message ? err.message : err)}))
        .then(() => box.setAttribute('data-drawn', String(++pushes)));  // the kernel has what w.save("x.svg") writes
    }, 300);
  }

  /* ---- layout: a title line, the prompt picker (views of one prompt), the view ---- */
  el.classList.add('ss-widget');
  const m = meta.model;
  const title = S.el('div', {class: 'ss-widget-head'}, [
    S.el('b', {text: info.title}), ` · ${meta.store} · ${m.name} · ${m.n_layers} layers · ${m.n_heads} heads · ` +
    `${meta.n_prompts} prompts · ${meta.n_tokens} tokens`]);
  const controls = S.el('div', {class: 'ss-controls'});
  const box = S.el('section', {class: 'ss-view', 'data-view': info.name});
  el.append(title, controls, box);
  let promptInput = null;
  if (info.prompt !== false) {
    if (meta.prompt_list) {
      const label = S.select('ss-prompt-select', 'Prompt', meta.prompt_list.map(p => [p.index, `${p.index}: ${S.short(p.preview, 60)} (${p.n_tokens} tokens)`]),
                             state.prompt, v => S.set({prompt: +v, position: null, target: null}));
      promptInput = label.querySelector('select');
      controls.appendChild(label);
    } else {
      promptInput = S.el('input', {type: 'number', min: 0, max: meta.n_prompts - 1, value: state.prompt, class: 'ss-prompt-select'});
      promptInput.addEventListener('change', () => S.set({prompt: Math.max(0, Math.min(meta.n_prompts - 1, +promptInput.value || 0)),
                                                          position: null, target: null}));
      controls.appendChild(S.el('label', {class: 'ss-control'}, [`Prompt (0-${meta.n_prompts - 1}) `, promptInput]));
    }
  }

  let renders = 0;
  function draw() {
    const mine = ++renders, view = S.views[info.name];
    if (promptInput && promptInput.value !== String(state.prompt)) promptInput.value = state.prompt;
    drawings = [];
    box.replaceChildren(S.el('p', {class: 'ss-desc', text: info.title + ': ' + info.description}));
    box.removeAttribute('data-ready');
    const body = S.el('div', {class: 'ss-body'});
    box.appendChild(body);
    const ctx = {meta: meta, state: state, get: get, set: S.set, stale: () => mine !== renders};
    Promise.resolve().then(() => view.render(body, ctx)).then(() => {
      if (mine !== renders) return;
      box.setAttribute('data-ready', '1');
      pushDrawing();
    }).catch(err => {
      if (mine !== renders) return;
      body.replaceChildren(S.el('p', {class: 'ss-error', text: String(err && err.message ? err.message : err)}));
      box.setAttribute('data-ready', 'error');
    });
  }
  draw();

  return () => {
    model.off('msg:custom', onMessage);
    model.off('change:state', onState);
    clearTimeout(pushTimer);
    for (const waiting of pending.values()) clearTimeout(waiting.timer);
    pending.clear();
  };
}

export default { render };
