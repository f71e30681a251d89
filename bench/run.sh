#!/usr/bin/env bash
# make bench: nbdmover against nbdcopy (the read ceiling) and virtnbdbackup
# (the peer), side by side, interleaved, on one realistic disk: a qcow2
# holding an ext4 filesystem filled from system directories (default 4 GiB
# with ~2.4 GB of files), attached to a throwaway libvirt domain.
#
#   bench/run.sh [ROUNDS]        (env: BENCH_SIZE=4G, BENCH_OUT=bench/out)
#
# Prints a Markdown table (median, min, max wall seconds; MB/s of the disk's
# data; CPU seconds; peak RSS; output size; ratios) and writes the raw
# samples as JSON to $BENCH_OUT/results.json. Everything it creates (domain,
# checkpoints, files) is removed at the end, also when interrupted; the
# test disk is cached in $NBDMOVER_CACHE/bench for the next run.
. "$(dirname "$0")/../scripts/lib.sh"
cd "$(dirname "$0")/.."

ROUNDS=${1:-3}
SIZE=${BENCH_SIZE:-4G}
OUT=${BENCH_OUT:-$PWD/bench/out}
DIRTY_PCT=${BENCH_DIRTY_PCT:-1}

scripts/install-deps.sh
started=$(scripts/libvirtd.sh)
make -s build
nbdmover=$PWD/bin/nbdmover
mkdir -p "$OUT"

