#!/usr/bin/env bash
# make bench-instant: instant restore (nbdmover instant-restore) against
# nbdmover restore, side by side and interleaved, on the benchmarks' test
# disk (bench/disk.sh) backed up from a running domain.
#
#   bench/instant.sh [ROUNDS]        (env: BENCH_SIZE=4G, BENCH_OUT=bench/out)
#
# Each round, page cache dropped before every command:
#   restore     nbdmover restore of the backup to a qcow2 image (local repository)
#   instant     nbdmover instant-restore (qcow2), from the command's start to
#               every disk home, while the guest writes 1 MiB and reads 4 MiB
#               through QEMU every 0.2 s; the final image is then compared
#               with the backup plus those writes
# Then, once: the time to a running domain of a 100 GiB backup (local, and
# MinIO behind bench/wanproxy at 50 ms RTT), and a copy killed at half and
# resumed (--resume) against a whole copy.
# Prints a Markdown table and writes instant.md to $BENCH_OUT.
. "$(dirname "$0")/../scripts/lib.sh"
cd "$(dirname "$0")/.."

ROUNDS=${1:-3}
SIZE=${BENCH_SIZE:-4G}
OUT=${BENCH_OUT:-$PWD/bench/out}

scripts/install-deps.sh
started=$(scripts/libvirtd.sh)
make -s build
nbdmover=$PWD/bin/nbdmover
mkdir -p "$OUT"
base=$(bench/disk.sh "$SIZE")
kvm="no: QEMU ran under TCG"
[ -c /dev/kvm ] && kvm=yes

