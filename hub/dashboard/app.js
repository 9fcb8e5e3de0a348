// The apex dashboard shell: sign-in, the hash router, hub-wide live events (`GET /v1/events`
// read as Server-Sent Events) and the status sampler behind the overview's charts.

import { Api, ApiError, Subscription } from './api.js';
import { OverviewView, NodesView, TasksView, TaskView, LogsView, NodeNames } from './views.js';

const KEY_STORAGE = 'apex.dashboard.apiKey';
const SAMPLE_MS = 2000;
const WINDOW_MS = 5 * 60_000;
const FALLBACK_POLL_MS = 3000;
// Above this many task events per second the tab stops streaming task events (it would spend
// its time parsing them) and refreshes task views once a second instead; node events still
// stream. Below CALM_PER_S finished tasks per second for three samples, it streams them again.
const BUSY_EVENTS_PER_S = 300;
const CALM_PER_S = 100;

const $ = (id) => document.getElementById(id);

// ---------------------------------------------------------------------------------------------
// event bus

class Bus {
  constructor() { this.subs = new Map(); }
  on(type, fn) {
    if (!this.subs.has(type)) this.subs.set(type, new Set());
    this.subs.get(type).add(fn);
    return () => this.subs.get(type)?.delete(fn);
  }
  emit(type, value) {
    for (const fn of [...(this.subs.get(type) || [])]) {
      try { fn(value); } catch (e) { console.error(e); }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// status sampler: the overview's figures and chart series

/** `/api/v1/system/status` (or `/health` on a hub without it) → one shape. */
export function normalizeStatus(raw, source) {
  const n = raw.nodes || raw.nodes_by_status || {};
  const t = raw.tasks || raw.tasks_by_state || {};
  const num = (v) => (typeof v === 'number' && Number.isFinite(v) ? v : null);
  let online = num(n.online) ?? 0;
  const draining = num(n.draining) ?? 0;
  let offline = num(n.offline);
  if (offline === null) offline = Math.max(0, (num(n.total) ?? 0) - online - draining);
  if (source === 'health') online = Math.max(0, online - draining);
  const tasks = {};
  for (const k of ['queued', 'assigned', 'running', 'succeeded', 'failed', 'cancelled', 'timed_out']) tasks[k] = num(t[k]) ?? 0;
  return {
    nodes: { online, draining, offline },
    tasks,
    queue_depth: num(raw.queue_depth) ?? tasks.queued,
    dispatch_rate: num(raw.dispatch_rate),
    uptime: num(raw.uptime_seconds) ?? num(raw.uptime),
    version: raw.version || null,
    cpu: num(raw.cpu_usage),
    mem: num(raw.memory_usage),
    gpu: num(raw.gpu_usage),
    sessions: num(raw.active_sessions),
  };
}

class Sampler {
  constructor(api) {
    this.api = api;
    this.path = '/api/v1/system/status';
    this.source = 'system/status';
    this.latest = null;
    this.latestAt = 0;
    this.prev = null;
    this.throughput = [];
    this.queue = [];
    this.listeners = new Set();
    this.stopped = false;
    this.timer = null;
    this.tick();
  }

  listen(fn) { this.listeners.add(fn); return () => this.listeners.delete(fn); }

  async tick() {
    if (this.stopped) return;
    try {
      let raw;
      try {
        raw = await this.api.get(this.path);
      } catch (e) {
        if (!(e instanceof ApiError) || e.status !== 404 || this.path === '/health') throw e;
        // A hub without the system status route: /health has the counts.
        this.path = '/health';
        this.source = 'health';
        raw = await this.api.get(this.path);
      }
      const now = Date.now();
      const s = normalizeStatus(raw, this.source);
      const done = s.tasks.succeeded + s.tasks.failed + s.tasks.cancelled + s.tasks.timed_out;
      if (this.prev) {
        const dt = (now - this.prev.at) / 1000;
        if (dt > 0) this.throughput.push([now, Math.max(0, (done - this.prev.done) / dt)]);
      }
      this.prev = { at: now, done };
      this.queue.push([now, s.queue_depth]);
      const cut = now - WINDOW_MS - 10_000;
      while (this.throughput.length && this.throughput[0][0] < cut) this.throughput.shift();
      while (this.queue.length && this.queue[0][0] < cut) this.queue.shift();
      this.latest = s;
      this.latestAt = now;
      for (const fn of this.listeners) fn(s);
    } catch (e) {
      if (e.status !== 401) console.warn('status sample failed', e);
    }
    if (!this.stopped) this.timer = setTimeout(() => this.tick(), SAMPLE_MS);
  }

  stop() { this.stopped = true; clearTimeout(this.timer); }
}

// ---------------------------------------------------------------------------------------------
// the app

const ROUTES = {
  overview: OverviewView,
  nodes: NodesView,
  tasks: TasksView,
  logs: LogsView,
};

function parseHash() {
  const raw = location.hash.replace(/^#\/?/, '');
  const [path, query = ''] = raw.split('?');
  const parts = path.split('/').filter(Boolean).map(decodeURIComponent);
  return { view: parts[0] || 'overview', arg: parts[1] || null, params: new URLSearchParams(query) };
}

class App {
  constructor(key) {
    this.key = key;
    this.bus = new Bus();
    this.prefs = {};
    this.view = null;
    this.api = new Api(key, (err) => this.unauthorized(err));
    this.sampler = new Sampler(this.api);
    this.names = new NodeNames(this.api);
    this.pollTimer = null;
    this.busy = false;
    this.busyTimer = null;
    this.calmSamples = 0;
    this.window = { start: 0, count: 0 };
    this.events = null;
    this.startEvents();
    this.ctx = {
      api: this.api,
      key,
      prefs: this.prefs,
      sampler: this.sampler,
      names: this.names,
      navigate: (hash) => { if (location.hash !== hash) location.hash = hash; else this.route(); },
      banner: (msg) => this.banner(msg),
      on: (type, fn) => this.bus.on(type, fn),
    };
    this.onHash = () => this.route();
    window.addEventListener('hashchange', this.onHash);
    this.verSampler = this.sampler.listen((s) => {
      $('hub-version').textContent = s.version ? `hub v${s.version}` : '';
      this.checkCalm();
    });
    $('app').hidden = false;
    $('signin').hidden = true;
    this.route();
  }

  startEvents() {
    if (this.events) this.events.stop();
    this.events = new Subscription(this.api, this.busy ? '/v1/events?topics=nodes' : '/v1/events', {
      onEvent: (e) => this.hubEvent(e),
      onState: (s, detail) => this.liveState(s, detail),
    });
  }

  hubEvent(e) {
    const d = e.data && typeof e.data === 'object' ? e.data : {};
    const name = String(d.event || e.event || '');
    if (name === 'events_dropped') { this.bus.emit('tick'); return; }
    const node = d.payload && d.payload.node;
    if (node && node.id) this.names.learn(node.id, node.name);
    if (name.startsWith('task_') && !this.busy) {
      const now = Date.now();
      if (now - this.window.start > 1000) this.window = { start: now, count: 0 };
      this.window.count += 1;
      if (this.window.count > BUSY_EVENTS_PER_S) { this.setBusy(true); return; }
    }
    this.bus.emit('event', { event: name, payload: d.payload, timestamp: d.timestamp, type: d.type });
  }

  setBusy(busy) {
    if (this.busy === busy) return;
    this.busy = busy;
    this.calmSamples = 0;
    clearInterval(this.busyTimer);
    this.busyTimer = busy ? setInterval(() => this.bus.emit('tick'), 1000) : null;
    this.startEvents();
  }

  checkCalm() {
    if (!this.busy) return;
    const t = this.sampler.throughput;
    const last = t.length ? t[t.length - 1][1] : 0;
    this.calmSamples = last < CALM_PER_S ? this.calmSamples + 1 : 0;
    if (this.calmSamples >= 3) this.setBusy(false);
  }

  liveState(state, detail) {
    const el = $('live');
    const text = $('live-text');
    // Without the stream (not served, or reconnecting), views are refreshed by polling.
    const polling = state === 'unavailable' || state === 'retrying';
    if (polling && !this.pollTimer) this.pollTimer = setInterval(() => this.bus.emit('tick'), FALLBACK_POLL_MS);
    if (!polling && state === 'live' && this.pollTimer) { clearInterval(this.pollTimer); this.pollTimer = null; }
    let label = { connecting: 'connecting', live: 'live', retrying: 'reconnecting', unavailable: 'polling' }[state] || state;
    if (state === 'live' && this.busy) label = 'live · busy';
    el.dataset.state = state;
    text.textContent = label;
    el.title = state === 'unavailable'
      ? 'This hub does not serve /v1/events: refreshing every 3 s instead'
      : detail ? `Live updates: ${detail}`
        : this.busy ? `Heavy task traffic (over ${BUSY_EVENTS_PER_S} events/s): node changes stream live, task views refresh every second`
          : 'Live updates (Server-Sent Events from /v1/events)';
    if (state === 'live') this.bus.emit('tick');
  }

  banner(msg) {
    const b = $('banner');
    if (!msg) { b.hidden = true; b.textContent = ''; return; }
    b.textContent = msg;
    b.hidden = false;
    clearTimeout(this.bannerTimer);
    this.bannerTimer = setTimeout(() => { b.hidden = true; }, 10_000);
  }

  route() {
    const { view, arg, params } = parseHash();
    if (this.view) this.view.destroy();
    this.view = null;
    for (const a of document.querySelectorAll('.tabs a')) a.classList.toggle('active', a.dataset.view === view);
    const main = $('main');
    main.replaceChildren();
    main.scrollTop = 0;
    let v;
    if (view === 'tasks' && arg) v = new TaskView(this.ctx, params, arg);
    else if (ROUTES[view]) v = new ROUTES[view](this.ctx, params);
    else { location.replace('#/overview'); return; }
    this.view = v;
    v.mount(main);
    document.title = `apex · ${view === 'tasks' && arg ? `task ${arg.slice(0, 8)}` : view}`;
  }

  stop() {
    window.removeEventListener('hashchange', this.onHash);
    if (this.view) this.view.destroy();
    this.view = null;
    this.events.stop();
    this.sampler.stop();
    clearInterval(this.pollTimer);
    clearInterval(this.busyTimer);
    $('main').replaceChildren();
  }

  unauthorized() {
    if (this.stopped) return;
    this.stopped = true;
    this.stop();
    sessionStorage.removeItem(KEY_STORAGE);
    showSignIn('The hub no longer accepts this API key (401). Sign in again.');
  }
}

// ---------------------------------------------------------------------------------------------
// sign-in

let app = null;

function showSignIn(error) {
  $('app').hidden = true;
  $('signin').hidden = false;
  const err = $('signin-error');
  err.textContent = error || '';
  err.hidden = !error;
  const input = $('signin-key');
  input.value = '';
  input.focus();
}

/** Checks a key with one cheap authenticated call. Resolves to null or an error message. */
async function checkKey(key) {
  try {
    await new Api(key).get('/v1/nodes?limit=1');
    return null;
  } catch (e) {
    if (e.status === 401) return 'The hub rejected this API key (401 Unauthorized). Check the key and try again.';
    if (e.status === 0) return `Could not reach the hub: ${e.message}`;
    return `The hub answered ${e.status}: ${e.message}`;
  }
}

async function signIn(key, { stored }) {
  const btn = $('signin-submit');
  btn.disabled = true;
  btn.textContent = 'Checking…';
  const err = await checkKey(key);
  btn.disabled = false;
  btn.textContent = 'Sign in';
  if (err) {
    if (stored) sessionStorage.removeItem(KEY_STORAGE);
    showSignIn(stored ? `Your saved key no longer works. ${err}` : err);
    return;
  }
  sessionStorage.setItem(KEY_STORAGE, key);
  app = new App(key);
}

function boot() {
  $('signin-form').addEventListener('submit', (e) => {
    e.preventDefault();
    const key = $('signin-key').value.trim();
    if (!key) { showSignIn('Enter an API key.'); return; }
    signIn(key, { stored: false });
  });
  $('signout').addEventListener('click', () => {
    sessionStorage.removeItem(KEY_STORAGE);
    if (app) { app.stopped = true; app.stop(); app = null; }
    showSignIn(null);
  });
  const saved = sessionStorage.getItem(KEY_STORAGE);
  if (saved) signIn(saved, { stored: true });
  else showSignIn(null);
}

boot();
