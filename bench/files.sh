#!/usr/bin/env bash
# make bench-files: file-level restore (nbdmover files, a libguestfs
# appliance on the backup's NBD export) against the goals of issue 28, in
# one run:
#   - the first `files ls /` of a backup of a 100 GiB disk (ext4 holding
#     /usr/include and a 1 GiB file), from a local repository and from
#     MinIO behind bench/wanproxy (50 ms RTT), with the appliance's share
#     (its launch and the guest's inspection, from `files fs --json`);
#   - later listings through the daemon (its session is kept);
#   - `files get` of the 1 GiB file against `restore` of the same backup
#     (rates of the bytes each writes), bit-exact;
#   - the peak RSS of nbdmover listing a directory of 100,000 files (the
#     CLI, and the daemon paging through it).
#
#   bench/files.sh [ROUNDS]        (env: BENCH_OUT=bench/out)
#
# The appliance uses KVM when its launch works, TCG otherwise (the report
# says which); every figure is wall time on this machine.
. "$(dirname "$0")/../scripts/lib.sh"
cd "$(dirname "$0")/.."

ROUNDS=${1:-3}
OUT=${BENCH_OUT:-$PWD/bench/out}
scripts/install-deps.sh
make -s build
nbdmover=$PWD/bin/nbdmover
mkdir -p "$OUT"
work=$(mktemp -d /var/tmp/nbdmover-bench-files.XXXXXX)
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
local_repo=(--repo "$work/repo")
s3_repo=(--repo "s3://bench-files/r")
run_dir=(--run-dir "$work/run")

serve() { # IMAGE FORMAT: qemu-nbd on a socket; prints its URI
	local sock="$work/qemu-nbd.$RANDOM.sock"
	qemu-nbd -r -t -e 8 -k "$sock" -f "$2" "$1" >/dev/null 2>&1 &
	pids+=($!)
	wait_for 20 qemu-nbd test -S "$sock"
	echo "nbd+unix:///?socket=$sock"
}
drop_caches() { sync; echo 3 >/proc/sys/vm/drop_caches; }
now() { date +%s.%N; }
since() { echo "$(now) - $1" | bc; }
peak_rss_mib() { echo $(($(sed -n 's/VmHWM:[^0-9]*\([0-9]*\).*/\1/p' "/proc/$1/status") / 1024)); }

say "making a 100 GiB disk: ext4 holding /usr/include and a 1 GiB file"
mkdir -p "$work/stage/data"
cp -a /usr/include "$work/stage/include"
head -c 1G /dev/urandom >"$work/stage/data/big.bin"
truncate -s 100G "$work/big.raw"
mkfs.ext4 -q -F -b 4096 -d "$work/stage" "$work/big.raw"
qemu-img convert -f raw -O qcow2 "$work/big.raw" "$work/big.qcow2"
rm "$work/big.raw"
say "making a 1 GiB btrfs disk with a directory of 100,000 files"
mkdir -p "$work/stage2/many"
(cd "$work/stage2/many" && seq -f "file-%06g" 0 99999 | xargs touch)
truncate -s 1G "$work/many.raw"
mkfs.btrfs -q --rootdir "$work/stage2" "$work/many.raw"
qemu-img convert -f raw -O qcow2 "$work/many.raw" "$work/many.qcow2"
rm -rf "$work/many.raw" "$work/stage2"

say "backing up (local and MinIO)"
uri=$(serve "$work/big.qcow2" qcow2)
"$nbdmover" --log-level warn backup --init "${local_repo[@]}" --nbd "$uri" --name big --disk vda >/dev/null
"$nbdmover" --log-level warn backup --init "${s3_repo[@]}" "${direct[@]}" --nbd "$uri" --name big --disk vda >/dev/null
uri=$(serve "$work/many.qcow2" qcow2)
"$nbdmover" --log-level warn backup "${local_repo[@]}" --nbd "$uri" --name many --disk vda >/dev/null

# The appliance: how it runs here, its launch and the inspection.
"$nbdmover" --log-level warn files fs "${local_repo[@]}" "${run_dir[@]}" --domain big --json >"$work/fs.json"
accel=$(sed -n 's/.*"accel": "\(.*\)".*/\1/p' "$work/fs.json")
launch=$(sed -n 's/.*"launch_seconds": \([0-9.]*\).*/\1/p' "$work/fs.json")
inspect=$(sed -n 's/.*"inspect_seconds": \([0-9.]*\).*/\1/p' "$work/fs.json")

