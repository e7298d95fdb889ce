// The sign-in page: a user name and password, or an API token, becomes a session cookie.
'use strict';

(function () {
  const $ = (id) => document.getElementById(id);
  const params = new URLSearchParams(location.search);
  const next = params.get('next');
  const target = next && /^\/ui\/[\x21-\x7e]*$/.test(next) && !next.startsWith('//') ? next : '/ui/';
  const reason = params.get('reason');
  if (reason === 'expired' || reason === 'signed-out') {
    $('notice-user').textContent = reason === 'expired' ? 'Your session has ended. Sign in again.' : 'You are signed out.';
    $('notice-user').hidden = false;
  }

  const tabs = [['tab-user', 'form-user'], ['tab-token', 'form-token']];
  for (const [tab, form] of tabs) {
    $(tab).addEventListener('click', () => {
      for (const [t, f] of tabs) {
        $(t).setAttribute('aria-selected', String(t === tab));
        $(f).hidden = t !== tab;
      }
      $(form).querySelector('input').focus();
    });
  }

  async function signIn(body, errorBox, button) {
    errorBox.hidden = true;
    button.disabled = true;
    try {
      const resp = await fetch('/ui/session', {
        method: 'POST',
        headers: { 'Content-Type': 'application/json', Accept: 'application/json' },
        credentials: 'same-origin',
        body: JSON.stringify(body),
      });
      if (resp.ok) {
        location.replace(target);
        return;
      }
      let msg = 'Signing in failed (' + resp.status + ')';
      try {
        const data = await resp.json();
        if (data && data.message) msg = data.message;
      } catch (e) {
        /* not JSON */
      }
      errorBox.textContent = msg;
      errorBox.hidden = false;
    } catch (e) {
      errorBox.textContent = 'The server did not answer: ' + e.message;
      errorBox.hidden = false;
    } finally {
      button.disabled = false;
    }
  }

  $('form-user').addEventListener('submit', (ev) => {
    ev.preventDefault();
    signIn({ user: $('user').value.trim(), password: $('password').value }, $('error-user'), $('sign-in-user'));
  });
  $('form-token').addEventListener('submit', (ev) => {
    ev.preventDefault();
    signIn({ token: $('token').value.trim() }, $('error-token'), $('sign-in-token'));
  });
  $('user').focus();
})();
