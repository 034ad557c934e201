// The gearmesh dashboard: watches the mesh live through the WebSocket interface (/v1/mesh) of
// the node that served this page, and calls ports on request.
//
// Plain modern JavaScript: no dependencies, no build step, nothing loaded from elsewhere. The
// page is served with a strict Content-Security-Policy, so nothing here uses inline code or
// inline styles (SVG presentation attributes and classes only).
//
// Data flow: `subscribe` (mesh + traces + stats) gives a snapshot; the mesh messages with a
// larger `seq` are applied to it (like examples/python/observer.py). Traces feed per-edge
// call rates, latencies and errors; stats give each node's exact mesh counters. `lagged` is
// followed by a fresh snapshot, which replaces the mesh model.
//
// Elements the tests look at: `#conn-status[data-status]`, `.node[data-node-id]` in the graph,
// `.link[data-link="<id>|<id>"]` (ids sorted), `.flow[data-call="<from>|<to>"]`,
// `.node-card[data-node-id]` with `.gear[data-gear]`, `#call-result[data-outcome]`, and
// `#page-errors[data-count]` (everything that went wrong in the page itself).
'use strict';

(() => {
  // === page errors: anything that goes wrong in the page shows in #page-errors ===

  let pageErrorCount = 0;

  function pageError(text) {
    pageErrorCount += 1;
    const box = document.getElementById('page-errors');
    const list = document.getElementById('page-error-list');
    if (!box || !list) return;
    box.dataset.count = String(pageErrorCount);
    box.hidden = false;
    if (list.children.length < 20) list.append(el('li', {}, String(text)));
  }

  window.addEventListener('error', (e) => pageError(`${e.message} (${e.filename}:${e.lineno})`));
  window.addEventListener('unhandledrejection', (e) => pageError(`unhandled rejection: ${e.reason}`));
  document.addEventListener('securitypolicyviolation', (e) =>
    pageError(`blocked by the content security policy: ${e.violatedDirective} ${e.blockedURI}`));
  // The page itself never logs; whatever calls these is a problem worth showing.
  for (const level of ['error', 'warn']) {
    const original = console[level].bind(console);
    console[level] = (...args) => {
      pageError(`console.${level}: ${args.map(String).join(' ')}`);
      original(...args);
    };
  }

  // === small helpers ===

  const SVG_NS = 'http://www.w3.org/2000/svg';
  const TOKEN_KEY = 'gearmesh.token';
  /** Rates and percentiles are over this window. */
  const WINDOW_MS = 10000;
  /** Call samples are kept this long (the table shows edges seen this recently). */
  const KEEP_MS = 30000;
  const MAX_ERRORS = 40;
  const MAX_PULSES = 30;
  const NODE_R = 44;

  const $ = (id) => document.getElementById(id);
  const now = () => performance.now();

  /** An HTML element: `attrs` keys are attributes (`class`, `data-*`, ...); children are nodes or text. */
  function el(tag, attrs, ...children) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v !== undefined && v !== null && v !== false) e.setAttribute(k, v === true ? '' : String(v));
    }
    e.append(...children.filter((c) => c !== null && c !== undefined));
    return e;
  }

  /** An SVG element, like `el`. */
  function svg(tag, attrs, ...children) {
    const e = document.createElementNS(SVG_NS, tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v !== undefined && v !== null) e.setAttribute(k, String(v));
    }
    e.append(...children.filter((c) => c !== null && c !== undefined));
    return e;
  }

  function fmtUs(us) {
    if (us === null || us === undefined || Number.isNaN(us)) return '–';
    if (us < 1000) return `${Math.round(us)} µs`;
    if (us < 1e6) return `${(us / 1000).toFixed(us < 1e4 ? 2 : 1)} ms`;
    return `${(us / 1e6).toFixed(2)} s`;
  }

  function fmtRate(r) {
    if (!r) return '0';
    return r >= 10 ? r.toFixed(0) : r.toFixed(1);
  }

  function fmtTime(ms) {
    if (!ms) return '';
    return new Date(ms).toLocaleTimeString([], { hour12: false });
  }

  function percentile(sorted, p) {
    if (sorted.length === 0) return null;
    return sorted[Math.min(sorted.length - 1, Math.floor(p * sorted.length))];
  }

  const linkKey = (a, b) => (a < b ? `${a}|${b}` : `${b}|${a}`);
  const sameGear = (x, y) => JSON.stringify(x) === JSON.stringify(y);

  // === the model: what the page believes about the mesh ===

  const model = {
    seq: 0,
    me: null,
    /** id -> NodeView (as in the snapshot). */
    nodes: new Map(),
    /** "a|b" (sorted ids) -> {a, b, rtt_us, transport}. */
    links: new Map(),
    /** node id -> {cur, prev} of its last two `stats` messages. */
    stats: new Map(),
    /** "from|to" -> {from, to, samples: [{t, lat, ok, port}], errors}. */
    flows: new Map(),
    /** Failed calls, newest first. */
    errors: [],
    errorTotal: 0,
    lagged: 0,
  };

  function nameOf(id) {
    const n = model.nodes.get(id);
    return n ? n.name : String(id).slice(0, 8);
  }

  function addLink(a, b, rtt, transport) {
    if (!a || !b || a === b) return;
    const k = linkKey(a, b);
    const [x, y] = k.split('|');
    const old = model.links.get(k);
    model.links.set(k, {
      a: x, b: y,
      rtt_us: rtt ?? (old ? old.rtt_us : null),
      transport: transport ?? (old ? old.transport : null),
    });
  }

  function applySnapshot(m) {
    model.seq = m.seq;
    model.me = m.me;
    model.nodes = new Map();
    model.links = new Map();
    for (const n of m.nodes || []) model.nodes.set(n.id, n);
    for (const n of m.nodes || []) for (const l of n.links || []) addLink(n.id, l.peer, l.rtt_us, l.transport);
  }

  function setState(id, state) {
    const n = model.nodes.get(id);
    if (n) n.state = state;
  }

  /** Applies one mesh change; returns false if it was already in the snapshot. */
  function applyChange(m) {
    if (typeof m.seq === 'number') {
      if (m.seq <= model.seq) return false;
      model.seq = m.seq;
    }
    switch (m.type) {
      case 'node_joined':
      case 'node_updated': {
        const n = m.node;
        model.nodes.set(n.id, { ...(model.nodes.get(n.id) || {}), ...n });
        for (const l of n.links || []) addLink(n.id, l.peer, l.rtt_us, l.transport);
        break;
      }
      case 'node_suspected': setState(m.node, 'suspect'); break;
      case 'node_alive': setState(m.node, 'alive'); break;
      case 'node_left': setState(m.node, m.graceful ? 'left' : 'dead'); break;
      case 'node_removed':
        model.nodes.delete(m.node);
        model.stats.delete(m.node);
        for (const [k, l] of model.links) if (l.a === m.node || l.b === m.node) model.links.delete(k);
        break;
      case 'gear_added': {
        const n = model.nodes.get(m.node);
        if (n) n.gears = (n.gears || []).filter((g) => !sameGear(g, m.gear)).concat([m.gear]);
        break;
      }
      case 'gear_removed': {
        const n = model.nodes.get(m.node);
        if (n) n.gears = (n.gears || []).filter((g) => !sameGear(g, m.gear));
        break;
      }
      case 'link_up': addLink(m.a, m.b, m.rtt_us, m.transport); break;
      case 'link_down': model.links.delete(linkKey(m.a, m.b)); break;
      case 'routes': {
        const routes = new Map((m.routes || []).map((r) => [r.node, r]));
        for (const n of model.nodes.values()) {
          if (n.id === m.node) continue;
          const r = routes.get(n.id);
          n.route = r ? { next_hop: r.next_hop, hops: r.hops } : null;
        }
        break;
      }
      default: break;
    }
    return true;
  }

  function applyStats(m) {
    const s = model.stats.get(m.node) || { cur: null, prev: null };
    s.prev = s.cur;
    s.cur = m;
    model.stats.set(m.node, s);
    for (const l of m.links || []) {
      const k = linkKey(m.node, l.peer);
      const link = model.links.get(k);
      if (link && l.rtt_us !== null && l.rtt_us !== undefined) link.rtt_us = l.rtt_us;
      if (link && l.transport) link.transport = l.transport;
    }
  }

  /** Mesh calls per second in and out of a node, from its last two stats (exact counters). */
  function meshRates(id) {
    const s = model.stats.get(id);
    if (!s || !s.cur || !s.prev) return null;
    const dt = (s.cur.at_ms - s.prev.at_ms) / 1000;
    if (!(dt > 0)) return null;
    const d = (k) => Math.max(0, (s.cur.mesh[k] || 0) - (s.prev.mesh[k] || 0)) / dt;
    return { in: d('calls_received'), out: d('calls_sent'), dropped: d('frames_dropped'), refused: d('calls_refused') };
  }

  function applyTrace(m) {
    const key = `${m.from}|${m.to}`;
    let f = model.flows.get(key);
    if (!f) {
      f = { from: m.from, to: m.to, samples: [], errors: 0 };
      model.flows.set(key, f);
    }
    const ok = m.outcome === 'ok';
    f.samples.push({ t: now(), lat: m.latency_us, ok, port: `${m.gear}/${m.port}` });
    if (!ok) {
      f.errors += 1;
      model.errorTotal += 1;
      model.errors.unshift(m);
      if (model.errors.length > MAX_ERRORS) model.errors.length = MAX_ERRORS;
    }
    pulse(m.from, m.to, ok);
  }

  /** Summary of a flow over the window (and drops samples older than KEEP_MS). */
  function flowSummary(f) {
    const t = now();
    while (f.samples.length && t - f.samples[0].t > KEEP_MS) f.samples.shift();
    const recent = f.samples.filter((s) => t - s.t <= WINDOW_MS);
    const span = Math.min(WINDOW_MS, t - conn.subscribedAt) / 1000;
    const lats = recent.map((s) => s.lat).sort((a, b) => a - b);
    const ports = new Map();
    for (const s of recent) ports.set(s.port, (ports.get(s.port) || 0) + 1);
    const top = [...ports.entries()].sort((a, b) => b[1] - a[1])[0];
    return {
      rate: span > 0.5 ? recent.length / span : recent.length,
      count: recent.length,
      kept: f.samples.length,
      errors: recent.filter((s) => !s.ok).length,
      p50: percentile(lats, 0.5),
      max: lats.length ? lats[lats.length - 1] : null,
      top: top ? top[0] : '',
    };
  }

  // === layout: nodes on a circle, in name order (stable as the mesh changes) ===

  const VIEW = { w: 800, h: 520 };

  function layout() {
    const ids = [...model.nodes.values()]
      .sort((a, b) => (a.name === b.name ? (a.id < b.id ? -1 : 1) : a.name < b.name ? -1 : 1))
      .map((n) => n.id);
    const pos = new Map();
    const n = ids.length;
    if (n === 1) pos.set(ids[0], { x: VIEW.w / 2, y: VIEW.h / 2 - 10 });
    if (n <= 1) return pos;
    // Points on a unit circle (two nodes side by side), scaled and centred to fill the view,
    // leaving room for the gear names under and over the circles.
    const start = n === 2 ? Math.PI : -Math.PI / 2;
    const unit = ids.map((_, i) => {
      const a = start + (2 * Math.PI * i) / n;
      return { x: Math.cos(a), y: Math.sin(a) };
    });
    const xs = unit.map((p) => p.x);
    const ys = unit.map((p) => p.y);
    const [x0, x1, y0, y1] = [Math.min(...xs), Math.max(...xs), Math.min(...ys), Math.max(...ys)];
    const marginX = NODE_R + 90;
    const marginY = NODE_R + 34;
    const r = Math.min(
      x1 - x0 > 0.01 ? (VIEW.w - 2 * marginX) / (x1 - x0) : Infinity,
      y1 - y0 > 0.01 ? (VIEW.h - 2 * marginY) / (y1 - y0) : Infinity,
      80 + 60 * n,
    );
    const cx = VIEW.w / 2 - (r * (x0 + x1)) / 2;
    const cy = VIEW.h / 2 - (r * (y0 + y1)) / 2;
    ids.forEach((id, i) => pos.set(id, { x: cx + r * unit[i].x, y: cy + r * unit[i].y }));
    return pos;
  }

  /** A curved path from node `a` to node `b` (bending to its right), ending at the circles. */
  function flowPath(p, q) {
    const dx = q.x - p.x;
    const dy = q.y - p.y;
    const len = Math.hypot(dx, dy) || 1;
    const bend = Math.min(80, len * 0.26);
    const normal = { x: -dy / len, y: dx / len };
    const c = { x: (p.x + q.x) / 2 + normal.x * bend, y: (p.y + q.y) / 2 + normal.y * bend };
    const cut = (from, to, by) => {
      const vx = to.x - from.x;
      const vy = to.y - from.y;
      const l = Math.hypot(vx, vy) || 1;
      return { x: from.x + (vx / l) * by, y: from.y + (vy / l) * by };
    };
    const s = cut(p, c, NODE_R + 4);
    const e = cut(q, c, NODE_R + 8);
    // The label sits just outside the curve's middle, away from the link it bends around.
    const mid = {
      x: 0.25 * s.x + 0.5 * c.x + 0.25 * e.x + normal.x * 12,
      y: 0.25 * s.y + 0.5 * c.y + 0.25 * e.y + normal.y * 12,
    };
    return { d: `M${s.x.toFixed(1)},${s.y.toFixed(1)} Q${c.x.toFixed(1)},${c.y.toFixed(1)} ${e.x.toFixed(1)},${e.y.toFixed(1)}`, mid };
  }

  let positions = new Map();
  let pulseCount = 0;

  /** A dot running along the edge of one traced call. */
  function pulse(from, to, ok) {
    const p = positions.get(from);
    const q = positions.get(to);
    if (!p || !q || from === to || pulseCount >= MAX_PULSES || document.hidden) return;
    const { d } = flowPath(p, q);
    const motion = svg('animateMotion', { dur: '0.7s', begin: 'indefinite', fill: 'freeze', path: d });
    const dot = svg('circle', { r: 4, class: ok ? 'pulse' : 'pulse err' }, motion);
    $('pulses').append(dot);
    pulseCount += 1;
    if (typeof motion.beginElement === 'function') motion.beginElement();
    setTimeout(() => {
      dot.remove();
      pulseCount -= 1;
    }, 750);
  }

  // === rendering (batched: at most a few times a second) ===

  let renderQueued = false;

  function scheduleRender() {
    if (renderQueued) return;
    renderQueued = true;
    setTimeout(() => {
      renderQueued = false;
      render();
    }, 150);
  }

  function render() {
    positions = layout();
    const flows = [...model.flows.values()].map((f) => ({ ...f, sum: flowSummary(f) }));
    renderSummary(flows);
    renderGraph(flows);
    renderNodes(flows);
    renderFlows(flows);
    renderErrors();
    renderGearLists();
  }

  function renderSummary(flows) {
    const nodes = [...model.nodes.values()];
    const alive = nodes.filter((n) => n.state === 'alive').length;
    let meshIn = 0;
    let known = false;
    for (const n of nodes) {
      const r = meshRates(n.id);
      if (r) {
        meshIn += r.in;
        known = true;
      }
    }
    if (nodes.length === 0) {
      $('summary').textContent = '';
      return;
    }
    const sampled = flows.reduce((acc, f) => acc + f.sum.rate, 0);
    const parts = [`${alive}/${nodes.length} nodes alive`, `${model.links.size} links`];
    parts.push(known ? `${fmtRate(meshIn)} mesh calls/s` : 'mesh calls/s: measuring');
    parts.push(`${fmtRate(sampled)} traced calls/s`);
    if (model.errorTotal) parts.push(`${model.errorTotal} errors`);
    $('summary').textContent = parts.join(' · ');
    $('summary').dataset.nodes = String(nodes.length);
    $('summary').dataset.links = String(model.links.size);
  }

  function renderGraph(flows) {
    $('graph-empty').textContent = model.nodes.size ? '' : conn.live ? 'No nodes.' : 'Waiting for the mesh…';

    const links = [];
    const showRtt = model.links.size <= 8;
    for (const [k, l] of [...model.links.entries()].sort()) {
      const p = positions.get(l.a);
      const q = positions.get(l.b);
      if (!p || !q) continue;
      const mx = (p.x + q.x) / 2;
      const my = (p.y + q.y) / 2;
      const over = l.transport ? ` over ${l.transport}` : '';
      links.push(svg('g', { class: 'link', 'data-link': k, 'data-rtt-us': l.rtt_us ?? '', 'data-transport': l.transport ?? '' },
        svg('title', {}, `${nameOf(l.a)} — ${nameOf(l.b)}${over}: RTT ${fmtUs(l.rtt_us)}`),
        svg('line', { x1: p.x, y1: p.y, x2: q.x, y2: q.y }),
        // On a dense mesh the labels would pile up in the middle; the title still has the RTT.
        showRtt && l.rtt_us !== null && l.rtt_us !== undefined
          ? svg('text', { x: mx, y: my - 6, 'text-anchor': 'middle' }, fmtUs(l.rtt_us)) : null));
    }
    $('links').replaceChildren(...links);

    const arrows = [];
    for (const f of flows) {
      if (f.from === f.to || f.sum.count === 0) continue;
      const p = positions.get(f.from);
      const q = positions.get(f.to);
      if (!p || !q) continue;
      const { d, mid } = flowPath(p, q);
      const err = f.sum.errors > 0;
      const width = 1.5 + Math.min(3.5, Math.log2(1 + f.sum.rate) * 0.7);
      const label = `${fmtRate(f.sum.rate)}/s · ${fmtUs(f.sum.p50)}${err ? ` · ${f.sum.errors} err` : ''}`;
      arrows.push(svg('g', {
        class: err ? 'flow err' : 'flow', 'data-call': `${f.from}|${f.to}`,
        'data-rate': f.sum.rate.toFixed(2), 'data-errors': f.sum.errors,
      },
      svg('title', {}, `${nameOf(f.from)} → ${nameOf(f.to)}: ${label} (sampled traces, last 10 s)`),
      svg('path', { d, 'stroke-width': width.toFixed(1), 'marker-end': err ? 'url(#arrow-err)' : 'url(#arrow)' }),
      svg('text', { x: mid.x, y: mid.y + 4, 'text-anchor': 'middle' }, label)));
    }
    $('flows').replaceChildren(...arrows);

    const nodes = [];
    for (const [id, p] of positions) {
      const n = model.nodes.get(id);
      const gears = (n.gears || []).map((g) => g.name).sort();
      let gearText = gears.join(', ');
      if (gearText.length > 34) gearText = `${gearText.slice(0, 32)}…`;
      const local = model.flows.get(`${id}|${id}`);
      const served = flows.filter((f) => f.to === id).reduce((acc, f) => acc + f.sum.rate, 0);
      const below = p.y > VIEW.h / 2 - 10 || positions.size === 1;
      const gy = below ? p.y + NODE_R + 18 : p.y - NODE_R - 10;
      nodes.push(svg('g', {
        class: id === model.me ? 'node me' : 'node', 'data-node-id': id, 'data-node-name': n.name,
        'data-state': n.state,
      },
      svg('title', {}, `${n.name} (${id})\nstate: ${n.state}\ngears: ${gears.join(', ') || 'none'}`),
      id === model.me ? svg('circle', { class: 'ring', cx: p.x, cy: p.y, r: NODE_R + 7 }) : null,
      svg('circle', { class: 'body', cx: p.x, cy: p.y, r: NODE_R }),
      svg('text', { class: 'name', x: p.x, y: p.y - 2, 'text-anchor': 'middle' },
        n.name.length > 11 ? `${n.name.slice(0, 10)}…` : n.name),
      svg('text', { class: 'rate', x: p.x, y: p.y + 16, 'text-anchor': 'middle' },
        served || local ? `${fmtRate(served)}/s in` : n.state),
      svg('text', { class: 'gears', x: p.x, y: gy, 'text-anchor': 'middle' }, gearText || 'no gears')));
    }
    $('nodes').replaceChildren(...nodes);
  }

  function routeText(n) {
    if (n.id === model.me) return 'this node';
    if (!n.route) return 'no route';
    if (n.route.hops <= 1) return 'direct';
    return `via ${nameOf(n.route.next_hop)} (${n.route.hops} hops)`;
  }

  function renderNodes(flows) {
    const cards = [];
    for (const id of positions.keys()) {
      const n = model.nodes.get(id);
      const s = model.stats.get(id);
      const r = meshRates(id);
      const inbound = flows.filter((f) => f.to === id);
      const errs = inbound.reduce((acc, f) => acc + f.sum.errors, 0);
      const served = inbound.reduce((acc, f) => acc + f.sum.rate, 0);
      const stat = (label, value, bad) => el('span', {}, `${label} `, el('b', bad ? { class: 'bad' } : {}, value), '  ');
      const line = el('div', { class: 'stats' },
        stat('traced in', `${fmtRate(served)}/s`),
        stat('errors', String(errs), errs > 0),
        r ? stat('mesh in', `${fmtRate(r.in)}/s`) : null,
        r ? stat('out', `${fmtRate(r.out)}/s`) : null,
        s && s.cur && s.cur.in_flight ? stat('in flight', String(s.cur.in_flight)) : null,
        s && s.cur && s.cur.mesh.frames_dropped ? stat('dropped', String(s.cur.mesh.frames_dropped), true) : null);
      const chips = (n.gears || []).slice().sort((a, b) => (a.name < b.name ? -1 : 1)).map((g) =>
        el('span', {
          class: 'gear', 'data-gear': g.name, 'data-ports': (g.ports || []).join(','), role: 'button', tabindex: 0,
          title: `ports: ${(g.ports || []).join(', ') || 'none'} (click to call)`,
        }, g.name, ' ', el('span', { class: 'ver' }, g.version)));
      cards.push(el('div', { class: 'node-card', 'data-node-id': id, 'data-state': n.state },
        el('div', { class: 'title' },
          el('strong', {}, n.name),
          el('span', { class: 'state' }, n.state),
          id === model.me ? el('span', { class: 'me-tag', title: 'the node this page is connected to' }, 'connected') : null,
          el('span', { class: 'id', title: id }, id.slice(0, 8)),
          el('span', { class: 'route', title: 'how the connected node reaches it' }, routeText(n))),
        line,
        el('div', { class: 'gear-chips' }, ...(chips.length ? chips : [el('span', { class: 'no-gears' }, 'no gears')]))));
    }
    $('node-list').replaceChildren(...cards);
    $('node-count').textContent = `${model.nodes.size} known`;
  }

  function renderFlows(flows) {
    const rows = flows
      .filter((f) => f.sum.kept > 0)
      .sort((a, b) => b.sum.rate - a.sum.rate || (a.from + a.to < b.from + b.to ? -1 : 1))
      .map((f) => el('tr', { 'data-call': `${f.from}|${f.to}` },
        el('td', {}, nameOf(f.from)),
        el('td', {}, f.from === f.to ? '(local)' : nameOf(f.to)),
        el('td', { class: 'num' }, fmtRate(f.sum.rate)),
        el('td', { class: 'num' }, fmtUs(f.sum.p50)),
        el('td', { class: 'num' }, fmtUs(f.sum.max)),
        el('td', { class: f.sum.errors ? 'num bad' : 'num' }, String(f.sum.errors)),
        el('td', {}, f.sum.top)));
    $('flow-rows').replaceChildren(...rows);
    $('flow-empty').hidden = rows.length > 0;
  }

  function renderErrors() {
    const items = model.errors.map((m) => el('li', { 'data-trace-id': m.trace_id || '' },
      el('span', { class: 'when' }, fmtTime(m.at_ms)),
      el('span', { class: 'code' }, m.outcome),
      el('span', {}, `${m.gear}/${m.port}`),
      el('span', {}, `${nameOf(m.from)} → ${nameOf(m.to)}`),
      el('span', { class: 'muted' }, fmtUs(m.latency_us))));
    $('error-list').replaceChildren(...items);
    $('error-empty').hidden = items.length > 0;
    $('error-count').textContent = model.errorTotal ? `${model.errorTotal} since the page opened` : '';
  }

  function renderGearLists() {
    const gears = new Map();
    for (const n of model.nodes.values()) for (const g of n.gears || []) gears.set(g.name, g.ports || []);
    const names = [...gears.keys()].sort();
    const list = $('gear-names');
    if (list.dataset.names !== names.join(',')) {
      list.dataset.names = names.join(',');
      list.replaceChildren(...names.map((g) => el('option', { value: g })));
    }
    const ports = gears.get($('call-gear').value.trim()) || [];
    const plist = $('port-names');
    if (plist.dataset.ports !== ports.join(',')) {
      plist.dataset.ports = ports.join(',');
      plist.replaceChildren(...ports.map((p) => el('option', { value: p })));
    }
  }

  // === the connection ===

  const conn = {
    ws: null,
    live: false,
    attempts: 0,
    timer: null,
    nextCallId: 1,
    /** call id -> {started, gear, port} */
    pending: new Map(),
    subscribedAt: now(),
    detail: '',
  };

  function setStatus(status, text, detail) {
    // What is on screen is only current while the page is live; otherwise it is dimmed.
    document.body.dataset.live = String(status === 'live');
    const s = $('conn-status');
    s.dataset.status = status;
    s.textContent = text;
    if (detail !== undefined) $('conn-detail').textContent = detail;
  }

  function send(msg) {
    if (!conn.ws || conn.ws.readyState !== WebSocket.OPEN) return false;
    conn.ws.send(JSON.stringify({ v: 1, ...msg }));
    return true;
  }

  /** JWTs travel as a subprotocol offer; anything else (not a valid offer) as a first message. */
  const OFFERABLE = /^[A-Za-z0-9._~+-]+$/;

  function connect() {
    clearTimeout(conn.timer);
    if (conn.ws) {
      conn.ws.onclose = null;
      conn.ws.close();
      conn.ws = null;
    }
    const token = sessionStorage.getItem(TOKEN_KEY);
    const url = `${location.protocol === 'https:' ? 'wss:' : 'ws:'}//${location.host}/v1/mesh`;
    const protocols = ['gearmesh.v1'];
    const offered = Boolean(token) && OFFERABLE.test(token);
    if (offered) protocols.push(`bearer.${token}`);
    setStatus(conn.attempts ? 'reconnecting' : 'connecting', 'connecting', '');
    const ws = new WebSocket(url, protocols);
    conn.ws = ws;
    ws.onopen = () => {
      if (token && !offered) send({ type: 'auth', token });
      send({ type: 'subscribe', id: 'dashboard', mesh: true, traces: true, stats: true, topics: [] });
    };
    ws.onmessage = (e) => {
      let m;
      try {
        m = JSON.parse(e.data);
      } catch (err) {
        pageError(`the node sent a message that is not JSON: ${err}`);
        return;
      }
      handle(m);
    };
    ws.onclose = (e) => closed(ws, e, Boolean(token));
  }

  function closed(ws, e, hadToken) {
    if (conn.ws !== ws) return;
    conn.ws = null;
    conn.live = false;
    for (const [id, p] of conn.pending) {
      showResult('error', `${p.gear}/${p.port}: the connection closed before the result arrived`);
      conn.pending.delete(id);
    }
    const reason = e.reason || '';
    if (e.code === 4401) {
      if (hadToken) sessionStorage.removeItem(TOKEN_KEY);
      setStatus('needs-token', 'needs a token', reason);
      askToken(hadToken ? `The node refused the token: ${reason || 'unauthorized'}.` : 'This node needs a token.');
      return;
    }
    if (e.code === 4403) {
      setStatus('denied', 'not allowed', reason);
      askToken(`The token is valid but grants nothing here: ${reason}. Use a token with the observe scope.`);
      return;
    }
    const delay = Math.min(15000, 500 * 2 ** conn.attempts) * (0.75 + Math.random() * 0.5);
    conn.attempts += 1;
    const why = reason || (e.code === 1006 ? 'connection lost' : `closed (${e.code})`);
    setStatus('reconnecting', 'reconnecting', `${why}; retrying in ${Math.max(1, Math.round(delay / 1000))} s`);
    conn.timer = setTimeout(connect, delay);
    scheduleRender();
  }

  const MESH_TYPES = new Set([
    'node_joined', 'node_updated', 'node_suspected', 'node_alive', 'node_left', 'node_removed',
    'gear_added', 'gear_removed', 'link_up', 'link_down', 'routes',
  ]);

  function handle(m) {
    if (MESH_TYPES.has(m.type)) {
      if (applyChange(m)) scheduleRender();
      return;
    }
    switch (m.type) {
      case 'welcome':
        conn.detail = `via ${m.node ? m.node.name : 'the node'}${m.node && m.node.mesh ? ` (mesh ${m.node.mesh})` : ''} as ${m.principal}`;
        setStatus('connecting', 'subscribing', conn.detail);
        break;
      case 'snapshot':
        applySnapshot(m);
        if (!conn.live) conn.subscribedAt = now();
        conn.live = true;
        conn.attempts = 0;
        setStatus('live', 'live', conn.detail + (model.lagged ? ` · resynced after dropping ${model.lagged} messages` : ''));
        render();
        break;
      case 'lagged':
        // A fresh snapshot follows; it replaces the mesh model.
        model.lagged += m.dropped || 0;
        break;
      case 'trace':
        applyTrace(m);
        scheduleRender();
        break;
      case 'stats':
        applyStats(m);
        scheduleRender();
        break;
      case 'result':
      case 'error':
        if (m.id === 'dashboard') {
          const e = m.error || {};
          setStatus('denied', 'not allowed', `${e.code}: ${e.message}`);
          askToken(`Watching the mesh was refused (${e.code}: ${e.message}). Use a token with the observe scope.`);
        } else if (conn.pending.has(m.id)) {
          callDone(m);
        } else if (m.type === 'error') {
          const e = m.error || {};
          $('conn-detail').textContent = `${conn.detail} · node says ${e.code}: ${e.message}`;
        }
        break;
      default:
        break;
    }
  }

  // === calling a port ===

  function showResult(outcome, text) {
    const r = $('call-result');
    r.dataset.outcome = outcome;
    r.classList.remove('muted');
    r.textContent = text;
  }

  function callDone(m) {
    const p = conn.pending.get(m.id);
    conn.pending.delete(m.id);
    const took = fmtUs((now() - p.started) * 1000);
    if (m.type === 'result') {
      showResult('ok', `${p.gear}/${p.port} ok in ${took}\n${JSON.stringify(m.ok, null, 2)}`);
    } else {
      const e = m.error || {};
      const app = e.app_code ? ` (app code ${e.app_code})` : '';
      showResult('error', `${p.gear}/${p.port} failed in ${took}: ${e.code}${app}\n${e.message || ''}`);
    }
  }

  function submitCall(ev) {
    ev.preventDefault();
    const gear = $('call-gear').value.trim();
    const port = $('call-port').value.trim();
    let arg;
    try {
      const text = $('call-arg').value.trim();
      arg = text === '' ? null : JSON.parse(text);
    } catch (err) {
      showResult('invalid', `The argument is not valid JSON: ${err.message}`);
      return;
    }
    const timeout = Number.parseInt($('call-timeout').value, 10);
    const id = conn.nextCallId;
    conn.nextCallId += 1;
    const msg = { type: 'call', id, gear, port, arg };
    if (timeout > 0) msg.timeout_ms = timeout;
    conn.pending.set(id, { started: now(), gear, port });
    if (!send(msg)) {
      conn.pending.delete(id);
      showResult('error', 'Not connected to the node.');
      return;
    }
    showResult('pending', `${gear}/${port}: calling…`);
  }

  function pickGear(target) {
    const chip = target.closest('.gear');
    if (!chip) return;
    $('call-gear').value = chip.dataset.gear;
    const ports = (chip.dataset.ports || '').split(',').filter(Boolean);
    if (ports.length && !ports.includes($('call-port').value.trim())) $('call-port').value = ports[0];
    renderGearLists();
    $('call-arg').focus();
  }

  // === the token ===

  function askToken(reason) {
    $('token-reason').textContent = reason;
    $('token-input').value = '';
    $('token-dialog').hidden = false;
    $('token-input').focus();
  }

  /** Takes `#token=...` (and `gear`, `port`, `arg` to fill the call form) from the fragment,
   *  then removes it from the address bar. The fragment never reaches the server. */
  function readFragment() {
    if (location.hash.length < 2) return;
    const params = new URLSearchParams(location.hash.slice(1));
    const token = params.get('token');
    if (token) sessionStorage.setItem(TOKEN_KEY, token.trim());
    for (const [key, field] of [['gear', 'call-gear'], ['port', 'call-port'], ['arg', 'call-arg']]) {
      const v = params.get(key);
      if (v !== null) $(field).value = v;
    }
    history.replaceState(null, '', location.pathname);
  }

  // === start ===

  function start() {
    readFragment();
    $('call-form').addEventListener('submit', submitCall);
    $('call-gear').addEventListener('input', renderGearLists);
    $('node-list').addEventListener('click', (e) => pickGear(e.target));
    $('node-list').addEventListener('keydown', (e) => {
      if (e.key === 'Enter') pickGear(e.target);
    });
    $('token-button').addEventListener('click', () => askToken(sessionStorage.getItem(TOKEN_KEY)
      ? 'A token is set for this tab. Paste another one to replace it.' : 'No token is set for this tab.'));
    $('token-form').addEventListener('submit', (e) => {
      e.preventDefault();
      const t = $('token-input').value.trim();
      if (t) sessionStorage.setItem(TOKEN_KEY, t);
      $('token-dialog').hidden = true;
      conn.attempts = 0;
      connect();
    });
    $('token-forget').addEventListener('click', () => {
      sessionStorage.removeItem(TOKEN_KEY);
      $('token-input').value = '';
      $('token-reason').textContent = 'The token is forgotten.';
    });
    $('token-cancel').addEventListener('click', () => {
      $('token-dialog').hidden = true;
    });
    // Rates decay even when nothing arrives.
    setInterval(scheduleRender, 1000);
    render();
    connect();
  }

  start();
})();