declare -A times
timed() { # NAME COMMAND...: wall seconds after dropping the page cache
	local name=$1 s
	shift
	drop_caches
	s=$(now)
	"$@" >/dev/null
	times[$name]="${times[$name]:-} $(since "$s")"
}
for r in $(seq "$ROUNDS"); do
	say "round $r of $ROUNDS"
	timed ls-local "$nbdmover" --log-level warn files ls "${local_repo[@]}" "${run_dir[@]}" --domain big /
	timed ls-wan "$nbdmover" --log-level warn files ls "${s3_repo[@]}" "${wan[@]}" "${run_dir[@]}" --domain big /
	rm -rf "$work/got"
	timed get-1g "$nbdmover" --log-level warn files get "${local_repo[@]}" "${run_dir[@]}" --domain big /data/big.bin --output "$work/got"
	cmp "$work/got/data/big.bin" "$work/stage/data/big.bin" || die "files get: the 1 GiB file differs"
	rm -f "$work/restored.raw"
	timed restore "$nbdmover" --log-level warn restore "${local_repo[@]}" --domain big --disk vda --output "$work/restored.raw"
	rm -f "$work/restored.raw"
done
restored_bytes=$(qemu-img map --output=json "$work/big.qcow2" | grep '"data": true' | sed -n 's/.*"length": \([0-9]*\).*/\1/p' | paste -sd+ | bc)

say "the CLI listing 100,000 files"
# nbdmover's own peak RSS (VmHWM), read until it exits: /usr/bin/time
# would report the appliance's QEMU, its child, when that is larger.
"$nbdmover" --log-level warn files ls "${local_repo[@]}" "${run_dir[@]}" --domain many --long /many >"$work/ls.out" &
ls_pid=$!
ls_rss=0
while kill -0 "$ls_pid" 2>/dev/null; do
	r=$(sed -n 's/VmHWM:[^0-9]*\([0-9]*\).*/\1/p' "/proc/$ls_pid/status" 2>/dev/null || true)
	[ -n "$r" ] && [ "$r" -gt "$ls_rss" ] && ls_rss=$r
	sleep 0.2
done
wait "$ls_pid"
ls_rss=$((ls_rss / 1024))
listed=$(wc -l <"$work/ls.out")

say "the daemon: later listings, and paging through 100,000 files"
sock="$work/api.sock"
"$nbdmover" --log-level warn serve "${local_repo[@]}" --run-dir "$work/run" --listen "unix://$sock" --files-accel "${accel:-auto}" &
serve_pid=$!
pids+=("$serve_pid")
wait_for 30 "the daemon" test -S "$sock"
api() { curl -sf --unix-socket "$sock" "http://nbdmover$1"; }
s=$(now)
api "/v1/backups/big/latest/files?path=/" >/dev/null
first_api=$(since "$s")
later=""
for _ in 1 2 3 4 5; do
	s=$(now)
	api "/v1/backups/big/latest/files?path=/include" >/dev/null
	later="$later $(since "$s")"
done
pages=0 after="" names=0
while :; do
	api "/v1/backups/many/latest/files?path=/many&limit=1000&after=$after" >"$work/page.json"
	names=$((names + $(grep -c '"name"' "$work/page.json")))
	pages=$((pages + 1))
	after=$(sed -n 's/.*"next": "\(.*\)".*/\1/p' "$work/page.json")
	[ -n "$after" ] || break
done
serve_rss=$(peak_rss_mib "$serve_pid")
kill -TERM "$serve_pid"
wait "$serve_pid" || true

# --- report -------------------------------------------------------------
median() { tr ' ' '\n' | grep . | sort -g | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }
med() { echo "${times[$1]}" | median; }
kvm="no /dev/kvm"
[ -c /dev/kvm ] && kvm="/dev/kvm present"
{
	echo "## nbdmover files ($(date -u +%Y-%m-%d), $ROUNDS rounds; appliance: ${accel:-?} ($kvm); libvirt not used)"
	echo
	echo "Median wall seconds of each command, page cache dropped before each (a new process: the appliance boots each time)."
	echo
	echo "| command | median s | all |"
	echo "|---|---|---|"
	for n in ls-local ls-wan get-1g restore; do
		echo "| $n | $(med $n) | ${times[$n]} |"
	done
	echo
	echo "- first files ls / of the 100 GiB disk's backup: local $(med ls-local) s (goal <= 10 with KVM), S3 at 50 ms RTT $(med ls-wan) s (goal <= 20);" \
		"of that the appliance's launch ${launch} s and the inspection ${inspect} s (files fs --json, local)"
	echo "- the daemon: first listing (with the launch) ${first_api} s; later listings${later} s (goal <= 0.2)"
	get_rate=$(echo "1073741824 / $(med get-1g) / 1000000" | bc)
	restore_rate=$(echo "$restored_bytes / $(med restore) / 1000000" | bc)
	echo "- files get of the 1 GiB file: ${get_rate} MB/s with the appliance's boot, bit-exact; restore of the disk: ${restore_rate} MB/s of its $restored_bytes data bytes;" \
		"ratio $(echo "scale=2; $get_rate / $restore_rate" | bc)x (goal >= 0.5)"
	echo "- 100,000 files: files ls --long listed $listed with a peak RSS of ${ls_rss} MiB; the daemon paged them in $pages pages ($names names), its peak RSS ${serve_rss} MiB (goal <= 200)"
} | tee "$OUT/files.md"
