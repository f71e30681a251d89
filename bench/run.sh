#!/usr/bin/env bash
# make bench: nbdmover against nbdcopy (the read ceiling) and virtnbdbackup
# (the peer), side by side, interleaved, on one realistic disk: a qcow2
# holding an ext4 filesystem filled from system directories (default 4 GiB
# with ~2.4 GB of files), attached to throwaway libvirt domains.
#
#   bench/run.sh [ROUNDS]        (env: BENCH_SIZE=4G, BENCH_OUT=bench/out)
#
# Each round: nbdcopy from a pull-mode export to null: and to a file;
# virtnbdbackup full with and without -z, virtnbdrestore; nbdmover full
# backups to the null store (zstd, none), the local store (zstd, s2, a
# 4 MiB-chunk repository, an encrypted one) and MinIO on 127.0.0.1;
# nbdmover restores to raw (also from the encrypted repository)
# and qcow2; then 1% and 10% of the disk dirtied through QEMU's block layer
# (1 MiB writes of real file data at random 4 KiB-aligned offsets) and an
# incremental of each tool after each. Page cache dropped before every
# command.
#
# MinIO is also reached through bench/wanproxy (50 ms round trip, 1 Gbit/s
# per connection and direction): a full backup and a restore each way, and
# after the full two incrementals through it: 800 scattered 64 KiB writes
# (distinct random 64 KiB-aligned offsets) and 50 MiB in 1 MiB-aligned
# writes (stored and dirty bytes recorded from --json).
#
# Prints a Markdown table (median, min, max wall seconds; MB/s of the disk's
# data; CPU seconds of the command and of the domain's QEMU process, host
# CPU per GB; peak RSS; output size; ratios) and the issue's goals,
# and writes report.md, results.json and chart.svg to $BENCH_OUT.
# Everything it creates (domains, checkpoints, MinIO, files) is removed at
# the end, also when interrupted; the test disk is cached in
# $NBDMOVER_CACHE/bench for the next run.
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

# --- the test disk, built once -------------------------------------------
base=$(bench/disk.sh "$SIZE")

