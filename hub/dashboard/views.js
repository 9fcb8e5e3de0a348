// The dashboard's views. Each view fetches only what it shows (one page, filtered by the hub),
// re-fetches when a hub event says something changed, and renders at most once per second
// (Coalescer). `ctx` is the app shell: {api, key, navigate, banner, sampler, on(type, fn)}.

import { qs, LogSocket } from './api.js';
import { TimeChart } from './chart.js';
import {
  h, replace, Coalescer, fmtInt, fmtNum, fmtPct, fmtDuration, fmtAgo, fmtTime, ms, shortId,
  badge, jsonBlock, loadBar,
} from './dom.js';

export const TASK_STATUSES = ['queued', 'assigned', 'running', 'succeeded', 'failed', 'cancelled', 'timed_out'];
const TERMINAL = new Set(['succeeded', 'failed', 'cancelled', 'timed_out']);
const NODE_STATUSES = ['online', 'draining', 'offline'];
const NODE_TYPES = ['worker', 'companion', 'custom'];
const RENDER_MS = 1000;

// ---------------------------------------------------------------------------------------------
// shared pieces

/**
 * Node id → display name, learned from node pages and node events, and fetched one node at a
 * time (`GET /v1/nodes/{id}`) for ids a page shows that are not known yet. Bounded.
 */
export class NodeNames {
  constructor(api) {
    this.api = api;
    this.names = new Map();
    this.pending = new Set();
    this.listeners = new Set();
  }

  learn(id, name) {
    if (!id) return;
    if (this.names.size > 20_000) this.names.clear();
    this.names.set(id, name || null);
  }

  listen(fn) { this.listeners.add(fn); return () => this.listeners.delete(fn); }

  /** The name of `id` if known; else null, and a look-up starts (listeners hear when done). */
  get(id) {
    if (!id) return null;
    if (this.names.has(id)) return this.names.get(id);
    if (!this.pending.has(id) && this.pending.size < 64) {
      this.pending.add(id);
      this.api.get(`/v1/nodes/${encodeURIComponent(id)}`)
        .then((n) => this.learn(id, n?.name))
        .catch(() => this.learn(id, null))
        .finally(() => {
          this.pending.delete(id);
          for (const fn of this.listeners) fn();
        });
    }
    return null;
  }

  /** A node cell: its name (id in the title), or the shortened id. */
  label(id) {
    if (!id) return h('span', { class: 'muted' }, '–');
    const name = this.get(id);
    return name ? h('span', { class: 'node-name', title: id }, name) : shortId(id, 13);
  }
}

function select(name, label, options, value, onChange) {
  return h('label', { class: 'field' }, h('span', {}, label),
    h('select', { name, onchange: (e) => onChange(e.target.value) },
      options.map(([v, text]) => h('option', { value: v, selected: v === value }, text))));
}

function textFilter(name, label, value, placeholder, onChange) {
  const input = h('input', {
    name, type: 'search', value: value || '', placeholder, spellcheck: 'false', autocomplete: 'off',
  });
  let t = null;
  input.addEventListener('input', () => {
    clearTimeout(t);
    t = setTimeout(() => onChange(input.value.trim()), 400);
  });
  input.addEventListener('keydown', (e) => {
    if (e.key === 'Enter') { clearTimeout(t); onChange(input.value.trim()); }
  });
  return h('label', { class: 'field' }, h('span', {}, label), input);
}

function pager(meta, onPage) {
  const page = meta?.page || 1;
  const pages = Math.max(1, meta?.pages || 1);
  const total = meta?.total ?? 0;
  const limit = meta?.limit || 0;
  const from = total ? (page - 1) * limit + 1 : 0;
  const to = Math.min(total, page * limit);
  return h('div', { class: 'pager' },
    h('span', { class: 'muted' }, total ? `${fmtInt(from)}–${fmtInt(to)} of ${fmtInt(total)}` : 'none'),
    h('div', { class: 'pager-buttons' },
      h('button', { class: 'btn btn-sm', type: 'button', disabled: page <= 1, 'data-action': 'first', onclick: () => onPage(1) }, '« First'),
      h('button', { class: 'btn btn-sm', type: 'button', disabled: page <= 1, 'data-action': 'prev', onclick: () => onPage(page - 1) }, '‹ Prev'),
      h('span', { class: 'pager-page' }, `Page ${fmtInt(page)} of ${fmtInt(pages)}`),
      h('button', { class: 'btn btn-sm', type: 'button', disabled: page >= pages, 'data-action': 'next', onclick: () => onPage(page + 1) }, 'Next ›')));
}

function emptyRow(cols, text) {
  return h('tr', { class: 'empty' }, h('td', { colspan: cols }, text));
}

function errorText(e) {
  return e && e.status ? `${e.message} (HTTP ${e.status})` : (e?.message || String(e));
}

/** Route query → object of strings. */
function readQuery(params, keys) {
  const out = {};
  for (const k of keys) out[k] = params.get(k) || '';
  return out;
}

