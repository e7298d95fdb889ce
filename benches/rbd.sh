#!/usr/bin/env bash
# Strata's RBD device against fio's own rbd engine on the same image and cluster, and an
# incremental backup of a 10 GiB RBD volume with 1% changed against a full backup of it.
# Every figure is printed with its peer from the same run and their ratio.
#
#   benches/rbd.sh                      # build strata (release), start a cluster, run it all
#   STRATA=path/to/strata ROUNDS=5 SECONDS_PER_RUN=5 BACKUP_GIB=10 benches/rbd.sh
#
# Method: a throwaway single-node cluster (scripts/ceph-cluster.sh: one mon, one mgr, one
# bluestore OSD on a sparse file, all on this machine) and one 1 GiB image, written in full
# first. librbd's cache is off for both sides (Strata turns it off for its own connections; the
# cluster's ceph.conf says so for fio), so every write reaches the OSD before it completes.
# ROUNDS rounds alternate `strata image bench lv:VG/NAME` and `fio --ioengine=rbd` on the same
# image: 4 KiB random read and write at QD1 and QD32, 1 MiB sequential read and write at QD8.
# Medians are reported, and the median of the per-round ratios (each pair ran back to back).
#
# Backup: a BACKUP_GIB GiB volume is written in full, backed up (full read), then 1% of it is
# rewritten as 160 random 64 KiB-aligned runs of 640 KiB per 10 GiB, and backed up again: the
# second backup reads only the 4 MiB objects Ceph's fast-diff reports as changed.
set -euo pipefail

cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-5}
SECS=${SECONDS_PER_RUN:-5}
BACKUP_GIB=${BACKUP_GIB:-10}
DIR=${BENCH_DIR:-/var/tmp/strata-bench-rbd}
if [[ -z "${STRATA:-}" ]]; then
    cargo build --release -j2 -p strata-cli >&2
    STRATA="${CARGO_TARGET_DIR:-target}/release/strata"
fi
command -v fio >/dev/null || { echo "fio is missing (scripts/install-deps.sh)" >&2; exit 1; }
command -v jq >/dev/null || { echo "jq is missing" >&2; exit 1; }
rm -rf "$DIR"
mkdir -p "$DIR"
CLUSTER="$DIR/cluster"
cleanup() {
    scripts/ceph-cluster.sh stop "$CLUSTER" >/dev/null 2>&1 || true
    rm -rf "$DIR"
}
trap cleanup EXIT
load_start=$(cut -d' ' -f1-3 /proc/loadavg)
echo "# starting the cluster in $CLUSTER" >&2
scripts/ceph-cluster.sh start --dir "$CLUSTER" --osd-size $((BACKUP_GIB + 8))G </dev/null >"$DIR/cluster.env"
CONF="$CLUSTER/ceph.conf"
POOL=$(sed -n 's/^pool=//p' "$DIR/cluster.env")
printf '[client]\nrbd cache = false\n' >>"$CONF"
export STRATA_DATA="$DIR/data" CEPH_CONF="$CONF"
S() { "$STRATA" "$@"; }