# --- the test disk, built once -------------------------------------------
cache="$NBDMOVER_CACHE/bench"
base="$cache/disk-$SIZE.qcow2"
if [ ! -f "$base" ]; then
	say "building the $SIZE test disk (once; a few minutes)"
	mkdir -p "$cache"
	stage=$(mktemp -d /var/tmp/nbdmover-bench-stage.XXXXXX)
	trap 'rm -rf "$stage" "$cache/disk.raw" "$base.tmp"' EXIT
	want=$(($(numfmt --from=iec "$SIZE") * 6 / 10)) # files fill ~60% of the disk
	have=0
	for d in /usr/share /usr/lib/x86_64-linux-gnu /usr/lib/jvm /usr/bin /usr/local/go /usr/lib/gcc /usr/include /usr/libexec /usr/lib/python3; do
		[ -d "$d" ] || continue
		size=$(du -sb "$d" | cut -f1)
		[ $((have + size)) -le "$want" ] || continue
		dest="$stage/$(echo "${d#/}" | tr / _)"
		cp -al "$d" "$dest" 2>/dev/null || cp -a "$d" "$dest"
		have=$((have + size))
	done
	[ "$have" -gt 0 ] || die "no system directory fits a $SIZE disk"
	mkfs.ext4 -q -F -b 4096 -d "$stage" "$cache/disk.raw" "$SIZE" >/dev/null
	qemu-img convert -f raw -O qcow2 "$cache/disk.raw" "$base.tmp"
	mv "$base.tmp" "$base"
	rm -rf "$stage"
	trap - EXIT
fi

# --- a domain on a copy of it --------------------------------------------
work=$(mktemp -d /var/tmp/nbdmover-bench.XXXXXX)
chmod 755 "$work"
dom="nbdmover-bench-$(basename "$work" | cut -d. -f2 | tr 'A-Z' 'a-z')"
cleanup() {
	virsh -q -c qemu:///system destroy "$dom" >/dev/null 2>&1 || true
	virsh -q -c qemu:///system destroy "$dom-peer" >/dev/null 2>&1 || true
	rm -rf "$work"
	if [ "$started" = started ]; then pkill -x libvirtd || true; pkill -x virtlogd || true; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM
# a directory QEMU (libvirt-qemu) may write, for the harness's own export
install -d -m 0700 "$work/qemu"
if id libvirt-qemu >/dev/null 2>&1; then chown libvirt-qemu:kvm "$work/qemu"; fi
# Two domains on identical copies: virtnbdbackup refuses to work next to
# another tool's checkpoints, so nbdmover ($dom) and the peers ($vdom) each
# have their own. Both get the same writes.
vdom="$dom-peer"
for d in "$dom" "$vdom"; do
	cp "$base" "$work/$d.qcow2"
	start_domain "$d" "$work/$d.qcow2"
done
disk_bytes=$(qemu-img info --output=json -U "$work/$dom.qcow2" | sed -n 's/.*"virtual-size": \([0-9]*\).*/\1/p')
data_bytes=$(qemu-img map --output=json -U "$work/$dom.qcow2" | grep '"data": true' |
	sed -n 's/.*"length": \([0-9]*\).*/\1/p' | paste -sd+ | bc)
say "disk: $disk_bytes bytes, $data_bytes allocated; $ROUNDS rounds"

virsh_() { virsh -q -c qemu:///system "$@"; }


# pull_export CMD...: run CMD with $SOCK set while a full pull-mode export of
# vda runs (no checkpoint), then end the job.
pull_export() {
	local sock="$work/qemu/pull.sock"
	cat >"$work/pull.xml" <<EOT
<domainbackup mode='pull'><server transport='unix' socket='$sock'/>
<disks><disk name='vda' backup='yes' type='file'><scratch file='$work/qemu/pull-scratch.qcow2'/></disk></disks></domainbackup>
EOT
	virsh_ backup-begin "$vdom" "$work/pull.xml" >/dev/null
	SOCK=$sock "$@"
	local rc=$?
	virsh_ domjobabort "$vdom" >/dev/null
	while virsh_ backup-dumpxml "$vdom" >/dev/null 2>&1; do sleep 0.1; done
	return $rc
}

RESULTS="$OUT/results.jsonl"
: >"$RESULTS"
# measure NAME OUTPUT_PATH CMD...: time CMD (wall, CPU, peak RSS) and record
# the size of OUTPUT_PATH ("" for none).
measure() {
	local name=$1 output=$2
	shift 2
	local tf="$work/time.$$"
	sync
	echo 3 >/proc/sys/vm/drop_caches 2>/dev/null || true
	if ! /usr/bin/time -f '%e %U %S %M' -o "$tf" bash -c '"$@"' _ "$@" >"$work/last.log" 2>&1; then
		cat "$work/last.log" >&2
		die "$name failed"
	fi
	read -r wall user sys rss <"$tf"
	local size=0
	[ -n "$output" ] && [ -e "$output" ] && size=$(du -sb "$output" | cut -f1)
	printf '{"name":"%s","round":%d,"wall":%s,"cpu":%s,"rss_kib":%s,"output_bytes":%s}\n' \
		"$name" "$round" "$wall" "$(echo "$user + $sys" | bc)" "$rss" "$size" >>"$RESULTS"
	printf '  %-28s %7.2fs  rss %6d MiB  out %s\n' "$name" "$wall" $((rss / 1024)) "$(numfmt --to=iec "$size")" >&2
}

dirty() { # dirty DIRTY_PCT% of both disks in the same 1 MiB writes spread over them
	local n=$((disk_bytes / 1048576 * DIRTY_PCT / 100)) i w
	for ((i = 0; i < n; i++)); do
		w="write -P 0x$(printf %02x $((i % 250 + 1))) $(((RANDOM * 32768 + RANDOM) % (disk_bytes / 1048576)))M 1M"
		qemu_io "$dom" "$w"
		qemu_io "$vdom" "$w"
	done
	qemu_io "$dom" flush
	qemu_io "$vdom" flush
}

for ((round = 1; round <= ROUNDS; round++)); do
	say "round $round"
	r="$work/r$round"
	mkdir -p "$r"
	nbdcopy_null() { nbdcopy "nbd+unix:///vda?socket=$SOCK" null:; }
	nbdcopy_file() { nbdcopy "nbd+unix:///vda?socket=$SOCK" "$r/nbdcopy.raw"; }
	export -f pull_export nbdcopy_null nbdcopy_file virsh_
	export work dom vdom r
	measure nbdcopy-null "" pull_export nbdcopy_null
	measure nbdcopy-to-file "$r/nbdcopy.raw" pull_export nbdcopy_file
	rm -f "$r/nbdcopy.raw"
	measure virtnbdbackup-full-z "$r/vnbz" virtnbdbackup -q -d "$vdom" -l full -z -o "$r/vnbz"
	rm -rf "$r/vnbz"
	measure virtnbdbackup-full "$r/vnb" virtnbdbackup -q -d "$vdom" -l full -o "$r/vnb"
	measure nbdmover-full-null "" "$nbdmover" --log-level warn backup --domain "$dom" --repo null: --mode full --scratch-dir "$work/scratch"
	measure nbdmover-full-null-nocomp "" "$nbdmover" --log-level warn backup --domain "$dom" --repo null: --mode full --compression none --scratch-dir "$work/scratch"
	measure nbdmover-full-local-s2 "$r/repo-s2" "$nbdmover" --log-level warn backup --domain "$dom" --repo "$r/repo-s2" --mode full --compression s2 --scratch-dir "$work/scratch"
	rm -rf "$r/repo-s2"
	measure nbdmover-full-local "$r/repo" "$nbdmover" --log-level warn backup --domain "$dom" --repo "$r/repo" --mode full --scratch-dir "$work/scratch"
	measure nbdmover-restore-raw "$r/restore.raw" "$nbdmover" restore --repo "$r/repo" --domain "$dom" --disk vda --output "$r/restore.raw"
	rm -f "$r/restore.raw"
	dirty
	measure nbdmover-incremental "$r/repo" "$nbdmover" --log-level warn backup --domain "$dom" --repo "$r/repo" --mode incremental --scratch-dir "$work/scratch"
	measure virtnbdbackup-inc "$r/vnb" virtnbdbackup -q -d "$vdom" -l inc -o "$r/vnb"
	rm -rf "$r"
done

# --- report ----------------------------------------------------------------
python_free_report() {
	local names
	names=$(sed -n 's/.*"name":"\([^"]*\)".*/\1/p' "$RESULTS" | awk '!seen[$0]++')
	stat() { # stat NAME FIELD -> median min max
		sed -n "s/.*\"name\":\"$1\".*\"$2\":\([0-9.]*\).*/\1/p" "$RESULTS" | sort -g |
			awk '{a[NR]=$1} END {m=(NR%2)?a[(NR+1)/2]:(a[NR/2]+a[NR/2+1])/2; printf "%s %s %s", m, a[1], a[NR]}'
	}
	read -r base_nbdcopy _ _ <<<"$(stat nbdcopy-null wall)"
	read -r base_vnbz _ _ <<<"$(stat virtnbdbackup-full-z wall)"
	echo "| tool | median s | min s | max s | MB/s (data) | CPU s | peak RSS MiB | output | vs nbdcopy | vs virtnbdbackup -z |"
	echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
	for n in $names; do
		read -r med lo hi <<<"$(stat "$n" wall)"
		read -r cpu _ _ <<<"$(stat "$n" cpu)"
		read -r rss _ _ <<<"$(stat "$n" rss_kib)"
		read -r outb _ _ <<<"$(stat "$n" output_bytes)"
		awk -v n="$n" -v med="$med" -v lo="$lo" -v hi="$hi" -v cpu="$cpu" -v rss="$rss" -v out="$outb" \
			-v data="$data_bytes" -v b1="$base_nbdcopy" -v b2="$base_vnbz" 'BEGIN {
			printf "| %s | %.2f | %.2f | %.2f | %.0f | %.1f | %.0f | %s | %.2fx time | %.2fx time |\n",
				n, med, lo, hi, data/med/1e6, cpu, rss/1024, (out>0? sprintf("%.0f MB", out/1e6) : "-"), med/b1, med/b2 }'
	done
}
report=$(python_free_report)
{
	echo "nbdmover benchmark, $(date -u +%Y-%m-%dT%H:%MZ), $(nproc) cores, $(free -g | awk '/Mem/{print $2}') GiB;"
	echo "disk $SIZE ($data_bytes bytes allocated), $ROUNDS rounds, incremental after dirtying $DIRTY_PCT%"
	echo
	echo "$report"
} | tee "$OUT/report.md"
sed 's/$/,/' "$RESULTS" | sed '$ s/,$//' | { echo "["; cat; echo "]"; } >"$OUT/results.json"