/** Object → `#/view?query` (skipping defaults). */
function hashFor(view, q) {
  return `#/${view}${qs(q)}`;
}

// ---------------------------------------------------------------------------------------------
// Overview

export class OverviewView {
  constructor(ctx) {
    this.ctx = ctx;
    this.failures = null;
    this.failuresError = null;
    this.render = new Coalescer(() => this.draw(), RENDER_MS);
    this.loadFailures = new Coalescer(() => this.fetchFailures(), 5000, 50, { adaptive: true });
  }

  mount(root) {
    this.root = root;
    this.kpis = h('section', { class: 'kpis' });
    this.nodeBar = h('div', { class: 'stackbar-wrap' });
    this.taskStates = h('div', { class: 'state-grid' });
    const thr = h('canvas', { class: 'chart', 'aria-label': 'Throughput chart' });
    const qd = h('canvas', { class: 'chart', 'aria-label': 'Queue depth chart' });
    this.thrNow = h('span', { class: 'chart-now' });
    this.qdNow = h('span', { class: 'chart-now' });
    this.failBody = h('tbody');
    replace(root,
      h('div', { class: 'page-head' }, h('h1', {}, 'Cluster overview'),
        h('span', { class: 'muted small', id: 'overview-updated' })),
      this.kpis,
      h('section', { class: 'grid-2' },
        h('div', { class: 'panel' }, h('div', { class: 'panel-head' }, h('h2', {}, 'Throughput'), h('span', { class: 'muted small' }, 'tasks finished per second'), this.thrNow), thr),
        h('div', { class: 'panel' }, h('div', { class: 'panel-head' }, h('h2', {}, 'Queue depth'), h('span', { class: 'muted small' }, 'tasks waiting for a node'), this.qdNow), qd)),
      h('section', { class: 'grid-2' },
        h('div', { class: 'panel' }, h('div', { class: 'panel-head' }, h('h2', {}, 'Nodes by status'), h('a', { href: '#/nodes', class: 'small' }, 'All nodes →')), this.nodeBar),
        h('div', { class: 'panel' }, h('div', { class: 'panel-head' }, h('h2', {}, 'Tasks by state'), h('a', { href: '#/tasks', class: 'small' }, 'All tasks →')), this.taskStates)),
      h('section', { class: 'panel' },
        h('div', { class: 'panel-head' }, h('h2', {}, 'Recent failures'),
          h('a', { href: '#/tasks?status=failed', class: 'small' }, 'All failed tasks →')),
        h('table', { class: 'table', id: 'failures' },
          h('thead', {}, h('tr', {}, ['Task', 'Tool', 'Status', 'Node', 'Error', 'When'].map((c) => h('th', {}, c)))),
          this.failBody)));
    this.thr = new TimeChart(thr, { color: '#38bdf8', windowMs: 5 * 60_000 });
    this.qd = new TimeChart(qd, { color: '#f59e0b', windowMs: 5 * 60_000, integer: true });
    // A task list query costs the hub a walk over its tasks, so recent failures are re-read
    // only when the failed/timed-out counts in the status samples move.
    this.failCount = null;
    this.offSample = this.ctx.sampler.listen((st) => {
      const n = (st.tasks.failed || 0) + (st.tasks.timed_out || 0);
      if (n !== this.failCount) { this.failCount = n; this.loadFailures.request(); }
      this.render.request();
    });
    this.offEvent = this.ctx.on('event', () => this.render.request());
    this.offTick = () => {};
    this.offNames = this.ctx.names.listen(() => this.render.request());
    if (this.ctx.sampler.latest) {
      const t = this.ctx.sampler.latest.tasks;
      this.failCount = (t.failed || 0) + (t.timed_out || 0);
    }
    this.loadFailures.request();
    this.render.request();
  }

  async fetchFailures() {
    try {
      const [failed, timed] = await Promise.all([
        this.ctx.api.get(`/api/v1/tasks${qs({ status: 'failed', limit: 8 })}`),
        this.ctx.api.get(`/api/v1/tasks${qs({ status: 'timed_out', limit: 8 })}`),
      ]);
      const all = [...(failed?.data || []), ...(timed?.data || [])];
      all.sort((a, b) => (ms(b.finished_at || b.updated_at) || 0) - (ms(a.finished_at || a.updated_at) || 0));
      this.failures = all.slice(0, 8);
      this.failuresError = null;
    } catch (e) {
      this.failuresError = errorText(e);
    }
    this.render.request();
  }

