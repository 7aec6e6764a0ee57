// ulan's web page: the running lab as a graph, kept current from
// /v1/events, changed through the same API the CLI uses (one call per
// action; an error is shown as the API words it).
'use strict';

const $ = (id) => document.getElementById(id);
const state = {
  graph: null,
  captures: [],
  selected: null,
  first: true,
  statsTimer: null,
  refreshTimer: null,
  errTimer: null,
  term: null,
  ws: null,
  panelKey: null,
};

// One API call. Errors carry the API's message and code.
async function api(method, path, body) {
  const opt = { method, headers: {}, credentials: 'same-origin' };
  if (body !== undefined) {
    opt.headers['content-type'] = 'application/json';
    opt.body = JSON.stringify(body);
  }
  const r = await fetch(path, opt);
  const text = await r.text();
  let v = null;
  if (text.trim()) {
    try { v = JSON.parse(text); } catch (_) { v = text; }
  }
  if (!r.ok) {
    const msg = v && v.error ? v.error.message : `${r.status} ${r.statusText}`;
    const err = new Error(msg);
    err.code = v && v.error ? v.error.code : String(r.status);
    throw err;
  }
  return v;
}

function showError(e) {
  const t = $('error');
  t.textContent = e && e.message ? e.message : String(e);
  t.dataset.code = (e && e.code) || '';
  t.classList.remove('hidden');
  clearTimeout(state.errTimer);
  state.errTimer = setTimeout(() => t.classList.add('hidden'), 10000);
}

async function act(fn) {
  try {
    const r = await fn();
    $('error').classList.add('hidden');
    refreshSoon();
    return r;
  } catch (e) {
    showError(e);
    return undefined;
  }
}

const enc = encodeURIComponent;

// ---- the graph ----

const STATE_COLOURS = {
  running: '#2e8b57', starting: '#e1b12c', stopping: '#e1b12c',
  stopped: '#9aa1ad', crashed: '#c0392b',
};

const cy = cytoscape({
  container: $('graph'),
  minZoom: 0.2,
  maxZoom: 3,
  style: [
    { selector: 'node', style: {
      label: 'data(label)', 'text-wrap': 'wrap', 'text-valign': 'center', 'text-halign': 'center',
      'font-size': 11, color: '#fff', 'text-outline-width': 0,
    } },
    { selector: 'node[role="lan"]', style: {
      shape: 'ellipse', width: 90, height: 46, 'background-color': '#3b6fb6',
    } },
    { selector: 'node[role="node"]', style: {
      shape: 'round-rectangle', width: 96, height: 46, 'background-color': '#9aa1ad',
    } },
    { selector: 'node[role="port"]', style: {
      shape: 'diamond', width: 34, height: 34, 'background-color': '#6b7385',
      color: '#1d2330', 'text-valign': 'bottom', 'text-margin-y': 4,
    } },
    { selector: 'node[role="port"][state="up"]', style: { 'background-color': '#2e8b57' } },
    { selector: 'edge', style: {
      width: 2, 'line-color': '#6b7385', 'curve-style': 'bezier', label: 'data(port)',
      'font-size': 9, 'text-rotation': 'autorotate', 'text-background-color': '#fff',
      'text-background-opacity': 0.8,
    } },
    { selector: 'edge[?up]', style: { 'line-color': '#2e8b57' } },
    { selector: 'edge[link="down"]', style: { 'line-style': 'dashed', 'line-color': '#c0392b' } },
    { selector: 'edge[?impaired]', style: { 'line-color': '#e67e22', width: 3 } },
    { selector: 'edge[?capturing]', style: { 'target-arrow-shape': 'none', 'line-outline-width': 0, width: 5 } },
    { selector: ':selected', style: { 'border-width': 3, 'border-color': '#f1c40f', 'line-color': '#f1c40f' } },
  ],
});
for (const [s, c] of Object.entries(STATE_COLOURS)) {
  cy.style().selector(`node[role="node"][state="${s}"]`).style('background-color', c).update();
}

function label(v) {
  if (v.role === 'node') return `${v.name}\n${v.kind || ''} · ${v.state || ''}`;
  if (v.role === 'port') return `${v.name}\n${v.kind || ''}`;
  return v.name;
}

function capturing(kind, name) {
  return state.captures.some((c) => c.state === 'running' && c.of === kind && c.name === name);
}

