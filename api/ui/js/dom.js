// DOM helpers: elements (text is always set as text, never parsed as HTML), icons, toasts,
// dialogs with labelled fields, and buttons that run an action and show its error.

/** Makes an element: h('button.primary#go', {onclick, type}, 'Text', child, ...). */
S.h = function (spec, attrs, ...children) {
  const m = /^([a-z0-9]+)?((?:[.#][\w-]+)*)$/i.exec(spec);
  const el = document.createElement((m && m[1]) || 'div');
  if (m && m[2]) {
    for (const part of m[2].match(/[.#][\w-]+/g)) {
      if (part[0] === '.') el.classList.add(part.slice(1));
      else el.id = part.slice(1);
    }
  }
  if (attrs && (typeof attrs !== 'object' || attrs instanceof Node || Array.isArray(attrs))) {
    children.unshift(attrs);
    attrs = null;
  }
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k.startsWith('on')) el.addEventListener(k.slice(2), v);
    else if (k === 'class') el.className = v;
    else if (k === 'dataset') Object.assign(el.dataset, v);
    else if (k === 'value') el.value = v;
    else if (k === 'checked') el.checked = !!v;
    else el.setAttribute(k, v === true ? '' : v);
  }
  S.append(el, children);
  return el;
};

S.append = function (el, children) {
  for (const c of children.flat(Infinity)) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
};

/** Replaces an element's children. */
S.fill = function (el, ...children) {
  el.replaceChildren();
  return S.append(el, children);
};

// Icons: 24×24 stroke paths.
const ICONS = {
  dashboard: 'M3 13h8V3H3zm10 8h8V11h-8zM3 21h8v-6H3zm10-18v6h8V3z',
  volumes: 'M4 6c0-1.7 3.6-3 8-3s8 1.3 8 3-3.6 3-8 3-8-1.3-8-3zm0 0v12c0 1.7 3.6 3 8 3s8-1.3 8-3V6M4 12c0 1.7 3.6 3 8 3s8-1.3 8-3',
  images: 'M4 4h16v16H4zM4 15l5-5 4 4 3-3 4 4',
  backups: 'M12 3a9 9 0 1 1-8.5 6M3 4v5h5M12 7v5l3 3',
  jobs: 'M4 6h16M4 12h10M4 18h6M18 14l3 3-3 3',
  vms: 'M3 4h18v12H3zM8 20h8M12 16v4',
  settings: 'M12 15a3 3 0 1 0 0-6 3 3 0 0 0 0 6zM19.4 15a1.7 1.7 0 0 0 .3 1.8l.1.1a2 2 0 1 1-2.8 2.8l-.1-.1a1.7 1.7 0 0 0-1.8-.3 1.7 1.7 0 0 0-1 1.5V21a2 2 0 1 1-4 0v-.1a1.7 1.7 0 0 0-1.1-1.5 1.7 1.7 0 0 0-1.8.3l-.1.1a2 2 0 1 1-2.8-2.8l.1-.1a1.7 1.7 0 0 0 .3-1.8 1.7 1.7 0 0 0-1.5-1H3a2 2 0 1 1 0-4h.1a1.7 1.7 0 0 0 1.5-1.1 1.7 1.7 0 0 0-.3-1.8l-.1-.1a2 2 0 1 1 2.8-2.8l.1.1a1.7 1.7 0 0 0 1.8.3H9a1.7 1.7 0 0 0 1-1.5V3a2 2 0 1 1 4 0v.1a1.7 1.7 0 0 0 1 1.5 1.7 1.7 0 0 0 1.8-.3l.1-.1a2 2 0 1 1 2.8 2.8l-.1.1a1.7 1.7 0 0 0-.3 1.8V9a1.7 1.7 0 0 0 1.5 1H21a2 2 0 1 1 0 4h-.1a1.7 1.7 0 0 0-1.5 1z',
};

S.icon = function (name) {
  const ns = 'http://www.w3.org/2000/svg';
  const svg = document.createElementNS(ns, 'svg');
  svg.setAttribute('viewBox', '0 0 24 24');
  svg.setAttribute('aria-hidden', 'true');
  const p = document.createElementNS(ns, 'path');
  p.setAttribute('d', ICONS[name] || '');
  p.setAttribute('fill', 'none');
  p.setAttribute('stroke', 'currentColor');
  p.setAttribute('stroke-width', '1.8');
  p.setAttribute('stroke-linecap', 'round');
  p.setAttribute('stroke-linejoin', 'round');
  svg.append(p);
  return svg;
};

/** A coloured badge. */
S.badge = function (text, kind) {
  return S.h('span.badge' + (kind ? '.' + kind : ''), text);
};

/** A usage bar with its label line. */
S.meter = function (label, used, total, extra) {
  const pct = total ? Math.min(100, (used * 100) / total) : 0;
  const cls = pct >= 90 ? '.bad' : pct >= 75 ? '.warn' : '';
  const bar = S.h('div.meter' + cls, { role: 'meter', 'aria-label': label, 'aria-valuemin': 0, 'aria-valuemax': 100, 'aria-valuenow': Math.round(pct) },
    S.h('span', { style: 'width:' + pct.toFixed(1) + '%' }));
  return S.h('div',
    S.h('div.usage-line', S.h('span', label), S.h('span.muted', S.fmt.bytes(used) + ' of ' + S.fmt.bytes(total) + ' · ' + S.fmt.pct(used, total))),
    bar, extra || null);
};

/** A toast that goes away by itself (errors stay until closed). */
S.toast = function (text, kind) {
  const box = document.getElementById('toasts');
  if (!box) return;
  const close = S.h('button', { type: 'button', 'aria-label': 'Close' }, '×');
  const t = S.h('div.alert.alert-' + (kind || 'ok'), { role: kind === 'error' ? 'alert' : 'status' }, S.h('div.grow', text), close);
  close.onclick = () => t.remove();
  box.append(t);
  if (kind !== 'error') setTimeout(() => t.remove(), 5000);
};

/** An error box (role=alert) for a view or a dialog; `show(e)` fills it, `clear()` hides it. */
S.errorBox = function () {
  const text = S.h('div.grow');
  const close = S.h('button', { type: 'button', 'aria-label': 'Dismiss error' }, '×');
  const box = S.h('div.alert.alert-error.api-error', { role: 'alert', hidden: true }, text, close);
  close.onclick = () => (box.hidden = true);
  box.show = (e) => {
    text.textContent = S.describe(e);
    box.hidden = false;
    box.scrollIntoView({ block: 'nearest' });
  };
  box.clear = () => (box.hidden = true);
  return box;
};

/** Runs `fn` for a button: disabled and busy meanwhile; an error goes to `errors` (or a toast). */
S.run = async function (button, errors, fn) {
  if (button) {
    button.disabled = true;
    button.classList.add('busy');
  }
  if (errors) errors.clear();
  try {
    return await fn();
  } catch (e) {
    if (e instanceof S.ApiError && e.status === 401) return;
    if (errors) errors.show(e);
    else S.toast(S.describe(e), 'error');
    return undefined;
  } finally {
    if (button) {
      button.disabled = false;
      button.classList.remove('busy');
    }
  }
};

/** A button that runs an action. */
S.button = function (label, fn, opts) {
  opts = opts || {};
  const b = S.h('button' + (opts.cls ? '.' + opts.cls.split(' ').join('.') : ''), { type: 'button', title: opts.title, 'aria-label': opts.aria, dataset: opts.data }, label);
  b.addEventListener('click', () => S.run(b, opts.errors, () => fn(b)));
  return b;
};

let fieldSeq = 0;
/** A labelled form field. `type`: text, password, number, select, checkbox, file, textarea. */
S.field = function (f) {
  const id = 'f' + ++fieldSeq;
  let input;
  if (f.type === 'select') {
    input = S.h('select', { id, name: f.name, required: f.required });
    for (const o of f.options || []) {
      const [value, label] = Array.isArray(o) ? o : [o, o];
      input.append(S.h('option', { value, selected: value === f.value }, label));
    }
  } else if (f.type === 'textarea') {
    input = S.h('textarea', { id, name: f.name, rows: f.rows || 3, required: f.required }, f.value || '');
  } else {
    input = S.h('input', {
      id, name: f.name, type: f.type || 'text', required: f.required, placeholder: f.placeholder,
      min: f.min, max: f.max, accept: f.accept, autocomplete: f.autocomplete || 'off',
      spellcheck: 'false', value: f.type === 'checkbox' || f.type === 'file' ? null : f.value, checked: f.type === 'checkbox' && f.value,
    });
  }
  const label = S.h('label', { for: id }, f.label);
  const help = f.help ? S.h('span.help', { id: id + '-help' }, f.help) : null;
  if (help) input.setAttribute('aria-describedby', id + '-help');
  const wrap = f.type === 'checkbox' ? S.h('div.field.check', input, label, help) : S.h('div.field', label, input, help);
  wrap.input = input;
  if (f.hidden) wrap.hidden = true;
  return wrap;
};

/** Values of a dialog's or form's fields by name. */
S.values = function (fields) {
  const out = {};
  for (const f of fields) {
    const i = f.input;
    if (!i || !i.name) continue;
    out[i.name] = i.type === 'checkbox' ? i.checked : i.type === 'file' ? i.files[0] : i.value.trim();
  }
  return out;
};

/**
 * A modal dialog: title, fields (from S.field) and other content, a submit button. `onSubmit`
 * gets the values; its error is shown in the dialog, which stays open; success closes it.
 */
S.dialog = function (opts) {
  const errors = S.errorBox();
  const fields = opts.fields || [];
  const submit = S.h('button.primary', { type: 'submit' }, opts.submit || 'OK');
  if (opts.danger) submit.className = 'danger';
  const cancel = S.h('button', { type: 'button' }, opts.cancel || 'Cancel');
  const titleId = 'd' + ++fieldSeq;
  const form = S.h('form', { method: 'dialog' },
    S.h('header', S.h('h2', { id: titleId }, opts.title)),
    S.h('div.body', errors, opts.intro ? S.h('p.muted', { style: 'margin:0' }, opts.intro) : null, fields, opts.content || null),
    S.h('footer', cancel, opts.onSubmit ? submit : null));
  const dlg = S.h('dialog' + (opts.wide ? '.wide' : ''), { 'aria-labelledby': titleId }, form);
  dlg.errors = errors;
  dlg.fields = fields;
  cancel.onclick = () => dlg.close();
  dlg.addEventListener('close', () => dlg.remove());
  form.addEventListener('submit', (ev) => {
    ev.preventDefault();
    S.run(submit, errors, async () => {
      const done = await opts.onSubmit(S.values(fields), dlg);
      if (done !== false) dlg.close();
    });
  });
  document.body.append(dlg);
  dlg.showModal();
  const first = fields.find((f) => f.input && !f.hidden);
  if (first) first.input.focus();
  return dlg;
};

/** Asks to confirm a dangerous action; resolves after `fn` ran (errors shown in the dialog). */
S.confirm = function (title, text, label, fn) {
  return S.dialog({ title, intro: text, submit: label, danger: true, onSubmit: fn });
};

/** A table: columns [{label, num}], rows of cells (nodes or text). */
S.table = function (columns, rows, opts) {
  opts = opts || {};
  const head = S.h('tr', columns.map((c) => S.h('th' + (c.num ? '.num' : '') + (c.narrow ? '.hide-narrow' : ''), { scope: 'col' }, c.label)));
  const body = S.h('tbody', rows.map((r) => {
    const tr = S.h('tr', { dataset: r.data || null });
    r.cells.forEach((cell, i) => {
      const c = columns[i] || {};
      tr.append(S.h('td' + (c.num ? '.num' : '') + (c.actions ? '.actions-cell' : '') + (c.narrow ? '.hide-narrow' : ''), cell));
    });
    return tr;
  }));
  const table = S.h('table', { 'aria-label': opts.label }, S.h('thead', head), body);
  if (!rows.length && opts.empty) return S.h('div.empty', opts.empty);
  return S.h('div.table-wrap', table);
};

/** A card with a header (title, tools) and a body. */
S.card = function (title, tools, ...body) {
  return S.h('section.card', S.h('header', S.h('h2', title), tools || null), S.h('div.body', body));
};
