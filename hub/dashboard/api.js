// The hub's HTTP API as the dashboard uses it: every call carries `Authorization: Bearer <key>`;
// Server-Sent Events are read with fetch (EventSource cannot send headers); the log channel is a
// WebSocket with the key in its path.

/** An HTTP error with the hub's message (from its `{"error": {...}}` body). */
export class ApiError extends Error {
  constructor(status, message, code) {
    super(message);
    this.status = status;
    this.code = code || null;
  }
}

async function errorOf(resp) {
  let message = `${resp.status} ${resp.statusText || 'error'}`;
  let code = null;
  try {
    const body = await resp.json();
    if (body && body.error) {
      message = body.error.message || message;
      code = body.error.code || null;
    }
  } catch { /* not JSON */ }
  return new ApiError(resp.status, message, code);
}

/** Query string from an object, skipping empty values. */
export function qs(params) {
  const u = new URLSearchParams();
  for (const [k, v] of Object.entries(params || {})) {
    if (v !== undefined && v !== null && v !== '') u.set(k, String(v));
  }
  const s = u.toString();
  return s ? `?${s}` : '';
}

export class Api {
  /**
   * @param {string} key API key
   * @param {(err: ApiError) => void} onUnauthorized called on any 401
   */
  constructor(key, onUnauthorized) {
    this.key = key;
    this.onUnauthorized = onUnauthorized;
  }

  headers(extra = {}) {
    return { Authorization: `Bearer ${this.key}`, ...extra };
  }

  async call(method, path, body, { signal } = {}) {
    const init = { method, headers: this.headers(), cache: 'no-store', signal };
    if (body !== undefined) {
      init.headers['Content-Type'] = 'application/json';
      init.body = JSON.stringify(body);
    }
    let resp;
    try {
      resp = await fetch(path, init);
    } catch (e) {
      if (e.name === 'AbortError') throw e;
      throw new ApiError(0, `the hub did not answer (${e.message})`);
    }
    if (!resp.ok) {
      const err = await errorOf(resp);
      if (resp.status === 401 && this.onUnauthorized) this.onUnauthorized(err);
      throw err;
    }
    if (resp.status === 204) return null;
    const text = await resp.text();
    return text ? JSON.parse(text) : null;
  }

  get(path, opts) { return this.call('GET', path, undefined, opts); }
  post(path, body = {}, opts) { return this.call('POST', path, body, opts); }

  /**
   * Reads a `text/event-stream` until it ends or `signal` aborts. Calls `onOpen()` once the
   * response arrived and `onEvent({event, data, id})` per event (`data` parsed as JSON when it
   * is). Resolves with `{ended: true}` on 204 No Content, else `{ended: false}` when the stream
   * closed; throws ApiError on an HTTP error.
   */
  async sse(path, { signal, onEvent, onOpen, lastEventId } = {}) {
    const headers = this.headers({ Accept: 'text/event-stream' });
    if (lastEventId) headers['Last-Event-ID'] = String(lastEventId);
    let resp;
    try {
      resp = await fetch(path, { headers, signal, cache: 'no-store' });
    } catch (e) {
      if (e.name === 'AbortError') throw e;
      throw new ApiError(0, `the hub did not answer (${e.message})`);
    }
    if (resp.status === 204) return { ended: true };
    if (!resp.ok) {
      const err = await errorOf(resp);
      if (resp.status === 401 && this.onUnauthorized) this.onUnauthorized(err);
      throw err;
    }
    if (onOpen) onOpen();
    const reader = resp.body.pipeThrough(new TextDecoderStream()).getReader();
    let buf = '';
    let cur = { event: '', data: [], id: null };
    const dispatch = () => {
      if (cur.data.length) {
        const raw = cur.data.join('\n');
        let data = raw;
        try { data = JSON.parse(raw); } catch { /* plain text */ }
        onEvent({ event: cur.event || 'message', data, id: cur.id });
      }
      cur = { event: '', data: [], id: cur.id };
    };
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += value;
      for (;;) {
        const nl = buf.search(/[\r\n]/);
        if (nl < 0) break;
        // A CR at the very end may be the first half of CRLF: wait for more.
        if (buf[nl] === '\r' && nl === buf.length - 1) break;
        const line = buf.slice(0, nl);
        buf = buf.slice(buf[nl] === '\r' && buf[nl + 1] === '\n' ? nl + 2 : nl + 1);
        if (line === '') { dispatch(); continue; }
        if (line.startsWith(':')) continue;
        const colon = line.indexOf(':');
        const field = colon < 0 ? line : line.slice(0, colon);
        let val = colon < 0 ? '' : line.slice(colon + 1);
        if (val.startsWith(' ')) val = val.slice(1);
        if (field === 'event') cur.event = val;
        else if (field === 'data') cur.data.push(val);
        else if (field === 'id') cur.id = val;
      }
    }
    return { ended: false };
  }
}