function applyGraph(g) {
  state.graph = g;
  $('lab-name').textContent = g.lab;
  const want = new Map();
  for (const v of g.vertices) {
    want.set(v.id, { group: 'nodes', data: { ...v, label: label(v), capturing: capturing(v.role, v.name) } });
  }
  for (const e of g.edges) {
    const id = `edge:${e.port}`;
    want.set(id, { group: 'edges', data: { ...e, id, capturing: capturing('port', e.port) } });
  }
  const added = [];
  cy.batch(() => {
    cy.elements().forEach((el) => { if (!want.has(el.id())) el.remove(); });
    for (const [id, el] of want) {
      if (el.group !== 'nodes') continue;
      const cur = cy.getElementById(id);
      if (cur.empty()) added.push(cy.add(el)); else cur.data(el.data);
    }
    for (const [id, el] of want) {
      if (el.group !== 'edges') continue;
      const cur = cy.getElementById(id);
      if (!cur.empty() && (cur.data('source') !== el.data.source || cur.data('target') !== el.data.target)) {
        cur.remove();
      }
      if (cy.getElementById(id).empty()) cy.add(el); else cur.data(el.data);
    }
  });
  if (state.first && g.vertices.length > 0) {
    state.first = false;
    cy.layout({ name: 'cose', animate: false, padding: 40, nodeRepulsion: () => 9000 }).run();
  } else {
    // New things go to a free spot next to what they connect to; what the
    // user arranged stays.
    const ext = cy.extent();
    const placed = cy.nodes().filter((m) => !added.includes(m)).map((m) => m.position());
    for (const n of added) {
      const nb = n.neighborhood('node').filter((m) => !added.includes(m));
      const base = nb.nonempty() ? nb.first().position() : { x: (ext.x1 + ext.x2) / 2, y: (ext.y1 + ext.y2) / 2 };
      n.position(freeSpot(base, placed));
      placed.push(n.position());
    }
  }
  renderDetails();
}

// The first point on a spiral around `base` at least 120 px from every
// point in `taken`.
function freeSpot(base, taken) {
  for (let i = 1; i < 400; i++) {
    const a = i * 0.7;
    const r = 60 + 12 * i;
    const p = { x: base.x + r * Math.cos(a), y: base.y + r * Math.sin(a) };
    if (taken.every((q) => Math.hypot(q.x - p.x, q.y - p.y) >= 120)) return p;
  }
  return { x: base.x + 150, y: base.y };
}

async function refresh() {
  try {
    const [g, caps] = await Promise.all([api('GET', '/v1/lab/graph'), api('GET', '/v1/captures')]);
    state.captures = caps || [];
    applyGraph(g);
  } catch (e) {
    setStatus(false, e.message);
  }
}

function refreshSoon() {
  clearTimeout(state.refreshTimer);
  state.refreshTimer = setTimeout(refresh, 30);
}

function setStatus(on, why) {
  const s = $('status');
  s.textContent = on ? 'live' : `disconnected${why ? ': ' + why : ''}`;
  s.className = `status ${on ? 'on' : 'off'}`;
}

const EVENTS = ['hello', 'lan_added', 'lan_removed', 'port_added', 'port_removed', 'port_moved',
  'port_up', 'port_down', 'node_added', 'node_removed', 'node_state', 'lagged'];

function connectEvents() {
  const es = new EventSource('/v1/events');
  es.onopen = () => setStatus(true);
  es.onerror = () => setStatus(false);
  for (const n of EVENTS) es.addEventListener(n, refreshSoon);
}

// ---- selection and the details panel ----

cy.on('tap', 'node, edge', (ev) => { state.selected = ev.target.id(); renderDetails(true); });
cy.on('tap', (ev) => { if (ev.target === cy) { state.selected = null; renderDetails(true); } });

// Drop a node or a plain port on a lan: connect it (a node's first NIC on
// no lan; a plain port moves).
cy.on('dragfree', 'node[role="node"], node[role="port"]', (ev) => {
  const n = ev.target;
  const p = n.position();
  const lan = cy.nodes('[role="lan"]').filter((l) => {
    const b = l.boundingBox();
    return p.x >= b.x1 - 20 && p.x <= b.x2 + 20 && p.y >= b.y1 - 20 && p.y <= b.y2 + 20;
  }).first();
  if (lan.empty()) return;
  n.position({ x: p.x + 110, y: p.y + 40 });
  connectTo(n.data(), lan.data('name'));
});

