// Live job progress: one EventSource on /api/events for the whole page. The server pushes the
// jobs whose status changed (at most every half second); views subscribe to the job table.
// The browser never polls for jobs.

S.jobs = new Map();
const jobListeners = new Set();
let source = null;

/** Calls `fn(jobs map, changed list)` now and on every change; returns the unsubscribe. */
S.onJobs = function (fn) {
  jobListeners.add(fn);
  fn(S.jobs, []);
  return () => jobListeners.delete(fn);
};

S.startEvents = function () {
  if (source) return;
  source = new EventSource('/api/events');
  source.addEventListener('jobs', (ev) => {
    let list;
    try {
      list = JSON.parse(ev.data);
    } catch (e) {
      return;
    }
    for (const j of list) S.jobs.set(j.id, j);
    for (const fn of [...jobListeners]) fn(S.jobs, list);
  });
  source.addEventListener('end', () => {
    source.close();
    S.signInAgain('expired');
  });
  source.onerror = () => {
    // The browser reconnects by itself; a 401 answer ends the stream for good.
    if (source.readyState === EventSource.CLOSED) {
      source = null;
      setTimeout(() => S.api('GET', '/ui/session').then(() => S.startEvents()).catch(() => {}), 2000);
    }
  };
};

S.stopEvents = function () {
  if (source) source.close();
  source = null;
};

/** Jobs, newest first. */
S.jobList = function () {
  return [...S.jobs.values()].sort((a, b) => b.started - a.started || (b.id < a.id ? -1 : 1));
};

/** Waits for a job to end (through the event stream); resolves with its last status. */
S.waitJob = function (id) {
  return new Promise((resolve) => {
    const off = S.onJobs((jobs) => {
      const j = jobs.get(id);
      if (j && j.state !== 'running') {
        setTimeout(() => off(), 0);
        resolve(j);
      }
    });
  });
};

S.stateBadge = function (state) {
  const kind = { running: 'info', succeeded: 'ok', failed: 'bad', cancelled: 'warn', defined: '', stopped: '' }[state];
  return S.badge(state, kind);
};

/** A progress bar following a job, with its percentage and state. */
S.jobProgress = function (job) {
  const bar = S.h('progress', { max: 100, value: 0, 'aria-label': 'Progress of ' + job.description });
  const label = S.h('span.small.muted');
  const box = S.h('div.job-progress', { dataset: { job: job.id } }, bar, label);
  const update = (j) => {
    bar.value = j.progress;
    bar.setAttribute('value', String(Math.round(j.progress)));
    const bytes = j.bytes_total ? S.fmt.bytes(j.bytes_done) + ' of ' + S.fmt.bytes(j.bytes_total) : '';
    label.textContent = j.state === 'running' ? Math.floor(j.progress) + '% ' + bytes : j.state + (j.error ? ': ' + j.error : '');
    box.dataset.state = j.state;
  };
  update(job);
  const off = S.onJobs((jobs) => {
    if (!box.isConnected && box.dataset.attached) return off();
    if (box.isConnected) box.dataset.attached = '1';
    const j = jobs.get(job.id);
    if (j) update(j);
  });
  return box;
};

/** Shows a started job: a toast now, another when it ends. */
S.followJob = function (job, what) {
  S.jobs.set(job.id, job);
  S.toast(what + ' started (job ' + job.id + ')', 'info');
  S.waitJob(job.id).then((j) => {
    if (j.state === 'succeeded') S.toast(what + ' finished', 'ok');
    else S.toast(what + ' ' + j.state + (j.error ? ': ' + j.error : ''), 'error');
  });
  return job;
};
