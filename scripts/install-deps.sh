#!/usr/bin/env bash
# Install the Debian packages nbdmover builds, tests and benchmarks with.
# Idempotent: installs only what is missing, silent when nothing is.
. "$(dirname "$0")/lib.sh"

pkgs=(
	gcc make pkg-config ca-certificates curl
	libnbd-dev libnbd-bin nbdkit
	libvirt-dev libvirt-daemon-system libvirt-daemon-driver-qemu libvirt-clients
	qemu-system-x86 qemu-utils e2fsprogs
	virtnbdbackup hyperfine time bc strace
	# files: the libguestfs appliance (supermin builds it from a kernel in /boot)
	libguestfs-tools libguestfs-dev libguestfs-xfs linux-image-amd64 btrfs-progs cryptsetup-bin
)
missing=()
for p in "${pkgs[@]}"; do
	dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if ((${#missing[@]})); then
	[ "$(id -u)" = 0 ] || die "missing packages (${missing[*]}); run this script as root"
	say "installing: ${missing[*]}"
	apt-get update -qq
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
command -v go >/dev/null || die "Go is not installed (expected at /usr/local/go)"
