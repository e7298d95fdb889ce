#!/usr/bin/env bash
# A short, time-bounded fuzz run of the targets at the guest and network boundary: the virtio-blk
# chain parser and request engine, and the NBD request parser. Each starts from its committed
# seeds (fuzz/corpus/<target>) with a scratch corpus of its own, and runs FUZZ_SECONDS (default
# 45) under libFuzzer with AddressSanitizer; a crash, a leak or an input over the memory limit
# fails the run (pipefail: the fuzzer's status, not grep's) and leaves the input in
# fuzz/artifacts/<target>/. The long runs are recorded in fuzz/README.md.
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${FUZZ_SECONDS:-45}
targets=(${FUZZ_TARGETS:-blk_chain blk_engine nbd_requests})
if ! command -v cargo-fuzz >/dev/null; then
    cargo install cargo-fuzz --locked --version 0.13.2 -j2
fi
# cargo-fuzz needs nightly flags; the stable toolchain accepts them with RUSTC_BOOTSTRAP.
export RUSTC_BOOTSTRAP=1 CARGO_BUILD_JOBS=2
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
for t in "${targets[@]}"; do
    mkdir -p "$work/$t"
    echo "fuzzing $t for ${secs} s"
    cargo fuzz run "$t" "$work/$t" "fuzz/corpus/$t" -- \
        -max_total_time="$secs" -rss_limit_mb=2048 -print_final_stats=1 2>&1 |
        { grep -E '^(Done|stat::number_of_executed_units|stat::peak_rss_mb|INFO: seed corpus)|ERROR|SUMMARY|panicked' || true; }
done
