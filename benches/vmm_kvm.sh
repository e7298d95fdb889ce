#!/usr/bin/env bash
# The hardware-KVM rows of the VMM benchmarks: the same Linux guest (Debian's kernel and the
# busybox + fio initramfs of tests/guest/build.sh) booted by Strata's own VMM (`strata vm run`,
# the disk served by Strata's virtio-blk device over virtio-mmio) and by QEMU (`-accel kvm`,
# virtio-blk-pci with aio=io_uring,cache.direct=on), alternating, on the same raw file. For each
# boot it records the time from launch to the guest's /init (its first console line, "STRATA
# init") and fio's 4k random-read IOPS inside the guest (libaio, /dev/vda, the given depth);
# it prints medians and ratios (the issue's targets: IOPS at least 1.2x QEMU's).
#
# This host kind's /dev/kvm is PVM, under which an unmodified Linux kernel does not finish
# booting: there the script prints SKIPPED with the reason and measures nothing. With
# --qemu-only it still runs the QEMU half (TCG where KVM cannot run Linux) to check the guest,
# the timing and the parsing; those figures are not the benchmark.
#
# Usage: benches/vmm_kvm.sh [--rounds N] [--depth D] [--file PATH] [--strata BIN] [--qemu-only]
# Needs qemu-system-x86 and qemu-utils, fio, python3, and what tests/guest/build.sh needs.
set -euo pipefail

rounds=3
depth=32
file=""
strata=""
qemu_only=0
while [ $# -gt 0 ]; do
  case "$1" in
    --rounds) rounds=$2; shift 2 ;;
    --depth) depth=$2; shift 2 ;;
    --file) file=$2; shift 2 ;;
    --strata) strata=$2; shift 2 ;;
    --qemu-only) qemu_only=1; shift ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done

accel=kvm
why=""
if [ -d /sys/module/kvm_pvm ]; then
  why="this host's /dev/kvm is PVM (/sys/module/kvm_pvm exists): an unmodified Linux kernel does not finish booting under it"
elif [ ! -w /dev/kvm ]; then
  why="/dev/kvm is missing or not writable"
fi
if [ -n "$why" ]; then
  echo "SKIPPED: the hardware-KVM rows need hardware KVM; $why." >&2
  if [ "$qemu_only" = 0 ]; then
    exit 0
  fi
  accel=tcg
  echo "--qemu-only: running the QEMU half under TCG to check the script; not a benchmark figure." >&2
fi

root=$(cd "$(dirname "$0")/.." && pwd)
need_strata=$((1 - qemu_only))
# shellcheck source=benches/vmm_guest_setup.sh
. "$root/benches/vmm_guest_setup.sh"
cmdline="console=ttyS0 panic=-1 quiet strata.test=fio strata.fio=--iodepth=$depth"

# Runs a command, time-stamps its console lines; prints "BOOT_SECONDS IOPS" or fails.
measure() {
  python3 - "$@" <<'PY'
import subprocess, sys, time
t0 = time.monotonic()
p = subprocess.Popen(sys.argv[1:], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
boot, iops, lines = None, None, []
deadline = t0 + 900
for raw in p.stdout:
    line = raw.decode(errors="replace").strip()
    lines.append(line)
    if boot is None and "STRATA init" in line:
        boot = time.monotonic() - t0
    if "STRATA fio vda" in line:
        iops = line.split()[3]
    if time.monotonic() > deadline:
        p.kill()
        break
p.wait()
if boot is None or iops is None:
    sys.stderr.write("no result; the console said:\n" + "\n".join(lines[-40:]) + "\n")
    sys.exit(1)
print(f"{boot:.3f} {iops}")
PY
}

ours_boot=(); ours_iops=(); peer_boot=(); peer_iops=()
for r in $(seq 1 "$rounds"); do
  if [ "$qemu_only" = 0 ]; then
    read -r b i < <(measure "$strata" vm run --kernel "$guest/vmlinuz" \
      --initrd "$guest/initramfs-fio.gz" --cmdline "$cmdline" --memory 1G --cpus 2 \
      --disk "$file,format=raw,readonly=on,queues=2")
    echo "round $r: strata vm run: /init after ${b} s, fio $i IOPS" >&2
    ours_boot+=("$b"); ours_iops+=("$i")
  fi
  read -r b i < <(measure qemu-system-x86_64 -accel "$accel" -M q35 -cpu max -smp 2 -m 1G \
    -nographic -no-reboot -nodefaults -serial stdio \
    -kernel "$guest/vmlinuz" -initrd "$guest/initramfs-fio.gz" -append "$cmdline" \
    -drive file="$file",if=none,id=d0,format=raw,aio=io_uring,cache.direct=on,readonly=on \
    -device virtio-blk-pci,drive=d0,num-queues=2)
  echo "round $r: QEMU ($accel, aio=io_uring): /init after ${b} s, fio $i IOPS" >&2
  peer_boot+=("$b"); peer_iops+=("$i")
done
python3 - "$depth" "$accel" "${ours_boot[*]:-}" "${ours_iops[*]:-}" "${peer_boot[*]}" "${peer_iops[*]}" <<'PY'
import statistics, sys
depth, accel = sys.argv[1], sys.argv[2]
ob, oi, pb, pi = ([float(x) for x in a.split()] for a in sys.argv[3:7])
m = statistics.median
print(f"| row | strata vm run | QEMU -accel {accel} aio=io_uring | ratio |")
print("|---|---|---|---|")
if oi:
    print(f"| in-guest fio 4k randread QD{depth} (IOPS) | {m(oi):.0f} | {m(pi):.0f} | {m(oi)/m(pi):.2f}x |")
    print(f"| launch to /init (s) | {m(ob):.3f} | {m(pb):.3f} | {m(pb)/m(ob):.2f}x faster |")
else:
    print(f"| in-guest fio 4k randread QD{depth} (IOPS) | not run | {m(pi):.0f} | |")
    print(f"| launch to /init (s) | not run | {m(pb):.3f} | |")
PY
