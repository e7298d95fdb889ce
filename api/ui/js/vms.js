// VMs: the list with state, define, start, stop, remove; a VM's page with its status,
// definition and live serial console.

S.views.vms = {
  title: 'Virtual machines',
  async render(root, params) {
    if (params.name) return vmPage(root, params.name);
    const errors = S.errorBox();
    const list = S.h('div');
    const reload = async () => {
      const vms = await S.api('GET', '/api/vms');
      S.fill(list, S.table(
        [{ label: 'Name' }, { label: 'State' }, { label: 'Memory', num: true, narrow: true }, { label: 'vCPUs', num: true, narrow: true }, { label: 'Disks', narrow: true }, { label: 'Uptime', narrow: true }, { label: 'Actions', actions: true }],
        vms.map((vm) => vmRow(vm, errors, reload)),
        { label: 'Virtual machines', empty: 'No VMs defined yet.' }));
    };
    S.fill(root,
      S.h('div.toolbar', S.h('div.grow'), S.button('Define VM', () => defineDialog(reload), { cls: 'primary', errors, data: { action: 'define-vm' } })),
      errors,
      S.h('section.card', S.h('header', S.h('h2', 'Virtual machines')), S.h('div.body.flush', list)));
    await reload();
    // VM states change without jobs: refresh the list every 5 s while it is shown.
    const timer = setInterval(() => reload().catch(() => {}), 5000);
    return () => clearInterval(timer);
  },
};

function vmActions(vm, errors, reload, small) {
  const name = vm.definition.name;
  const path = '/api/vms/' + encodeURIComponent(name);
  const cls = small ? 'small' : '';
  const act = (label, fn, extra) => S.button(label, fn, { cls: [cls, extra].filter(Boolean).join(' '), errors, aria: label + ' ' + name, data: { action: label.toLowerCase().replace(/ /g, '-'), vm: name } });
  const state = vm.status.state;
  const running = state === 'running' || state === 'paused';
  const out = [];
  if (!running) {
    out.push(act('Start', async () => {
      await S.api('POST', path + '/start');
      S.toast('Started ' + name);
      await reload();
    }, small ? null : 'primary'));
  } else {
    out.push(act('Shut down', () => S.confirm('Shut down ' + name + '?', 'The VM\'s ACPI power button is pressed; if the guest has not powered off after 60 s it is stopped hard.', 'Shut down', async () => {
      S.toast('Shutting down ' + name + '…');
      await S.api('POST', path + '/stop');
      S.toast('Stopped ' + name);
      await reload();
    })));
    if (state === 'paused') {
      out.push(act('Resume', async () => {
        await S.api('POST', path + '/resume');
        S.toast('Resumed ' + name);
        await reload();
      }));
    } else {
      out.push(act('Pause', async () => {
        await S.api('POST', path + '/pause');
        S.toast('Paused ' + name);
        await reload();
      }));
    }
    out.push(act('Force stop', () => S.confirm('Force stop ' + name + '?', 'The vCPUs stop at once (like pulling the plug); the disks are flushed.', 'Force stop', async () => {
      await S.api('POST', path + '/stop?force=true');
      S.toast('Stopped ' + name);
      await reload();
    }), 'danger'));
  }
  if (!running) {
    out.push(act('Remove', () => S.confirm('Remove VM ' + name + '?', 'Its definition and console logs are deleted; its disks stay.', 'Remove', async () => {
      await S.api('DELETE', path);
      S.toast('Removed ' + name);
      if (location.pathname !== '/ui/vms') S.navigate('/ui/vms');
      else await reload();
    }), 'danger'));
  }
  return out;
}

function vmRow(vm, errors, reload) {
  const d = vm.definition;
  const st = vm.status;
  return {
    data: { vm: d.name },
    cells: [
      S.h('a.name', { href: '/ui/vms/' + encodeURIComponent(d.name), 'data-nav': '' }, d.name),
      S.stateBadge(st.state),
      S.fmt.bytes(d.memory),
      String(d.vcpus),
      d.disks.map((x) => x.source.replace(/^lv:/, '')).join(', ') || '–',
      st.state === 'running' ? S.fmt.duration(st.uptime_seconds) : '–',
      S.h('div.actions', S.h('a.button.small', { href: '/ui/vms/' + encodeURIComponent(d.name), 'data-nav': '', 'aria-label': 'Console of ' + d.name }, 'Console'), vmActions(vm, errors, reload, true)),
    ],
  };
}

