// DOM building and formatting helpers. Every text from the hub goes in through textContent
// (never innerHTML), so node names, tool output and log lines cannot inject markup.

/**
 * Creates an element. `attrs` keys: `class`, `dataset` (object), `on<event>` (listener),
 * `style` (object), anything else as an attribute (false/null/undefined skip it).
 * Children: nodes, strings, numbers, arrays of those; null/false are skipped.
 */
export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === 'class') el.className = v;
    else if (k === 'dataset') Object.assign(el.dataset, v);
    else if (k === 'style') Object.assign(el.style, v);
    else if (k.startsWith('on') && typeof v === 'function') el.addEventListener(k.slice(2), v);
    else if (k === 'value') el.value = v;
    else el.setAttribute(k, v === true ? '' : String(v));
  }
  append(el, children);
  return el;
}

function append(el, children) {
  for (const c of children) {
    if (c === null || c === undefined || c === false) continue;
    if (Array.isArray(c)) append(el, c);
    else if (c instanceof Node) el.appendChild(c);
    else el.appendChild(document.createTextNode(String(c)));
  }
}

/** Replaces every child of `el` in one DOM operation (one mutation, one layout). */
export function replace(el, ...children) {
  const frag = document.createDocumentFragment();
  append(frag, children);
  el.replaceChildren(frag);
}

/**
 * Runs `fn` at most once per `intervalMs`. A request after a quiet period runs after `settleMs`
 * (so a burst, such as an event backlog, lands in one render); later ones are merged into a
 * single run when the interval has passed. A run still in progress (async) delays the next one
 * until it ends (and counts from its start). A run whose `fn` returns `false` (it had nothing to show yet, e.g. before the
 * first answer) does not count, so the first real render is not held back.
 */
export class Coalescer {
  /**
   * `adaptive`: when a run takes long (a slow hub answering a list), the next one waits four
   * times as long as it took (at most 30 s), so a live view never keeps a busy hub busier.
   */
  constructor(fn, intervalMs = 1000, settleMs = 50, { adaptive = false } = {}) {
    this.fn = fn;
    this.interval = intervalMs;
    this.minInterval = intervalMs;
    this.adaptive = adaptive;
    this.settle = settleMs;
    this.last = 0;
    this.timer = null;
    this.running = false;
    this.pending = false;
    this.stopped = false;
  }

  request() {
    if (this.stopped) return;
    if (this.running) { this.pending = true; return; }
    if (this.timer) return;
    const wait = Math.max(this.settle, this.last + this.interval - Date.now());
    this.timer = setTimeout(() => this.run(), wait);
  }

  async run() {
    this.timer = null;
    if (this.stopped) return;
    this.running = true;
    const started = Date.now();
    let shown = true;
    try { shown = (await this.fn()) !== false; } catch (e) { console.error(e); }
    this.last = shown ? started : 0;
    if (this.adaptive) this.interval = Math.max(this.minInterval, Math.min(30_000, 4 * (Date.now() - started)));
    this.running = false;
    if (this.pending) { this.pending = false; this.request(); }
  }

  stop() {
    this.stopped = true;
    if (this.timer) clearTimeout(this.timer);
    this.timer = null;
  }
}

const nf = new Intl.NumberFormat('en-US');
/** 12,345 */
export const fmtInt = (n) => (n === null || n === undefined || Number.isNaN(n) ? '–' : nf.format(Math.round(n)));

/** A number with at most `d` decimals, or `–`. */
export function fmtNum(n, d = 1) {
  if (n === null || n === undefined || !Number.isFinite(n)) return '–';
  return n.toLocaleString('en-US', { maximumFractionDigits: d });
}

/** Percent 0-100 → `42%`, or `–`. */
export const fmtPct = (n) => (n === null || n === undefined || !Number.isFinite(n) ? '–' : `${n.toFixed(n < 10 ? 1 : 0)}%`);

/** Seconds → `3d 4h`, `5h 12m`, `4m 05s`, `12.3 s`, `85 ms`. */
export function fmtDuration(s) {
  if (s === null || s === undefined || !Number.isFinite(s)) return '–';
  if (s < 0) s = 0;
  if (s < 1) return `${Math.round(s * 1000)} ms`;
  if (s < 60) return `${s.toFixed(s < 10 ? 2 : 1)} s`;
  const m = Math.floor(s / 60);
  if (m < 60) return `${m}m ${String(Math.floor(s % 60)).padStart(2, '0')}s`;
  const hr = Math.floor(m / 60);
  if (hr < 48) return `${hr}h ${String(m % 60).padStart(2, '0')}m`;
  return `${Math.floor(hr / 24)}d ${hr % 24}h`;
}

/** RFC 3339 → milliseconds since the epoch, or null. */
export function ms(t) {
  if (!t) return null;
  const v = typeof t === 'number' ? t : Date.parse(t);
  return Number.isFinite(v) ? v : null;
}

/** `12s ago`, `3m ago`, ... for an RFC 3339 time. */
export function fmtAgo(t, now = Date.now()) {
  const v = ms(t);
  if (v === null) return '–';
  const s = Math.max(0, (now - v) / 1000);
  if (s < 1) return 'just now';
  if (s < 60) return `${Math.floor(s)}s ago`;
  if (s < 3600) return `${Math.floor(s / 60)}m ago`;
  if (s < 86400) return `${Math.floor(s / 3600)}h ago`;
  return `${Math.floor(s / 86400)}d ago`;
}

/** Local `HH:MM:SS` (with the date when not today) for an RFC 3339 time. */
export function fmtTime(t) {
  const v = ms(t);
  if (v === null) return '–';
  const d = new Date(v);
  const time = d.toLocaleTimeString('en-GB', { hour12: false });
  if (new Date().toDateString() === d.toDateString()) return time;
  return `${d.toISOString().slice(0, 10)} ${time}`;
}

/** First 8 characters of an id, the whole id in the title. */
export function shortId(id, n = 8) {
  if (!id) return h('span', { class: 'muted' }, '–');
  return h('span', { class: 'mono', title: id }, id.length > n + 1 ? `${id.slice(0, n)}…` : id);
}

/** A coloured status pill. */
export function badge(status) {
  const s = status || 'unknown';
  return h('span', { class: `badge badge-${s}`, dataset: { status: s } }, s.replace('_', ' '));
}

/** Pretty JSON in a <pre>. */
export function jsonBlock(v) {
  let text;
  if (v === undefined || v === null) text = 'null';
  else if (typeof v === 'string') text = v;
  else {
    try { text = JSON.stringify(v, null, 2); } catch { text = String(v); }
  }
  return h('pre', { class: 'json' }, text.length > 100_000 ? `${text.slice(0, 100_000)}\n… (truncated)` : text);
}

/** A horizontal bar, `frac` 0-1; amber from 60 %, red from 90 % unless `neutral`. */
export function loadBar(frac, label, { neutral = false } = {}) {
  const f = Math.max(0, Math.min(1, Number(frac) || 0));
  const cls = neutral ? '' : f >= 0.9 ? 'hot' : f >= 0.6 ? 'warm' : '';
  return h('div', { class: 'loadbar', title: label },
    h('div', { class: `loadbar-fill ${cls}`, style: { width: `${(f * 100).toFixed(1)}%` } }),
    h('span', { class: 'loadbar-text' }, label));
}
