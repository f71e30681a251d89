#!/usr/bin/env bash
# make bench-chunksize: the baseline alternative of issue 29's lever 3 (smaller
# chunks instead of deltas): the bench disk (bench/disk.sh, 4 GiB with ~2.5 GB
# of files) backed up in full, then after SCATTER scattered 64 KiB writes of
# random data (default 800, at random 64 KiB-aligned offsets), incrementally,
# then restored, with each chunk size of CHUNKS (default "1MiB 256KiB"), into
# a local repository.
#
#   bench/chunksize.sh        (env: CHUNKS, SCATTER, BENCH_OUT=bench/out)
#
# The disk is an offline qcow2 served by qemu-nbd with a persistent dirty
# bitmap (no guest: no KVM involved). Reported per chunk size: wall seconds
# and CPU of each command, objects and bytes the repository gained (chunks
# and metadata), and for the incremental the bytes read and stored against
# the bytes written. Everything it creates is removed at the end.
. "$(dirname "$0")/../scripts/lib.sh"
cd "$(dirname "$0")/.."

CHUNKS=${CHUNKS:-1MiB 256KiB}
SCATTER=${SCATTER:-800}
OUT=${BENCH_OUT:-$PWD/bench/out}
scripts/install-deps.sh
make -s build
nbdmover=$PWD/bin/nbdmover
mkdir -p "$OUT"
base=$(bench/disk.sh 4G)
work=$(mktemp -d /var/tmp/nbdmover-chunksize.XXXXXX)
cleanup() {
	[ -n "$nbd_pid" ] && kill "$nbd_pid" 2>/dev/null
	rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
report="$OUT/chunksize.md"
printf '| chunk size | command | wall s | CPU s (user+sys) | objects added | bytes added | read | stored |\n|---|---|---:|---:|---:|---:|---:|---:|\n' >"$report"

objects() { find "$1" -type f -not -path '*/locks/*' | wc -l; }
bytes() { du -sb "$1" | cut -f1; }
# run NAME CMD...: time a command, append a row; $json is its stdout
run() {
	local name=$1 repo=$2
	shift 2
	local o0 b0
	o0=$(objects "$repo")
	b0=$(bytes "$repo")
	sync
	echo 3 >/proc/sys/vm/drop_caches
	/usr/bin/time -f '%e %U %S' -o "$work/time" "$@" >"$work/out.json"
	read -r wall user sys <"$work/time"
	json=$(cat "$work/out.json")
	local read stored
	read=$(jq -r '.bytes_read // empty' <<<"$json" 2>/dev/null)
	stored=$(jq -r '.bytes_written // empty' <<<"$json" 2>/dev/null)
	printf '| %s | %s | %.2f | %.2f | %d | %d | %s | %s |\n' "$cs" "$name" "$wall" "$(echo "$user + $sys" | bc)" \
		$(($(objects "$repo") - o0)) $(($(bytes "$repo") - b0)) "${read:--}" "${stored:--}" >>"$report"
}

# The scattered writes, the same for every chunk size: SCATTER distinct
# random 64 KiB-aligned offsets in the 4 GiB disk, each given 64 KiB of
# random data of its own (pieces/NNNN).
mkdir "$work/pieces"
head -c $((SCATTER << 16)) /dev/urandom | split -b 64k -a 4 -d - "$work/pieces/"
awk -v n="$SCATTER" 'BEGIN { srand(29); while (c < n) { k = int(rand() * 65536); if (!(k in seen)) { seen[k] = 1; print k; c++ } } }' >"$work/offsets"

for cs in $CHUNKS; do
	repo="$work/repo-$cs"
	cp "$base" "$work/disk.qcow2"
	qemu-img bitmap --add "$work/disk.qcow2" b0
	"$nbdmover" init --repo "$repo" --chunk-size "$cs" >/dev/null
	serve_qcow2 "$work"
	run full "$repo" "$nbdmover" backup --nbd "nbd+unix:///?socket=$work/nbd.sock" --bitmap b0 --name d --disk vda --repo "$repo" --json --log-level warn
	unserve_qcow2
	args=()
	i=0
	while read -r k; do
		args+=(-c "write -s $work/pieces/$(printf %04d $i) $((k << 16)) 64k")
		i=$((i + 1))
	done <"$work/offsets"
	qemu-io -f qcow2 "${args[@]}" "$work/disk.qcow2" >/dev/null
	serve_qcow2 "$work"
	run "incremental ($SCATTER x 64 KiB)" "$repo" "$nbdmover" backup --nbd "nbd+unix:///?socket=$work/nbd.sock" --bitmap b0 --name d --disk vda --repo "$repo" --json --log-level warn
	unserve_qcow2
	rm -f "$work/disk.qcow2"
	run restore "$repo" "$nbdmover" restore --domain d --disk vda --repo "$repo" --output "$work/out.raw" --json
	rm -f "$work/out.raw"
	rm -rf "$repo"
done
cat "$report"
