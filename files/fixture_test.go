package files_test

import (
	"archive/tar"
	"bytes"
	"fmt"
	"maps"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nbdmover/nbdmover/internal/qemutest"
)

const MiB = 1 << 20

// node is one entry of a reference tree: what the guest filesystem holds.
type node struct {
	typ    byte // tar type
	data   []byte
	size   int64 // for a sparse file: its size (data is its head)
	target string
	mode   int64
	uid    int
	mtime  time.Time
}

// tree is a reference tree: guest path (without the leading /) -> node.
type tree map[string]*node

// hostile is the tree with what a hostile guest can put in a filesystem:
// names with spaces, newlines and non-UTF-8 bytes, links pointing out of
// any directory they are extracted to, hard links, a sparse file, a FIFO,
// a setuid program, a large random file and a directory of many files.
func hostile(big int) tree {
	t := tree{}
	mt := time.Date(2026, 3, 4, 5, 6, 7, 0, time.UTC)
	dir := func(p string) { t[p] = &node{typ: tar.TypeDir, mode: 0o755, mtime: mt} }
	file := func(p string, data []byte, mode int64) {
		t[p] = &node{typ: tar.TypeReg, data: data, size: int64(len(data)), mode: mode, uid: 1234, mtime: mt}
	}
	link := func(p, target string) { t[p] = &node{typ: tar.TypeSymlink, target: target, mode: 0o777, mtime: mt} }
	dir("etc")
	file("etc/hosts", []byte("127.0.0.1 localhost\n"), 0o644)
	dir("etc/nginx")
	file("etc/nginx/nginx.conf", []byte("worker_processes 4;\n"), 0o640)
	dir("hostile")
	file("hostile/with space", []byte("space\n"), 0o644)
	file("hostile/new\nline", []byte("newline\n"), 0o644)
	file("hostile/bad\xff\xfename", []byte("not utf-8\n"), 0o644)
	file("hostile/-dash", []byte("dash\n"), 0o644)
	file("hostile/"+strings.Repeat("L", 250), []byte("long\n"), 0o644)
	link("hostile/escape", "../../../../etc/passwd")
	link("hostile/abs", "/etc/shadow")
	link("hostile/dirlink", "/")
	file("hostile/suid", []byte("#!/bin/sh\nid\n"), 0o4755)
	t["hostile/fifo"] = &node{typ: tar.TypeFifo, mode: 0o644, mtime: mt}
	file("hostile/hl1", []byte("hard\n"), 0o644)
	t["hostile/hl2"] = &node{typ: tar.TypeLink, target: "hostile/hl1", data: []byte("hard\n"), size: 5, mode: 0o644, uid: 1234, mtime: mt}
	// sparse: 1 MiB of data, then a hole to 64 MiB (made by truncate-size).
	head := bytes.Repeat([]byte{0x5a}, MiB)
	t["hostile/sparse"] = &node{typ: tar.TypeReg, data: head, size: 64 * MiB, mode: 0o600, uid: 1234, mtime: mt}
	dir("big")
	r := rand.New(rand.NewPCG(7, uint64(big)))
	data := make([]byte, big)
	for i := range data {
		data[i] = byte(r.Uint32())
	}
	file("big/random.bin", data, 0o644)
	dir("many")
	for i := range 2500 {
		file(fmt.Sprintf("many/f%05d", i), []byte(fmt.Sprint(i)), 0o644)
	}
	dir("d")
	dir("d/e")
	file("d/e/deep.txt", []byte("deep\n"), 0o644)
	return t
}

// tarOf writes a tree as a tar file (what guestfish's tar-in reads).
func tarOf(t testing.TB, tr tree, path string) {
	t.Helper()
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for _, p := range sortedKeys(tr) {
		n := tr[p]
		h := &tar.Header{Name: p, Typeflag: n.typ, Mode: n.mode, Uid: n.uid, Gid: n.uid, ModTime: n.mtime, Linkname: n.target, Format: tar.FormatPAX}
		if n.typ == tar.TypeDir {
			h.Name += "/"
		}
		if n.typ == tar.TypeReg {
			h.Size = int64(len(n.data))
		}
		if err := tw.WriteHeader(h); err != nil {
			t.Fatal(err)
		}
		if n.typ == tar.TypeReg {
			tw.Write(n.data)
		}
	}
	if err := tw.Close(); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, buf.Bytes(), 0o644); err != nil {
		t.Fatal(err)
	}
}