  draw() {
    const s = this.ctx.sampler;
    const st = s.latest;
    const upd = this.root.querySelector('#overview-updated');
    if (upd) upd.textContent = st ? `updated ${fmtTime(new Date(s.latestAt).toISOString())} · source ${s.source}` : '';
    const nodes = st?.nodes || {};
    const tasks = st?.tasks || {};
    const active = (tasks.assigned || 0) + (tasks.running || 0);
    const finished = (tasks.succeeded || 0) + (tasks.failed || 0) + (tasks.cancelled || 0) + (tasks.timed_out || 0);
    const failRate = finished ? ((tasks.failed || 0) + (tasks.timed_out || 0)) / finished * 100 : null;
    const thrLast = s.throughput.length ? s.throughput[s.throughput.length - 1][1] : null;
    const kpi = (id, label, value, sub, cls = '') => h('div', { class: `kpi ${cls}`, dataset: { kpi: id } },
      h('div', { class: 'kpi-label' }, label), h('div', { class: 'kpi-value' }, value), h('div', { class: 'kpi-sub' }, sub));
    replace(this.kpis,
      kpi('nodes', 'Nodes online', st ? fmtInt(nodes.online) : '–',
        st ? `${fmtInt(nodes.draining)} draining · ${fmtInt(nodes.offline)} offline` : 'loading…',
        st && !nodes.online ? 'kpi-bad' : ''),
      kpi('active', 'Tasks in flight', st ? fmtInt(active) : '–', st ? `${fmtInt(tasks.running)} running · ${fmtInt(tasks.assigned)} assigned` : ''),
      kpi('queue', 'Queue depth', st ? fmtInt(st.queue_depth) : '–', st?.dispatch_rate !== null && st?.dispatch_rate !== undefined ? `dispatching ${fmtNum(st.dispatch_rate)}/s` : 'tasks waiting', st?.queue_depth > 0 && !nodes.online ? 'kpi-warn' : ''),
      kpi('throughput', 'Throughput', thrLast === null ? '–' : `${fmtNum(thrLast)}/s`, 'tasks finished, last interval'),
      kpi('failures', 'Failed', st ? fmtInt((tasks.failed || 0) + (tasks.timed_out || 0)) : '–',
        failRate === null ? 'no finished tasks yet' : `${fmtPct(failRate)} of ${fmtInt(finished)} finished`,
        failRate !== null && failRate >= 5 ? 'kpi-bad' : ''),
      kpi('hub', 'Hub uptime', st ? fmtDuration(st.uptime) : '–',
        st ? [st.cpu !== null && st.cpu !== undefined ? `CPU ${fmtPct(st.cpu)}` : null,
          st.mem !== null && st.mem !== undefined ? `mem ${fmtPct(st.mem)}` : null].filter(Boolean).join(' · ') : ''));

    // nodes by status
    const total = (nodes.online || 0) + (nodes.draining || 0) + (nodes.offline || 0);
    const seg = (k) => (total ? h('div', { class: `seg seg-${k}`, style: { flexGrow: String(nodes[k] || 0) }, title: `${k}: ${nodes[k] || 0}` }) : null);
    replace(this.nodeBar,
      h('div', { class: 'stackbar' }, total ? NODE_STATUSES.map(seg) : h('div', { class: 'seg seg-none' })),
      h('div', { class: 'legend' }, NODE_STATUSES.map((k) => h('a', { class: 'legend-item', href: hashFor('nodes', { status: k }) },
        h('span', { class: `swatch seg-${k}` }), h('span', {}, k), h('strong', {}, st ? fmtInt(nodes[k]) : '–')))));

    replace(this.taskStates, TASK_STATUSES.map((k) => h('a', { class: 'state-cell', href: hashFor('tasks', { status: k }) },
      badge(k), h('strong', {}, st ? fmtInt(tasks[k]) : '–'))));

    this.thr.setData(s.throughput);
    this.qd.setData(s.queue);
    this.thrNow.textContent = thrLast === null ? '' : `${fmtNum(thrLast)}/s`;
    const ql = s.queue.length ? s.queue[s.queue.length - 1][1] : null;
    this.qdNow.textContent = ql === null ? '' : fmtInt(ql);

    if (this.failuresError) {
      replace(this.failBody, emptyRow(6, `Could not load failures: ${this.failuresError}`));
    } else if (!this.failures) {
      replace(this.failBody, emptyRow(6, 'loading…'));
    } else if (!this.failures.length) {
      replace(this.failBody, emptyRow(6, 'No failed or timed-out tasks.'));
    } else {
      replace(this.failBody, this.failures.map((t) => h('tr', { class: 'clickable', onclick: () => this.ctx.navigate(`#/tasks/${encodeURIComponent(t.task_id)}`) },
        h('td', {}, shortId(t.task_id)), h('td', {}, t.tool), h('td', {}, badge(t.status)), h('td', {}, this.ctx.names.label(t.node_id)),
        h('td', { class: 'err-cell' }, t.error ? h('span', {}, h('code', {}, t.error.code || 'error'), ' ', t.error.message || '') : (t.message || '')),
        h('td', { class: 'nowrap', title: t.finished_at || t.updated_at }, fmtAgo(t.finished_at || t.updated_at)))));
    }
    return Boolean(st);
  }

  destroy() {
    this.render.stop();
    this.loadFailures.stop();
    this.offSample?.();
    this.offEvent?.();
    this.offTick?.();
    this.offNames?.();
    this.thr?.destroy();
    this.qd?.destroy();
  }
}

// ---------------------------------------------------------------------------------------------
// Nodes