median() { sort -g | awk '{v[NR]=$1} END {print (NR % 2) ? v[(NR+1)/2] : (v[NR/2] + v[NR/2+1]) / 2}'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN {printf "%.4f", a / b}'; }

S vg create-rbd ceph --conf "$CONF" --id admin --pool "$POOL" >/dev/null
S lv create ceph/bench --size 1G >/dev/null
S image bench -w -s 4M -d 8 -c 256 lv:ceph/bench >/dev/null

# strata: ops/s of `strata image bench`; fio: ops/s of fio's rbd engine, same image.
strata_ops() { S image bench --output json --time "$SECS" "$@" lv:ceph/bench | jq -r '.ops_per_sec | floor'; }
fio_ops() { # rw bs depth
    fio --name=rbd --ioengine=rbd --clientname=admin --pool="$POOL" --rbdname=bench \
        --rw="$1" --bs="$2" --iodepth="$3" --time_based --runtime="$SECS" --output-format=json |
        jq -r '[.jobs[0].read.iops, .jobs[0].write.iops] | add | floor'
}
# ROWS="rr32 sr" runs only those rows; BACKUP_GIB=0 skips the backup part.
read -r -a ROWS <<<"${ROWS:-rr1 rr32 rw1 rw32 sr ws}"
declare -A LABEL=([rr1]="4k random read QD1" [rr32]="4k random read QD32"
    [rw1]="4k random write QD1" [rw32]="4k random write QD32"
    [sr]="1M sequential read QD8" [ws]="1M sequential write QD8")
declare -A SARGS=([rr1]="--pattern rand -s 4K -d 1" [rr32]="--pattern rand -s 4K -d 32"
    [rw1]="-w --pattern rand -s 4K -d 1" [rw32]="-w --pattern rand -s 4K -d 32"
    [sr]="--pattern seq -s 1M -d 8" [ws]="-w --pattern seq -s 1M -d 8")
declare -A FARGS=([rr1]="randread 4k 1" [rr32]="randread 4k 32" [rw1]="randwrite 4k 1"
    [rw32]="randwrite 4k 32" [sr]="read 1M 8" [ws]="write 1M 8")
declare -A S_ F_
for r in $(seq "$ROUNDS"); do
    echo "# round $r/$ROUNDS" >&2
    for row in "${ROWS[@]}"; do
        # shellcheck disable=SC2086
        if (( r % 2 )); then
            S_[$row]+="$(strata_ops ${SARGS[$row]}) "
            F_[$row]+="$(fio_ops ${FARGS[$row]}) "
        else
            F_[$row]+="$(fio_ops ${FARGS[$row]}) "
            S_[$row]+="$(strata_ops ${SARGS[$row]}) "
        fi
    done
done
med() { tr ' ' '\n' <<<"$1" | grep . | median; }
pmed() { paste -d' ' <(tr ' ' '\n' <<<"$1" | grep .) <(tr ' ' '\n' <<<"$2" | grep .) |
    awk '{printf "%.4f\n", $1 / $2}' | median; }

# Incremental backup of a BACKUP_GIB GiB volume with 1% changed, against a full backup.
if (( BACKUP_GIB > 0 )); then
echo "# backup: writing a ${BACKUP_GIB} GiB volume" >&2
S lv create ceph/big --size "${BACKUP_GIB}G" >/dev/null
S image bench -w -s 4M -d 8 -c $((BACKUP_GIB * 256)) lv:ceph/big >/dev/null
STORE="$DIR/store"
bk() { S backup create lv:ceph/big --store "$STORE" --quiet --output json; }
t0=$(date +%s%N); full=$(bk); t1=$(date +%s%N)
full_s=$(awk -v n=$((t1 - t0)) 'BEGIN {printf "%.2f", n / 1e9}')
runs=$((BACKUP_GIB * 16))
S image bench -w --pattern rand -s 640K -c "$runs" -d 8 lv:ceph/big >/dev/null
t0=$(date +%s%N); inc=$(bk); t1=$(date +%s%N)
inc_s=$(awk -v n=$((t1 - t0)) 'BEGIN {printf "%.2f", n / 1e9}')
full_read=$(jq -r '.stats."bytes-read"' <<<"$full")
inc_read=$(jq -r '.stats."bytes-read"' <<<"$inc")
inc_mode=$(jq -r '."change-tracking".mode' <<<"$inc")
inc_chunks=$(jq -r '."change-tracking"."dirty-chunks"' <<<"$inc")
objects=$((BACKUP_GIB * 256))
fi

cat <<EOF

## RBD volumes: Strata's device vs fio's rbd engine (benches/rbd.sh)

Run $(date -u +%Y-%m-%d), $ROUNDS alternating rounds of ${SECS} s, medians; one 1 GiB image on a
single-node test cluster (scripts/ceph-cluster.sh, bluestore OSD on a sparse file on the same
disk), librbd cache off on both sides.
Host load average (1, 5, 15 min) at the start: $load_start; at the end: $(cut -d' ' -f1-3 /proc/loadavg); $(nproc) CPUs.

| row | strata ops/s | fio ops/s | strata / fio (median of round ratios) |
|---|---|---|---|
EOF
for row in "${ROWS[@]}"; do
    s=$(med "${S_[$row]}"); f=$(med "${F_[$row]}")
    echo "| ${LABEL[$row]} | $s | $f | $(ratio "$s" "$f") ($(pmed "${S_[$row]}" "${F_[$row]}")) |"
done
echo
for row in "${ROWS[@]}"; do
    echo "Per-round ${LABEL[$row]}: strata ${S_[$row]% }; fio ${F_[$row]% }."
done
(( BACKUP_GIB > 0 )) || exit 0
cat <<EOF

| backup of a ${BACKUP_GIB} GiB RBD volume | bytes read | seconds | chunks read |
|---|---|---|---|
| full (first backup) | $full_read | $full_s | $objects |
| incremental after $runs random 640 KiB writes (1%), mode $inc_mode | $inc_read | $inc_s | $inc_chunks |
| incremental / full | $(ratio "$inc_read" "$full_read") | $(ratio "$inc_s" "$full_s") | |
EOF