func sortedKeys(tr tree) []string {
	return slices.Sorted(maps.Keys(tr)) // parents before children
}

// images are the test's disk images, built once per test binary by one
// guestfish run (one appliance launch).
type images struct {
	dir string
	// gpt: GPT, partition 1 ext4 (the hostile tree), partition 2 vfat.
	// os: MBR, LVM VG "debian-vg" (the name of Debian's installer's VG,
	// as a host's own would be) with LVs root (a Linux root: os-release,
	// fstab) and data (mounted at /srv by that fstab).
	// xfs: MBR, xfs (a small tree). btrfs: the whole disk, a subvolume
	// "home". a, b: ext4 on the whole disk, b a changed copy of a.
	// swap: a swap area (listed, never mounted). luks: a LUKS2 volume
	// (made by cryptsetup on the host; never opened).
	gpt, os, xfs, btrfs, a, b, swap, luks string
	ref                                   tree // what gpt's ext4 holds
	refA, refB                            tree
}

var (
	fixtureOnce sync.Once
	fixture     *images
	fixtureErr  string
)

// build makes the images (or fails every test that needs them).
func build(t *testing.T) *images {
	t.Helper()
	qemutest.Need(t, "guestfish", "qemu-img", "qemu-nbd", "cryptsetup")
	fixtureOnce.Do(func() {
		dir, err := os.MkdirTemp("", "nbdmover-files-")
		if err != nil {
			fixtureErr = err.Error()
			return
		}
		im := &images{dir: dir, ref: hostile(32 * MiB)}
		for _, x := range []struct {
			p    *string
			name string
			size int64
		}{{&im.gpt, "gpt", 256}, {&im.os, "os", 160}, {&im.xfs, "xfs", 320}, {&im.btrfs, "btrfs", 160},
			{&im.a, "a", 64}, {&im.b, "b", 64}, {&im.swap, "swap", 16}} {
			*x.p = filepath.Join(dir, x.name+".img")
			f, err := os.Create(*x.p)
			if err == nil {
				err = f.Truncate(x.size * MiB)
				f.Close()
			}
			if err != nil {
				fixtureErr = err.Error()
				return
			}
		}
		tarOf(t, im.ref, filepath.Join(dir, "hostile.tar"))
		im.refA, im.refB = diffTrees()
		tarOf(t, im.refA, filepath.Join(dir, "a.tar"))
		tarOf(t, im.refB, filepath.Join(dir, "b.tar"))
		os.WriteFile(filepath.Join(dir, "os-release"), []byte("NAME=\"Debian GNU/Linux\"\nVERSION_ID=\"12\"\nID=debian\nPRETTY_NAME=\"Debian GNU/Linux 12 (bookworm)\"\n"), 0o644)
		os.WriteFile(filepath.Join(dir, "fstab"), []byte("/dev/debian-vg/root / ext4 errors=remount-ro 0 1\n/dev/debian-vg/data /srv ext4 defaults 0 2\n"), 0o644)
		os.WriteFile(filepath.Join(dir, "small.txt"), []byte("small file\n"), 0o644)
		script := fmt.Sprintf(`run
part-init /dev/sda gpt
part-add /dev/sda p 2048 327679
part-add /dev/sda p 327680 -2048
mkfs ext4 /dev/sda1
set-label /dev/sda1 gptroot
mkfs vfat /dev/sda2
mount /dev/sda1 /
tar-in %[1]s/hostile.tar /
truncate-size /hostile/sparse 67108864
utimens /hostile/sparse %[2]d 0 %[2]d 0
umount /
mount /dev/sda2 /
upload %[1]s/small.txt /README.TXT
umount /
part-disk /dev/sdb mbr
pvcreate /dev/sdb1
vgcreate debian-vg /dev/sdb1
lvcreate root debian-vg 64
lvcreate data debian-vg 32
mkfs ext4 /dev/debian-vg/root
mkfs ext4 /dev/debian-vg/data
mount /dev/debian-vg/root /
mkdir-p /etc
mkdir-p /bin
mkdir-p /usr/bin
mkdir /srv
upload %[1]s/os-release /etc/os-release
upload %[1]s/fstab /etc/fstab
mount /dev/debian-vg/data /srv
upload %[1]s/small.txt /srv/data.txt
umount-all
part-disk /dev/sdc mbr
mkfs xfs /dev/sdc1
mount /dev/sdc1 /
upload %[1]s/small.txt /xfs.txt
umount /
mkfs btrfs /dev/sdd
mount /dev/sdd /
btrfs-subvolume-create /home
upload %[1]s/small.txt /home/user.txt
upload %[1]s/small.txt /top.txt
umount /
mkfs ext4 /dev/sde
mount /dev/sde /
tar-in %[1]s/a.tar /
umount /
mkfs ext4 /dev/sdf
mount /dev/sdf /
tar-in %[1]s/b.tar /
umount /
mkswap /dev/sdg
`, dir, im.ref["hostile/sparse"].mtime.Unix())
		args := []string{"--format=raw"}
		for _, p := range []string{im.gpt, im.os, im.xfs, im.btrfs, im.a, im.b, im.swap} {
			args = append(args, "-a", p)
		}
		cmd := exec.Command("guestfish", args...)
		cmd.Stdin = strings.NewReader(script)
		cmd.Env = append(os.Environ(), "LIBGUESTFS_BACKEND=direct")
		if !kvmWorksForGuestfs() {
			cmd.Env = append(cmd.Env, "LIBGUESTFS_BACKEND_SETTINGS=force_tcg")
		}
		start := time.Now()
		if out, err := cmd.CombinedOutput(); err != nil {
			fixtureErr = fmt.Sprintf("guestfish: %v: %s", err, out)
			return
		}
		im.luks = filepath.Join(dir, "luks.img")
		key := filepath.Join(dir, "luks.key")
		os.WriteFile(key, []byte("not a real secret"), 0o600)
		if err := os.WriteFile(im.luks, nil, 0o644); err == nil {
			err = os.Truncate(im.luks, 32*MiB)
		}
		luks := exec.Command("cryptsetup", "luksFormat", "--batch-mode", "--type", "luks2", "--pbkdf", "pbkdf2",
			"--pbkdf-force-iterations", "1000", im.luks, key)
		if out, err := luks.CombinedOutput(); err != nil {
			fixtureErr = fmt.Sprintf("cryptsetup: %v: %s", err, out)
			return
		}
		t.Logf("images built by guestfish in %v", time.Since(start).Round(time.Millisecond))
		fixture = im
	})
	if fixture == nil {
		t.Fatal(fixtureErr)
	}
	return fixture
}