export class NodesView {
  constructor(ctx, params) {
    this.ctx = ctx;
    this.q = readQuery(params, ['status', 'type', 'tool', 'page', 'limit']);
    this.data = null;
    this.error = null;
    this.busy = new Set();
    this.render = new Coalescer(() => this.fetch(), RENDER_MS, 50, { adaptive: true });
  }

  setQuery(patch) {
    const q = { ...this.q, ...patch };
    if (!('page' in patch)) q.page = '';
    this.ctx.navigate(hashFor('nodes', q));
  }

  mount(root) {
    this.root = root;
    this.body = h('tbody');
    this.pagerEl = h('div');
    this.summary = h('span', { class: 'muted small' });
    replace(root,
      h('div', { class: 'page-head' }, h('h1', {}, 'Nodes'), this.summary),
      h('div', { class: 'toolbar' },
        select('status', 'Status', [['', 'any'], ...NODE_STATUSES.map((s) => [s, s])], this.q.status, (v) => this.setQuery({ status: v })),
        select('type', 'Type', [['', 'any'], ...NODE_TYPES.map((s) => [s, s])], this.q.type, (v) => this.setQuery({ type: v })),
        textFilter('tool', 'Tool', this.q.tool, 'e.g. sha256', (v) => this.setQuery({ tool: v })),
        select('limit', 'Per page', [['', '50'], ['25', '25'], ['100', '100'], ['200', '200']], this.q.limit, (v) => this.setQuery({ limit: v }))),
      h('div', { class: 'panel panel-flush' },
        h('table', { class: 'table', id: 'nodes-table' },
          h('thead', {}, h('tr', {}, ['Node', 'Status', 'Type', 'Load', 'CPU', 'Memory', 'Tools', 'Done / failed', 'Last seen', ''].map((c) => h('th', {}, c)))),
          this.body),
        this.pagerEl));
    // Node events change status; task events change load. Heartbeats (CPU, memory, last seen)
    // send no event, so the page is also re-read every 5 s.
    this.offEvent = this.ctx.on('event', () => this.render.request());
    this.offTick = this.ctx.on('tick', () => this.render.request());
    this.offNames = this.ctx.names.listen(() => this.render.request());
    this.timer = setInterval(() => this.render.request(), 5000);
    this.render.request();
  }

  async fetch() {
    const q = this.q;
    try {
      this.data = await this.ctx.api.get(`/v1/nodes${qs({ status: q.status, type: q.type, tool: q.tool, page: q.page, limit: q.limit || 50 })}`);
      for (const n of this.data?.data || []) this.ctx.names.learn(n.id, n.name);
      this.error = null;
    } catch (e) {
      this.error = errorText(e);
    }
    this.draw();
  }

  async act(node, action) {
    if (action === 'forget' && !window.confirm(`Forget node ${node.name || node.id}? It is removed from the list; queued tasks pinned to it fail.`)) return;
    this.busy.add(node.id);
    this.draw();
    try {
      const path = `/v1/nodes/${encodeURIComponent(node.id)}`;
      if (action === 'forget') await this.ctx.api.call('DELETE', path);
      else await this.ctx.api.post(`${path}/${action}`);
      this.ctx.banner(null);
    } catch (e) {
      this.ctx.banner(`Could not ${action} node ${node.name || node.id}: ${errorText(e)}`);
    }
    this.busy.delete(node.id);
    this.render.request();
  }

  draw() {
    if (this.error && !this.data) {
      replace(this.body, emptyRow(10, `Could not load nodes: ${this.error}`));
      return;
    }
    const rows = this.data?.data || [];
    const meta = this.data?.meta;
    this.summary.textContent = meta ? `${fmtInt(meta.total)} node${meta.total === 1 ? '' : 's'}${this.error ? ` · update failed: ${this.error}` : ''}` : '';
    if (!rows.length) {
      const filtered = this.q.status || this.q.type || this.q.tool;
      replace(this.body, emptyRow(10, filtered ? 'No node matches these filters.' : 'No node has connected yet. Start one with `apex-node --hub ws://HUB --key NODE_KEY`.'));
    } else {
      const now = Date.now();
      replace(this.body, rows.map((n) => {
        const st = n.stats || {};
        const busy = this.busy.has(n.id);
        const tools = n.tools || [];
        const action = n.status === 'draining'
          ? h('button', { class: 'btn btn-sm', type: 'button', 'data-action': 'undrain', disabled: busy, onclick: () => this.act(n, 'undrain') }, busy ? '…' : 'Undrain')
          : n.status === 'online'
            ? h('button', { class: 'btn btn-sm btn-warn', type: 'button', 'data-action': 'drain', disabled: busy, title: 'Stop sending new work; running tasks finish', onclick: () => this.act(n, 'drain') }, busy ? '…' : 'Drain')
            : h('button', { class: 'btn btn-sm btn-ghost', type: 'button', 'data-action': 'forget', disabled: busy, title: 'Remove this offline node from the list', onclick: () => this.act(n, 'forget') }, busy ? '…' : 'Forget');
        return h('tr', { dataset: { nodeId: n.id, status: n.status } },
          h('td', {}, h('a', { class: 'strong', href: hashFor('tasks', { node_id: n.id }), title: 'Tasks of this node' }, n.name || n.id),
            h('div', { class: 'sub mono', title: n.id }, n.id.length > 20 ? `${n.id.slice(0, 20)}…` : n.id)),
          h('td', {}, badge(n.status)),
          h('td', {}, n.type || '–', h('div', { class: 'sub' }, n.dialect || '')),
          h('td', { class: 'w-load' }, loadBar(n.load, `${fmtInt(n.active_tasks)} / ${fmtInt(n.max_concurrent_tasks)}`)),
          h('td', { class: 'num' }, fmtPct(st.cpu_usage ?? st.cpuUsage)),
          h('td', { class: 'num' }, fmtPct(st.memory_usage ?? st.memoryUsage)),
          h('td', { class: 'tools' }, tools.slice(0, 5).map((t) => h('span', { class: 'chip' }, t)),
            tools.length > 5 ? h('span', { class: 'chip chip-more', title: tools.join(', ') }, `+${tools.length - 5}`) : null),
          h('td', { class: 'num' }, fmtInt(n.completed_tasks), ' / ', h('span', { class: n.failed_tasks ? 'text-bad' : '' }, fmtInt(n.failed_tasks))),
          h('td', { class: 'nowrap', title: n.last_seen_at || n.disconnected_at || '' },
            n.status === 'offline' ? `offline ${fmtAgo(n.disconnected_at, now)}` : fmtAgo(n.last_seen_at || n.last_heartbeat_at, now)),
          h('td', { class: 'actions' }, action));
      }));
    }
    replace(this.pagerEl, pager(meta, (p) => this.setQuery({ page: String(p) })));
  }