work=$(mktemp -d /var/tmp/nbdmover-bench-instant.XXXXXX)
chmod 755 "$work"
mkdir -m 755 "$work/images"
pids=()
doms=()
cleanup() {
	for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
	for d in "${doms[@]}"; do
		virsh -q -c qemu:///system destroy "$d" >/dev/null 2>&1 || true
		virsh -q -c qemu:///system undefine "$d" >/dev/null 2>&1 || true
	done
	scripts/minio.sh stop "$work/minio" || true
	rm -rf "$work"
	if [ "$started" = started ]; then pkill -x libvirtd || true; pkill -x virtlogd || true; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM
minio_wan "$work"
pids+=("$WAN_PID")
local_repo=(--repo "$work/repo")
s3_repo=(--repo "s3://bench-instant/r")

# backup_domain NAME IMAGE REPO-ARGS...: back IMAGE up as domain NAME.
backup_domain() {
	local name=$1 image=$2
	shift 2
	start_domain "$name" "$image"
	doms+=("$name")
	"$nbdmover" --log-level warn backup --init --domain "$name" "$@" >/dev/null
}
# forget_domain NAME: destroy and undefine it, remove its images.
forget_domain() {
	virsh -q -c qemu:///system destroy "$1" >/dev/null 2>&1 || true
	virsh -q -c qemu:///system undefine "$1" >/dev/null 2>&1 || true
	rm -f "$work/images/$1"-*
}
drop_caches() { sync; echo 3 >/proc/sys/vm/drop_caches; }

say "backing up the $SIZE test disk from a running domain"
cp "$base" "$work/src.qcow2"
backup_domain bench-src "$work/src.qcow2" "${local_repo[@]}"
virsh -q -c qemu:///system destroy bench-src >/dev/null
qemu-img convert -f qcow2 -O raw "$work/src.qcow2" "$work/ref.raw"
data_bytes=$(qemu-img map --output=json "$base" | grep '"data": true' | sed -n 's/.*"length": \([0-9]*\).*/\1/p' | paste -sd+ | bc)
size_bytes=$(qemu-img info --output=json "$base" | sed -n 's/.*"virtual-size": \([0-9]*\).*/\1/p')

# guest_io DOMAIN LOG: every 0.2 s a 1 MiB write (pattern N at a place
# that moves through the disk) and a 4 MiB read through QEMU, each write
# logged as a qemu-io command, until killed.
guest_io() {
	local dom=$1 log=$2 i=0 off
	while :; do
		i=$((i + 1))
		off=$(((i * 389) % (size_bytes >> 20)))
		virsh -q -c qemu:///system qemu-monitor-command "$dom" --hmp \
			"qemu-io -d $qemu_io_dev \"write -P $((i % 250 + 1)) ${off}M 1M\"" >/dev/null || return 0
		echo "write -P $((i % 250 + 1)) ${off}M 1M" >>"$log"
		virsh -q -c qemu:///system qemu-monitor-command "$dom" --hmp \
			"qemu-io -d $qemu_io_dev \"read $(((i * 977) % (size_bytes >> 20)))M 4M\"" >/dev/null || return 0
		sleep 0.2
	done
}

declare -A times
note() { times[$1]="${times[$1]:-} $2"; }
now() { date +%s.%N; }
# instant NAME REPO-ARGS...: instant-restore as NAME with --json to
# $work/NAME.json, in the background; sets INSTANT_PID and waits for the
# domain to run.
instant() {
	local name=$1
	shift
	doms+=("$name")
	"$nbdmover" --log-level warn instant-restore --domain "${SRC:-bench-src}" --as "$name" \
		--image-dir "$work/images" --json "$@" >"$work/$name.json" 2>"$work/$name.err" &
	INSTANT_PID=$!
	pids+=("$INSTANT_PID")
	until grep -q '"event":"running"' "$work/$name.json"; do
		kill -0 "$INSTANT_PID" 2>/dev/null || die "instant-restore $name failed: $(cat "$work/$name.err")"
		sleep 0.01
	done
}

for r in $(seq "$ROUNDS"); do
	say "round $r of $ROUNDS"
	drop_caches
	s=$(now)
	"$nbdmover" --log-level warn restore "${local_repo[@]}" --domain bench-src --disk vda --format qcow2 --output "$work/restored.qcow2" >/dev/null
	note restore "$(echo "$(now) - $s" | bc)"
	rm -f "$work/restored.qcow2"

	drop_caches
	s=$(now)
	instant "bench-i$r" "${local_repo[@]}"
	: >"$work/writes"
	guest_io "bench-i$r" "$work/writes" &
	io=$!
	wait "$INSTANT_PID" || die "instant-restore failed: $(cat "$work/bench-i$r.err")"
	note instant "$(echo "$(now) - $s" | bc)"
	kill "$io" 2>/dev/null; wait "$io" 2>/dev/null || true
	virsh -q -c qemu:///system qemu-monitor-command "bench-i$r" --hmp "qemu-io -d $qemu_io_dev \"flush\"" >/dev/null
	cp "$work/ref.raw" "$work/want.raw"
	args=()
	while read -r w; do args+=(-c "$w"); done <"$work/writes"
	[ ${#args[@]} -eq 0 ] || qemu-io -f raw "${args[@]}" "$work/want.raw" >/dev/null
	qemu-img compare -q -U -f qcow2 -F raw "$work/images/bench-i$r-vda.qcow2" "$work/want.raw" ||
		die "round $r: the instant restore's image is not the backup plus the guest's writes"
	note writes "$(wc -l <"$work/writes")"
	forget_domain "bench-i$r"
done

say "a copy killed at half, resumed"
drop_caches
s=$(now)
instant bench-whole "${local_repo[@]}"
wait "$INSTANT_PID"
whole=$(echo "$(now) - $s" | bc)
whole_copy=$(sed -n 's/.*"event":"done".*"copy_seconds":\([0-9.]*\).*/\1/p' "$work/bench-whole.json")
forget_domain bench-whole
drop_caches
instant bench-half "${local_repo[@]}"
until tail -1 "$work/bench-half.json" | grep -q '"event":"progress"' &&
	[ "$(tail -1 "$work/bench-half.json" | sed -n 's/.*"bytes_done":\([0-9]*\),"bytes_total":\([0-9]*\).*/\1 * 2 >= \2/p' | head -1 | bc)" = 1 ]; do
	kill -0 "$INSTANT_PID" 2>/dev/null || die "the copy ended before half"
	sleep 0.05
done
kill -9 "$INSTANT_PID"
wait "$INSTANT_PID" 2>/dev/null || true
sleep 1
drop_caches
s=$(now)
"$nbdmover" --log-level warn instant-restore --resume bench-half "${local_repo[@]}" >/dev/null || die "--resume failed"
resumed=$(echo "$(now) - $s" | bc)
virsh -q -c qemu:///system qemu-monitor-command bench-half --hmp "qemu-io -d $qemu_io_dev \"flush\"" >/dev/null
qemu-img compare -q -U -f qcow2 -F raw "$work/images/bench-half-vda.qcow2" "$work/ref.raw" || die "the resumed copy is not the backup"
forget_domain bench-half

say "time to a running domain of a 100 GiB backup"
big="$work/big.qcow2"
qemu-img create -q -f qcow2 "$big" 100G
for i in $(seq 0 15); do qemu-io -f qcow2 -c "write -P $((i + 1)) $((i * 6))G 64M" "$big" >/dev/null; done
backup_domain bench-big "$big" "${local_repo[@]}"
"$nbdmover" --log-level warn backup --init --domain bench-big "${s3_repo[@]}" "${direct[@]}" >/dev/null
virsh -q -c qemu:///system destroy bench-big >/dev/null
to_running() { # NAME REPO-ARGS...: seconds from the command to the domain running
	local name=$1 s
	shift
	drop_caches
	s=$(now)
	SRC=bench-big instant "$name" "$@"
	echo "$(now) - $s" | bc
	virsh -q -c qemu:///system domstate "$name" | grep -q running || die "$name does not run"
	kill -INT "$INSTANT_PID"
	wait "$INSTANT_PID" 2>/dev/null || true
	forget_domain "$name"
}
run_local=$(to_running bench-big-l "${local_repo[@]}")
run_wan=$(to_running bench-big-w "${s3_repo[@]}" "${wan[@]}")

# --- report -------------------------------------------------------------
median() { tr ' ' '\n' | grep . | sort -g | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }
med() { echo "${times[$1]}" | median; }
ratio() { echo "scale=2; $1 / $2" | bc; }
{
	echo "## nbdmover instant-restore ($(date -u +%Y-%m-%d), $ROUNDS rounds, KVM: $kvm)"
	echo
	echo "Disk: $SIZE, $data_bytes bytes allocated. Median wall seconds (all rounds)."
	echo
	echo "| command | median s | all |"
	echo "|---|---|---|"
	for n in restore instant; do
		echo "| $n | $(med $n) | ${times[$n]} |"
	done
	echo
	echo "- copy home while the guest reads and writes vs restore: $(ratio "$(med instant)" "$(med restore)")x (goal <= 1.3); guest writes per round:${times[writes]}, all in the final images"
	echo "- a copy killed at half and resumed: $resumed s vs a whole run $whole s (copy alone $whole_copy s): $(ratio "$resumed" "$whole")x (goal <= 0.6)"
	echo "- a 100 GiB backup to a running domain: local $run_local s (goal <= 2), S3 at 50 ms RTT $run_wan s (goal <= 5)"
} | tee "$OUT/instant.md"
