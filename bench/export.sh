#!/usr/bin/env bash
# make bench-export: the NBD export (nbdmover export) against nbdmover
# restore and against qemu-nbd (the ceiling), side by side, interleaved, on
# the benchmarks' test disk (bench/disk.sh), and the export's time to first
# byte, scale and random reads.
#
#   bench/export.sh [ROUNDS]        (env: BENCH_SIZE=4G, BENCH_OUT=bench/out)
#
# Each round, page cache dropped before every command:
#   restore-local   nbdmover restore of the backup to a raw file (local repository)
#   export-local    nbdcopy of the export to a raw file (local repository)
#   restore-wan     nbdmover restore from MinIO behind bench/wanproxy (50 ms RTT)
#   export-wan      nbdcopy of the export of the same (MinIO behind the proxy)
#   qemu-nbd-8      nbdcopy -C 8 of qemu-nbd serving the disk's qcow2 to null: (the ceiling)
#   export-8        nbdcopy -C 8 of the export (local repository) to null:
# Then, once: the first read of an export of a 100 GiB backup after the
# command starts (local and behind the proxy); a 16 TiB sparse backup's
# export mapped by qemu-img map, with the export's peak RSS; 4 KiB random
# reads at queue depth 16 (bench/nbdrand), over the whole disk and over
# 64 MiB already in the cache.
# Prints a Markdown table and writes export.md to $BENCH_OUT.
. "$(dirname "$0")/../scripts/lib.sh"
cd "$(dirname "$0")/.."

ROUNDS=${1:-3}
SIZE=${BENCH_SIZE:-4G}
OUT=${BENCH_OUT:-$PWD/bench/out}

scripts/install-deps.sh
make -s build
nbdmover=$PWD/bin/nbdmover
mkdir -p "$OUT"
base=$(bench/disk.sh "$SIZE")
kvm="no (the export does not use QEMU; qemu-nbd and qemu-img never need KVM)"
[ -c /dev/kvm ] && kvm=yes

