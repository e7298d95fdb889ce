// Images: the list with formats and sizes; upload with a progress bar (restartable: a failed or
// cancelled upload leaves nothing behind, so it is started again); convert to a volume or to
// another image; download in any format; remove.

const FORMATS = ['qcow2', 'raw', 'vmdk', 'vhd', 'vhdx'];

S.views.images = {
  title: 'Images',
  async render(root) {
    const errors = S.errorBox();
    const list = S.h('div');
    const reload = async () => {
      const images = await S.api('GET', '/api/images');
      S.fill(list, S.table(
        [{ label: 'Name' }, { label: 'Format' }, { label: 'Virtual size', num: true }, { label: 'On disk', num: true, narrow: true }, { label: 'Actions', actions: true }],
        images.map((img) => imageRow(img, errors, reload)),
        { label: 'Images', empty: 'No images yet: upload one above.' }));
    };
    S.fill(root, uploadCard(reload), errors,
      S.h('section.card', S.h('header', S.h('h2', 'Images')), S.h('div.body.flush', list)));
    await reload();
  },
};

function imageRow(img, errors, reload) {
  const path = '/api/images/' + encodeURIComponent(img.name);
  const act = (label, fn, cls) => S.button(label, fn, { cls: 'small' + (cls ? ' ' + cls : ''), errors, aria: label + ' ' + img.name, data: { action: label.toLowerCase().replace(/ /g, '-'), image: img.name } });
  return {
    data: { image: img.name },
    cells: [
      S.h('span.name', img.name),
      img.format === 'unknown' ? S.badge('unknown', 'warn') : S.badge(img.format),
      S.fmt.bytes(img.virtual_size),
      S.fmt.bytes(img.actual_size),
      S.h('div.actions',
        act('Convert', () => convertDialog(img)),
        act('Download', () => downloadDialog(img, path)),
        act('Remove', () => S.confirm('Remove image ' + img.name + '?', 'The file is deleted.', 'Remove', async () => {
          await S.api('DELETE', path);
          S.toast('Removed ' + img.name);
          await reload();
        }), 'danger')),
    ],
  };
}

function uploadCard(reload) {
  const errors = S.errorBox();
  const file = S.field({ name: 'file', label: 'Disk image file', type: 'file', help: 'raw, qcow2, vmdk, vhd or vhdx; self-contained (no backing file).' });
  const name = S.field({ name: 'name', label: 'Image name', placeholder: 'debian-12.qcow2' });
  const srcFmt = S.field({ name: 'source_format', label: 'File format', type: 'select', options: [['', 'Detect'], ...FORMATS] });
  const fmt = S.field({ name: 'format', label: 'Store as', type: 'select', options: FORMATS, value: 'qcow2' });
  file.input.addEventListener('change', () => {
    const f = file.input.files[0];
    if (f && !name.input.value) name.input.value = f.name.replace(/[^A-Za-z0-9._+-]/g, '_').replace(/^[.-]+/, '');
  });
  const bar = S.h('progress#upload-progress', { max: 100, value: 0, 'aria-label': 'Upload progress' });
  const status = S.h('span.small.muted#upload-status', 'No upload running.');
  const cancel = S.h('button.danger', { type: 'button', hidden: true }, 'Cancel upload');
  const start = S.h('button.primary#upload-start', { type: 'submit' }, 'Upload');
  const form = S.h('form.form.cols', { 'aria-label': 'Upload an image' }, file, name, srcFmt, fmt, S.h('div.field', start));
  let xhr = null;
  cancel.onclick = () => xhr && xhr.abort();
  form.addEventListener('submit', (ev) => {
    ev.preventDefault();
    errors.clear();
    const f = file.input.files[0];
    if (!f) return errors.show(new Error('Choose a file to upload.'));
    const n = name.input.value.trim();
    if (!n) return errors.show(new Error('Give the image a name.'));
    const q = new URLSearchParams({ format: fmt.input.value });
    if (srcFmt.input.value) q.set('source_format', srcFmt.input.value);
    const x = (xhr = new XMLHttpRequest());
    xhr.open('PUT', '/api/images/' + encodeURIComponent(n) + '/upload?' + q);
    xhr.setRequestHeader('X-CSRF-Token', S.session.csrf);
    xhr.setRequestHeader('Content-Type', 'application/octet-stream');
    const began = performance.now();
    xhr.upload.onprogress = (e) => {
      if (!e.lengthComputable) return;
      const pct = (e.loaded * 100) / e.total;
      bar.value = pct;
      bar.setAttribute('value', pct.toFixed(1));
      const secs = (performance.now() - began) / 1000;
      status.textContent = 'Uploading ' + Math.floor(pct) + '% · ' + S.fmt.bytes(e.loaded) + ' of ' + S.fmt.bytes(e.total) + (secs > 0.5 ? ' · ' + S.fmt.bytes(e.loaded / secs) + '/s' : '');
    };
    const done = () => {
      start.disabled = false;
      cancel.hidden = true;
      xhr = null;
    };
    xhr.onload = async () => {
      done();
      try {
        const job = await S.answer(new Response(x.responseText, { status: x.status }));
        status.textContent = 'Uploaded; storing as ' + fmt.input.value + ' (job ' + job.id + ')…';
        S.followJob(job, 'Storing ' + n);
        const end = await S.waitJob(job.id);
        status.textContent = end.state === 'succeeded' ? 'Upload of ' + n + ' complete.' : 'Storing ' + n + ' ' + end.state + (end.error ? ': ' + end.error : '');
        if (end.state !== 'succeeded') errors.show(new Error(status.textContent));
        await reload();
      } catch (e) {
        status.textContent = 'Upload failed; start it again.';
        errors.show(e);
      }
    };
    xhr.onerror = () => {
      done();
      status.textContent = 'Upload interrupted; start it again.';
      errors.show(new Error('The upload was interrupted (connection lost or refused). Nothing was kept: start it again.'));
    };
    xhr.onabort = () => {
      done();
      status.textContent = 'Upload cancelled; nothing was kept.';
    };
    start.disabled = true;
    cancel.hidden = false;
    bar.value = 0;
    bar.setAttribute('value', '0');
    status.textContent = 'Starting upload…';
    xhr.send(f);
  });
  return S.h('section.card#upload', S.h('header', S.h('h2', 'Upload an image')),
    S.h('div.body.stack', errors, form, S.h('div.stack', bar, S.h('div.row', status, cancel))));
}

