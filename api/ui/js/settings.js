// Settings: API tokens and local users (admins only), NBD exports, storage backends (volume
// groups, RBD groups).

S.views.settings = {
  title: 'Settings',
  async render(root) {
    const sections = [];
    if (S.session.admin) sections.push(await tokensCard(), await usersCard());
    else sections.push(S.h('div.alert.alert-info', 'Tokens and users are managed by admins; you are signed in without admin rights.'));
    sections.push(await exportsCard(), await storageCard());
    S.fill(root, sections);
  },
};

/** A card whose body `load()` refills; returns [card, reload]. */
function section(title, tools, load) {
  const errors = S.errorBox();
  const body = S.h('div.body.flush');
  const reload = async () => S.fill(body, await load(errors, reload));
  const card = S.h('section.card', S.h('header', S.h('h2', title), typeof tools === 'function' ? tools(errors, reload) : tools), S.h('div.body', { style: 'padding:0' }, errors), body);
  return [card, reload];
}

async function tokensCard() {
  const [card, reload] = section('API tokens', (errors, reload) =>
    S.button('Create token', () => S.dialog({
      title: 'Create an API token', submit: 'Create',
      fields: [S.field({ name: 'name', label: 'Name', required: true }), S.field({ name: 'admin', label: 'Admin (may manage tokens and users)', type: 'checkbox' })],
      onSubmit: async (v, dlg) => {
        const t = await S.api('POST', '/api/tokens', { name: v.name, admin: v.admin });
        await reload();
        const field = S.h('input#new-token', { type: 'text', readonly: true, value: t.token, 'aria-label': 'The new token' });
        S.dialog({
          title: 'Token ' + t.name, cancel: 'Done',
          intro: 'Copy the token now: it is shown only once.',
          content: [field],
        });
        field.select();
        return true;
      },
    }), { cls: 'small primary', errors, data: { action: 'create-token' } }),
  async (errors, reload) => {
    const tokens = await S.api('GET', '/api/tokens');
    return S.table([{ label: 'Name' }, { label: 'Id' }, { label: 'Rights' }, { label: 'Created', narrow: true }, { label: '', actions: true }],
      tokens.map((t) => ({
        data: { token: t.id },
        cells: [S.h('span.name', t.name), S.h('code', t.id), t.admin ? S.badge('admin', 'info') : S.badge('user'), S.fmt.date(t.created),
          S.h('div.actions', S.button('Revoke', () => S.confirm('Revoke token ' + t.name + '?', 'Clients using it (and sessions signed in with it) stop working at once.', 'Revoke', async () => {
            await S.api('DELETE', '/api/tokens/' + encodeURIComponent(t.id));
            await reload();
          }), { cls: 'small danger', errors, aria: 'Revoke token ' + t.name }))],
      })), { label: 'API tokens', empty: 'No tokens.' });
  });
  await reload();
  return card;
}

async function usersCard() {
  const pw = (label) => S.field({ name: 'password', label, type: 'password', required: true, autocomplete: 'new-password', help: 'At least 8 characters.' });
  const [card, reload] = section('Users', (errors, reload) =>
    S.button('Add user', () => S.dialog({
      title: 'Add a user', submit: 'Add',
      intro: 'Users sign in to this web UI with a password. Scripts use API tokens.',
      fields: [S.field({ name: 'name', label: 'User name', required: true }), pw('Password'), S.field({ name: 'admin', label: 'Admin (may manage tokens and users)', type: 'checkbox' })],
      onSubmit: async (v) => {
        await S.api('POST', '/api/users', { name: v.name, password: v.password, admin: v.admin });
        S.toast('Added user ' + v.name);
        await reload();
      },
    }), { cls: 'small primary', errors, data: { action: 'add-user' } }),
  async (errors, reload) => {
    const users = await S.api('GET', '/api/users');
    return S.table([{ label: 'Name' }, { label: 'Rights' }, { label: 'Created', narrow: true }, { label: '', actions: true }],
      users.map((u) => ({
        data: { user: u.name },
        cells: [S.h('span.name', u.name), u.admin ? S.badge('admin', 'info') : S.badge('user'), S.fmt.date(u.created),
          S.h('div.actions',
            S.button('Set password', () => S.dialog({
              title: 'New password for ' + u.name, submit: 'Set', fields: [pw('New password')],
              intro: 'The user\'s sessions end.',
              onSubmit: async (v) => {
                await S.api('PUT', '/api/users/' + encodeURIComponent(u.name) + '/password', { password: v.password });
                S.toast('Password of ' + u.name + ' changed');
              },
            }), { cls: 'small', errors, aria: 'Set the password of ' + u.name }),
            S.button('Remove', () => S.confirm('Remove user ' + u.name + '?', 'Their sessions end at once.', 'Remove', async () => {
              await S.api('DELETE', '/api/users/' + encodeURIComponent(u.name));
              await reload();
            }), { cls: 'small danger', errors, aria: 'Remove user ' + u.name }))],
      })), { label: 'Users', empty: 'No local users yet: people sign in with API tokens.' });
  });
  await reload();
  return card;
}

