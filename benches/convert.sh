#!/usr/bin/env bash
# Benchmark: `strata image convert` against `qemu-img convert`, same machine, same run.
#
# Source: an image of SIZE_MIB (default 4096) with about 40% data (1 MiB runs of mixed
# incompressible and text-like data, placed by a fixed pseudo-random pattern), written with dd
# and qemu-img, in several formats: qcow2, raw and vmdk (monolithicSparse), plus a dynamic VHD
# (qemu's vpc, exact size) and a dynamic VHDX. Targets: raw, qcow2 and streamOptimized vmdk
# (`-o subformat=streamOptimized` for both tools).
#
# Durability is the same on both sides: strata's default flushes the target once at the end
# (`-t writeback`), and qemu-img runs with `-t writeback`, which also flushes once at the end
# (its convert default, `unsafe`, never flushes). Neither timing includes a system-wide `sync`.
# Both tools run with their default source cache (strata: `-T none`, O_DIRECT, unless STRATA_ARGS
# says otherwise; qemu-img: `-T writeback`, the page cache).
#
# CACHES (default "warm cold") picks the cache states: `cold` drops the page cache before every
# run (`echo 3 > /proc/sys/vm/drop_caches`); `warm` reads the source into the page cache before
# the row and never drops it. Every output is checked with `qemu-img compare` outside the timing.
# Rows strata cannot run (a format it does not support) are printed as "pending" with its error.
#
# Each row runs REPEAT times (default 5) per tool, alternating who goes first round by round,
# and reports each tool's median wall time, the ratio of the medians, and the median CPU time
# (user + system, from /usr/bin/time). The machine may be shared: the load average is printed
# before and after.
#
# ROWS limits the rows, e.g. ROWS="raw:qcow2 qcow2:vmdk-stream"; the default is the issue's set
# qcow2:qcow2 raw:qcow2 vhd:raw vhdx:qcow2. Any of {qcow2,raw,vmdk,vhd,vhdx}:{raw,qcow2,vmdk-stream}.
#
# Usage: benches/convert.sh [WORKDIR]   (STRATA=path/to/strata, default target/release/strata;
#        STRATA_ARGS adds options to strata's command line, QEMU_ARGS to qemu-img's)
set -euo pipefail

here="$(cd "$(dirname "$0")/.." && pwd)"
STRATA="${STRATA:-${CARGO_TARGET_DIR:-$here/target}/release/strata}"
SIZE_MIB="${SIZE_MIB:-4096}"
if [ "$SIZE_MIB" = 4096 ]; then
    WORK="${1:-/var/tmp/strata-bench-convert}"
else
    WORK="${1:-/var/tmp/strata-bench-convert-$SIZE_MIB}"
fi
REPEAT="${REPEAT:-5}"
CACHES="${CACHES:-warm cold}"
read -r -a strata_extra <<< "${STRATA_ARGS:-}"
read -r -a qemu_extra <<< "${QEMU_ARGS:-}"
for tool in qemu-img qemu-io /usr/bin/time "$STRATA"; do
    command -v "$tool" >/dev/null || { echo "missing: $tool (apt-get install qemu-utils time; cargo build --release -p strata-cli)" >&2; exit 1; }
done
mkdir -p "$WORK"
rm -rf "${WORK:?}"/out
mkdir -p "$WORK/out"

drop_caches() { sync; echo 3 > /proc/sys/vm/drop_caches; }

if [ ! -f "$WORK/src.qcow2" ]; then
    echo "making the $SIZE_MIB MiB source with ~40% data..." >&2
    # 64 MiB of data: half random, half base64 text (compresses about 4:3).
    head -c $((32 << 20)) /dev/urandom > "$WORK/rand.bin"
    head -c $((24 << 20)) /dev/urandom | base64 -w 100 > "$WORK/text.bin"
    truncate -s $((32 << 20)) "$WORK/text.bin"
    cat "$WORK/rand.bin" "$WORK/text.bin" > "$WORK/data.bin"
    qemu-img create -q -f raw "$WORK/src.raw" ${SIZE_MIB}M
    # 40% of the 1 MiB blocks, chosen by a fixed linear congruential sequence.
    seed=12345
    for ((mib = 0; mib < SIZE_MIB; mib++)); do
        seed=$(( (seed * 1103515245 + 12345) % 2147483648 ))
        if (( seed % 100 < 40 )); then
            echo "$mib $(( (seed >> 8) % 64 ))"
        fi
    done | while read -r mib from; do
        dd if="$WORK/data.bin" of="$WORK/src.raw" bs=1M count=1 skip="$from" seek="$mib" conv=notrunc status=none
    done
    qemu-img convert -O qcow2 "$WORK/src.raw" "$WORK/src.qcow2"
    qemu-img convert -O vmdk "$WORK/src.raw" "$WORK/src.vmdk"
    # A few qemu-io writes on top, as a guest would make them (inside the smallest size too).
    for f in qcow2 vmdk raw; do
        qemu-io -f $f -c "write -P 0x5a $((SIZE_MIB / 4))M 3M" -c "write -P 0xa5 $((SIZE_MIB * 3 / 4))M 512k" "$WORK/src.$f" >/dev/null
    done
    rm -f "$WORK/rand.bin" "$WORK/text.bin" "$WORK/data.bin"
fi