async function connectTo(v, lan) {
  if (v.role === 'port') {
    return act(() => api('PATCH', `/v1/ports/${enc(v.name)}`, { lan }));
  }
  const onLan = new Set(state.graph.edges.filter((e) => e.source === v.id).map((e) => e.port));
  const free = (v.ports || []).find((p) => !onLan.has(p));
  if (!free) {
    showError(new Error(`node ${v.name} has no NIC on no lan: move one in its panel`));
    return undefined;
  }
  return act(() => api('PATCH', `/v1/ports/${enc(free)}`, { lan }));
}

function el(tag, attrs, ...kids) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k.startsWith('on')) e.addEventListener(k.slice(2), v); else e.setAttribute(k, v);
  }
  for (const k of kids) e.append(k instanceof Node ? k : document.createTextNode(String(k)));
  return e;
}

function button(text, fn, cls) {
  return el('button', { type: 'button', class: cls || '', onclick: fn }, text);
}

function lanSelect(current, onchange, id) {
  const s = el('select', id ? { id } : {});
  s.append(el('option', { value: '' }, '(no lan)'));
  for (const v of (state.graph ? state.graph.vertices : [])) {
    if (v.role !== 'lan') continue;
    const o = el('option', { value: v.name }, v.name);
    if (v.name === current) o.selected = true;
    s.append(o);
  }
  if (!current) s.value = '';
  s.addEventListener('change', () => onchange(s.value || null));
  return s;
}

function table(rows) {
  const t = el('table');
  for (const r of rows) t.append(el('tr', {}, ...r.map((c, i) => el(i === 0 ? 'th' : 'td', {}, c))));
  return t;
}

function portOf(name) {
  return state.graph.edges.find((e) => e.port === name);
}

// What the panel shows depends on: the selection, the graph, the running
// captures. Redrawn only when one of them changed, so a refresh does not
// wipe what someone is typing in the panel.
function panelKey() {
  const caps = state.captures.filter((c) => c.state === 'running').map((c) => c.id);
  return JSON.stringify([state.selected, state.graph, caps]);
}

function renderDetails(force) {
  const key = panelKey();
  if (!force && key === state.panelKey) return;
  state.panelKey = key;
  clearInterval(state.statsTimer);
  const d = $('details');
  const id = state.selected;
  const g = state.graph;
  if (!g || !id || cy.getElementById(id).empty()) {
    d.replaceChildren(el('p', { class: 'hint' },
      'Click a lan, node, port or link. Drag a node or a plain port onto a lan to connect it.'));
    return;
  }
  const data = cy.getElementById(id).data();
  if (id.startsWith('edge:') || data.role === 'port') {
    renderPort(d, id.startsWith('edge:') ? data.port : data.name);
  } else if (data.role === 'lan') {
    renderLan(d, data);
  } else {
    renderNode(d, data);
  }
}

function renderLan(d, v) {
  const fdb = el('div', { id: 'fdb' }, 'MAC table: loading');
  const ports = g().edges.filter((e) => e.target === v.id).map((e) => e.port);
  d.replaceChildren(
    el('h2', {}, `lan ${v.name}`),
    el('p', {}, `ports: ${ports.join(', ') || 'none'}`),
    el('div', { class: 'row' },
      captureButton('lan', v.name),
      button('Remove', () => act(() => api('DELETE', `/v1/lans/${enc(v.name)}`)), 'danger')),
    fdb,
  );
  const load = async () => {
    try {
      const f = await api('GET', `/v1/lans/${enc(v.name)}/fdb`);
      fdb.replaceChildren(el('h3', {}, 'MAC table'),
        table([['MAC', 'port', 'age (s)'], ...f.entries.map((e) => [e.mac, e.port, e.age_s.toFixed(1)])]));
    } catch (e) { fdb.textContent = e.message; }
  };
  load();
  state.statsTimer = setInterval(load, 1000);
}

function g() { return state.graph; }

