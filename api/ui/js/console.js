// A VM's serial console in the browser: xterm.js (loaded on first use, with its integrity
// hash) fed by a WebSocket from /api/vms/{name}/console/ws. Binary frames are the guest's
// output; text frames are JSON notices ({state}, {notice}, {error}). The whole transport is
// this file and api/src/ui/console.rs.

const loaded = {};

/** Loads a vendored script or stylesheet named in the page's asset list, once. */
function loadAsset(name) {
  if (loaded[name]) return loaded[name];
  const assets = JSON.parse(document.getElementById('strata-assets').textContent);
  const a = assets[name];
  loaded[name] = new Promise((resolve, reject) => {
    if (!a) return reject(new Error('The page names no asset ' + name));
    const el = name.endsWith('.css')
      ? S.h('link', { rel: 'stylesheet', href: a.url, integrity: a.integrity })
      : S.h('script', { src: a.url, integrity: a.integrity });
    el.onload = resolve;
    el.onerror = () => reject(new Error('Could not load ' + name));
    document.head.append(el);
  });
  return loaded[name];
}

/**
 * Opens the console of VM `name` in `box`; `note` shows the connection state; `onState` gets
 * the VM's state when it changes. Resolves with a function that closes it.
 */
S.openConsole = async function (name, box, note, onState) {
  let term = null;
  let plain = null;
  try {
    await Promise.all([loadAsset('xterm.js'), loadAsset('xterm.css')]);
    term = new window.Terminal({
      convertEol: true, disableStdin: true, scrollback: 5000, fontSize: 13, rows: 24,
      fontFamily: 'ui-monospace, Menlo, Consolas, "DejaVu Sans Mono", monospace',
      theme: { background: '#0b0f16', foreground: '#d5deea' },
    });
    term.open(box);
  } catch (e) {
    // Without xterm.js the output still shows, as plain text.
    plain = S.h('pre.console-plain');
    S.fill(box, plain);
  }
  const decoder = new TextDecoder();
  const write = (bytes) => {
    if (term) term.write(bytes);
    else plain.textContent += decoder.decode(bytes, { stream: true });
    box.dataset.bytes = String(parseInt(box.dataset.bytes || '0', 10) + bytes.length);
  };
  let closed = false;
  let ws = null;
  const connect = () => {
    const url = (location.protocol === 'https:' ? 'wss://' : 'ws://') + location.host + '/api/vms/' + encodeURIComponent(name) + '/console/ws';
    ws = new WebSocket(url);
    ws.binaryType = 'arraybuffer';
    ws.onopen = () => (note.textContent = 'Live');
    ws.onmessage = (ev) => {
      if (typeof ev.data !== 'string') return write(new Uint8Array(ev.data));
      let msg = {};
      try {
        msg = JSON.parse(ev.data);
      } catch (e) {
        return;
      }
      if (msg.state) {
        box.dataset.state = msg.state;
        note.textContent = msg.state === 'running' ? 'Live' : 'Live · VM ' + msg.state;
        if (onState) onState(msg.state);
      }
      if (msg.notice) note.textContent = msg.notice;
      if (msg.error) note.textContent = 'Console closed: ' + msg.error;
    };
    ws.onclose = () => {
      if (closed) return;
      note.textContent = 'Disconnected; reconnecting…';
      // Reconnect after a pause (the server may be restarting); the session is checked again.
      setTimeout(() => {
        if (closed) return;
        S.api('GET', '/ui/session').then(() => {
          if (term) term.reset();
          else plain.textContent = '';
          box.dataset.bytes = '0';
          connect();
        }).catch(() => {});
      }, 3000);
    };
  };
  connect();
  return () => {
    closed = true;
    if (ws) ws.close();
    if (term) term.dispose();
  };
};
