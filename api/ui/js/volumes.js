// Volumes: per group, the tree of volumes with their snapshots and clones (children under the
// volume they were made from); create, resize (shrinking only after an explicit confirmation),
// snapshot, clone, template, download, remove. Every API error is shown above the tree.

const SIZE_HELP = 'A size such as 512M, 10G or 1T.';

S.views.volumes = {
  title: 'Volumes',
  async render(root) {
    const errors = S.errorBox();
    const body = S.h('div.stack');
    const reload = async () => {
      const [storage, volumes] = await Promise.all([S.api('GET', '/api/storage'), S.api('GET', '/api/volumes')]);
      S.fill(body, storage.map((g) => groupCard(g, volumes.filter((v) => v.vg === g.group.name), errors, reload)));
    };
    const create = S.button('Create volume', () => createDialog(reload), { cls: 'primary', data: { action: 'create-volume' } });
    S.fill(root, S.h('div.toolbar', S.h('div.grow'), create), errors, body);
    await reload();
  },
};

function kindBadge(v) {
  if (v.template) return S.badge('template', 'info');
  if (v.type === 'snapshot') return S.badge('snapshot');
  if (v.type === 'thin' && v.origin) return S.badge('clone');
  return S.badge(v.type === 'linear' ? 'linear' : 'thin');
}

function groupCard(g, volumes, errors, reload) {
  const info = g.group;
  const byName = new Map(volumes.map((v) => [v.name, v]));
  const children = new Map();
  const roots = [];
  for (const v of volumes) {
    if (v.origin && byName.has(v.origin)) {
      if (!children.has(v.origin)) children.set(v.origin, []);
      children.get(v.origin).push(v);
    } else roots.push(v);
  }
  const rows = [];
  const walk = (v, depth) => {
    rows.push(row(v, depth, info, errors, reload));
    for (const c of (children.get(v.name) || []).sort((a, b) => a.name.localeCompare(b.name))) walk(c, depth + 1);
  };
  roots.sort((a, b) => a.name.localeCompare(b.name)).forEach((v) => walk(v, 0));
  const pools = g.pools.map((p) => p.usage && S.meter('Pool ' + p.name, p.usage['used-bytes'], p.usage['pool-bytes']));
  const head = info.size !== undefined ? S.fmt.bytes(info.free) + ' free of ' + S.fmt.bytes(info.size) : 'RBD pool ' + info.pool;
  return S.h('section.card', { dataset: { vg: info.name } },
    S.h('header', S.h('h2', 'Volume group ' + info.name), S.h('span.small.muted', head)),
    pools.length ? S.h('div.body.stack', pools) : null,
    S.h('div.body.flush', S.table(
      [{ label: 'Name' }, { label: 'Kind' }, { label: 'Size', num: true }, { label: 'Allocated', num: true, narrow: true }, { label: 'In use by', narrow: true }, { label: 'Actions', actions: true }],
      rows, { label: 'Volumes of ' + info.name, empty: 'No volumes in this group yet.' })));
}

