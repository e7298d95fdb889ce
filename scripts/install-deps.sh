#!/usr/bin/env bash
# Installs the Debian packages Strata's tests and benchmarks need. Run as root on Debian 12.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
sudo_cmd=""
[ "$(id -u)" -eq 0 ] || sudo_cmd=sudo
$sudo_cmd apt-get update -qq
# qemu-img/qemu-io are the test oracle and QEMU runs guest tests. A newer qemu-utils may be
# preinstalled from outside Debian 12; pin all QEMU packages to Debian's one version so that apt
# can resolve them (it downgrades qemu-utils to match qemu-system-x86).
qemu_version=$(apt-cache policy qemu-system-x86 | awk '/Candidate:/ {print $2}')
qemu=(qemu-utils="$qemu_version" qemu-system-x86="$qemu_version" qemu-system-common="$qemu_version"
      qemu-block-extra="$qemu_version")
packages=(
  fio                          # benchmark peer
  e2fsprogs                    # chattr, for read-only-file tests as root
  python3                      # benchmark scripts parse JSON
  cpio kmod                    # tests/guest/build.sh and appliance-image/build.sh: initramfs
                               # images (cpio) and module lists for them (depmod)
  binutils                     # appliance-image/build.sh: readelf finds the libraries each tool
                               # needs, strip drops strata's debug information
  xorriso                      # appliance-image/build.sh: grub-mkrescue writes the ISO with it
  grub-common                  # appliance-image/build.sh: grub-mkrescue itself
  xz-utils                     # grub-mkrescue --compress=xz runs xz on GRUB's modules
  grub-pc-bin                  # grub-mkrescue: the ISO's BIOS boot (i386-pc modules)
  grub-efi-amd64-bin           # grub-mkrescue: the ISO's UEFI boot (x86_64-efi modules)
  mtools                       # grub-mkrescue makes the ISO's EFI FAT image with mformat/mcopy;
                               # tests/tests/appliance_iso.rs makes and reads the token stick
  ovmf                         # tests/tests/appliance_iso.rs: UEFI firmware for QEMU
  libnbd-bin                   # nbd/tests: nbdinfo and nbdcopy, real NBD clients
  nbdkit                       # NBD peer tooling (benches/nbd.sh checks the export with it)
  openssl                      # nbd/tests/security.rs: test CA and certificates for NBD TLS
  ceph-mon ceph-osd ceph-mgr   # scripts/ceph-cluster.sh: the single-node test cluster for RBD
  ceph-common                  # volume groups (the ceph and rbd tools, librados, librbd)
  librbd-dev librados-dev      # librbd.so/librados.so, which Strata loads at run time
  radosgw                      # scripts/ceph-cluster.sh --rgw: S3 for the datastore on S3
  curl                         # cli/tests/s3_datastore.rs, benches/s3.sh: create buckets (SigV4)
  restic                       # benches/s3.sh: the peer of the S3 datastore
  acpica-tools                 # vmm/src/boot/acpi.rs: iasl disassembles the DSDT (power button, GED)
  chromium chromium-driver     # cli/tests/ui_browser.rs: the web UI in a real headless browser (WebDriver)
  prometheus                   # cli/tests/metrics.rs: promtool check metrics on /api/metrics
  iperf3                       # tests/tests/tier2_net_qemu.rs: iperf3 in the Linux guest (its
                               # initramfs-net.gz) and the server in the peer namespace
  iproute2                     # network tests: ip netns/link/addr, ss
  libvhdi-utils                # storage/tests/vhd_chains.rs: vhdiinfo and vhdimount (FUSE), an
                               # independent VHD/VHDX reader for differencing chains (unmounted with umount as root)
)
$sudo_cmd apt-get install -y -qq --no-install-recommends --allow-downgrades "${qemu[@]}" "${packages[@]}" >/dev/null
echo "installed: ${qemu[*]} ${packages[*]}"
qemu-img --version | head -n 1
