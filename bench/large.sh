#!/usr/bin/env bash
# make bench-large: memory and metadata on large disks (docs/performance.md).
#
#   bench/large.sh            (env: LARGE_CASES="sparse16t alloc64g", BENCH_OUT=bench/out)
#
# Cases, each an offline qcow2 served by qemu-nbd with a persistent bitmap:
#   sparse16t  16 TiB virtual, 4 GiB of random data in 64 places spread
#              over the disk;
#   alloc64g   64 GiB, every byte written (patterns: 250 kinds of 64 MiB
#              regions, so the repository stays small on this machine).
# For each, at nbdmover's defaults: a full backup, 8 MiB changed in 8
# places, an incremental, a restore (qcow2 for 16 TiB: ext4 files stop
# short of 16 TiB; raw for 64 GiB, after the source image is removed to
# make room). Reported per command: wall seconds, peak RSS (GNU time), and
# for backups the bytes of metadata written (index objects, manifests,
# files, catalogs). Everything it creates is removed at the end.
. "$(dirname "$0")/../scripts/lib.sh"
cd "$(dirname "$0")/.."

CASES=${LARGE_CASES:-sparse16t alloc64g}
OUT=${BENCH_OUT:-$PWD/bench/out}
scripts/install-deps.sh
make -s build
nbdmover=$PWD/bin/nbdmover
mkdir -p "$OUT"
work=$(mktemp -d /var/tmp/nbdmover-large.XXXXXX)
cleanup() {
	[ -n "$nbd_pid" ] && kill "$nbd_pid" 2>/dev/null
	rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
report="$OUT/large.md"
printf '| case | command | wall s | peak RSS MiB | metadata written |\n|---|---|---:|---:|---:|\n' >"$report"

meta_bytes() {
	local d n=0
	for d in indexes manifests files catalog; do
		[ -d "$work/repo/$d" ] && n=$((n + $(du -sb "$work/repo/$d" | cut -f1)))
	done
	echo "$n"
}
# run CASE NAME CMD...: time CMD, add a row.
run() {
	local case=$1 name=$2 before after
	shift 2
	before=$(meta_bytes)
	sync
	echo 3 >/proc/sys/vm/drop_caches 2>/dev/null || true
	/usr/bin/time -f '%e %M' -o "$work/time" "$@" >"$work/out" 2>"$work/err" || { cat "$work/err" >&2; die "$case $name failed"; }
	read -r wall rss <"$work/time"
	after=$(meta_bytes)
	local meta=-
	[[ $name == backup* ]] && meta=$((after - before))
	printf '| %s | %s | %s | %d | %s |\n' "$case" "$name" "$wall" $((rss / 1024)) "$meta" | tee -a "$report" >&2
}
change() { # 8 MiB changed in 8 places spread over a disk of $1 bytes
	local i cmds=()
	for i in 1 2 3 4 5 6 7; do cmds+=(-c "write -P 0x$((40 + i)) $(($1 / 8 * i)) 1M"); done
	cmds+=(-c "write -P 0x40 0 1M")
	qemu-io -f qcow2 "${cmds[@]}" "$work/disk.qcow2" >/dev/null
}

for case in $CASES; do
	rm -rf "$work/repo" "$work/restore"*
	case $case in
	sparse16t)
		size=$((16 << 40))
		qemu-img create -q -f qcow2 "$work/disk.qcow2" "$size"
		for i in $(seq 0 63); do
			head -c 64M /dev/urandom >"$work/data"
			qemu-io -f qcow2 -c "write -s $work/data $((i * (size / 64))) 64M" "$work/disk.qcow2" >/dev/null
		done
		rm -f "$work/data"
		qemu-img bitmap --add "$work/disk.qcow2" b0 # from here on: what the incremental reads
		;;
	alloc64g)
		size=$((64 << 30))
		qemu-img create -q -f qcow2 "$work/disk.qcow2" "$size"
		for i in $(seq 0 1023); do
			printf -- '-c\nwrite -P %d %d 64M\n' $((i % 250 + 1)) $((i << 26))
		done | xargs -d '\n' qemu-io -f qcow2 "$work/disk.qcow2" >/dev/null
		qemu-img bitmap --add "$work/disk.qcow2" b0
		;;
	*) die "unknown case $case" ;;
	esac
	serve_qcow2 "$work"
	backup=("$nbdmover" --log-level warn backup --init --repo "$work/repo" --nbd "nbd+unix:///?socket=$work/nbd.sock"
		--name "$case" --bitmap b0 --disk vda --json)
	run "$case" "backup full" "${backup[@]}"
	unserve_qcow2
	change "$size"
	serve_qcow2 "$work"
	run "$case" "backup incremental (8 MiB changed)" "${backup[@]}"
	unserve_qcow2
	if [ "$case" = sparse16t ]; then
		run "$case" "restore qcow2" "$nbdmover" restore --repo "$work/repo" --domain "$case" --disk vda --format qcow2 --output "$work/restore.qcow2"
	else
		rm -f "$work/disk.qcow2"
		run "$case" "restore raw" "$nbdmover" restore --repo "$work/repo" --domain "$case" --disk vda --output "$work/restore.raw"
	fi
	rm -f "$work/disk.qcow2" "$work/restore"*
done
say "written to $report"
cat "$report"