async function vmPage(root, name) {
  const errors = S.errorBox();
  const path = '/api/vms/' + encodeURIComponent(name);
  const info = S.h('div');
  const tools = S.h('div.actions');
  let lastState = null;
  const reload = async () => {
    const vm = await S.api('GET', path);
    const d = vm.definition;
    const st = vm.status;
    lastState = st.state;
    S.fill(tools, vmActions(vm, errors, reload, false));
    S.fill(info, S.h('dl.kv',
      S.h('dt', 'State'), S.h('dd#vm-state', S.stateBadge(st.state), st.exit_reason ? ' ' + st.exit_reason : ''),
      S.h('dt', 'Uptime'), S.h('dd', st.state === 'running' ? S.fmt.duration(st.uptime_seconds) : '–'),
      S.h('dt', 'Memory'), S.h('dd', S.fmt.bytes(d.memory)),
      S.h('dt', 'vCPUs'), S.h('dd', String(d.vcpus)),
      S.h('dt', 'Boots'), S.h('dd', d.boot + ' ', S.h('code', d.kernel)),
      S.h('dt', 'Disks'), S.h('dd', d.disks.length ? d.disks.map((x) => x.source + (x.readonly ? ' (read-only)' : '')).join(', ') : 'none')));
  };
  const consoleBox = S.h('div.console#console', { role: 'region', 'aria-label': 'Serial console of ' + name });
  const consoleNote = S.h('span.small.muted#console-note', 'Connecting…');
  S.fill(root,
    S.h('div.row', S.h('a', { href: '/ui/vms', 'data-nav': '' }, '← All VMs')),
    errors,
    S.h('div.grid.vm-layout',
      S.h('section.card', S.h('header', S.h('h2', name)), S.h('div.body.stack', info, tools)),
      S.h('section.card', S.h('header', S.h('h2', 'Serial console'), consoleNote), S.h('div.body', consoleBox))));
  await reload();
  const closeConsole = await S.openConsole(name, consoleBox, consoleNote, (state) => {
    if (state !== lastState) reload().catch(() => {});
  });
  return closeConsole;
}

function defineDialog(reload) {
  const fields = [
    S.field({ name: 'name', label: 'Name', required: true, placeholder: 'web-1' }),
    S.field({ name: 'memory', label: 'Memory', value: '512M', help: 'At least 16M.' }),
    S.field({ name: 'vcpus', label: 'vCPUs', type: 'number', min: 1, max: 64, value: '1' }),
    S.field({ name: 'boot', label: 'Boots', type: 'select', options: [['linux', 'Linux kernel (bzImage)'], ['flat', 'Flat 64-bit image']] }),
    S.field({ name: 'kernel', label: 'Kernel or image on the server', required: true, placeholder: '/var/lib/strata/import/vmlinuz', help: 'An absolute path inside an import folder (DATA/import or --import-dir).' }),
    S.field({ name: 'initrd', label: 'Initramfs on the server (Linux)', placeholder: 'optional' }),
    S.field({ name: 'cmdline', label: 'Kernel command line (Linux)', placeholder: 'console=ttyS0 reboot=k panic=1' }),
    S.field({ name: 'disks', label: 'Disks', placeholder: 'lv:strata/vm-disk-0, image:seed.raw', help: 'Comma-separated lv:VG/NAME or image:NAME; the first is /dev/vda. Add “:ro” for read-only.' }),
  ];
  S.dialog({
    title: 'Define a VM', fields, submit: 'Define',
    onSubmit: async (v) => {
      const disks = v.disks ? v.disks.split(',').map((s) => s.trim()).filter(Boolean).map((s) => {
        const ro = s.endsWith(':ro');
        return { source: ro ? s.slice(0, -3) : s, readonly: ro };
      }) : [];
      await S.api('POST', '/api/vms', {
        name: v.name, memory: v.memory || '512M', vcpus: parseInt(v.vcpus || '1', 10), boot: v.boot,
        kernel: v.kernel, initrd: v.initrd || null, cmdline: v.cmdline || null, disks,
      });
      S.toast('Defined ' + v.name);
      await reload();
    },
  });
}
