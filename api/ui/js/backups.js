// Backups: snapshots grouped by source with size, age, verification state and encryption;
// back up now, restore, verify (one or all), prune with a dry-run preview, garbage collection.

S.views.backups = {
  title: 'Backups',
  async render(root) {
    const errors = S.errorBox();
    const list = S.h('div.stack');
    const reload = async () => {
      const snaps = await S.api('GET', '/api/backups');
      const groups = new Map();
      for (const s of snaps) {
        const id = s.snapshot.slice(0, s.snapshot.lastIndexOf('/'));
        if (!groups.has(id)) groups.set(id, []);
        groups.get(id).push(s);
      }
      if (!groups.size) return S.fill(list, S.h('section.card', S.h('div.empty', 'No backups yet. Use “Back up now”.')));
      S.fill(list, [...groups.entries()].sort().map(([id, items]) => groupCard(id, items, errors, reload)));
    };
    const tools = S.h('div.toolbar',
      S.button('Back up now', () => backupDialog(reload), { cls: 'primary', errors, data: { action: 'backup-now' } }),
      S.button('Verify all', async () => {
        const job = await S.api('POST', '/api/backups/verify', {});
        S.followJob(job, 'Verification');
        S.waitJob(job.id).then(reload);
      }, { errors, data: { action: 'verify-all' } }),
      S.button('Prune…', () => pruneDialog(reload), { errors, data: { action: 'prune' } }),
      S.button('Collect garbage', async () => {
        const job = await S.api('POST', '/api/backups/gc', {});
        S.followJob(job, 'Garbage collection');
      }, { errors, data: { action: 'gc' } }),
      S.h('div.grow'),
      S.h('span.small.muted', 'Backups are stored unencrypted in the appliance\'s datastore (encryption is not supported yet).'));
    S.fill(root, tools, errors, list);
    await reload();
  },
};

function verifyBadge(v) {
  if (!v) return S.badge('not verified', '');
  return S.h('span', { title: 'Verified ' + S.fmt.date(v.at) }, S.badge(v.ok ? 'verified' : 'damaged', v.ok ? 'ok' : 'bad'), ' ', S.h('span.small.muted', S.fmt.age(v.at)));
}

function groupCard(id, items, errors, reload) {
  items.sort((a, b) => (a.snapshot < b.snapshot ? 1 : -1));
  const latest = items[0];
  const m = latest.manifest || {};
  const rows = items.map((s) => {
    const man = s.manifest || {};
    const t = S.snapshotTime(s.snapshot);
    const act = (label, fn) => S.button(label, fn, { cls: 'small', errors, aria: label + ' ' + s.snapshot, data: { action: label.toLowerCase(), snapshot: s.snapshot } });
    return {
      data: { snapshot: s.snapshot },
      cells: [
        S.h('span', S.h('span.name', S.fmt.date(t)), ' ', S.h('span.small.muted', S.fmt.age(t))),
        S.fmt.bytes(man.size),
        man.stats ? S.fmt.bytes(man.stats.bytes_stored || man.stats['bytes-stored']) : '–',
        man['change-tracking'] ? man['change-tracking'].mode : '–',
        verifyBadge(s.verified),
        S.badge('no'),
        S.h('div.actions',
          act('Restore', () => restoreDialog(s, reload)),
          act('Verify', async () => {
            const job = await S.api('POST', '/api/backups/verify', { snapshot: s.snapshot });
            S.followJob(job, 'Verification of ' + s.snapshot);
            S.waitJob(job.id).then(reload);
          })),
      ],
    };
  });
  return S.h('section.card', { dataset: { group: id } },
    S.h('header', S.h('h2', id), S.h('span.small.muted', 'from ' + (m.source || '?') + ' · ' + items.length + ' snapshot' + (items.length === 1 ? '' : 's'))),
    S.h('div.body.flush', S.table(
      [{ label: 'Taken' }, { label: 'Size', num: true }, { label: 'New data', num: true, narrow: true }, { label: 'Mode', narrow: true }, { label: 'Verified' }, { label: 'Encrypted', narrow: true }, { label: 'Actions', actions: true }],
      rows, { label: 'Snapshots of ' + id })));
}