async function exportsCard() {
  const [card, reload] = section('NBD exports', (errors, reload) =>
    S.button('Add export', async () => {
      const [volumes, images] = await Promise.all([S.api('GET', '/api/volumes'), S.api('GET', '/api/images')]);
      const sources = [...volumes.map((v) => [v.source, 'Volume ' + v.vg + '/' + v.name]), ...images.map((i) => ['image:' + i.name, 'Image ' + i.name])];
      S.dialog({
        title: 'Export over NBD', submit: 'Export',
        intro: 'An exported volume is held: it cannot be resized, removed or written by anything else meanwhile.',
        fields: [
          S.field({ name: 'source', label: 'Source', type: 'select', options: sources }),
          S.field({ name: 'name', label: 'Export name', placeholder: 'default: the source\'s name' }),
          S.field({ name: 'read_only', label: 'Read-only', type: 'checkbox' }),
          S.field({ name: 'mode', label: 'Access', type: 'select', options: [['open', 'Open (loopback, or TLS)'], ['secret', 'Secret name (shown once)']] }),
        ],
        onSubmit: async (v) => {
          const e = await S.api('POST', '/api/exports', { source: v.source, name: v.name || null, read_only: v.read_only, access: { mode: v.mode } });
          S.toast('Exported ' + v.source + (e.uri ? ' at ' + e.uri : ''));
          await reload();
        },
      });
    }, { cls: 'small primary', errors, data: { action: 'add-export' } }),
  async (errors, reload) => {
    const exports = await S.api('GET', '/api/exports');
    return S.table([{ label: 'Export' }, { label: 'Source' }, { label: 'Access', narrow: true }, { label: 'Clients', num: true, narrow: true }, { label: '', actions: true }],
      exports.map((e) => ({
        data: { export: e.id },
        cells: [S.h('span', S.h('span.name', e.name || e.id), e.uri ? S.h('div.small.muted.mono', e.uri) : null, e.error ? S.h('div.small', { style: 'color:var(--bad)' }, e.error) : null),
          e.source + (e.read_only ? ' (read-only)' : ''), e.access, String(e.clients.length),
          S.h('div.actions', S.button('Remove', () => S.confirm('Remove export ' + (e.name || e.id) + '?', 'Connected clients are disconnected after their requests finish.', 'Remove', async () => {
            await S.api('DELETE', '/api/exports/' + encodeURIComponent(e.id));
            await reload();
          }), { cls: 'small danger', errors, aria: 'Remove export ' + (e.name || e.id), data: { action: 'remove-export', export: e.id } }))],
      })), { label: 'NBD exports', empty: 'Nothing is exported.' });
  });
  await reload();
  return card;
}

async function storageCard() {
  const [card, reload] = section('Storage backends', (errors, reload) =>
    S.button('Add RBD group', () => S.dialog({
      title: 'Add a volume group on Ceph RBD', submit: 'Add',
      intro: 'The configuration and keyring must be files in an import folder on the server.',
      fields: [
        S.field({ name: 'name', label: 'Group name', required: true }),
        S.field({ name: 'conf', label: 'Ceph configuration file', required: true, placeholder: '/var/lib/strata/import/ceph.conf' }),
        S.field({ name: 'user', label: 'Ceph user (without client.)', value: 'admin' }),
        S.field({ name: 'keyring', label: 'Keyring file', placeholder: 'optional' }),
        S.field({ name: 'pool', label: 'RBD pool', required: true }),
      ],
      onSubmit: async (v) => {
        await S.api('POST', '/api/storage/rbd', { name: v.name, conf: v.conf, user: v.user || 'admin', keyring: v.keyring || null, pool: v.pool });
        S.toast('Added RBD group ' + v.name);
        await reload();
      },
    }), { cls: 'small primary', errors, data: { action: 'add-rbd' } }),
  async (errors, reload) => {
    const groups = await S.api('GET', '/api/storage');
    return S.table([{ label: 'Group' }, { label: 'Backend' }, { label: 'Size', num: true }, { label: 'Free / used', num: true }, { label: '', actions: true }],
      groups.map((g) => {
        const i = g.group;
        const local = i.size !== undefined;
        const actions = [S.button('Check', async () => {
          const r = await S.api('POST', '/api/storage/' + encodeURIComponent(i.name) + '/check');
          S.toast(i.name + (r.clean ? ': metadata clean' : ': problems found, see the API answer'), r.clean ? 'ok' : 'error');
        }, { cls: 'small', errors, aria: 'Check ' + i.name })];
        if (!local) {
          actions.push(S.button('Remove', () => S.confirm('Remove RBD group ' + i.name + '?', 'Only an empty group can be removed; the Ceph pool stays.', 'Remove', async () => {
            await S.api('DELETE', '/api/storage/' + encodeURIComponent(i.name));
            await reload();
          }), { cls: 'small danger', errors, aria: 'Remove ' + i.name }));
        }
        return {
          data: { vg: i.name },
          cells: [S.h('span.name', i.name), local ? 'local (' + i.pvs.length + ' PV)' : 'Ceph RBD pool ' + i.pool,
            local ? S.fmt.bytes(i.size) : i.quota_bytes ? S.fmt.bytes(i.quota_bytes) : 'no quota',
            local ? S.fmt.bytes(i.free) + ' free' : S.fmt.bytes(i['used-bytes']) + ' used', S.h('div.actions', actions)],
        };
      }), { label: 'Storage backends' });
  });
  await reload();
  return card;
}