  destroy() {
    clearInterval(this.timer);
    this.render.stop();
    this.offEvent?.();
    this.offTick?.();
    this.offNames?.();
  }
}

// ---------------------------------------------------------------------------------------------
// Tasks

export class TasksView {
  constructor(ctx, params) {
    this.ctx = ctx;
    this.q = readQuery(params, ['status', 'tool', 'node_id', 'page', 'limit']);
    this.data = null;
    this.error = null;
    this.live = ctx.prefs.tasksLive !== false;
    this.render = new Coalescer(() => this.fetch(), RENDER_MS, 50, { adaptive: true });
  }

  setQuery(patch) {
    const q = { ...this.q, ...patch };
    if (!('page' in patch)) q.page = '';
    this.ctx.navigate(hashFor('tasks', q));
  }

  mount(root) {
    this.root = root;
    this.body = h('tbody');
    this.pagerEl = h('div');
    this.summary = h('span', { class: 'muted small' });
    const liveBox = h('input', { type: 'checkbox', name: 'live', checked: this.live });
    liveBox.addEventListener('change', () => {
      this.live = liveBox.checked;
      this.ctx.prefs.tasksLive = this.live;
      if (this.live) this.render.request();
    });
    replace(root,
      h('div', { class: 'page-head' }, h('h1', {}, 'Tasks'), this.summary),
      h('div', { class: 'toolbar' },
        select('status', 'Status', [['', 'any'], ...TASK_STATUSES.map((s) => [s, s.replace('_', ' ')])], this.q.status, (v) => this.setQuery({ status: v })),
        textFilter('tool', 'Tool', this.q.tool, 'e.g. echo', (v) => this.setQuery({ tool: v })),
        textFilter('node_id', 'Node id', this.q.node_id, 'node id', (v) => this.setQuery({ node_id: v })),
        select('limit', 'Per page', [['', '50'], ['25', '25'], ['100', '100'], ['200', '200']], this.q.limit, (v) => this.setQuery({ limit: v })),
        h('label', { class: 'field field-check', title: 'Refresh this page as tasks change' }, liveBox, h('span', {}, 'Live'))),
      h('div', { class: 'panel panel-flush' },
        h('table', { class: 'table', id: 'tasks-table' },
          h('thead', {}, h('tr', {}, ['Task', 'Tool', 'Status', 'Node', 'Attempt', 'Created', 'Duration', 'Detail'].map((c) => h('th', {}, c)))),
          this.body),
        this.pagerEl));
    const poke = () => { if (this.live) this.render.request(); };
    this.offEvent = this.ctx.on('event', poke);
    this.offTick = this.ctx.on('tick', poke);
    this.offNames = this.ctx.names.listen(() => this.render.request());
    this.render.request();
  }

  async fetch() {
    const q = this.q;
    try {
      this.data = await this.ctx.api.get(`/api/v1/tasks${qs({ status: q.status, tool: q.tool, node_id: q.node_id, page: q.page, limit: q.limit || 50 })}`);
      this.error = null;
    } catch (e) {
      this.error = errorText(e);
    }
    this.draw();
  }