work=$(mktemp -d /var/tmp/nbdmover-bench-export.XXXXXX)
chmod 700 "$work"
pids=()
cleanup() {
	for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
	scripts/minio.sh stop "$work/minio" || true
	rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
minio_wan "$work"
pids+=("$WAN_PID")
go build -o "$work/nbdrand" ./bench/nbdrand
local_repo=(--repo "$work/repo")
s3_repo=(--repo "s3://bench-export/r")

# serve IMAGE FORMAT: run qemu-nbd on a socket; prints its URI.
serve() {
	local sock="$work/qemu-nbd.$RANDOM.sock"
	qemu-nbd -r -t -e 32 -k "$sock" -f "$2" --cache=none --aio=native "$1" >/dev/null 2>&1 &
	pids+=($!)
	wait_for 20 qemu-nbd test -S "$sock"
	echo "nbd+unix:///?socket=$sock"
}

say "backing up the $SIZE test disk (local and MinIO)"
uri=$(serve "$base" qcow2)
"$nbdmover" --log-level warn backup --init "${local_repo[@]}" --nbd "$uri" --name disk --disk vda >/dev/null
"$nbdmover" --log-level warn backup --init "${s3_repo[@]}" "${direct[@]}" --nbd "$uri" --name disk --disk vda >/dev/null
data_bytes=$(qemu-img map --output=json "$base" | grep '"data": true' | sed -n 's/.*"length": \([0-9]*\).*/\1/p' | paste -sd+ | bc)

# start_export ARGS...: start nbdmover export --json on a new socket;
# sets EXPORT_PID and EXPORT_URI.
start_export() {
	local sock="$work/export.$RANDOM.sock"
	"$nbdmover" --log-level warn export --json --listen "unix://$sock" "$@" >"$work/export.json" &
	EXPORT_PID=$!
	pids+=("$EXPORT_PID")
	wait_for 60 "the export" grep -q '"uri"' "$work/export.json"
	EXPORT_URI=$(sed -n 's/.*"uri": "\(.*\)".*/\1/p' "$work/export.json" | head -1)
}
stop_export() {
	kill -INT "$EXPORT_PID"
	wait "$EXPORT_PID" || true
}
peak_rss_mib() { echo $(($(sed -n 's/VmHWM:[^0-9]*\([0-9]*\).*/\1/p' "/proc/$1/status") / 1024)); }

declare -A times
# timed NAME COMMAND...: wall seconds of COMMAND after dropping the page
# cache, appended to times[NAME].
timed() {
	local name=$1 s e
	shift
	rm -f "$work/out.raw"
	sync
	echo 3 >/proc/sys/vm/drop_caches
	s=$(date +%s.%N)
	"$@" >/dev/null
	e=$(date +%s.%N)
	times[$name]="${times[$name]:-} $(echo "$e - $s" | bc)"
}
copy_export() { # REPO-ARGS... -- NBDCOPY-ARGS...
	local args=()
	while [ "$1" != -- ]; do args+=("$1"); shift; done
	shift
	start_export "${args[@]}" --domain disk
	nbdcopy "$@" "$EXPORT_URI" "${dst:-$work/out.raw}"
	stop_export
}

qemu_uri=$(serve "$base" qcow2)
for r in $(seq "$ROUNDS"); do
	say "round $r of $ROUNDS"
	timed restore-local "$nbdmover" --log-level warn restore "${local_repo[@]}" --domain disk --disk vda --output "$work/out.raw"
	timed export-local copy_export "${local_repo[@]}" --
	qemu-img compare -q -f raw -F qcow2 "$work/out.raw" "$base" || die "the export's copy differs from the disk"
	timed restore-wan "$nbdmover" --log-level warn restore "${s3_repo[@]}" "${wan[@]}" --domain disk --disk vda --output "$work/out.raw"
	timed export-wan copy_export "${s3_repo[@]}" "${wan[@]}" --
	timed qemu-nbd-8 nbdcopy -C 8 "$qemu_uri" null:
	dst=null: timed export-8 copy_export "${local_repo[@]}" -- -C 8
done

# Time to first byte: a 100 GiB disk with 1 GiB of data spread over it.
say "time to first byte of a 100 GiB backup"
big="$work/big.qcow2"
qemu-img create -q -f qcow2 "$big" 100G
for i in $(seq 0 15); do qemu-io -f qcow2 -c "write -P $((i + 1)) $((i * 6))G 64M" "$big"; done
uri=$(serve "$big" qcow2)
"$nbdmover" --log-level warn backup "${local_repo[@]}" --nbd "$uri" --name big --disk vda >/dev/null
"$nbdmover" --log-level warn backup "${s3_repo[@]}" "${direct[@]}" --nbd "$uri" --name big --disk vda >/dev/null
ttfb() { # REPO-ARGS...: seconds from the command's start to the first 4 KiB read
	local sock="$work/ttfb.$RANDOM.sock" s e
	sync
	echo 3 >/proc/sys/vm/drop_caches
	s=$(date +%s.%N)
	"$nbdmover" --log-level warn export "$@" --domain big --listen "unix://$sock" >/dev/null &
	local pid=$!
	until [ -S "$sock" ]; do sleep 0.005; done
	qemu-io -r -f raw -c "read -P 1 0 4k" "nbd+unix:///vda?socket=$sock" >/dev/null
	e=$(date +%s.%N)
	kill -INT "$pid"
	wait "$pid" || true
	echo "$e - $s" | bc
}
ttfb_local=$(ttfb "${local_repo[@]}")
ttfb_wan=$(ttfb "${s3_repo[@]}" "${wan[@]}")

# Scale: a 16 TiB sparse disk.
say "a 16 TiB sparse backup"
huge="$work/huge.qcow2"
qemu-img create -q -f qcow2 "$huge" 16T
qemu-io -f qcow2 -c "write -P 7 0 4M" -c "write -P 8 8T 4M" -c "write -P 9 16383G 4M" "$huge"
uri=$(serve "$huge" qcow2)
"$nbdmover" --log-level warn backup "${local_repo[@]}" --nbd "$uri" --name huge --disk vda >/dev/null
start_export "${local_repo[@]}" --domain huge
s=$(date +%s.%N)
extents=$(qemu-img map --output=json "$EXPORT_URI" | grep -c '"start"')
map_secs=$(echo "$(date +%s.%N) - $s" | bc)
qemu-io -r -f raw -c "read -P 8 8T 4M" "$EXPORT_URI" >/dev/null || die "the 16 TiB export reads wrong"
huge_rss=$(peak_rss_mib "$EXPORT_PID")
stop_export

# Random reads, and the peak RSS of an export read whole (default cache).
say "random reads"
start_export "${local_repo[@]}" --domain disk
rand_all=$("$work/nbdrand" -uri "$EXPORT_URI" -seconds 10)
rand_hot=$("$work/nbdrand" -uri "$EXPORT_URI" -seconds 10 -span $((64 << 20)) -warm)
nbdcopy -C 8 "$EXPORT_URI" null:
disk_rss=$(peak_rss_mib "$EXPORT_PID")
stop_export
rand_qemu=$("$work/nbdrand" -uri "$qemu_uri" -seconds 10)

# --- report -------------------------------------------------------------
median() { tr ' ' '\n' | grep . | sort -g | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }
med() { echo "${times[$1]}" | median; }
ratio() { echo "scale=2; $1 / $2" | bc; }
{
	echo "## nbdmover export ($(date -u +%Y-%m-%d), $ROUNDS rounds, KVM: $kvm)"
	echo
	echo "Disk: $SIZE, $data_bytes bytes allocated. Median wall seconds (all rounds)."
	echo
	echo "| command | median s | all | MB/s of data |"
	echo "|---|---|---|---|"
	for n in restore-local export-local restore-wan export-wan qemu-nbd-8 export-8; do
		m=$(med $n)
		echo "| $n | $m | ${times[$n]} | $(echo "$data_bytes / $m / 1000000" | bc) |"
	done
	echo
	echo "- export vs restore, local: $(ratio "$(med restore-local)" "$(med export-local)")x (goal >= 1.0)"
	echo "- export vs restore, S3 at 50 ms RTT: $(ratio "$(med restore-wan)" "$(med export-wan)")x (goal >= 1.0)"
	echo "- export with 8 connections vs qemu-nbd with 8: $(ratio "$(med qemu-nbd-8)" "$(med export-8)")x (goal >= 0.8)"
	echo "- first read of a 100 GiB backup's export after the command: local ${ttfb_local} s (goal <= 0.5), S3 at 50 ms RTT ${ttfb_wan} s (goal <= 2)"
	echo "- 16 TiB sparse backup: qemu-img map of its export ${map_secs} s ($extents extents); the export's peak RSS ${huge_rss} MiB"
	echo "- peak RSS of an export read whole by nbdcopy -C 8 (cache 512 MiB): ${disk_rss} MiB (goal <= 576)"
	echo "- 4 KiB random reads, queue depth 16, whole disk: export $rand_all; qemu-nbd $rand_qemu"
	echo "- the same over 64 MiB in the export's cache: $rand_hot (goal: p50 <= 100 us)"
} | tee "$OUT/export.md"
