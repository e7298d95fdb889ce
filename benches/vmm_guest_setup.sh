# Sourced by the in-guest VMM benchmarks (vmm_qemu_fio.sh, vmm_kvm.sh) after they set `root`,
# `file` (may be empty) and `need_strata` (1 to build and locate the strata binary unless
# `strata` is set). Sets `work`, `file` (the 1 GiB random-data image, made once) and `guest`
# (the Linux test guest with fio, built once).
if [ "${need_strata:-1}" = 1 ] && [ -z "${strata:-}" ]; then
  (cd "$root" && cargo build -q -j2 --release -p strata-cli)
  strata=${CARGO_TARGET_DIR:-$root/target}/release/strata
fi
work=$root/benches/work
mkdir -p "$work"
file=${file:-$work/vmm-datapath.raw}
if [ ! -f "$file" ]; then
  fio --name=fill --rw=write --bs=1M --direct=1 --filename="$file" --size=1G --refill_buffers \
      --output=/dev/null
fi
guest=${STRATA_GUEST_DIR:-$root/build/guest}
if [ ! -f "$guest/initramfs-fio.gz" ]; then
  STRATA_GUEST_FIO=1 bash "$root/tests/guest/build.sh" "$guest" >&2
fi
