#!/usr/bin/env bash
# Installs the Debian packages Strata's tests and benchmarks need. Run as root on Debian 12.
# qemu-utils and qemu-system-x86 are installed in one command: installing qemu-system-x86 alone
# removes the preinstalled qemu-utils (see ../shared/ENVIRONMENT.md).
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
sudo_cmd=""
[ "$(id -u)" -eq 0 ] || sudo_cmd=sudo
packages=(
  qemu-utils qemu-system-x86   # qemu-img/qemu-io as test oracle; QEMU for guest tests
  fio                          # benchmark peer
  e2fsprogs                    # chattr, for read-only-file tests as root
  python3                      # benchmark scripts parse JSON
)
$sudo_cmd apt-get update -qq
$sudo_cmd apt-get install -y -qq --no-install-recommends "${packages[@]}" >/dev/null
echo "installed: ${packages[*]}"
