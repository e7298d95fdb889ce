#!/usr/bin/env bash
# Thin volumes against a raw file on the same disk, and snapshot/clone creation time against
# virtual size. Every figure is printed with its peer from the same run and their ratio.
#
#   benches/volume.sh            # build strata (release) and run everything
#   STRATA=path/to/strata BENCH_DIR=/var/tmp/x ROUNDS=5 SECONDS_PER_RUN=5 benches/volume.sh
#
# Method: a 2 GiB raw file and a 2 GiB thin volume (64 KiB blocks, pool file on the same file
# system), both written once in full so that the thin volume's blocks are provisioned (steady
# state: writes go in place, no metadata changes). Then ROUNDS rounds alternate thin and raw runs
# of `strata image bench` (4 KiB random, queue depth 32, O_DIRECT, io_uring), and the median of
# each is reported: the disk's speed drifts with other load, alternating keeps that fair. First
# writes to a fresh thin volume (each allocates and writes a whole 64 KiB block) are reported
# separately against a fresh sparse raw file. Snapshot and clone times are wall-clock times of
# the `strata lv snapshot|clone` command (process start, group open and pool load, the O(1)
# operation, and its metadata commit) on volumes of 1 GiB and 1 TiB holding the same 256 MiB
# of data. Finally, random reads on the first and the 32nd generation of a chain of clones of
# snapshots show whether depth slows reads down.
set -euo pipefail

cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-5}
SECS=${SECONDS_PER_RUN:-5}
DIR=${BENCH_DIR:-/var/tmp/strata-bench-volume}
if [[ -z "${STRATA:-}" ]]; then
    cargo build --release -j2 -p strata-cli >&2
    STRATA="${CARGO_TARGET_DIR:-target}/release/strata"
fi
rm -rf "$DIR"
mkdir -p "$DIR"
# The scratch files (about 7 GiB at the peak) go when the script ends; the results are printed.
trap 'rm -rf "$DIR"' EXIT
load_start=$(cut -d' ' -f1-3 /proc/loadavg)
export STRATA_DATA="$DIR/data"
S() { "$STRATA" "$@"; }

