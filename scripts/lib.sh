# Shared by the scripts: paths and small helpers. Source it; do not run it.
set -euo pipefail

export PATH="$PATH:/usr/local/go/bin:/usr/sbin:/sbin"
# Slow-to-build things (the MinIO binary) live here between runs.
NBDMOVER_CACHE="${NBDMOVER_CACHE:-/var/cache/nbdmover}"
# State of the services the test run started (pids, addresses, credentials).
NBDMOVER_TEST_STATE="${NBDMOVER_TEST_STATE:-/run/nbdmover-test}"

say() { printf '%s\n' "$*" >&2; }
die() { say "error: $*"; exit 1; }

# wait_for SECONDS DESCRIPTION COMMAND...: retry COMMAND until it succeeds.
wait_for() {
	local secs=$1 what=$2
	shift 2
	local i
	for ((i = 0; i < secs * 10; i++)); do
		"$@" >/dev/null 2>&1 && return 0
		sleep 0.1
	done
	die "$what did not come up within ${secs}s"
}

# serve_qcow2 DIR: serve DIR/disk.qcow2 read-only, with its dirty bitmap
# b0, on DIR/nbd.sock (qemu-nbd, its pid in $nbd_pid: a script's cleanup
# kills it); unserve_qcow2 ends it.
nbd_pid=
serve_qcow2() {
	qemu-nbd -r -t -f qcow2 -B b0 -k "$1/nbd.sock" "$1/disk.qcow2" &
	nbd_pid=$!
	wait_for 30 qemu-nbd nbdinfo --size "nbd+unix:///?socket=$1/nbd.sock"
}
unserve_qcow2() {
	kill "$nbd_pid"
	wait "$nbd_pid" 2>/dev/null || true
	nbd_pid=
}

# start_domain NAME IMAGE: start a transient, guest-less domain (the BIOS
# idles, which is all a backup needs) with IMAGE (qcow2) as vda, reachable
# by qemu_io below. KVM when /dev/kvm exists, TCG otherwise.
start_domain() {
	local name=$1 image=$2 virt=kvm xml
	[ -c /dev/kvm ] || virt=qemu
	xml="$(dirname "$image")/$name.xml"
	cat >"$xml" <<EOT
<domain type='$virt'><name>$name</name><memory unit='MiB'>64</memory><vcpu>1</vcpu>
<os><type arch='x86_64' machine='pc'>hvm</type></os><devices>
<disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='$image'/>
<target dev='vda' bus='virtio'/><alias name='ua-vda'/></disk></devices></domain>
EOT
	virsh -q -c qemu:///system create "$xml" >/dev/null
}

# qemu_io DOMAIN COMMAND: a qemu-io command on the domain's vda through
# QEMU's block layer (so dirty bitmaps see it), e.g. "write -P 0x11 1M 4M".
qemu_io() {
	virsh -q -c qemu:///system qemu-monitor-command "$1" --hmp \
		"qemu-io -d $qemu_io_dev \"$2\"" >/dev/null
}
# vda's block backend in a start_domain domain, as qemu-io names it
qemu_io_dev=/machine/peripheral/ua-vda/virtio-backend

# qemu_io_lines DOMAIN COMMAND...: the qemu_io calls for COMMANDs as lines
# of virsh's shell, to pipe into one virsh session (many writes at once).
qemu_io_lines() {
	local dom=$1 c
	shift
	for c in "$@"; do
		printf 'qemu-monitor-command %s --hmp "qemu-io -d %s \\"%s\\""\n' "$dom" "$qemu_io_dev" "$c"
	done
}

# minio_wan DIR: a throwaway MinIO in DIR/minio (its environment exported;
# scripts/minio.sh stop DIR/minio ends it) and bench/wanproxy in front of
# it (50 ms round trip, 1 Gbit/s). Sets WAN_PID and the arrays wan and
# direct: the --s3-endpoint through the proxy and straight to MinIO.
minio_wan() {
	local dir=$1
	scripts/minio.sh start "$dir/minio"
	set -a
	. "$dir/minio/minio.env"
	set +a
	go build -o "$dir/wanproxy" ./bench/wanproxy
	"$dir/wanproxy" -to "${NBDMOVER_TEST_S3_ENDPOINT#http://}" -rtt 50ms -rate 1000 -ready "$dir/wan.addr" >/dev/null &
	WAN_PID=$!
	for _ in $(seq 50); do [ -s "$dir/wan.addr" ] && break; sleep 0.1; done
	[ -s "$dir/wan.addr" ] || die "the WAN proxy did not start"
	wan=(--s3-endpoint "http://$(cat "$dir/wan.addr")")
	direct=(--s3-endpoint "$NBDMOVER_TEST_S3_ENDPOINT")
}