function renderNode(d, v) {
  const nics = el('div', {});
  for (const p of v.ports || []) {
    const e = portOf(p);
    nics.append(el('div', { class: 'row' }, `${p}: `,
      lanSelect(e ? e.target.slice(4) : null,
        (lan) => act(() => api('PATCH', `/v1/ports/${enc(p)}`, { lan })), `nic-${p}`),
      button('details', () => { state.selected = e ? `edge:${p}` : null; renderPortPanel(p); })));
  }
  d.replaceChildren(
    el('h2', {}, `node ${v.name}`),
    table([['kind', v.kind || ''], ['state', v.state || ''], ['image', v.image || 'built-in'],
      ['memory', `${v.memory_mb || '?'} MiB`]]),
    el('h3', {}, 'NICs'), nics,
    el('div', { class: 'row' },
      button('Start', () => act(() => api('POST', `/v1/nodes/${enc(v.name)}/start`))),
      button('Stop', () => act(() => api('POST', `/v1/nodes/${enc(v.name)}/stop`))),
      button('Console', () => openConsole(v.name)),
      button('Remove', () => act(() => api('DELETE', `/v1/nodes/${enc(v.name)}`)), 'danger')),
  );
}

function renderPortPanel(name) {
  clearInterval(state.statsTimer);
  renderPort($('details'), name);
}

function captureButton(kind, name) {
  const running = state.captures.find((c) => c.state === 'running' && c.of === kind && c.name === name);
  if (running) {
    return el('span', {}, `capturing (${running.frames} frames) `,
      button('Stop capture', () => act(() => api('DELETE', `/v1/captures/${enc(running.id)}`))));
  }
  return button('Capture', async () => {
    const c = await act(() => api('POST', '/v1/captures', { [kind]: name }));
    // The pcapng stream downloads until the capture stops.
    if (c) window.open(`/v1/captures/${enc(c.id)}/stream`, '_blank');
  });
}

function renderPort(d, name) {
  const info = g().vertices.find((v) => v.id === `port:${name}`);
  const edge = portOf(name);
  const owner = g().vertices.find((v) => v.role === 'node' && (v.ports || []).includes(name));
  const stats = el('div', { id: 'port-stats' }, 'counters: loading');
  const imp = el('div', { id: 'port-impairments' });
  const link = edge ? edge.link : 'up';
  d.replaceChildren(
    el('h2', {}, `port ${name}`),
    table([['kind', (edge && edge.kind) || (info && info.kind) || ''],
      ['node', owner ? owner.name : '-'], ['link', link],
      ['client', edge ? (edge.up ? 'attached' : 'none') : (info ? info.state : '')]]),
    el('div', { class: 'row' }, 'lan: ', lanSelect(edge ? edge.target.slice(4) : null,
      (lan) => act(() => api('PATCH', `/v1/ports/${enc(name)}`, { lan })), 'port-lan-select')),
    el('div', { class: 'row' },
      button(link === 'down' ? 'Link up' : 'Link down',
        () => act(() => api('PATCH', `/v1/ports/${enc(name)}`, { link: link === 'down' ? 'up' : 'down' }))),
      captureButton('port', name),
      owner ? '' : button('Remove', () => act(() => api('DELETE', `/v1/ports/${enc(name)}`)), 'danger')),
    imp, stats,
  );
  (async () => {
    try {
      const s = await api('GET', `/v1/ports/${enc(name)}/impairments`);
      const show = (dir) => Object.entries(s[dir] || {}).map(([k, v]) => `${k}=${JSON.stringify(v)}`).join(' ') || 'none';
      const delay = el('input', { id: 'imp-delay', type: 'number', min: '0', placeholder: 'delay ms', size: '6' });
      const loss = el('input', { id: 'imp-loss', type: 'number', min: '0', max: '100', placeholder: 'loss %', size: '6' });
      imp.replaceChildren(el('h3', {}, 'Impairments'),
        table([['egress', show('egress')], ['ingress', show('ingress')]]),
        el('div', { class: 'row' }, delay, loss,
          button('Set egress', () => {
            const e = {};
            if (delay.value !== '') e.delay_ms = Number(delay.value);
            if (loss.value !== '') e.loss_pct = Number(loss.value);
            return act(() => api('PUT', `/v1/ports/${enc(name)}/impairments`, { egress: e }));
          }),
          button('Clear', () => act(() => api('DELETE', `/v1/ports/${enc(name)}/impairments`)))));
    } catch (e) { imp.textContent = e.message; }
  })();
  const load = async () => {
    try {
      const s = await api('GET', `/v1/ports/${enc(name)}/stats`);
      stats.replaceChildren(el('h3', {}, 'Counters'), table([
        ['', 'rx', 'tx'],
        ['frames', s.rx_frames, s.tx_frames],
        ['bytes', s.rx_bytes, s.tx_bytes],
        ['dropped', s.rx_dropped, s.tx_dropped],
      ]));
    } catch (e) { stats.textContent = e.message; }
  };
  load();
  state.statsTimer = setInterval(load, 1000);
}

