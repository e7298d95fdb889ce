// Strata web UI: the core. One global namespace (`Strata`), the API client with the session's
// CSRF token, errors, and formatting. The files under js/ are joined in order by the server.
'use strict';

const S = (window.Strata = { views: {}, session: null });

/** An error answered by the API: its HTTP status, kind and message. */
S.ApiError = class extends Error {
  constructor(status, kind, message) {
    super(message);
    this.status = status;
    this.kind = kind;
  }
};

/** Where to sign in again, coming back here after. */
S.signInAgain = function (reason) {
  const next = encodeURIComponent(location.pathname);
  location.assign('/ui/login?next=' + next + (reason ? '&reason=' + encodeURIComponent(reason) : ''));
};

/** Calls the API. `body` is sent as JSON; the answer is parsed JSON (or null for 204). */
S.api = async function (method, path, body) {
  const headers = { Accept: 'application/json' };
  if (method !== 'GET' && method !== 'HEAD') headers['X-CSRF-Token'] = S.session ? S.session.csrf : '';
  const init = { method, headers, credentials: 'same-origin' };
  if (body !== undefined) {
    headers['Content-Type'] = 'application/json';
    init.body = JSON.stringify(body);
  }
  let resp;
  try {
    resp = await fetch(path, init);
  } catch (e) {
    throw new S.ApiError(0, 'network', 'The server did not answer (' + e.message + ')');
  }
  return S.answer(resp);
};

/** Turns a response into its JSON, or throws its error. */
S.answer = async function (resp) {
  if (resp.status === 204) return null;
  const text = await resp.text();
  let data = null;
  try {
    data = text ? JSON.parse(text) : null;
  } catch (e) {
    data = null;
  }
  if (resp.ok) return data;
  if (resp.status === 401) {
    S.signInAgain('expired');
    throw new S.ApiError(401, 'unauthorized', 'Your session has ended. Sign in again.');
  }
  const msg = data && data.message ? data.message : text || resp.statusText || 'Request failed';
  throw new S.ApiError(resp.status, data && data.kind ? data.kind : 'error', msg);
};

/** A readable description of an error, with its HTTP status. */
S.describe = function (e) {
  if (e instanceof S.ApiError) {
    const what = {
      409: 'Conflict', 507: 'Out of space', 404: 'Not found', 403: 'Not allowed',
      400: 'Invalid request', 429: 'Too busy', 501: 'Not supported', 422: 'Damaged data',
    }[e.status];
    return (what ? what + ' (' + e.status + '): ' : e.status ? 'Error ' + e.status + ': ' : '') + e.message;
  }
  return String(e && e.message ? e.message : e);
};

// ---- formatting ----
S.fmt = {
  bytes(n) {
    if (n === null || n === undefined || isNaN(n)) return '–';
    const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB', 'PiB'];
    let i = 0;
    let v = Math.abs(n);
    while (v >= 1024 && i < units.length - 1) {
      v /= 1024;
      i++;
    }
    const s = i === 0 ? String(v) : v >= 100 ? v.toFixed(0) : v >= 10 ? v.toFixed(1) : v.toFixed(2);
    return (n < 0 ? '-' : '') + s + ' ' + units[i];
  },
  pct(used, total) {
    if (!total) return '–';
    return ((used * 100) / total).toFixed(used * 100 < total ? 1 : 0) + '%';
  },
  date(secs) {
    if (!secs && secs !== 0) return '–';
    const d = new Date(secs * 1000);
    return d.toLocaleString(undefined, { year: 'numeric', month: 'short', day: 'numeric', hour: '2-digit', minute: '2-digit' });
  },
  day(secs) {
    if (!secs) return '–';
    return new Date(secs * 1000).toLocaleDateString(undefined, { year: 'numeric', month: 'short', day: 'numeric' });
  },
  duration(secs) {
    if (secs === null || secs === undefined) return '–';
    secs = Math.max(0, Math.round(secs));
    if (secs < 60) return secs + ' s';
    if (secs < 3600) return Math.floor(secs / 60) + ' min ' + (secs % 60) + ' s';
    if (secs < 86400) return Math.floor(secs / 3600) + ' h ' + Math.floor((secs % 3600) / 60) + ' min';
    return Math.floor(secs / 86400) + ' d ' + Math.floor((secs % 86400) / 3600) + ' h';
  },
  age(secs) {
    if (!secs) return '–';
    const d = Date.now() / 1000 - secs;
    if (d < 60) return 'just now';
    return S.fmt.duration(d).replace(/ \d+ (s|min)$/, '') + ' ago';
  },
  /** Parses "10G", "512M", "1.5T" into bytes (for form checks; the server parses again). */
  parseSize(text) {
    const m = /^\s*(\d+(?:\.\d+)?)\s*([KMGTP]?)(i?B)?\s*$/i.exec(text || '');
    if (!m) return null;
    const mult = { '': 1, K: 2 ** 10, M: 2 ** 20, G: 2 ** 30, T: 2 ** 40, P: 2 ** 50 }[m[2].toUpperCase()];
    return Math.round(parseFloat(m[1]) * mult);
  },
};

/** Backup snapshot names are `ID/TIME`: the time in seconds. */
S.snapshotTime = function (name) {
  const t = Date.parse(name.slice(name.lastIndexOf('/') + 1));
  return isNaN(t) ? null : t / 1000;
};
