#!/usr/bin/env bash
# make demo: the main job on a fresh machine, end to end. Creates a
# throwaway domain whose disk holds real files (an ext4 filesystem made from
# /usr/include), takes a full backup into a local repository, writes through
# QEMU's block layer, takes an incremental, restores both points and checks
# each is exact, lists and fetches files of the last (a libguestfs
# appliance reads them) and compares them with their source. Prints what it did and how long each step took, and
# removes everything it created (also when interrupted).
. "$(dirname "$0")/lib.sh"
cd "$(dirname "$0")/.."

step_start=0
step() { step_start=$(date +%s%N); printf '%-58s' "$*" >&2; }
done_() {
	local ms=$((($(date +%s%N) - step_start) / 1000000))
	printf '%4d.%01ds  %s\n' $((ms / 1000)) $((ms % 1000 / 100)) "${1:-}" >&2
}

step "installing packages (if missing)"; scripts/install-deps.sh; done_
step "starting libvirtd (if not running)"; started=$(scripts/libvirtd.sh); done_ "$started"
step "building nbdmover"; make -s build; done_ "bin/nbdmover"
nbdmover=$PWD/bin/nbdmover

work=$(mktemp -d /var/tmp/nbdmover-demo.XXXXXX)
chmod 755 "$work"
dom="nbdmover-demo-$(basename "$work" | cut -d. -f2 | tr 'A-Z' 'a-z')"
repo="$work/repo"
inst="$dom-instant"
cleanup() {
	virsh -q -c qemu:///system destroy "$dom" >/dev/null 2>&1 || true
	virsh -q -c qemu:///system destroy "$inst" >/dev/null 2>&1 || true
	virsh -q -c qemu:///system undefine "$inst" >/dev/null 2>&1 || true
	rm -rf "$work"
	if [ "$started" = started ]; then pkill -x libvirtd || true; pkill -x virtlogd || true; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

step "making a 1 GiB disk holding /usr/include"
mkfs.ext4 -q -F -b 4096 -d /usr/include "$work/fs.raw" 1G >/dev/null
qemu-img convert -f raw -O qcow2 "$work/fs.raw" "$work/vda.qcow2" && rm "$work/fs.raw"
done_ "$(du -sh /usr/include | cut -f1) of files"

step "starting domain $dom"; start_domain "$dom" "$work/vda.qcow2"; done_

snapshot() { # raw reference copy of vda as it is now
	qemu_io "$dom" flush
	virsh -q -c qemu:///system suspend "$dom" >/dev/null
	qemu-img convert -U -f qcow2 -O raw "$work/vda.qcow2" "$1"
	virsh -q -c qemu:///system resume "$dom" >/dev/null
}

step "full backup into $repo"
out=$("$nbdmover" --log-level warn backup --init --domain "$dom" --repo "$repo")
done_ "$out"
snapshot "$work/ref1.raw"

step "writing 24 MiB through QEMU (3 places)"
for w in "write -P 0x11 100M 16M" "write -P 0x22 600M 4M" "write -z 900M 4M"; do
	qemu_io "$dom" "$w"
done
done_
snapshot "$work/ref2.raw"

step "incremental backup"
out=$("$nbdmover" --log-level warn backup --init --domain "$dom" --repo "$repo")
done_ "$out"

"$nbdmover" list --repo "$repo" >&2
ids=$("$nbdmover" list --repo "$repo" --domain "$dom" --json | sed -n 's/.*"id": "\(.*\)".*/\1/p')
set -- $ids
for pair in "1 $1" "2 $2"; do
	set -- $pair
	step "restoring backup $1 ($2) and comparing"
	"$nbdmover" restore --repo "$repo" --domain "$dom" --backup "$2" --disk vda --output "$work/restored$1.qcow2" --format qcow2 >/dev/null
	done_ "$(qemu-img compare -f raw -F qcow2 "$work/ref$1.raw" "$work/restored$1.qcow2")"
done
step "files: listing /linux of backup 2 (in a libguestfs VM)"
n=$("$nbdmover" --log-level warn files ls --repo "$repo" --domain "$dom" /linux | wc -l)
done_ "$n entries"
step "files: fetching /stdio.h and /linux, comparing"
"$nbdmover" --log-level warn files get --repo "$repo" --domain "$dom" /stdio.h /linux --output "$work/files" >/dev/null
cmp -s /usr/include/stdio.h "$work/files/stdio.h" || die "files get: stdio.h differs"
diff -r --no-dereference /usr/include/linux "$work/files/linux" >/dev/null || die "files get: /linux differs"
[ "$n" = "$(ls -A /usr/include/linux | wc -l)" ] || die "files ls: $n entries, /usr/include/linux has $(ls -A /usr/include/linux | wc -l)"
done_ "identical ($(du -sh "$work/files" | cut -f1))"
step "instant restore of backup 2 as $inst"
mkdir -m 755 "$work/instant"
"$nbdmover" --log-level warn instant-restore --repo "$repo" --domain "$dom" --as "$inst" \
	--image-dir "$work/instant" --json >"$work/instant.json"
running=$(sed -n 's/.*"event":"running".*"running_after_seconds":\([0-9.]*\).*/\1/p' "$work/instant.json")
copied=$(sed -n 's/.*"event":"done".*"copy_seconds":\([0-9.]*\).*/\1/p' "$work/instant.json")
done_ "running after ${running:0:4}s, disks home after ${copied:0:4}s more"
step "comparing $inst's own image (it still runs)"
virsh -q -c qemu:///system qemu-monitor-command "$inst" --hmp "qemu-io -d $qemu_io_dev \"flush\"" >/dev/null
virsh -q -c qemu:///system domstate "$inst" | grep -q running || die "$inst is not running"
done_ "$(qemu-img compare -U -f raw -F qcow2 "$work/ref2.raw" "$work/instant/$inst-vda.qcow2")"
step "verifying every chunk"; done_ "$("$nbdmover" verify --repo "$repo" --read-data)"
say "demo done: everything it created is being removed"
