// Dashboard: volume groups and thin pools (data and metadata), the datastore, running jobs,
// VMs by state, and the usage history with "estimated full" dates.

S.views.dashboard = {
  title: 'Dashboard',
  async render(root) {
    const [storage, usage, vms] = await Promise.all([
      S.api('GET', '/api/storage'),
      S.api('GET', '/api/usage'),
      S.api('GET', '/api/vms'),
    ]);
    const seriesByKey = new Map(usage.series.map((s) => [s.key, s]));
    const estimateFor = (key) => (seriesByKey.has(key) ? S.estimate(seriesByKey.get(key)) : null);

    // Storage: each group with its pools.
    const storageCards = storage.map((g) => {
      const info = g.group;
      const rows = [];
      if (info.size !== undefined) {
        rows.push(S.meter('Allocated to volumes', info.size - info.free, info.size, estimateFor('vg:' + info.name)));
      } else {
        rows.push(S.meter('Stored in pool ' + info.pool, info['used-bytes'], info['quota-bytes'] || info['used-bytes'], estimateFor('vg:' + info.name)));
      }
      for (const p of g.pools) {
        const u = p.usage;
        if (!u) continue;
        rows.push(S.h('h3', { style: 'margin-top:8px' }, 'Thin pool ' + p.name));
        rows.push(S.meter('Data', u['used-bytes'], u['pool-bytes'], estimateFor('pool:' + p.vg + '/' + p.name)));
        rows.push(S.meter('Metadata', u['used-metadata-blocks'] * 4096, u['metadata-blocks'] * 4096, estimateFor('pool-metadata:' + p.vg + '/' + p.name)));
        rows.push(S.h('div.small.muted', u.devices + ' thin volumes · ' + S.fmt.bytes(u['virtual-bytes']) + ' provisioned (' + u.overcommit.toFixed(2) + '× the pool)'));
      }
      const kind = info.size !== undefined ? 'local' : 'RBD';
      return S.card('Volume group ' + info.name, S.badge(kind), S.h('div.stack', rows));
    });

    // Datastore.
    const ds = usage.datastore;
    let dsBody;
    if (!ds) {
      dsBody = S.h('p.muted', 'Not measured yet: the server samples usage every ' + S.fmt.duration(usage.interval_secs) + '.');
    } else {
      const gc = ds.last_gc;
      const ver = ds.last_verify;
      dsBody = S.h('div.stack',
        S.h('div.stats',
          S.h('div.stat', S.h('span.big', String(ds.snapshots)), S.h('span.small.muted', 'snapshots')),
          S.h('div.stat', S.h('span.big', S.fmt.bytes(ds.stored_bytes)), S.h('span.small.muted', 'stored')),
          S.h('div.stat', S.h('span.big', ds.dedup_factor ? ds.dedup_factor.toFixed(2) + '×' : '–'), S.h('span.small.muted', 'deduplication'))),
        S.meter('File system', ds.file_system.size - ds.file_system.available, ds.file_system.size, estimateFor('datastore')),
        S.h('dl.kv',
          S.h('dt', 'Backed-up data'), S.h('dd', S.fmt.bytes(ds.logical_bytes)),
          S.h('dt', 'Last GC'), S.h('dd', gc ? [S.fmt.age(gc.at), ' ', S.badge(gc.ok ? 'ok' : 'failed', gc.ok ? 'ok' : 'bad')] : 'never'),
          S.h('dt', 'Last verify'), S.h('dd', ver ? [S.fmt.age(ver.at), ' ', S.badge(ver.ok ? 'all intact' : 'damage found', ver.ok ? 'ok' : 'bad')] : 'never')));
    }
    const dsCard = S.card('Backup datastore', S.h('a.small', { href: '/ui/backups', 'data-nav': '' }, 'Backups →'), dsBody);

    // VMs by state.
    const counts = { running: 0, stopped: 0, defined: 0, failed: 0 };
    for (const v of vms) counts[v.status.state] = (counts[v.status.state] || 0) + 1;
    const vmCard = S.card('Virtual machines', S.h('a.small', { href: '/ui/vms', 'data-nav': '' }, 'VMs →'),
      S.h('div.stats', Object.entries(counts).map(([state, n]) =>
        S.h('div.stat', S.h('span.big', String(n)), S.h('span', S.stateBadge(state))))),
      vms.length ? null : S.h('p.muted.small', 'No VMs defined yet.'));

    // Running jobs, live.
    const jobsBody = S.h('div.stack');
    const jobCard = S.card('Running jobs', S.h('a.small', { href: '/ui/jobs', 'data-nav': '' }, 'All jobs →'), jobsBody);
    const shown = new Map();
    const offJobs = S.onJobs(() => {
      const running = S.jobList().filter((j) => j.state === 'running');
      for (const [id, el] of shown) {
        if (!running.find((j) => j.id === id)) {
          el.remove();
          shown.delete(id);
        }
      }
      for (const j of running) {
        if (!shown.has(j.id)) {
          const el = S.h('div', S.h('div.row', S.h('span.name', j.kind), S.h('span.small.muted', j.description)), S.jobProgress(j));
          shown.set(j.id, el);
          jobsBody.append(el);
        }
      }
      const none = jobsBody.querySelector('.none');
      if (!running.length && !none) jobsBody.append(S.h('p.muted.none', { style: 'margin:0' }, 'Nothing running.'));
      if (running.length && none) none.remove();
    });

    // Usage history.
    const history = usage.series.map((s) =>
      S.h('section.card.series', { dataset: { key: s.key } },
        S.h('header', S.h('h2', s.label)),
        S.h('div.body.stack',
          S.h('div.series-head', S.h('span.small', S.fmt.bytes(s.used) + ' of ' + S.fmt.bytes(s.capacity)), S.estimate(s)),
          S.usageChart(s),
          S.h('div.small.muted', s.growth_per_day !== null && s.growth_per_day !== undefined
            ? (s.growth_per_day >= 0 ? '+' : '') + S.fmt.bytes(s.growth_per_day) + ' a day' : ''))));

    S.fill(root,
      S.h('div.grid', storageCards, dsCard, vmCard, jobCard),
      S.h('h2', { style: 'margin-top:6px' }, 'Usage history'),
      S.h('p.small.muted', { style: 'margin:-10px 0 0' }, usage.sampled_at
        ? 'Sampled every ' + S.fmt.duration(usage.interval_secs) + '; last ' + S.fmt.age(usage.sampled_at) + '. Dates extend a straight line through the last week.'
        : 'No samples yet.'),
      S.h('div.grid', history));
    return offJobs;
  },
};