// ---- dialogs ----

function dialog(id, onsubmit) {
  const dlg = $(id);
  dlg.querySelector('.cancel').addEventListener('click', () => dlg.close());
  dlg.querySelector('form').addEventListener('submit', (ev) => {
    ev.preventDefault();
    dlg.close();
    onsubmit();
  });
  return dlg;
}

const dlgLan = dialog('dlg-lan', () => act(() => api('POST', '/v1/lans', { name: $('lan-name').value.trim() })));
const dlgNode = dialog('dlg-node', () => {
  const spec = {
    name: $('node-name').value.trim(),
    kind: $('node-kind').value.trim() || undefined,
    memory_mb: Number($('node-memory').value) || undefined,
    nics: $('node-nics').value.split(',').map((s) => s.trim()).map((lan) => ({ lan: lan || null })),
  };
  if ($('node-nics').value.trim() === '') spec.nics = [];
  const image = $('node-image').value.trim();
  if (image) spec.image = image;
  return act(() => api('POST', '/v1/nodes', spec));
});
const dlgPort = dialog('dlg-port', () => act(() => api('POST', '/v1/ports', {
  name: $('port-name').value.trim(), kind: $('port-kind').value.trim(), lan: $('port-lan').value || null,
})));

$('btn-add-lan').addEventListener('click', () => { $('lan-name').value = ''; dlgLan.showModal(); });
$('btn-add-node').addEventListener('click', () => dlgNode.showModal());
$('btn-add-port').addEventListener('click', () => {
  $('port-lan').replaceWith(lanSelect(null, () => {}, 'port-lan'));
  dlgPort.showModal();
});
$('btn-fit').addEventListener('click', () => cy.fit(undefined, 40));
$('btn-save').addEventListener('click', () => act(async () => {
  const spec = await api('GET', '/v1/lab/spec');
  const blob = new Blob([JSON.stringify(spec, null, 2) + '\n'], { type: 'application/json' });
  const a = el('a', { href: URL.createObjectURL(blob), download: `${(state.graph && state.graph.lab) || 'lab'}.json` });
  document.body.append(a);
  a.click();
  a.remove();
}));

// ---- consoles ----

function openConsole(node) {
  closeConsole();
  $('console').classList.remove('hidden');
  $('console-title').textContent = `console: ${node}`;
  const term = new Terminal({ convertEol: false, cursorBlink: true, fontSize: 13, scrollback: 5000 });
  const fit = new FitAddon.FitAddon();
  term.loadAddon(fit);
  term.open($('term'));
  fit.fit();
  const proto = location.protocol === 'https:' ? 'wss:' : 'ws:';
  const ws = new WebSocket(`${proto}//${location.host}/ws/console/${enc(node)}`);
  ws.binaryType = 'arraybuffer';
  ws.onmessage = (ev) => term.write(typeof ev.data === 'string' ? ev.data : new Uint8Array(ev.data));
  ws.onclose = (ev) => term.write(`\r\n[console closed${ev.reason ? ': ' + ev.reason : ''}]\r\n`);
  ws.onerror = () => showError(new Error(
    `cannot open the console of ${node}: consoles need \`ulan web\` (not the Unix socket), and a running node`));
  term.onData((data) => { if (ws.readyState === WebSocket.OPEN) ws.send(data); });
  state.term = term;
  state.ws = ws;
  window.ulan.term = term;
  term.focus();
}

function closeConsole() {
  if (state.ws) state.ws.close();
  if (state.term) state.term.dispose();
  state.ws = null;
  state.term = null;
  $('console').classList.add('hidden');
}
$('console-close').addEventListener('click', closeConsole);

// For tests and the curious: the graph and the state from the console.
window.ulan = { cy, state, refresh, openConsole, term: null };

connectEvents();
refresh();
setInterval(refresh, 2000); // link and impairment changes send no event