  draw() {
    if (this.error && !this.data) {
      replace(this.body, emptyRow(8, `Could not load tasks: ${this.error}`));
      return;
    }
    const rows = this.data?.data || [];
    const meta = this.data?.meta;
    this.summary.textContent = meta ? `${fmtInt(meta.total)} task${meta.total === 1 ? '' : 's'}${this.error ? ` · update failed: ${this.error}` : ''}` : '';
    if (!rows.length) {
      replace(this.body, emptyRow(8, this.q.status || this.q.tool || this.q.node_id ? 'No task matches these filters.' : 'No tasks yet.'));
    } else {
      const now = Date.now();
      replace(this.body, rows.map((t) => {
        const start = ms(t.started_at);
        const end = ms(t.finished_at) ?? (start ? now : null);
        const detail = t.error ? `${t.error.code}: ${t.error.message}` : (t.message || t.description || '');
        return h('tr', { class: 'clickable', dataset: { taskId: t.task_id, status: t.status }, onclick: () => this.ctx.navigate(`#/tasks/${encodeURIComponent(t.task_id)}`) },
          h('td', {}, h('a', { href: `#/tasks/${encodeURIComponent(t.task_id)}`, class: 'mono', title: t.task_id }, t.task_id.slice(0, 8))),
          h('td', {}, t.tool),
          h('td', {}, badge(t.status), t.status === 'running' && t.progress ? h('span', { class: 'sub' }, ` ${Math.round(t.progress)}%`) : null),
          h('td', {}, this.ctx.names.label(t.node_id)),
          h('td', { class: 'num' }, `${t.attempt} / ${t.max_attempts}`),
          h('td', { class: 'nowrap', title: t.created_at }, fmtAgo(t.created_at, now)),
          h('td', { class: 'num nowrap' }, start && end ? fmtDuration((end - start) / 1000) : '–'),
          h('td', { class: `detail ${t.error ? 'text-bad' : ''}`, title: detail }, detail));
      }));
    }
    replace(this.pagerEl, pager(meta, (p) => this.setQuery({ page: String(p) })));
  }

  destroy() {
    this.render.stop();
    this.offEvent?.();
    this.offTick?.();
    this.offNames?.();
  }
}

// ---------------------------------------------------------------------------------------------
// One task

export class TaskView {
  constructor(ctx, _params, id) {
    this.ctx = ctx;
    this.id = id;
    this.task = null;
    this.events = [];
    this.error = null;
    this.streamState = 'connecting';
    this.ctrl = new AbortController();
    this.render = new Coalescer(() => this.refresh(), RENDER_MS);
  }

  mount(root) {
    this.root = root;
    this.head = h('div', { class: 'page-head' });
    this.facts = h('div', { class: 'facts' });
    this.io = h('section', { class: 'grid-2' });
    this.evBody = h('tbody');
    this.streamEl = h('span', { class: 'muted small' });
    replace(root,
      h('a', { href: '#/tasks', class: 'back small' }, '← Tasks'),
      this.head,
      h('section', { class: 'panel' }, this.facts),
      this.io,
      h('section', { class: 'panel' },
        h('div', { class: 'panel-head' }, h('h2', {}, 'Events'), this.streamEl),
        h('table', { class: 'table', id: 'events-table' },
          h('thead', {}, h('tr', {}, ['#', 'Time', 'Event', 'Status', 'Attempt', 'Node', 'Detail'].map((c) => h('th', {}, c)))),
          this.evBody)));
    this.offNames = this.ctx.names.listen(() => this.render.request());
    this.render.request();
    this.stream();
  }

  async stream() {
    let last = 0;
    let delay = 1000;
    while (!this.ctrl.signal.aborted) {
      try {
        const r = await this.ctx.api.sse(`/api/v1/tasks/${encodeURIComponent(this.id)}/events`, {
          signal: this.ctrl.signal,
          lastEventId: last || undefined,
          onOpen: () => { this.streamState = 'live'; delay = 1000; this.render.request(); },
          onEvent: (e) => {
            const ev = e.data;
            if (!ev || typeof ev !== 'object') return;
            const seq = Number(e.id || ev.seq || 0);
            if (seq && seq <= last) return;
            last = seq || last;
            this.events.push(ev);
            this.render.request();
          },
        });
        if (r.ended || (this.task && TERMINAL.has(this.task.status)) || this.events.some((ev) => TERMINAL.has(ev.status))) {
          this.streamState = 'ended';
          this.render.request();
          return;
        }
      } catch (e) {
        if (e.name === 'AbortError') return;
        this.streamState = `retrying: ${errorText(e)}`;
        this.render.request();
        if (e.status === 404 || e.status === 401) return;
      }
      await new Promise((r) => setTimeout(r, delay));
      delay = Math.min(delay * 2, 15000);
    }
  }

  async refresh() {
    try {
      this.task = await this.ctx.api.get(`/api/v1/tasks/${encodeURIComponent(this.id)}`, { signal: this.ctrl.signal });
      this.error = null;
    } catch (e) {
      if (e.name === 'AbortError') return false;
      this.error = errorText(e);
    }
    this.draw();
    // Until the event backlog is in, this was not the full first paint.
    return this.events.length > 0 || !['connecting', 'live'].includes(this.streamState) || Boolean(this.error);
  }

