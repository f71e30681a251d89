#!/usr/bin/env bash
# bench/disk.sh SIZE: print the path of the benchmarks' test disk of SIZE
# (a qcow2 holding an ext4 filesystem filled from system directories to
# ~60%), building it once into $NBDMOVER_CACHE/bench.
. "$(dirname "$0")/../scripts/lib.sh"
SIZE=${1:-4G}
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
	rm -rf "$stage" "$cache/disk.raw"
	trap - EXIT
fi

echo "$base"