/**
 * A long-lived SSE subscription that reconnects with backoff (1 s doubling to 15 s).
 * `onState(state, detail)` gets `connecting`, `live`, `retrying` (detail: error text) or
 * `unavailable` (the route answered 404: the hub has no such stream).
 */
export class Subscription {
  constructor(api, path, { onEvent, onState }) {
    this.api = api;
    this.path = path;
    this.onEvent = onEvent;
    this.onState = onState || (() => {});
    this.ctrl = null;
    this.stopped = false;
    this.delay = 1000;
    this.loop();
  }

  async loop() {
    while (!this.stopped) {
      this.ctrl = new AbortController();
      this.onState('connecting');
      try {
        await this.api.sse(this.path, {
          signal: this.ctrl.signal,
          onOpen: () => { this.delay = 1000; this.onState('live'); },
          onEvent: (e) => this.onEvent(e),
        });
        if (this.stopped) return;
        this.onState('retrying', 'stream closed');
      } catch (e) {
        if (this.stopped || e.name === 'AbortError') return;
        if (e.status === 404 || e.status === 405) { this.onState('unavailable', e.message); return; }
        if (e.status === 401) { this.stopped = true; return; }
        this.onState('retrying', e.message);
      }
      await new Promise((r) => setTimeout(r, this.delay));
      this.delay = Math.min(this.delay * 2, 15000);
    }
  }

  stop() {
    this.stopped = true;
    if (this.ctrl) this.ctrl.abort();
  }
}

/**
 * The log channel: WebSocket `/log/VCP_Key=<key>[?node=&level=]`, one `{type, data}` JSON
 * object per message. Reconnects with backoff; `onState` as for Subscription, plus `closed`.
 */
export class LogSocket {
  constructor(key, params, { onMessage, onState }) {
    this.key = key;
    this.params = params;
    this.onMessage = onMessage;
    this.onState = onState || (() => {});
    this.stopped = false;
    this.delay = 1000;
    this.ws = null;
    this.connect();
  }

  url() {
    const proto = location.protocol === 'https:' ? 'wss:' : 'ws:';
    return `${proto}//${location.host}/log/VCP_Key=${encodeURIComponent(this.key)}${qs(this.params)}`;
  }

  connect() {
    if (this.stopped) return;
    this.onState('connecting');
    let opened = false;
    const ws = new WebSocket(this.url());
    this.ws = ws;
    ws.onopen = () => { opened = true; this.delay = 1000; this.onState('live'); };
    ws.onmessage = (m) => {
      let msg;
      try { msg = JSON.parse(m.data); } catch { msg = { type: 'text', data: String(m.data) }; }
      this.onMessage(msg);
    };
    ws.onclose = (ev) => {
      if (this.stopped) return;
      this.onState('retrying', opened ? `closed (${ev.code})` : 'could not connect');
      setTimeout(() => this.connect(), this.delay);
      this.delay = Math.min(this.delay * 2, 15000);
    };
  }

  stop() {
    this.stopped = true;
    if (this.ws) this.ws.close(1000, 'view closed');
  }
}