  async cancel() {
    try {
      await this.ctx.api.post(`/api/v1/tasks/${encodeURIComponent(this.id)}/cancel`);
      this.ctx.banner(null);
    } catch (e) {
      this.ctx.banner(`Could not cancel: ${errorText(e)}`);
    }
    this.render.request();
  }

  draw() {
    const t = this.task;
    if (!t) {
      replace(this.head, h('h1', {}, 'Task ', h('span', { class: 'mono' }, this.id)));
      replace(this.facts, h('p', { class: this.error ? 'text-bad' : 'muted' }, this.error ? `Could not load the task: ${this.error}` : 'loading…'));
      return;
    }
    replace(this.head,
      h('h1', {}, 'Task ', h('span', { class: 'mono', id: 'task-id' }, t.task_id)),
      h('span', { id: 'task-status' }, badge(t.status)),
      h('div', { class: 'spacer' }),
      TERMINAL.has(t.status) ? null : h('button', { class: 'btn btn-sm btn-danger', type: 'button', 'data-action': 'cancel', onclick: () => this.cancel() }, 'Cancel task'));
    const start = ms(t.started_at);
    const end = ms(t.finished_at);
    const fact = (k, v) => h('div', { class: 'fact' }, h('div', { class: 'fact-k' }, k), h('div', { class: 'fact-v' }, v));
    replace(this.facts,
      fact('Tool', h('a', { href: hashFor('tasks', { tool: t.tool }) }, t.tool)),
      fact('Node', t.node_id ? h('a', { href: hashFor('tasks', { node_id: t.node_id }), title: t.node_id }, this.ctx.names.get(t.node_id) || t.node_id) : '–'),
      fact('Attempt', `${t.attempt} of ${t.max_attempts}`),
      fact('Priority', String(t.priority)),
      fact('Progress', loadBar((t.progress || 0) / 100, `${Math.round(t.progress || 0)}%`, { neutral: true })),
      fact('Created', fmtTime(t.created_at)),
      fact('Started', fmtTime(t.started_at)),
      fact('Finished', fmtTime(t.finished_at)),
      fact('Run time', start ? fmtDuration(((end ?? Date.now()) - start) / 1000) : '–'),
      fact('Timeout', fmtDuration(t.timeout_seconds)),
      t.pinned_node_id ? fact('Pinned to', h('span', { class: 'mono' }, t.pinned_node_id)) : null,
      t.idempotency_key ? fact('Idempotency key', h('span', { class: 'mono' }, t.idempotency_key)) : null,
      t.description ? fact('Description', t.description) : null,
      t.message ? fact('Message', t.message) : null);
    replace(this.io,
      h('div', { class: 'panel' }, h('div', { class: 'panel-head' }, h('h2', {}, 'Arguments')), jsonBlock(t.args)),
      t.error
        ? h('div', { class: 'panel panel-bad' }, h('div', { class: 'panel-head' }, h('h2', {}, 'Error'), h('code', {}, t.error.code)), jsonBlock(t.error.message), t.error.details ? jsonBlock(t.error.details) : null)
        : h('div', { class: 'panel' }, h('div', { class: 'panel-head' }, h('h2', {}, 'Result')), TERMINAL.has(t.status) ? jsonBlock(t.result) : h('p', { class: 'muted' }, 'not finished yet')));
    this.streamEl.textContent = this.streamState === 'live' ? '● live' : this.streamState === 'ended' ? 'complete' : this.streamState;
    replace(this.evBody, this.events.length ? this.events.map((e) => h('tr', { dataset: { event: e.type } },
      h('td', { class: 'num' }, String(e.seq ?? '')),
      h('td', { class: 'nowrap mono', title: e.timestamp }, fmtTime(e.timestamp)),
      h('td', {}, h('code', {}, e.type)),
      h('td', {}, badge(e.status)),
      h('td', { class: 'num' }, String(e.attempt ?? '')),
      h('td', {}, this.ctx.names.label(e.node_id)),
      h('td', { class: e.error ? 'text-bad' : '' }, e.error ? `${e.error.code}: ${e.error.message}` : (e.message || (e.progress !== undefined ? `${Math.round(e.progress)}%` : ''))))) : emptyRow(7, 'no events yet'));
  }

  destroy() {
    this.ctrl.abort();
    this.render.stop();
    this.offNames?.();
  }
}

// ---------------------------------------------------------------------------------------------
// Live log tail

const LEVELS = ['debug', 'info', 'warn', 'error'];
const MAX_LINES = 1000;

/**
 * One log-channel message `{type, data}` → {time, level, source, text, taskId}. Types:
 * `node_log` {node_id, level, message}, `hub_event` {event, node_id?, task_id?, level, message},
 * `vcp_log` {tool_name, status, content, task_id, node_id?, level}, `log_dropped` {skipped}.
 */
