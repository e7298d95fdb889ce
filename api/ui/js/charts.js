// Small usage-history graphs as inline SVG: used bytes over time (area and line), the capacity
// (dashed red) and, when the estimate falls near, the projection to it (dashed).

S.usageChart = function (series) {
  const ns = 'http://www.w3.org/2000/svg';
  const W = 320;
  const H = 96;
  const padT = 8;
  const padB = 16;
  const svg = document.createElementNS(ns, 'svg');
  svg.setAttribute('viewBox', '0 0 ' + W + ' ' + H);
  svg.setAttribute('preserveAspectRatio', 'none');
  svg.classList.add('chart');
  svg.setAttribute('role', 'img');
  const pts = series.points || [];
  const label = series.label + ': ' + (pts.length ? S.fmt.bytes(series.used) + ' used of ' + S.fmt.bytes(series.capacity) : 'no samples yet');
  svg.setAttribute('aria-label', label);
  const el = (name, attrs) => {
    const e = document.createElementNS(ns, name);
    for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
    svg.append(e);
    return e;
  };
  if (pts.length < 2) {
    const t = el('text', { x: W / 2, y: H / 2, 'text-anchor': 'middle' });
    t.textContent = pts.length ? 'One sample so far' : 'No samples yet';
    return svg;
  }
  const t0 = pts[0][0];
  let t1 = pts[pts.length - 1][0];
  const span = Math.max(1, t1 - t0);
  const full = series.estimated_full;
  const project = full && full > t1 && full - t1 < span * 2;
  if (project) t1 = full;
  const cap = Math.max(...pts.map((p) => p[2]), ...pts.map((p) => p[1]), 1);
  const x = (t) => ((t - t0) / Math.max(1, t1 - t0)) * W;
  const y = (v) => padT + (1 - v / cap) * (H - padT - padB);
  const line = pts.map((p, i) => (i ? 'L' : 'M') + x(p[0]).toFixed(1) + ' ' + y(p[1]).toFixed(1)).join(' ');
  const last = pts[pts.length - 1];
  el('path', { class: 'area', d: line + ' L' + x(last[0]).toFixed(1) + ' ' + y(0) + ' L0 ' + y(0) + ' Z' });
  el('path', { class: 'line', d: line, 'vector-effect': 'non-scaling-stroke' });
  if (series.capacity) el('line', { class: 'cap', x1: 0, x2: W, y1: y(series.capacity), y2: y(series.capacity), 'vector-effect': 'non-scaling-stroke' });
  if (project) el('line', { class: 'proj', x1: x(last[0]), y1: y(last[1]), x2: x(full), y2: y(series.capacity), 'vector-effect': 'non-scaling-stroke' });
  const from = el('text', { x: 2, y: H - 3 });
  from.textContent = S.fmt.date(t0);
  const to = el('text', { x: W - 2, y: H - 3, 'text-anchor': 'end' });
  to.textContent = project ? 'full ' + S.fmt.day(full) : S.fmt.date(pts[pts.length - 1][0]);
  return svg;
};

/** "Estimated full" text for a series. */
S.estimate = function (series) {
  if (series.estimated_full) {
    const soon = series.estimated_full - Date.now() / 1000 < 14 * 86400;
    return S.h('span', { class: soon ? 'badge bad' : 'badge warn' }, 'Estimated full ' + S.fmt.day(series.estimated_full));
  }
  return S.h('span.small.muted', series.estimate_note ? 'No full date: ' + series.estimate_note : '');
};