async function backupDialog(reload) {
  const [volumes, images] = await Promise.all([S.api('GET', '/api/volumes'), S.api('GET', '/api/images')]);
  const sources = [
    ...volumes.map((v) => [v.source, 'Volume ' + v.vg + '/' + v.name + ' (' + S.fmt.bytes(v.size) + ')']),
    ...images.map((i) => ['image:' + i.name, 'Image ' + i.name]),
  ];
  if (!sources.length) throw new Error('There is nothing to back up: create a volume or upload an image first.');
  S.dialog({
    title: 'Back up now', submit: 'Back up',
    fields: [S.field({ name: 'source', label: 'Source', type: 'select', options: sources })],
    intro: 'Volumes are backed up incrementally after their first backup.',
    onSubmit: async (v) => {
      const job = await S.api('POST', '/api/backups', { source: v.source });
      S.followJob(job, 'Backup of ' + v.source);
      S.waitJob(job.id).then(reload);
    },
  });
}

async function restoreDialog(snap, reload) {
  const size = (snap.manifest || {}).size;
  const volumes = (await S.api('GET', '/api/volumes')).filter((v) => !v.read_only && v.size === size);
  const targets = [['image', 'A new image'], ...volumes.map((v) => [v.source, 'Volume ' + v.vg + '/' + v.name + ' (overwrite)'])];
  const target = S.field({ name: 'target', label: 'Restore to', type: 'select', options: targets });
  const base = snap.snapshot.split('/').slice(-2, -1)[0] || 'restore';
  const name = S.field({ name: 'name', label: 'New image name', value: base + '-restored.raw' });
  const fmt = S.field({ name: 'format', label: 'Format', type: 'select', options: FORMATS_RESTORE, value: 'raw' });
  const sync = () => (name.hidden = fmt.hidden = target.input.value !== 'image');
  target.input.addEventListener('change', sync);
  sync();
  S.dialog({
    title: 'Restore ' + snap.snapshot, submit: 'Restore', fields: [target, name, fmt],
    intro: 'A volume target must be exactly ' + S.fmt.bytes(size) + ' and not in use; it is overwritten.',
    onSubmit: async (v) => {
      const req = v.target === 'image'
        ? { snapshot: snap.snapshot, target: 'image:' + v.name, format: v.format }
        : { snapshot: snap.snapshot, target: v.target };
      const job = await S.api('POST', '/api/backups/restore', req);
      S.followJob(job, 'Restore of ' + snap.snapshot);
      S.showJobDialog(job, 'Restoring to ' + req.target);
    },
  });
}

const FORMATS_RESTORE = ['raw', 'qcow2', 'vmdk', 'vhd', 'vhdx'];

function pruneDialog(reload) {
  const num = (name, label, value) => S.field({ name, label, type: 'number', min: 0, value });
  const fields = [
    num('keep_last', 'Keep the newest', 3),
    num('keep_daily', 'Keep daily (days)', 7),
    num('keep_weekly', 'Keep weekly (weeks)', 4),
    num('keep_monthly', 'Keep monthly (months)', 6),
  ];
  const preview = S.h('div#prune-preview', S.h('p.muted.small', 'Preview first: nothing is removed until you press Prune.'));
  let previewed = null;
  const rules = () => {
    const v = S.values(fields);
    return Object.fromEntries(Object.entries(v).map(([k, n]) => [k, parseInt(n || '0', 10)]));
  };
  const dlg = S.dialog({
    title: 'Prune backups', fields, submit: 'Prune', danger: true, wide: true,
    intro: 'Snapshots outside all of these rules are removed, per group.',
    content: [S.h('div.row', S.button('Preview', async () => {
      const res = await S.api('POST', '/api/backups/prune', { ...rules(), dry_run: true });
      previewed = JSON.stringify(rules());
      const removed = res.filter((d) => !d.keep);
      S.fill(preview,
        S.h('p', removed.length ? removed.length + ' of ' + res.length + ' snapshots would be removed.' : 'Nothing would be removed.'),
        S.table([{ label: 'Snapshot' }, { label: 'Decision' }],
          res.map((d) => ({ data: { snapshot: d.snapshot }, cells: [d.snapshot, d.keep ? S.badge('keep (' + d.rule + ')', 'ok') : S.badge('remove', 'bad')] })),
          { label: 'Prune preview' }));
    }, { errors: null, data: { action: 'prune-preview' } })), preview],
    onSubmit: async () => {
      if (previewed !== JSON.stringify(rules())) {
        throw new Error('Preview these rules first.');
      }
      const res = await S.api('POST', '/api/backups/prune', { ...rules(), dry_run: false });
      S.toast('Pruned: ' + res.filter((d) => !d.keep).length + ' snapshots removed');
      await reload();
    },
  });
  return dlg;
}
