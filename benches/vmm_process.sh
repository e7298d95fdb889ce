#!/usr/bin/env bash
# Before and after one VMM process per VM, in the same run:
#
# 1. VM start latency: from the API request (`POST /api/vms/NAME/start`) to the guest's first
#    serial byte (the console log growing), for a freestanding guest that prints at once.
#    "before" is main's `strata serve` (the VM is a thread of the server), "after" this
#    branch's (a sandboxed VMM process per VM). Alternating, N starts each, medians.
# 2. The device data path (`vmm_datapath --only-strata-depth D`, 4k random reads, io_uring,
#    O_DIRECT): main's binary against this branch's with the worker under its seccomp filter
#    (`--seccomp`), alternating, medians and the ratio (the issue's bar: after >= 0.95x before).
#
# Usage: benches/vmm_process.sh --before DIR [--rounds N] [--starts N] [--seconds S]
#   DIR: a worktree of main with `cargo build --release -p strata-cli -p strata-benches` done
#        (its target/release/strata and vmm_datapath are used).
# Needs /dev/kvm, fio, curl, python3. The machine is shared: figures drift; read the ratio.
set -euo pipefail

before=""
rounds=3
starts=10
seconds=4
while [ $# -gt 0 ]; do
  case "$1" in
    --before) before=$2; shift 2 ;;
    --rounds) rounds=$2; shift 2 ;;
    --starts) starts=$2; shift 2 ;;
    --seconds) seconds=$2; shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
[ -n "$before" ] || { echo "--before DIR (a built worktree of main) is required" >&2; exit 2; }
here=$(cd "$(dirname "$0")/.." && pwd)
cargo build --release -j2 -p strata-cli -p strata-benches --manifest-path "$here/Cargo.toml" >&2
old_strata=$(cd "$before" && pwd)/target/release/strata
old_dp=$(cd "$before" && pwd)/target/release/vmm_datapath
new_strata=$here/target/release/strata
new_dp=$here/target/release/vmm_datapath
for b in "$old_strata" "$old_dp" "$new_strata" "$new_dp"; do
  [ -x "$b" ] || { echo "missing $b" >&2; exit 2; }
done
work=$(mktemp -d /tmp/strata-vmm-process.XXXXXX)
trap 'rm -rf "$work"' EXIT

python3 - "$old_strata" "$new_strata" "$starts" "$work" <<'PY'
import json, os, signal, statistics, subprocess, sys, time, urllib.request
old, new, starts, work = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
# A flat guest: print one line on COM1, then spin.
code = bytes([0x66, 0xba, 0xf8, 0x03])
for b in b"up\n":
    code += bytes([0xb0, b, 0xee])
code += bytes([0xeb, 0xfe])

def server(binary, tag):
    data = os.path.join(work, tag)
    port = {"before": 18641, "after": 18642}[tag]
    p = subprocess.Popen([binary, "--data", data, "serve", "--http", "--listen",
                          f"127.0.0.1:{port}", "--pv-size", "2G"],
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    token = None
    for line in p.stdout:
        if line.startswith("  ") and "." in line and token is None:
            token = line.strip()
        if line.startswith("Strata API listening"):
            break
    os.makedirs(os.path.join(data, "import"), exist_ok=True)
    guest = os.path.join(data, "import", "up.bin")
    open(guest, "wb").write(code)
    return p, data, port, token, guest

def call(port, token, method, path, body=None):
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method,
                                 data=None if body is None else json.dumps(body).encode(),
                                 headers={"Authorization": f"Bearer {token}",
                                          "Content-Type": "application/json"})
    with urllib.request.urlopen(req) as r:
        return json.loads(r.read() or b"null")

results = {}
servers = {tag: server(b, tag) for tag, b in (("before", old), ("after", new))}
for tag, (p, data, port, token, guest) in servers.items():
    call(port, token, "POST", "/api/vms",
         {"name": "lat", "memory": "32M", "boot": "flat", "kernel": guest})
    results[tag] = []
for i in range(starts):
    for tag, (p, data, port, token, guest) in servers.items():
        log = os.path.join(data, "vms", "lat", "console.log")
        t0 = time.perf_counter()
        call(port, token, "POST", "/api/vms/lat/start")
        while True:
            try:
                if os.path.getsize(log) > 0:
                    break
            except FileNotFoundError:
                pass
            time.sleep(0.0005)
        results[tag].append((time.perf_counter() - t0) * 1000)
        stop = "/api/vms/lat/stop" + ("?force=true" if tag == "after" else "")
        call(port, token, "POST", stop)
for p, *_ in servers.values():
    p.send_signal(signal.SIGTERM)
    p.wait()
b, a = statistics.median(results["before"]), statistics.median(results["after"])
print(f"VM start, API request to first serial byte, {starts} starts each, medians:")
print("| | before (VM thread in the server) | after (sandboxed VMM process) | after/before |")
print("|---|---|---|---|")
print(f"| start latency | {b:.1f} ms | {a:.1f} ms | {a / b:.2f}x |")
print(f"  before: {' '.join(f'{x:.1f}' for x in results['before'])}")
print(f"  after:  {' '.join(f'{x:.1f}' for x in results['after'])}")
PY

file="$work/datapath.raw"
echo
echo "Device data path, 4k random read, ${seconds} s runs, ${rounds} rounds alternating:"
echo "| depth | before (main) IOPS | after (worker under seccomp) IOPS | after/before |"
echo "|---|---|---|---|"
for depth in 1 32; do
  b=(); a=()
  for r in $(seq "$rounds"); do
    b+=("$("$old_dp" --file "$file" --seconds "$seconds" --only-strata-depth "$depth" | awk '{print $3}')")
    a+=("$("$new_dp" --file "$file" --seconds "$seconds" --only-strata-depth "$depth" --seccomp | awk '{print $3}')")
    echo "  QD$depth round $r: before ${b[-1]}, after ${a[-1]}" >&2
  done
  python3 -c "
import statistics,sys
b=statistics.median(map(float,sys.argv[1].split())); a=statistics.median(map(float,sys.argv[2].split()))
print(f'| QD$depth | {b:.0f} | {a:.0f} | {a/b:.2f}x |')" "${b[*]}" "${a[*]}"
done