// kvmWorksForGuestfs: the test images are built under TCG unless
// NBDMOVER_TEST_GUESTFS_KVM says KVM works for the appliance here (on
// nested virtualisation its launch aborts).
func kvmWorksForGuestfs() bool { return os.Getenv("NBDMOVER_TEST_GUESTFS_KVM") != "" }

// diffTrees are two versions of a small tree: b adds, removes, changes
// (size; mtime; content with size and mtime kept; mode; a link's target)
// and turns a file into a directory.
func diffTrees() (tree, tree) {
	mt := time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)
	f := func(data string, mode int64) *node {
		return &node{typ: tar.TypeReg, data: []byte(data), size: int64(len(data)), mode: mode, mtime: mt}
	}
	d := func() *node { return &node{typ: tar.TypeDir, mode: 0o755, mtime: mt} }
	l := func(target string) *node { return &node{typ: tar.TypeSymlink, target: target, mode: 0o777, mtime: mt} }
	a := tree{
		"etc": d(), "etc/same": f("same\n", 0o644), "etc/size": f("short\n", 0o644),
		"etc/mtime": f("mtime\n", 0o644), "etc/content": f("aaaa\n", 0o644), "etc/mode": f("mode\n", 0o644),
		"etc/link": l("one"), "etc/gone": f("gone\n", 0o644), "etc/kind": f("file\n", 0o644),
		"old": d(), "old/x": f("x\n", 0o644),
	}
	b := tree{}
	for k, v := range a {
		c := *v
		b[k] = &c
	}
	delete(b, "etc/gone")
	delete(b, "old")
	delete(b, "old/x")
	b["etc/new"] = f("new\n", 0o644)
	b["etc/size"] = f("much longer\n", 0o644)
	b["etc/mtime"].mtime = mt.Add(time.Hour)
	b["etc/content"] = f("bbbb\n", 0o644)
	b["etc/mode"].mode = 0o600
	b["etc/link"] = l("two")
	b["etc/kind"] = d()
	b["etc/kind/inside"] = f("inside\n", 0o644)
	return a, b
}
