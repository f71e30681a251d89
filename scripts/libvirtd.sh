#!/usr/bin/env bash
# Make sure a libvirt daemon answers on qemu:///system. A running daemon is
# left alone; otherwise virtlogd and libvirtd are started the way a fresh
# machine without systemd needs. Prints "started" when it started them.
. "$(dirname "$0")/lib.sh"

# Without udev (containers, minimal machines) /dev/kvm stays root-only and
# QEMU, running as libvirt-qemu, cannot use it: set what Debian's udev
# rules set.
if [ -c /dev/kvm ] && [ "$(id -u)" = 0 ] && getent group kvm >/dev/null &&
	[ "$(stat -c %G:%a /dev/kvm)" != kvm:660 ]; then
	chgrp kvm /dev/kvm && chmod 0660 /dev/kvm
fi

virsh -c qemu:///system version >/dev/null 2>&1 && exit 0
[ "$(id -u)" = 0 ] || die "libvirtd is not running and starting it needs root"
mkdir -p /var/log/libvirt /var/run/libvirt /var/lib/libvirt/images
# Checked again on every retry: a daemon that is still exiting is left to
# go, and a new one starts once it has.
start() {
	pgrep -x virtlogd >/dev/null || /usr/sbin/virtlogd -d || true
	pgrep -x libvirtd >/dev/null || /usr/sbin/libvirtd -d || true
	virsh -c qemu:///system version
}
wait_for 30 libvirtd start
echo started
