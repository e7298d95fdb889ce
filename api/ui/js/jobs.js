// Jobs: every job with live progress (from the event stream), its result or error, cancel, and
// its log.

S.views.jobs = {
  title: 'Jobs',
  async render(root) {
    const errors = S.errorBox();
    // The full list once (the event stream carries the newest hundred and every change).
    for (const j of await S.api('GET', '/api/jobs')) if (!S.jobs.has(j.id)) S.jobs.set(j.id, j);
    const body = S.h('div');
    const rows = new Map();
    const tbody = S.h('tbody');
    const table = S.h('div.table-wrap', S.h('table', { 'aria-label': 'Jobs' },
      S.h('thead', S.h('tr', ['Job', 'What', 'State', 'Progress', 'Started', 'Took', ''].map((l, i) => S.h('th' + (i === 1 || i === 5 ? '.hide-narrow' : ''), { scope: 'col' }, l)))),
      tbody));
    const render = () => {
      const list = S.jobList().slice(0, 300);
      if (!list.length) return S.fill(body, S.h('div.empty', 'No jobs yet.'));
      if (!table.isConnected) S.fill(body, table);
      list.forEach((j, i) => {
        let r = rows.get(j.id);
        const key = j.state + (j.finished || '');
        if (!r) {
          r = { tr: S.h('tr', { dataset: { job: j.id } }), key: null };
          rows.set(j.id, r);
        }
        if (r.key !== key) {
          r.key = key;
          S.fill(r.tr, ...jobCells(j, errors));
        }
        if (tbody.children[i] !== r.tr) tbody.insertBefore(r.tr, tbody.children[i] || null);
      });
    };
    S.fill(root, errors, S.h('section.card', S.h('header', S.h('h2', 'Jobs'), S.h('span.small.muted', 'Updated live')), S.h('div.body.flush', body)));
    return S.onJobs(render);
  },
};

function jobCells(j, errors) {
  const took = (j.finished || Date.now() / 1000) - j.started;
  const actions = [S.button('Log', () => logDialog(j), { cls: 'small', aria: 'Log of job ' + j.id, data: { action: 'log', job: j.id } })];
  if (j.state === 'running') {
    actions.push(S.button('Cancel', async () => {
      await S.api('DELETE', '/api/jobs/' + encodeURIComponent(j.id));
      S.toast('Cancelling ' + j.id);
    }, { cls: 'small danger', errors, aria: 'Cancel job ' + j.id, data: { action: 'cancel', job: j.id } }));
  }
  const progress = j.state === 'running'
    ? S.jobProgress(j)
    : j.error ? S.h('span.small', { style: 'color:var(--bad)' }, j.error) : S.h('span.small.muted', j.bytes_total ? S.fmt.bytes(j.bytes_total) : 'done');
  return [
    S.h('td', S.h('span.name', j.kind), S.h('div.small.muted.mono', j.id)),
    S.h('td.hide-narrow', j.description),
    S.h('td', S.stateBadge(j.state)),
    S.h('td.progress-cell', progress),
    S.h('td', S.h('span', { title: S.fmt.date(j.started) }, S.fmt.age(j.started))),
    S.h('td.hide-narrow', S.fmt.duration(took)),
    S.h('td.actions-cell', S.h('div.actions', actions)),
  ];
}

async function logDialog(j) {
  const lines = await S.api('GET', '/api/jobs/' + encodeURIComponent(j.id) + '/log');
  const text = lines.map((l) => new Date(l.at_ms).toLocaleTimeString() + '  ' + l.message).join('\n');
  const cur = S.jobs.get(j.id) || j;
  const result = cur.result ? S.h('details', S.h('summary', 'Result'), S.h('pre.log', JSON.stringify(cur.result, null, 2))) : null;
  S.dialog({
    title: 'Job ' + j.id + ' · ' + j.kind, wide: true, cancel: 'Close',
    content: [S.h('p.muted', { style: 'margin:0' }, cur.description), S.h('pre.log#job-log', text || '(empty)'), result],
  });
}
