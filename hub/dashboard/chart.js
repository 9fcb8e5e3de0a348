// A small time-series line chart drawn on <canvas>: sharp on high-DPI screens, redrawn on
// resize, y axis with round ticks, x axis in minutes before now.

const COLORS = {
  grid: 'rgba(148, 163, 184, 0.14)',
  axis: '#8b98ad',
};

function niceStep(range, ticks) {
  const raw = range / Math.max(1, ticks);
  const mag = 10 ** Math.floor(Math.log10(raw));
  const norm = raw / mag;
  const step = norm <= 1 ? 1 : norm <= 2 ? 2 : norm <= 2.5 ? 2.5 : norm <= 5 ? 5 : 10;
  return step * mag;
}

function fmtTick(v) {
  if (v >= 1e6) return `${(v / 1e6).toFixed(v % 1e6 ? 1 : 0)}M`;
  if (v >= 1e3) return `${(v / 1e3).toFixed(v % 1e3 ? 1 : 0)}k`;
  return String(Number(v.toFixed(2)));
}

export class TimeChart {
  /**
   * @param {HTMLCanvasElement} canvas
   * @param {{color: string, windowMs: number, unit?: string, integer?: boolean}} opts
   *   `integer`: the series holds counts, so the y axis steps by whole numbers
   */
  constructor(canvas, { color, windowMs, unit = '', integer = false }) {
    this.integer = integer;
    this.canvas = canvas;
    this.color = color;
    this.windowMs = windowMs;
    this.unit = unit;
    this.points = [];
    this.ro = new ResizeObserver(() => this.draw());
    this.ro.observe(canvas);
  }

  /** Replaces the data: `[[timeMs, value], ...]` in time order. */
  setData(points) {
    this.points = points;
    this.draw();
  }

  destroy() { this.ro.disconnect(); }

  draw() {
    const c = this.canvas;
    const w = c.clientWidth;
    const hgt = c.clientHeight;
    if (!w || !hgt) return;
    const dpr = window.devicePixelRatio || 1;
    if (c.width !== Math.round(w * dpr) || c.height !== Math.round(hgt * dpr)) {
      c.width = Math.round(w * dpr);
      c.height = Math.round(hgt * dpr);
    }
    const g = c.getContext('2d');
    g.setTransform(dpr, 0, 0, dpr, 0, 0);
    g.clearRect(0, 0, w, hgt);
    g.font = '11px system-ui, -apple-system, "Segoe UI", Roboto, sans-serif';

    const pad = { l: 44, r: 12, t: 10, b: 22 };
    const pw = w - pad.l - pad.r;
    const ph = hgt - pad.t - pad.b;
    const now = Date.now();
    // The window grows with the history, from one minute up to windowMs, so a freshly opened
    // page shows detail instead of a line squeezed against the right edge.
    const first = this.points.length ? this.points[0][0] : now;
    const win = Math.min(this.windowMs, Math.max(60_000, Math.ceil((now - first) / 60_000) * 60_000));
    const t0 = now - win;
    const pts = this.points.filter(([t]) => t >= t0 - 5000);

    let max = 0;
    for (const [, v] of pts) if (v > max) max = v;
    let step = niceStep(max > 0 ? max : (this.integer ? 4 : 1), 4);
    if (this.integer) step = step < 1 ? 1 : step === 2.5 ? 2 : step;
    const top = Math.max(step, Math.ceil((max * 1.1) / step) * step);

    // grid and y labels
    g.strokeStyle = COLORS.grid;
    g.fillStyle = COLORS.axis;
    g.lineWidth = 1;
    g.textAlign = 'right';
    g.textBaseline = 'middle';
    for (let v = 0; v <= top + step / 2; v += step) {
      const y = Math.round(pad.t + ph - (v / top) * ph) + 0.5;
      g.beginPath(); g.moveTo(pad.l, y); g.lineTo(pad.l + pw, y); g.stroke();
      g.fillText(fmtTick(v), pad.l - 6, y);
    }
    // x labels: every 15 s on a one-minute window, else every minute
    g.textAlign = 'center';
    g.textBaseline = 'top';
    const every = win <= 60_000 ? 15_000 : 60_000;
    for (let a = win; a >= 0; a -= every) {
      const x = pad.l + pw - (a / win) * pw;
      const label = a === 0 ? 'now' : every < 60_000 ? `-${a / 1000}s` : `-${a / 60_000}m`;
      g.fillText(label, x, pad.t + ph + 6);
    }

    if (pts.length === 0) {
      g.textAlign = 'center';
      g.textBaseline = 'middle';
      g.fillText('waiting for data…', pad.l + pw / 2, pad.t + ph / 2);
      return;
    }
    const X = (t) => pad.l + ((t - t0) / win) * pw;
    const Y = (v) => pad.t + ph - (v / top) * ph;

    g.save();
    g.beginPath();
    g.rect(pad.l, pad.t, pw, ph + 1);
    g.clip();
    // area
    const grad = g.createLinearGradient(0, pad.t, 0, pad.t + ph);
    grad.addColorStop(0, `${this.color}55`);
    grad.addColorStop(1, `${this.color}05`);
    g.beginPath();
    g.moveTo(X(pts[0][0]), Y(0));
    for (const [t, v] of pts) g.lineTo(X(t), Y(v));
    g.lineTo(X(pts[pts.length - 1][0]), Y(0));
    g.closePath();
    g.fillStyle = grad;
    g.fill();
    // line
    g.beginPath();
    pts.forEach(([t, v], i) => (i ? g.lineTo(X(t), Y(v)) : g.moveTo(X(t), Y(v))));
    g.strokeStyle = this.color;
    g.lineWidth = 1.75;
    g.lineJoin = 'round';
    g.stroke();
    // last point
    const [lt, lv] = pts[pts.length - 1];
    g.beginPath();
    g.arc(X(lt), Y(lv), 3, 0, Math.PI * 2);
    g.fillStyle = this.color;
    g.fill();
    g.restore();
  }
}