export function logEntry(msg) {
  const d = msg && typeof msg.data === 'object' && msg.data !== null ? msg.data : { message: msg?.data };
  const type = msg?.type || '';
  let level = String(d.level || (d.status === 'error' ? 'error' : 'info')).toLowerCase();
  let source = d.node_id || d.source || (type === 'hub_event' ? 'hub' : '');
  let text;
  if (type === 'vcp_log') {
    const content = typeof d.content === 'string' ? d.content : JSON.stringify(d.content ?? '');
    text = `${d.tool_name || 'tool'} ${d.outcome || d.status || ''} → ${content}`;
  } else if (type === 'log_dropped') {
    level = 'warn';
    source = 'dashboard';
    text = `${fmtInt(d.skipped)} entries skipped: this tab fell behind the hub`;
  } else {
    text = d.message ?? d.content;
    if (text === undefined || text === null) text = JSON.stringify(d);
    if (typeof text !== 'string') text = JSON.stringify(text);
  }
  if (type === 'hub_event' && !d.node_id) source = 'hub';
  return { time: d.timestamp || new Date().toISOString(), level, source: String(source), type, text, taskId: d.task_id || null };
}

export class LogsView {
  constructor(ctx, params) {
    this.ctx = ctx;
    this.q = readQuery(params, ['node', 'level']);
    this.lines = [];
    this.dropped = 0;
    this.paused = false;
    this.search = '';
    this.state = 'connecting';
    this.render = new Coalescer(() => this.draw(), RENDER_MS);
  }

  mount(root) {
    this.root = root;
    this.out = h('div', { class: 'logtail', id: 'logtail', role: 'log', 'aria-live': 'off' });
    this.stateEl = h('span', { class: 'muted small' });
    const pauseBtn = h('button', { class: 'btn btn-sm', type: 'button' }, 'Pause');
    pauseBtn.addEventListener('click', () => {
      this.paused = !this.paused;
      pauseBtn.textContent = this.paused ? 'Resume' : 'Pause';
      this.render.request();
    });
    replace(root,
      h('div', { class: 'page-head' }, h('h1', {}, 'Live log'), this.stateEl),
      h('div', { class: 'toolbar' },
        textFilter('node', 'Node', this.q.node, 'node id', (v) => this.ctx.navigate(hashFor('logs', { ...this.q, node: v }))),
        select('level', 'Level', [['', 'any'], ...LEVELS.map((l) => [l, `${l}+`])], this.q.level, (v) => this.ctx.navigate(hashFor('logs', { ...this.q, level: v }))),
        textFilter('search', 'Search', '', 'text in this tail', (v) => { this.search = v.toLowerCase(); this.render.request(); }),
        h('div', { class: 'field field-buttons' }, pauseBtn,
          h('button', { class: 'btn btn-sm', type: 'button', onclick: () => { this.lines = []; this.dropped = 0; this.render.request(); } }, 'Clear'))),
      h('div', { class: 'panel panel-flush' }, this.out));
    this.offNames = this.ctx.names.listen(() => this.render.request());
    this.sock = new LogSocket(this.ctx.key, { node: this.q.node, level: this.q.level }, {
      onMessage: (m) => {
        this.lines.push(logEntry(m));
        if (this.lines.length > MAX_LINES) { this.dropped += this.lines.length - MAX_LINES; this.lines.splice(0, this.lines.length - MAX_LINES); }
        if (!this.paused) this.render.request();
      },
      onState: (s, detail) => { this.state = detail ? `${s}: ${detail}` : s; this.render.request(); },
    });
    this.render.request();
  }

  draw() {
    this.stateEl.textContent = `${this.state === 'live' ? '● live' : this.state} · ${fmtInt(this.lines.length)} lines${this.dropped ? ` (${fmtInt(this.dropped)} older dropped)` : ''}${this.paused ? ' · paused' : ''}`;
    if (this.paused) return;
    const atBottom = this.out.scrollHeight - this.out.scrollTop - this.out.clientHeight < 40;
    const shown = this.search ? this.lines.filter((l) => `${l.source} ${l.text}`.toLowerCase().includes(this.search)) : this.lines;
    if (!shown.length) {
      replace(this.out, h('div', { class: 'log-empty muted' }, this.lines.length ? 'No line matches the search.' : 'Waiting for log lines from the hub and its nodes…'));
    } else {
      replace(this.out, shown.map((l) => h('div', { class: `log-line lvl-${l.level}` },
        h('span', { class: 'log-time' }, fmtTime(l.time)),
        h('span', { class: 'log-level' }, l.level),
        h('span', { class: 'log-src', title: l.source }, this.sourceName(l.source)),
        h('span', { class: 'log-text' }, l.text,
          l.taskId ? h('a', { class: 'log-task', href: `#/tasks/${encodeURIComponent(l.taskId)}` }, ` task ${l.taskId.slice(0, 8)}`) : null))));
    }
    if (atBottom) this.out.scrollTop = this.out.scrollHeight;
  }

  sourceName(src) {
    const name = src.startsWith('node-') ? this.ctx.names.get(src) : null;
    const text = name || src;
    return text.length > 22 ? `${text.slice(0, 22)}…` : text;
  }

  destroy() {
    this.sock?.stop();
    this.offNames?.();
    this.render.stop();
  }
}
