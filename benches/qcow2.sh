#!/usr/bin/env bash
# qcow2 benchmarks: `strata image bench` against `qemu-img bench` on the same image in the same
# run, alternating, O_DIRECT (-t none), io_uring where qemu-img has it. Prints both figures and
# the ratio per row (ops/s; higher is better):
#   1. 4 KiB random reads of a fully allocated image
#   2. 4 KiB allocating random writes on an empty image (a fresh image for every run)
#   3. 64 KiB sequential writes on an empty image (a fresh image for every run)
#   4. 4 KiB random reads: allocated qcow2 against raw, both through strata
# qemu-img bench has no random pattern: it walks the image with a large odd step (modulo the
# size), which visits 4 KiB slots in scattered order; strata uses its uniform random pattern.
#
# Usage: benches/qcow2.sh [DIR]   (DIR: scratch folder on the disk to measure; default a temp dir)
# Env:   RUNS (default 3), SIZE_MIB (default 1024), STRATA (default target/release/strata)
set -euo pipefail

RUNS=${RUNS:-3}
SIZE_MIB=${SIZE_MIB:-1024}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
STRATA=${STRATA:-${CARGO_TARGET_DIR:-$ROOT/target}/release/strata}
DIR=${1:-$(mktemp -d -p "${TMPDIR:-/var/tmp}" strata-qcow2-bench.XXXXXX)}
mkdir -p "$DIR"
trap 'rm -f "$DIR"/*.qcow2 "$DIR"/*.raw' EXIT

command -v qemu-img >/dev/null || { echo "qemu-img not found (install qemu-utils)"; exit 1; }
[ -x "$STRATA" ] || { echo "build strata first: cargo build --release -p strata-cli"; exit 1; }

AIO=io_uring
qemu-img create -q -f raw "$DIR/probe.raw" 1M
if ! qemu-img bench -q -c 1 -t none -i io_uring -f raw "$DIR/probe.raw" >/dev/null 2>&1; then
  AIO=native
fi

SIZE=$((SIZE_MIB << 20))
SLOTS=$((SIZE / 4096))
STEP4K=$((4096 * 100003))          # odd multiple of 4 KiB: every slot, scattered
READS=${READS:-60000}
AWRITES=$(( SLOTS / 16 < 16000 ? SLOTS / 16 : 16000 ))  # about one write per 64 KiB cluster
SWRITES=$((SIZE / 65536))

secs() { sed -n 's/^Run completed in \([0-9.]*\) seconds\./\1/p'; }
ops() { awk -v n="$1" -v s="$2" 'BEGIN { printf "%.0f", n / s }'; }

strata_run() { "$STRATA" image bench "$@" | secs; }
qemu_run() { qemu-img bench -t none -i "$AIO" -f "$@" | secs; }

median() { sort -n | awk '{ a[NR] = $1 } END { print a[int((NR + 1) / 2)] }'; }

row() { # name ours_ops theirs_ops theirs_label
  awk -v n="$1" -v a="$2" -v b="$3" -v l="$4" 'BEGIN { printf "%-44s %10d %10d %7.2fx  (%s)\n", n, a, b, a / b, l }'
}

printf "%-44s %10s %10s %8s\n" "row (ops/s, median of $RUNS)" strata peer ratio
echo "# qemu-img $(qemu-img --version | head -1 | awk '{print $3}'), aio=$AIO, image ${SIZE_MIB} MiB, $(nproc) cpus"

# 1 and 4: reads of a fully allocated image, and of raw.
qemu-img create -q -f qcow2 -o preallocation=full "$DIR/full.qcow2" "$SIZE"
qemu-img create -q -f raw -o preallocation=full "$DIR/full.raw" "$SIZE"
s=(); q=(); r=()
for _ in $(seq "$RUNS"); do
  s+=("$(ops "$READS" "$(strata_run -c "$READS" -d 32 -s 4K --pattern rand -t none -f qcow2 "$DIR/full.qcow2")")")
  q+=("$(ops "$READS" "$(qemu_run qcow2 -c "$READS" -d 32 -s 4K -S "$STEP4K" "$DIR/full.qcow2")")")
  r+=("$(ops "$READS" "$(strata_run -c "$READS" -d 32 -s 4K --pattern rand -t none -f raw "$DIR/full.raw")")")
done
S=$(printf '%s\n' "${s[@]}" | median); Q=$(printf '%s\n' "${q[@]}" | median); R=$(printf '%s\n' "${r[@]}" | median)
row "4k random read, allocated qcow2, QD32" "$S" "$Q" "qemu-img bench"

# 2: allocating 4 KiB random writes, fresh image each run.
s=(); q=()
for _ in $(seq "$RUNS"); do
  rm -f "$DIR/w.qcow2"; qemu-img create -q -f qcow2 "$DIR/w.qcow2" "$SIZE"
  s+=("$(ops "$AWRITES" "$(strata_run -w -c "$AWRITES" -d 32 -s 4K --pattern rand -t none -f qcow2 "$DIR/w.qcow2")")")
  rm -f "$DIR/w.qcow2"; qemu-img create -q -f qcow2 "$DIR/w.qcow2" "$SIZE"
  q+=("$(ops "$AWRITES" "$(qemu_run qcow2 -w -c "$AWRITES" -d 32 -s 4K -S $((65536 * 30011)) "$DIR/w.qcow2")")")
done
row "4k allocating random write, empty qcow2, QD32" "$(printf '%s\n' "${s[@]}" | median)" "$(printf '%s\n' "${q[@]}" | median)" "qemu-img bench"

# 3: 64 KiB sequential writes, fresh image each run.
s=(); q=()
for _ in $(seq "$RUNS"); do
  rm -f "$DIR/s.qcow2"; qemu-img create -q -f qcow2 "$DIR/s.qcow2" "$SIZE"
  s+=("$(ops "$SWRITES" "$(strata_run -w -c "$SWRITES" -d 32 -s 64K --pattern seq -t none -f qcow2 "$DIR/s.qcow2")")")
  rm -f "$DIR/s.qcow2"; qemu-img create -q -f qcow2 "$DIR/s.qcow2" "$SIZE"
  q+=("$(ops "$SWRITES" "$(qemu_run qcow2 -w -c "$SWRITES" -d 32 -s 64K "$DIR/s.qcow2")")")
done
row "64k sequential write, empty qcow2, QD32" "$(printf '%s\n' "${s[@]}" | median)" "$(printf '%s\n' "${q[@]}" | median)" "qemu-img bench"

row "4k random read: allocated qcow2 vs raw" "$S" "$R" "strata on raw"