function row(v, depth, group, errors, reload) {
  const name = S.h('span', depth ? S.h('span.tree', { 'aria-hidden': 'true', style: 'margin-left:' + (depth - 1) * 16 + 'px' }, '└') : null, S.h('span.name', v.name));
  const path = '/api/volumes/' + encodeURIComponent(v.vg) + '/' + encodeURIComponent(v.name);
  const act = (label, fn, cls) => S.button(label, fn, { cls: 'small' + (cls ? ' ' + cls : ''), errors, aria: label + ' ' + v.name, data: { action: label.toLowerCase().replace(/ /g, '-'), volume: v.name } });
  const thin = v.type !== 'linear';
  const actions = [];
  if (!v.read_only) actions.push(act('Resize', () => resizeDialog(v, path, reload)));
  if (thin && !v.template) actions.push(act('Snapshot', () => nameDialog('Snapshot of ' + v.name, 'Snapshot name', v.name + '-snap', path + '/snapshot', reload)));
  if (v.type === 'snapshot' || v.template) actions.push(act('Clone', () => nameDialog('Clone of ' + v.name, 'Clone name', v.name + '-clone', path + '/clone', reload)));
  if (thin && v.type !== 'snapshot') {
    actions.push(act(v.template ? 'Untemplate' : 'Template', async () => {
      await S.api('POST', path + '/template', { template: !v.template });
      S.toast(v.name + (v.template ? ' is no longer a template' : ' is now a template'));
      await reload();
    }));
  }
  actions.push(S.h('a.button.small', { href: path + '/download', download: v.name + '.raw', 'aria-label': 'Download ' + v.name + ' as raw' }, 'Download'));
  actions.push(act('Remove', () => S.confirm('Remove ' + v.vg + '/' + v.name + '?',
    'Its data is deleted. Snapshots and clones made from it stay.', 'Remove', async () => {
      await S.api('DELETE', path);
      S.toast('Removed ' + v.name);
      await reload();
    }), 'danger'));
  return {
    data: { volume: v.name },
    cells: [
      name,
      kindBadge(v),
      S.fmt.bytes(v.size),
      v.mapped_bytes !== undefined ? S.fmt.bytes(v.mapped_bytes) : '–',
      v.held_by ? v.held_by.join(', ') : '',
      S.h('div.actions', actions),
    ],
  };
}

async function createDialog(reload) {
  const storage = await S.api('GET', '/api/storage');
  const groups = storage.map((g) => g.group.name);
  const pools = [['', 'None (linear volume)']];
  for (const g of storage) for (const p of g.pools) pools.push([p.name, g.group.name + '/' + p.name + ' (thin)']);
  if (pools.length > 1) pools.push(pools.shift());
  const fields = [
    S.field({ name: 'vg', label: 'Volume group', type: 'select', options: groups, value: groups[0] }),
    S.field({ name: 'name', label: 'Name', required: true, placeholder: 'vm-100-disk-0' }),
    S.field({ name: 'size', label: 'Size', required: true, placeholder: '10G', help: SIZE_HELP }),
    S.field({ name: 'pool', label: 'Thin pool', type: 'select', options: pools, value: pools[0][0] }),
  ];
  S.dialog({
    title: 'Create volume', fields, submit: 'Create',
    onSubmit: async (v) => {
      await S.api('POST', '/api/volumes', { vg: v.vg, name: v.name, size: v.size, pool: v.pool || null });
      S.toast('Created ' + v.vg + '/' + v.name);
      await reload();
    },
  });
}

function resizeDialog(v, path, reload) {
  const size = S.field({ name: 'size', label: 'New size', required: true, value: S.fmt.bytes(v.size).replace(/ ([KMGTP])iB$/, '$1').replace(' B', ''), help: 'Now ' + S.fmt.bytes(v.size) + '. ' + SIZE_HELP });
  const shrink = S.field({ name: 'shrink', label: 'Shrink: I understand that the data past the new end is lost', type: 'checkbox', hidden: true });
  size.input.addEventListener('input', () => {
    const n = S.fmt.parseSize(size.input.value);
    shrink.hidden = !(n !== null && n < v.size);
  });
  size.input.dispatchEvent(new Event('input'));
  S.dialog({
    title: 'Resize ' + v.vg + '/' + v.name, fields: [size, shrink], submit: 'Resize',
    onSubmit: async (val) => {
      const n = S.fmt.parseSize(val.size);
      if (n !== null && n < v.size && !val.shrink) {
        shrink.hidden = false;
        throw new Error('The new size is smaller than ' + S.fmt.bytes(v.size) + ': tick the box to confirm that the data past the new end is lost.');
      }
      await S.api('POST', path + '/resize', { size: val.size, shrink: !!val.shrink });
      S.toast('Resized ' + v.name + ' to ' + val.size);
      await reload();
    },
  });
}

function nameDialog(title, label, suggestion, url, reload) {
  S.dialog({
    title, fields: [S.field({ name: 'name', label, required: true, value: suggestion })], submit: 'Create',
    onSubmit: async (v) => {
      await S.api('POST', url, { name: v.name });
      S.toast('Created ' + v.name);
      await reload();
    },
  });
}