async function convertDialog(img) {
  const volumes = (await S.api('GET', '/api/volumes')).filter((v) => !v.read_only);
  const targets = [['image', 'A new image'], ...volumes.map((v) => [v.source, 'Volume ' + v.vg + '/' + v.name + ' (' + S.fmt.bytes(v.size) + ')'])];
  const target = S.field({ name: 'target', label: 'Convert to', type: 'select', options: targets, value: targets.length > 1 ? targets[1][0] : 'image' });
  const newName = S.field({ name: 'name', label: 'New image name', value: img.name.replace(/\.[a-z0-9]+$/i, '') + '.raw' });
  const fmt = S.field({ name: 'format', label: 'New image format', type: 'select', options: FORMATS, value: 'raw' });
  const sync = () => (newName.hidden = fmt.hidden = target.input.value !== 'image');
  target.input.addEventListener('change', sync);
  sync();
  S.dialog({
    title: 'Convert ' + img.name, fields: [target, newName, fmt], submit: 'Convert',
    intro: 'A volume target must be at least ' + S.fmt.bytes(img.virtual_size) + ' and not in use; its contents are overwritten.',
    onSubmit: async (v) => {
      const req = v.target === 'image'
        ? { source: 'image:' + img.name, target: 'image:' + v.name, format: v.format }
        : { source: 'image:' + img.name, target: v.target };
      const job = await S.api('POST', '/api/convert', req);
      S.followJob(job, 'Conversion of ' + img.name);
      showJobDialog(job, 'Converting ' + img.name + ' to ' + req.target.replace(/^lv:/, 'volume '));
    },
  });
}

/** A dialog following one job's progress until it ends. */
function showJobDialog(job, title) {
  const progress = S.jobProgress(job);
  S.dialog({ title, content: S.h('div.stack#job-dialog', progress), cancel: 'Close' });
}
S.showJobDialog = showJobDialog;

function downloadDialog(img, path) {
  const fmt = S.field({ name: 'format', label: 'Format', type: 'select', options: FORMATS, value: img.format === 'unknown' ? 'raw' : img.format });
  const link = S.h('a.button.primary', { href: path + '/download?format=' + fmt.input.value, download: '' }, 'Download');
  fmt.input.addEventListener('change', () => (link.href = path + '/download?format=' + fmt.input.value));
  const dlg = S.dialog({
    title: 'Download ' + img.name, fields: [fmt],
    intro: 'Another format than the image\'s own is converted on the server first.',
    content: S.h('div.row', link),
  });
  link.addEventListener('click', () => setTimeout(() => dlg.close(), 100));
}