median() { sort -g | awk '{v[NR]=$1} END {print (NR % 2) ? v[(NR+1)/2] : (v[NR/2] + v[NR/2+1]) / 2}'; }
ops() { S image bench --output json "$@" | jq -r '.ops_per_sec | floor'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN {printf "%.2f", a / b}'; }

echo "# setup in $DIR (disk: $(df --output=source "$DIR" | tail -1))" >&2
S pv create "$DIR/pv.img" --size 3G >/dev/null
S vg create vg0 "$DIR/pv.img" >/dev/null
S lv create-pool vg0/pool --size 2304M >/dev/null
S lv create vg0/thin --size 2G --thin vg0/pool >/dev/null
S image create -q "$DIR/raw.img" 2G
S image bench -w -s 1M -d 8 -c 2048 lv:vg0/thin >/dev/null
S image bench -w -s 1M -d 8 -c 2048 "$DIR/raw.img" >/dev/null

declare -A R
for r in $(seq "$ROUNDS"); do
    echo "# round $r/$ROUNDS" >&2
    R[thin_read]+="$(ops --pattern rand -d 32 --time "$SECS" lv:vg0/thin) "
    R[raw_read]+="$(ops --pattern rand -d 32 --time "$SECS" "$DIR/raw.img") "
    R[thin_write]+="$(ops -w --pattern rand -d 32 --time "$SECS" lv:vg0/thin) "
    R[raw_write]+="$(ops -w --pattern rand -d 32 --time "$SECS" "$DIR/raw.img") "
done
med() { tr ' ' '\n' <<<"${R[$1]}" | grep . | median; }
# Median of the per-round ratios (each round's pair ran back to back, so drift cancels).
pmed() { paste -d' ' <(tr ' ' '\n' <<<"${R[$1]}" | grep .) <(tr ' ' '\n' <<<"${R[$2]}" | grep .) |
    awk '{printf "%.4f\n", $1 / $2}' | median; }

# CPU time per request (user + system, µs), which load on the host disturbs much less than
# throughput: 100,000 requests each way.
cpu_us() {
    local t
    t=$( { /usr/bin/time -f "%U %S" "$STRATA" image bench --output json -c 100000 "$@" >/dev/null; } 2>&1 | tail -1)
    awk -v t="$t" 'BEGIN {split(t, a, " "); printf "%.2f", (a[1] + a[2]) * 1e6 / 100000}'
}
cpu_thin_r=$(cpu_us --pattern rand -d 32 lv:vg0/thin)
cpu_raw_r=$(cpu_us --pattern rand -d 32 "$DIR/raw.img")
cpu_thin_w=$(cpu_us -w --pattern rand -d 32 lv:vg0/thin)
cpu_raw_w=$(cpu_us -w --pattern rand -d 32 "$DIR/raw.img")

# First writes: a fresh thin volume in a fresh pool against a fresh sparse raw file, same
# number of requests. (Blocks freed and reused later are no longer known to hold zeros: a
# first write there writes its whole 64 KiB block.)
S lv remove vg0/thin >/dev/null
S lv remove vg0/pool >/dev/null
S lv create-pool vg0/pool --size 2304M >/dev/null
S lv create vg0/fresh --size 2G --thin vg0/pool >/dev/null
S image create -q "$DIR/fresh.img" 2G
first_thin=$(ops -w --pattern rand -d 32 -c 20000 lv:vg0/fresh)
first_raw=$(ops -w --pattern rand -d 32 -c 20000 "$DIR/fresh.img")
S lv remove vg0/fresh >/dev/null

# Snapshot and clone creation at 1 GiB and 1 TiB of virtual size, same data in both.
S lv create vg0/small --size 1G --thin vg0/pool >/dev/null
S lv create vg0/huge --size 1T --thin vg0/pool >/dev/null
for v in small huge; do
    S image bench -w -s 1M -d 8 -c 256 lv:vg0/$v >/dev/null
done
time_ms() { local t0 t1; t0=$(date +%s%N); "$@" >/dev/null; t1=$(date +%s%N); echo $(((t1 - t0) / 1000)); }
declare -A T
for i in $(seq 7); do
    for v in small huge; do
        T[snap_$v]+="$(time_ms S lv snapshot vg0/$v vg0/$v-s$i) "
        T[clone_$v]+="$(time_ms S lv clone vg0/$v-s$i vg0/$v-c$i) "
    done
done
tmed() { tr ' ' '\n' <<<"${T[$1]}" | grep . | median; }

# Reads at snapshot depth: a chain of 32 clone-of-snapshot generations of a fully written
# volume; random reads on generation 1 and generation 32 (every block shared along the chain).
S lv create vg0/g0 --size 512M --thin vg0/pool >/dev/null
S image bench -w -s 1M -d 8 -c 512 lv:vg0/g0 >/dev/null
for i in $(seq 32); do
    S lv snapshot vg0/g$((i - 1)) vg0/g$((i - 1))-snap >/dev/null
    S lv clone vg0/g$((i - 1))-snap vg0/g$i >/dev/null
done
declare -A D
for r in $(seq "$ROUNDS"); do
    D[depth1]+="$(ops --pattern rand -d 32 --time "$SECS" lv:vg0/g1) "
    D[depth32]+="$(ops --pattern rand -d 32 --time "$SECS" lv:vg0/g32) "
done
dmed() { tr ' ' '\n' <<<"${D[$1]}" | grep . | median; }

tr_=$(med thin_read); rr_=$(med raw_read); tw=$(med thin_write); rw=$(med raw_write)
cat <<EOF

## Volumes (benches/volume.sh)

Run $(date -u +%Y-%m-%d), $ROUNDS alternating rounds of ${SECS} s, medians; 4 KiB random, QD32,
O_DIRECT, io_uring; thin volume (64 KiB blocks, provisioned) vs raw file on the same disk.
Host load average (1, 5, 15 min) at the start: $load_start; at the end: $(cut -d' ' -f1-3 /proc/loadavg); $(nproc) CPUs.

| figure | thin | raw file | thin / raw |
|---|---|---|---|
| 4k random read, ops/s (median ratio of rounds: $(pmed thin_read raw_read)) | $tr_ | $rr_ | $(ratio "$tr_" "$rr_") |
| 4k random write, ops/s (median ratio of rounds: $(pmed thin_write raw_write)) | $tw | $rw | $(ratio "$tw" "$rw") |
| 4k random read, CPU µs per request | $cpu_thin_r | $cpu_raw_r | $(ratio "$cpu_thin_r" "$cpu_raw_r") |
| 4k random write, CPU µs per request | $cpu_thin_w | $cpu_raw_w | $(ratio "$cpu_thin_w" "$cpu_raw_w") |
| 4k random first writes (fresh pool and volume vs sparse file), ops/s | $first_thin | $first_raw | $(ratio "$first_thin" "$first_raw") |

Per-round ops/s: thin read ${R[thin_read]% }; raw read ${R[raw_read]% }; thin write ${R[thin_write]% }; raw write ${R[raw_write]% }.

| command (wall time, median of 7, µs) | 1 GiB volume | 1 TiB volume | 1 TiB / 1 GiB |
|---|---|---|---|
| strata lv snapshot | $(tmed snap_small) | $(tmed snap_huge) | $(ratio "$(tmed snap_huge)" "$(tmed snap_small)") |
| strata lv clone | $(tmed clone_small) | $(tmed clone_huge) | $(ratio "$(tmed clone_huge)" "$(tmed clone_small)") |

| 4k random read at snapshot depth, ops/s | generation 1 | generation 32 | 32 / 1 |
|---|---|---|---|
| clone of a snapshot of a clone ... of a 512 MiB volume | $(dmed depth1) | $(dmed depth32) | $(ratio "$(dmed depth32)" "$(dmed depth1)") |
EOF