# --- domains on copies of it, and MinIO ------------------------------------
work=$(mktemp -d /var/tmp/nbdmover-bench.XXXXXX)
chmod 755 "$work"
dom="nbdmover-bench-$(basename "$work" | cut -d. -f2 | tr 'A-Z' 'a-z')"
# Four domains on identical copies, given the same writes: one per
# checkpoint chain. virtnbdbackup refuses to work next to another tool's
# checkpoints ($vdom), and an nbdmover domain follows one repository
# ($dom: 1 MiB chunks, the default; $mdom: a 4 MiB-chunk repository;
# $sdom: the default, with incrementals that do not read a sample of
# clean chunks to check the dirty bitmap, to measure what the check costs).
vdom="$dom-peer"
mdom="$dom-4m"
sdom="$dom-nosample" # the default chain, but incrementals skip the bitmap check
domains="$dom $mdom $vdom $sdom"
virsh_() { virsh -q -c qemu:///system "$@"; }
cleanup() {
	for d in $domains; do virsh_ destroy "$d" >/dev/null 2>&1 || true; done
	[ -z "${wanpid:-}" ] || kill "$wanpid" 2>/dev/null || true
	scripts/minio.sh stop "$work/minio" || true
	rm -rf "$work"
	if [ "$started" = started ]; then pkill -x libvirtd || true; pkill -x virtlogd || true; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM
# a directory QEMU (libvirt-qemu) may read and write: the harness's own
# export, and the data the dirtying writes copy into the disks
install -d -m 0700 "$work/qemu"
i=0
for f in $(find /usr/lib/x86_64-linux-gnu -maxdepth 1 -type f -name '*.so*' -size +1M | sort | sed -n 1,32p); do
	head -c 1M "$f" >"$work/qemu/src.$(printf %02d $i)"
	i=$((i + 1))
done
[ "$i" -eq 32 ] || die "need 32 shared libraries over 1 MiB for the dirtying writes, found $i"
# 800 distinct 64 KiB pieces and 50 distinct 1 MiB pieces of real file data
# for the scattered and aligned writes.
{ find /usr/lib/x86_64-linux-gnu /usr/bin -type f -size +64k -print0 | sort -z | xargs -0 cat | head -c $((800 * 65536 + 50 * 1048576)) >"$work/pieces"; } 2>/dev/null || true
[ "$(stat -c %s "$work/pieces")" -eq $((800 * 65536 + 50 * 1048576)) ] || die "not enough file data for the scattered writes"
head -c $((800 * 65536)) "$work/pieces" >"$work/pieces.64k"
split -b 64k -a 4 -d "$work/pieces.64k" "$work/qemu/piece."
tail -c $((50 * 1048576)) "$work/pieces" >"$work/pieces.1m"
split -b 1M -a 2 -d "$work/pieces.1m" "$work/qemu/mib."
rm -f "$work/pieces.64k" "$work/pieces.1m"
rm -f "$work/pieces"
if id libvirt-qemu >/dev/null 2>&1; then chown -R libvirt-qemu:kvm "$work/qemu"; fi
# fresh_domains: (re)start every domain on a fresh copy of the test disk,
# so that every round starts from the same disk and no checkpoints.
fresh_domains() {
	local d
	for d in $domains; do
		virsh_ destroy "$d" >/dev/null 2>&1 || true
		cp "$base" "$work/$d.qcow2"
		start_domain "$d" "$work/$d.qcow2"
	done
}
minio_wan "$work"
wanpid=$WAN_PID
disk_bytes=$(qemu-img info --output=json "$base" | sed -n 's/.*"virtual-size": \([0-9]*\).*/\1/p')
data_bytes=$(qemu-img map --output=json "$base" | grep '"data": true' |
	sed -n 's/.*"length": \([0-9]*\).*/\1/p' | paste -sd+ | bc)
# The domains run under KVM when /dev/kvm exists (scripts/lib.sh), else
# under TCG, several times slower (and the peers with them): say which.
accel="TCG (no /dev/kvm: QEMU and the peers several times slower; no peer ratio is evidence)"
[ -c /dev/kvm ] && accel="KVM"
say "disk: $disk_bytes bytes, $data_bytes allocated; $ROUNDS rounds; domains under $accel"


# pull_export CMD...: run CMD with $SOCK set while a full pull-mode export of
# the peer's vda runs (no checkpoint), then end the job.
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

SAMPLES="$work/samples.jsonl"
: >"$SAMPLES"
# qemu_cpu DOMAIN: CPU seconds (user+sys) the domain's QEMU process used so
# far; 0 without a domain.
qemu_cpu() {
	local pid
	[ -n "$1" ] && pid=$(cat "/run/libvirt/qemu/$1.pid" 2>/dev/null) || { echo 0; return; }
	awk -v hz="$(getconf CLK_TCK)" '{printf "%.2f", ($14 + $15) / hz}' "/proc/$pid/stat" 2>/dev/null || echo 0
}
# [QDOM=DOMAIN] measure NAME OUTPUT_PATH CMD...: time CMD (wall, CPU, peak
# RSS, and the CPU of QDOM's QEMU process, the domain the command reads)
# and record the size of OUTPUT_PATH ("" for none).
measure() {
	local name=$1 output=$2
	shift 2
	local tf="$work/time.$$"
	sync
	echo 3 >/proc/sys/vm/drop_caches 2>/dev/null || true
	local q0
	q0=$(qemu_cpu "${QDOM:-}")
	if ! /usr/bin/time -f '%e %U %S %M' -o "$tf" bash -c '"$@"' _ "$@" >"$work/last.log" 2>"$work/last.err"; then
		cat "$work/last.log" "$work/last.err" >&2
		die "$name failed"
	fi
	local stored=0 dirty=0 # of a backup run with --json
	if [ -s "$work/last.log" ] && jq -e .bytes_written "$work/last.log" >/dev/null 2>&1; then
		stored=$(jq '.bytes_written // 0' "$work/last.log")
		dirty=$(jq '[.disks[].dirty_bytes // 0] | add // 0' "$work/last.log")
	fi
	stored=${stored:-0} dirty=${dirty:-0}
	local qemu
	qemu=$(echo "$(qemu_cpu "${QDOM:-}") $q0" | awk '{printf "%.2f", $1 - $2}')
	read -r wall user sys rss <"$tf"
	local size=0
	[ -n "$output" ] && [ -e "$output" ] && size=$(du -sb "$output" | cut -f1)
	printf '{"name":"%s","round":%d,"wall":%s,"cpu":%s,"qemu_cpu":%s,"rss_kib":%s,"output_bytes":%s,"stored_bytes":%s,"dirty_bytes":%s}\n' \
		"$name" "$round" "$wall" "$(echo "$user $sys" | awk '{printf "%.2f", $1 + $2}')" "$qemu" "$rss" "$size" "$stored" "$dirty" >>"$SAMPLES"
	printf '  %-28s %7.2fs  rss %6d MiB  out %s\n' "$name" "$wall" $((rss / 1024)) "$(numfmt --to=iec "$size")" >&2
}

# dirty PCT: PCT% of the disk in 1 MiB writes of real file data at random
# 4 KiB-aligned offsets, the same on every domain, through QEMU's block layer
# (so the dirty bitmaps see them), then a flush; one virsh session.
dirty() {
	local n=$((disk_bytes / 1048576 * $1 / 100)) pages=$((disk_bytes / 4096 - 256)) i d cmds=()
	for ((i = 0; i < n; i++)); do
		cmds+=("write -s $work/qemu/src.$(printf %02d $((i % 32))) $((((RANDOM << 15 | RANDOM) % pages) * 4096)) 1M")
	done
	cmds+=(flush)
	for d in $domains; do qemu_io_lines "$d" "${cmds[@]}"; done | virsh_ >/dev/null
}

# scatter: 800 writes of 64 KiB at distinct random 64 KiB-aligned offsets,
# then 50 of 1 MiB at distinct random 1 MiB-aligned offsets when given
# "aligned"; the same on every domain (a new choice of offsets each call).
scatter() {
	local cmds=() k i=0 d
	if [ "${1:-}" = aligned ]; then
		for k in $(shuf -i 0-$((disk_bytes / 1048576 - 2)) -n 50); do
			cmds+=("write -s $work/qemu/mib.$(printf %02d $i) $((k * 1048576)) 1M")
			i=$((i + 1))
		done
	else
		for k in $(shuf -i 0-$((disk_bytes / 65536 - 2)) -n 800); do
			cmds+=("write -s $work/qemu/piece.$(printf %04d $i) $((k * 65536)) 64k")
			i=$((i + 1))
		done
	fi
	cmds+=(flush)
	for d in $domains; do qemu_io_lines "$d" "${cmds[@]}"; done | virsh_ >/dev/null
}

nbdmover() { "$PWD/bin/nbdmover" --log-level warn "$@"; }
backup() { nbdmover backup --init --scratch-dir "$work/scratch" "$@"; }
s3=(--s3-endpoint "$NBDMOVER_TEST_S3_ENDPOINT")
for ((round = 1; round <= ROUNDS; round++)); do
	say "round $round"
	fresh_domains
	r="$work/r$round"
	mkdir -p "$r"
	nbdcopy_null() { nbdcopy "nbd+unix:///vda?socket=$SOCK" null:; }
	nbdcopy_file() { nbdcopy "nbd+unix:///vda?socket=$SOCK" "$r/nbdcopy.raw"; }
	export -f pull_export nbdcopy_null nbdcopy_file virsh_ nbdmover backup
	export work dom vdom r
	QDOM=$vdom measure nbdcopy-null "" pull_export nbdcopy_null
	QDOM=$vdom measure nbdcopy-to-file "$r/nbdcopy.raw" pull_export nbdcopy_file
	rm -f "$r/nbdcopy.raw"
	QDOM=$vdom measure virtnbdbackup-full-z "$r/vnbz" virtnbdbackup -q -d "$vdom" -l full -z -o "$r/vnbz"
	rm -rf "$r/vnbz"
	QDOM=$vdom measure virtnbdbackup-full "$r/vnb" virtnbdbackup -q -d "$vdom" -l full -o "$r/vnb"
	measure virtnbdrestore "$r/vnbrestore" virtnbdrestore -n -i "$r/vnb" -o "$r/vnbrestore"
	rm -rf "$r/vnbrestore"
	QDOM=$dom measure nbdmover-full-null "" backup --domain "$dom" --repo null: --mode full
	QDOM=$dom measure nbdmover-full-null-nocomp "" backup --domain "$dom" --repo null: --mode full --compression none
	QDOM=$dom measure nbdmover-full-minio "" backup --domain "$dom" --repo "s3://bench/r$round" "${s3[@]}" --mode full
	QDOM=$dom measure nbdmover-full-minio-wan "" backup --domain "$dom" --repo "s3://bench/r$round-wan" "${wan[@]}" --mode full
	scatter
	QDOM=$dom measure nbdmover-inc-scatter-minio-wan "" backup --domain "$dom" --repo "s3://bench/r$round-wan" "${wan[@]}" --mode incremental --json
	scatter aligned
	QDOM=$dom measure nbdmover-inc-aligned-minio-wan "" backup --domain "$dom" --repo "s3://bench/r$round-wan" "${wan[@]}" --mode incremental --json
	measure nbdmover-restore-minio "$r/restore.raw" nbdmover restore --repo "s3://bench/r$round" "${s3[@]}" --domain "$dom" --disk vda --output "$r/restore.raw"
	rm -f "$r/restore.raw"
	measure nbdmover-restore-minio-wan "$r/restore.raw" nbdmover restore --repo "s3://bench/r$round" "${wan[@]}" --domain "$dom" --disk vda --output "$r/restore.raw"
	rm -f "$r/restore.raw"
	QDOM=$dom measure nbdmover-full-local-s2 "$r/repo-s2" backup --domain "$dom" --repo "$r/repo-s2" --mode full --compression s2
	rm -rf "$r/repo-s2"
	# Encrypted, the same full: through a key file (the data path's cost),
	# and through a password (plus one Argon2id derivation). Before the
	# full to "$r/repo": a backup into another repository drops the
	# domain's checkpoints, which the incrementals below need.
	NBDMOVER_PASSWORD=bench-password nbdmover init --repo "$r/repo-enc" --encryption >/dev/null
	NBDMOVER_PASSWORD=bench-password nbdmover init --repo "$r/repo-enc-pw" --encryption >/dev/null
	NBDMOVER_PASSWORD=bench-password nbdmover key add --repo "$r/repo-enc" --new-key-file "$r/enc.key" >/dev/null
	QDOM=$dom measure nbdmover-full-local-enc "$r/repo-enc" backup --domain "$dom" --repo "$r/repo-enc" --key-file "$r/enc.key" --mode full
	QDOM=$dom measure nbdmover-full-local-enc-pw "$r/repo-enc-pw" env NBDMOVER_PASSWORD=bench-password "$PWD/bin/nbdmover" --log-level warn \
		backup --scratch-dir "$work/scratch" --domain "$dom" --repo "$r/repo-enc-pw" --mode full
	measure nbdmover-restore-raw-enc "$r/restore.raw" nbdmover restore --repo "$r/repo-enc" --key-file "$r/enc.key" --domain "$dom" --disk vda --output "$r/restore.raw"
	rm -rf "$r/restore.raw" "$r/repo-enc" "$r/repo-enc-pw"
	QDOM=$dom measure nbdmover-full-local "$r/repo" backup --domain "$dom" --repo "$r/repo" --mode full
	nbdmover init --repo "$r/repo-4m" --chunk-size 4MiB >/dev/null
	QDOM=$mdom measure nbdmover-4m-full-local "$r/repo-4m" backup --domain "$mdom" --repo "$r/repo-4m" --mode full
	backup --domain "$sdom" --repo "$r/repo-nosample" --mode full >/dev/null
	measure nbdmover-restore-raw "$r/restore.raw" nbdmover restore --repo "$r/repo" --domain "$dom" --disk vda --output "$r/restore.raw"
	rm -f "$r/restore.raw"
	measure nbdmover-restore-qcow2 "$r/restore.qcow2" nbdmover restore --repo "$r/repo" --domain "$dom" --disk vda --format qcow2 --output "$r/restore.qcow2"
	rm -f "$r/restore.qcow2"
	for pct in 1 10; do
		dirty "$pct"
		QDOM=$dom measure "nbdmover-inc-${pct}pct" "$r/repo" backup --domain "$dom" --repo "$r/repo" --mode incremental
		QDOM=$mdom measure "nbdmover-4m-inc-${pct}pct" "$r/repo-4m" backup --domain "$mdom" --repo "$r/repo-4m" --mode incremental
		QDOM=$sdom measure "nbdmover-inc-${pct}pct-nosample" "$r/repo-nosample" backup --domain "$sdom" --repo "$r/repo-nosample" --mode incremental --verify-sample 0
		QDOM=$vdom measure "virtnbdbackup-inc-${pct}pct" "$r/vnb" virtnbdbackup -q -d "$vdom" -l inc -o "$r/vnb"
	done
	rm -rf "$r"
done

# --- report ----------------------------------------------------------------
cp "$SAMPLES" "$OUT/samples.jsonl" # kept: the report can be made again from it
go run ./bench/report -in "$SAMPLES" -out "$OUT" -data "$data_bytes" \
	-title "nbdmover benchmark, $(date -u +%Y-%m-%dT%H:%MZ), $(nproc) cores, $(free -g | awk '/Mem/{print $2}') GiB; disk $SIZE ($data_bytes bytes allocated), $ROUNDS rounds; domains under $accel"
