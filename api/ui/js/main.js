// The application: navigation (History API; every view has its own URL under /ui/), the
// session (its CSRF token), signing out, and the job counter in the header.

const NAV = [
  ['dashboard', '/ui/', 'Dashboard'],
  ['volumes', '/ui/volumes', 'Volumes'],
  ['images', '/ui/images', 'Images'],
  ['backups', '/ui/backups', 'Backups'],
  ['jobs', '/ui/jobs', 'Jobs'],
  ['vms', '/ui/vms', 'VMs'],
  ['settings', '/ui/settings', 'Settings'],
];

function route(path) {
  const parts = path.replace(/^\/ui\/?/, '').split('/').filter(Boolean).map(decodeURIComponent);
  if (!parts.length) return { view: 'dashboard', params: {} };
  if (parts[0] === 'vms' && parts[1]) return { view: 'vms', params: { name: parts[1] } };
  return { view: S.views[parts[0]] && parts.length === 1 ? parts[0] : 'notfound', params: {} };
}

S.views.notfound = {
  title: 'Not found',
  render(root) {
    S.fill(root, S.h('section.card', S.h('div.empty', 'There is no page here. ', S.h('a', { href: '/ui/', 'data-nav': '' }, 'Go to the dashboard'))));
  },
};

let cleanup = null;
let renderSeq = 0;

async function show(path, focus) {
  const { view, params } = route(path);
  const v = S.views[view];
  const seq = ++renderSeq;
  if (cleanup) {
    try {
      cleanup();
    } catch (e) {
      /* a view's cleanup failing must not block the next view */
    }
    cleanup = null;
  }
  for (const a of document.querySelectorAll('#nav a')) {
    if (a.dataset.view === view) a.setAttribute('aria-current', 'page');
    else a.removeAttribute('aria-current');
  }
  const title = view === 'vms' && params.name ? params.name : v.title;
  document.getElementById('title').textContent = title;
  document.title = title + ' · Strata';
  const root = document.getElementById('content');
  root.dataset.view = view;
  root.dataset.ready = '';
  S.fill(root, S.h('p.muted', 'Loading…'));
  try {
    const c = await v.render(root, params);
    if (seq !== renderSeq) {
      if (typeof c === 'function') c();
      return;
    }
    cleanup = typeof c === 'function' ? c : null;
    root.dataset.ready = '1';
  } catch (e) {
    if (e instanceof S.ApiError && e.status === 401) return;
    const box = S.errorBox();
    S.fill(root, box);
    box.show(e);
    root.dataset.ready = 'error';
  }
  if (focus) root.focus({ preventScroll: true });
}

S.navigate = function (path) {
  history.pushState(null, '', path);
  show(path, true);
};

async function signOut(button) {
  await S.run(button, null, async () => {
    await S.api('DELETE', '/ui/session');
    S.stopEvents();
    location.replace('/ui/login?reason=signed-out');
  });
}

async function start() {
  performance.mark('strata-start');
  try {
    S.session = await S.api('GET', '/ui/session');
  } catch (e) {
    return;
  }
  document.getElementById('who').textContent = S.session.name + (S.session.admin ? ' (admin)' : '');
  const nav = document.getElementById('nav');
  for (const [view, href, label] of NAV) {
    nav.append(S.h('li', S.h('a', { href, 'data-nav': '', dataset: { view } }, S.icon(view), S.h('span', label))));
  }
  document.addEventListener('click', (ev) => {
    const a = ev.target.closest('a[data-nav]');
    if (!a || ev.ctrlKey || ev.metaKey || ev.shiftKey || ev.button !== 0) return;
    ev.preventDefault();
    S.navigate(a.getAttribute('href'));
  });
  window.addEventListener('popstate', () => show(location.pathname, true));
  const out = document.getElementById('sign-out');
  out.addEventListener('click', () => signOut(out));
  const pill = document.getElementById('jobs-pill');
  S.onJobs(() => {
    const n = [...S.jobs.values()].filter((j) => j.state === 'running').length;
    pill.hidden = !n;
    pill.textContent = n + (n === 1 ? ' job running' : ' jobs running');
  });
  S.startEvents();
  await show(location.pathname, false);
  // Time to interactive: the first view rendered with its data and its controls wired.
  performance.mark('strata-interactive');
}

start();