if [ ! -f "$WORK/src.vhd" ] || [ ! -f "$WORK/src.vhdx" ]; then
    echo "making the VHD and VHDX sources from the raw one..." >&2
    rm -f "$WORK/src.vhd" "$WORK/src.vhdx"
    qemu-img convert -f raw -O vpc -o subformat=dynamic,force_size=on "$WORK/src.raw" "$WORK/src.vhd"
    qemu-img convert -f raw -O vhdx "$WORK/src.raw" "$WORK/src.vhdx"
fi
DEFAULT_ROWS="qcow2:qcow2 raw:qcow2 vhd:raw vhdx:qcow2"
ROWS="${ROWS:-$DEFAULT_ROWS}"
qemu_fmt() { if [ "$1" = vhd ]; then echo vpc; else echo "$1"; fi; }

median() { printf '%s\n' "$@" | sort -g | awk '{ v[NR] = $1 } END { if (NR % 2) print v[(NR + 1) / 2]; else printf "%.3f\n", (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
div() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", a / b }'; }

# Runs one tool, timed; sets `wall` and `cpu` (user + system seconds). Returns its status.
timed() {
    local tf="$WORK/out/time" user sys
    if /usr/bin/time -f "%e %U %S" -o "$tf" "$@" > "$WORK/out/log" 2>&1; then
        read -r wall user sys < "$tf"
        cpu=$(awk -v a="$user" -v b="$sys" 'BEGIN { printf "%.2f", a + b }')
        return 0
    fi
    return 1
}

echo "load before: $(uptime)"
echo "strata: $STRATA image convert ${strata_extra[*]:-}; qemu-img: convert -t writeback ${qemu_extra[*]:-}"
printf '%-6s %-6s %-12s %10s %10s %7s %9s %9s  %s\n' cache source target "qemu-img" strata ratio "cpu q" "cpu s" note
results=()
for cache in $CACHES; do
for src in qcow2 raw vmdk vhd vhdx; do
    qsrc=$(qemu_fmt $src)
    for target in raw qcow2 vmdk-stream; do
        if [[ " $ROWS " != *" $src:$target "* ]]; then continue; fi
        case $target in
            raw) qargs=(-O raw); sargs=(-O raw); ext=raw; qfmt=raw ;;
            qcow2) qargs=(-O qcow2); sargs=(-O qcow2); ext=qcow2; qfmt=qcow2 ;;
            vmdk-stream) qargs=(-O vmdk -o subformat=streamOptimized); sargs=(-O vmdk -o subformat=streamOptimized); ext=vmdk; qfmt=vmdk ;;
        esac
        q="$WORK/out/q-$src-$target.$ext"; s="$WORK/out/s-$src-$target.$ext"
        qt=(); st=(); qc=(); sc=(); err=""
        if [ "$cache" = warm ]; then cat "$WORK/src.$src" > /dev/null; fi
        for ((r = 1; r <= REPEAT; r++)); do
            for who in $( ((r % 2)) && echo "qemu strata" || echo "strata qemu"); do
                rm -f "$q" "$s"
                if [ "$cache" = cold ]; then drop_caches; else sync; fi
                if [ $who = qemu ]; then
                    timed qemu-img convert -t writeback -f $qsrc "${qargs[@]}" "${qemu_extra[@]}" "$WORK/src.$src" "$q" \
                        || { cat "$WORK/out/log" >&2; exit 1; }
                    qt+=("$wall"); qc+=("$cpu")
                elif [ -z "$err" ]; then
                    if timed "$STRATA" image convert -f $src "${sargs[@]}" "${strata_extra[@]}" "$WORK/src.$src" "$s"; then
                        st+=("$wall"); sc+=("$cpu")
                        qemu-img compare -q -f $qsrc -F $qfmt "$WORK/src.$src" "$s" || { echo "MISMATCH: $s" >&2; exit 1; }
                    else
                        err=$(tail -1 "$WORK/out/log")
                    fi
                fi
            done
        done
        qm=$(median "${qt[@]}"); qcm=$(median "${qc[@]}")
        if [ ${#st[@]} -gt 0 ]; then
            sm=$(median "${st[@]}"); scm=$(median "${sc[@]}")
            ratio=$(div "$sm" "$qm")
            printf '%-6s %-6s %-12s %9.2fs %9.2fs %7s %8.2fs %8.2fs  runs q: %s / s: %s\n' $cache $src $target "$qm" "$sm" "$ratio" "$qcm" "$scm" "${qt[*]}" "${st[*]}"
            results+=("| $cache | $src → $target | $(printf %.2f "$qm") s | $(printf %.2f "$sm") s | $ratio | $(printf %.2f "$qcm") s | $(printf %.2f "$scm") s |")
        else
            printf '%-6s %-6s %-12s %9.2fs %10s %7s %8.2fs %9s  pending: %s\n' $cache $src $target "$qm" "-" "-" "$qcm" "-" "${err##*: }"
            results+=("| $cache | $src → $target | $(printf %.2f "$qm") s | pending | — | $(printf %.2f "$qcm") s | — |")
        fi
        rm -f "$q" "$s"
    done
done
done
echo
echo "| cache | row | qemu-img | strata | strata/qemu-img | qemu-img CPU | strata CPU |"
echo "|---|---|---|---|---|---|---|"
printf '%s\n' "${results[@]}"
echo "medians of $REPEAT alternating runs per tool; $SIZE_MIB MiB source; qemu-img: $(qemu-img --version | head -1); cores: $(nproc); $(date -u +%Y-%m-%d)"
echo "load after: $(uptime)"
