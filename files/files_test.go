package files_test

import (
	"archive/tar"
	"bytes"
	"errors"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/nbdmover/nbdmover/files"
	"github.com/nbdmover/nbdmover/internal/backuptest"
	"github.com/nbdmover/nbdmover/internal/qemutest"
	"github.com/nbdmover/nbdmover/mover"
	"github.com/nbdmover/nbdmover/mover/domain"
	"github.com/nbdmover/nbdmover/repo"
)

// open opens a session on a backup, failing the test on error.
func open(t *testing.T, ro repo.Options, dom, id string) *files.Session {
	t.Helper()
	s, err := files.Open(t.Context(), files.Options{Repo: ro, Domain: dom, Backup: id, RunDir: t.TempDir(), Log: backuptest.Log(t)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(s.Close)
	t.Logf("appliance: %s, launched in %v", s.Accel, s.Launch.Round(time.Millisecond))
	return s
}

// use mounts fs for the rest of the test's calls.
func use(t *testing.T, s *files.Session, fs string) {
	t.Helper()
	release, err := s.Use(fs)
	if err != nil {
		t.Fatal(err)
	}
	release()
}

func read(t *testing.T, s *files.Session, p string) []byte {
	t.Helper()
	var b bytes.Buffer
	if _, err := s.Read(t.Context(), p, &b); err != nil {
		t.Fatal(err)
	}
	return b.Bytes()
}

// TestFilesDomain backs up a running domain whose four disks hold GPT,
// MBR, LVM (a Linux root with /srv on another LV, in a VG named like a
// host's), ext4, vfat, xfs and btrfs with a subvolume, then reads it all
// through one appliance: the guest as it runs (inspection), each
// filesystem by name, the hostile tree listed, paged, read, extracted and
// streamed as tar, every byte compared with the source.
func TestFilesDomain(t *testing.T) {
	im := build(t)
	qemutest.NeedLibvirt(t)
	dom := qemutest.NewDomain(t, false,
		qemutest.DiskSpec{Dev: "vda", Format: "qcow2", From: im.gpt},
		qemutest.DiskSpec{Dev: "vdb", Format: "raw", From: im.os},
		qemutest.DiskSpec{Dev: "vdc", Format: "qcow2", From: im.xfs},
		qemutest.DiskSpec{Dev: "vdd", Format: "qcow2", From: im.btrfs},
		qemutest.DiskSpec{Dev: "vde", Format: "raw", From: im.swap},
		qemutest.DiskSpec{Dev: "vdf", Format: "raw", From: im.luks})
	ro := repo.Options{Location: filepath.Join(t.TempDir(), "repo")}
	res, err := mover.Backup(t.Context(), domain.New(domain.Options{Name: dom.Name, ScratchDir: filepath.Join(t.TempDir(), "scratch")}),
		mover.Options{Repo: ro, Init: true, Log: backuptest.Log(t)})
	if err != nil {
		t.Fatal(err)
	}
	s := open(t, ro, dom.Name, res.ID)

	// The guest as it runs: its root LV at /, the data LV at /srv.
	use(t, s, "")
	if s.OS != "Debian GNU/Linux 12 (bookworm)" {
		t.Errorf("OS %q", s.OS)
	}
	want := map[string]string{"vda1": "ext4", "vda2": "vfat", "debian-vg/root": "ext4", "debian-vg/data": "ext4",
		"vdc1": "xfs", "vdd": "btrfs", "vdd:/home": "btrfs", "vde": "swap", "vdf": "crypto_LUKS"}
	got := map[string]string{}
	for _, f := range s.Filesystems() {
		got[f.Name] = f.Type
		switch f.Name {
		case "debian-vg/root", "debian-vg/data":
			if !f.Mounted || f.Mountpoint != map[string]string{"debian-vg/root": "/", "debian-vg/data": "/srv"}[f.Name] {
				t.Errorf("%s: mounted %v at %q", f.Name, f.Mounted, f.Mountpoint)
			}
		case "vda1":
			if f.Label != "gptroot" || f.Size == 0 {
				t.Errorf("vda1: %+v", f)
			}
		}
	}
	for n, typ := range want {
		if got[n] != typ {
			t.Errorf("filesystem %s: type %q, want %q (all: %v)", n, got[n], typ, got)
		}
	}
	if b := read(t, s, "/srv/data.txt"); string(b) != "small file\n" {
		t.Errorf("/srv/data.txt: %q", b)
	}
	if es, _, err := s.List(t.Context(), "/etc", "", 0); err != nil || len(es) != 2 {
		t.Errorf("/etc: %v %v", es, err)
	}

	// Each other filesystem, by name, in the same appliance.
	for fs, p := range map[string]string{"vda2": "/README.TXT", "vdc1": "/xfs.txt", "vdd:/home": "/user.txt", "vdd": "/top.txt"} {
		use(t, s, fs)
		if b := read(t, s, p); string(b) != "small file\n" {
			t.Errorf("%s %s: %q", fs, p, b)
		}
	}
	if _, err := s.Use("vdz9"); !errors.Is(err, files.ErrInvalid) {
		t.Errorf("Use(vdz9): %v, want ErrInvalid", err)
	}
	// A filesystem it cannot read says why.
	if _, err := s.Use("vde"); !errors.Is(err, files.ErrNoFilesystem) || !strings.Contains(err.Error(), "vde: swap") {
		t.Errorf("Use(vde), a swap area: %v", err)
	}
	if _, err := s.Use("vdf"); !errors.Is(err, files.ErrNoFilesystem) || !strings.Contains(err.Error(), "vdf: encrypted filesystem, not opened") {
		t.Errorf("Use(vdf), a LUKS volume: %v", err)
	}

	use(t, s, "vda1")
	checkHostile(t, s, im.ref)
}

// checkHostile lists, pages, reads, extracts and tars the hostile tree.
func checkHostile(t *testing.T, s *files.Session, ref tree) {
	ctx := t.Context()
	// Listing: every name, types, sizes, link targets as stored.
	es, more, err := s.List(ctx, "/hostile", "", 0)
	if err != nil || more {
		t.Fatal(err, more)
	}
	var names []string
	for _, e := range es {
		names = append(names, e.Name)
		n := ref["hostile/"+e.Name]
		if n == nil {
			t.Errorf("unexpected %q", e.Name)
			continue
		}
		if n.typ == tar.TypeSymlink && e.Target != n.target {
			t.Errorf("%q -> %q, want %q", e.Name, e.Target, n.target)
		}
		if (n.typ == tar.TypeReg || n.typ == tar.TypeLink) && e.Size != n.size {
			t.Errorf("%q: size %d, want %d", e.Name, e.Size, n.size)
		}
		if e.Name == "bad\xff\xfename" && string(e.NameBase64) != e.Name {
			t.Errorf("non-UTF-8 name: NameBase64 %q", e.NameBase64)
		}
	}
	var want []string
	for p := range ref {
		if rest, ok := strings.CutPrefix(p, "hostile/"); ok {
			want = append(want, rest)
		}
	}
	slices.Sort(want)
	if !slices.Equal(names, want) {
		t.Errorf("/hostile lists %q, want %q", names, want)
	}

	// Paging a directory of 2,500 files.
	var all []string
	for after := ""; ; {
		page, more, err := s.List(ctx, "/many", after, 1000)
		if err != nil {
			t.Fatal(err)
		}
		if len(page) > 1000 {
			t.Fatalf("page of %d", len(page))
		}
		for _, e := range page {
			all = append(all, e.Name)
		}
		if !more {
			break
		}
		after = page[len(page)-1].Name
	}
	if len(all) != 2500 || !slices.IsSorted(all) || all[0] != "f00000" || all[2499] != "f02499" {
		t.Errorf("paged /many: %d names", len(all))
	}

	// Unknown path: ErrNotFound naming it.
	if _, err := s.Stat("/hostile/nope"); !errors.Is(err, files.ErrNotFound) || !strings.Contains(err.Error(), "/hostile/nope") {
		t.Errorf("Stat of a missing path: %v", err)
	}
	if _, err := s.Read(ctx, "/hostile", io.Discard); err == nil {
		t.Error("Read of a directory: no error")
	}

	// Reading: the large file, bit-exact.
	if b := read(t, s, "/big/random.bin"); !bytes.Equal(b, ref["big/random.bin"].data) {
		t.Errorf("/big/random.bin: %d bytes differ from the source", len(b))
	}

	// Extraction beside a sentinel directory: nothing lands outside out.
	parent := t.TempDir()
	out, sentinel := filepath.Join(parent, "out"), filepath.Join(parent, "sentinel")
	os.Mkdir(sentinel, 0o755)
	r, err := s.Extract(ctx, []string{"/hostile", "/big", "/etc/nginx/nginx.conf", "/d/e"}, out)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("extracted: %+v", r)
	if len(r.Skipped) != 1 || !strings.Contains(r.Skipped[0], "fifo") || r.Hardlinks != 1 {
		t.Errorf("skipped %q, hard links %d", r.Skipped, r.Hardlinks)
	}
	checkOutside(t, parent, sentinel)
	for p, n := range ref {
		if !(strings.HasPrefix(p, "hostile/") || strings.HasPrefix(p, "big") || p == "etc/nginx/nginx.conf" || p == "d/e/deep.txt") {
			continue
		}
		checkExtracted(t, filepath.Join(out, p), p, n)
	}
	a, _ := os.Stat(filepath.Join(out, "hostile/hl1"))
	b, _ := os.Stat(filepath.Join(out, "hostile/hl2"))
	if !os.SameFile(a, b) {
		t.Error("hl1 and hl2 are not one file")
	}
	var st syscall.Stat_t
	if err := syscall.Stat(filepath.Join(out, "hostile/sparse"), &st); err != nil || st.Blocks*512 > 8*MiB {
		t.Errorf("sparse file: %d bytes allocated of %d (%v)", st.Blocks*512, st.Size, err)
	}
	if _, err := os.Lstat(filepath.Join(out, "etc/hosts")); err == nil {
		t.Error("/etc/hosts extracted though not asked for")
	}

	// An existing file is never overwritten.
	if _, err := s.Extract(ctx, []string{"/etc/nginx/nginx.conf"}, out); !errors.Is(err, os.ErrExist) {
		t.Errorf("extracting over an existing file: %v", err)
	}
	// A link in the output (extracted from the guest, or put there by
	// someone else) is never followed out of it.
	out2 := filepath.Join(parent, "out2")
	if _, err := s.Extract(ctx, []string{"/hostile/dirlink", "/hostile/dirlink/etc/hosts"}, out2); err == nil {
		t.Error("extraction through the guest's link to / did not fail")
	}
	out3 := filepath.Join(parent, "out3")
	os.Mkdir(out3, 0o700)
	os.Symlink("../sentinel", filepath.Join(out3, "etc"))
	if _, err := s.Extract(ctx, []string{"/etc/hosts"}, out3); err == nil {
		t.Error("extraction through a planted link did not fail")
	}
	checkOutside(t, parent, sentinel, "out2", "out3")

	// The tar stream: the same tree, setuid kept (the reader decides).
	var buf bytes.Buffer
	if _, err := s.Tar(ctx, []string{"/hostile"}, &buf); err != nil {
		t.Fatal(err)
	}
	tr := tar.NewReader(&buf)
	seen := 0
	for {
		h, err := tr.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		name := strings.TrimSuffix(h.Name, "/")
		n := ref[name]
		if n == nil {
			t.Errorf("tar: unexpected %q", h.Name)
			continue
		}
		seen++
		data, _ := io.ReadAll(tr)
		switch h.Typeflag {
		case tar.TypeReg:
			if !bytes.Equal(data, full(n)) || h.Mode&0o7777 != n.mode || h.Uid != n.uid {
				t.Errorf("tar %q: %d bytes, mode %o uid %d", name, len(data), h.Mode, h.Uid)
			}
		case tar.TypeSymlink:
			if h.Linkname != n.target {
				t.Errorf("tar %q -> %q", name, h.Linkname)
			}
		case tar.TypeLink: // either may come first (the directory's order)
			if !(name == "hostile/hl2" && h.Linkname == "hostile/hl1" || name == "hostile/hl1" && h.Linkname == "hostile/hl2") {
				t.Errorf("tar hard link %q -> %q", name, h.Linkname)
			}
		}
	}
	if seen != len(want) { // the fifo is skipped, /hostile itself counted
		t.Errorf("tar held %d of %d entries", seen, len(want))
	}
}

// full is a file's whole content (a sparse file's hole as zeros).
func full(n *node) []byte {
	b := make([]byte, n.size)
	copy(b, n.data)
	return b
}

// checkExtracted compares an extracted entry with its source.
func checkExtracted(t *testing.T, path, name string, n *node) {
	t.Helper()
	fi, err := os.Lstat(path)
	if n.typ == tar.TypeFifo {
		if err == nil {
			t.Errorf("%q: a FIFO was made", name)
		}
		return
	}
	if err != nil {
		t.Errorf("%q: %v", name, err)
		return
	}
	switch n.typ {
	case tar.TypeReg, tar.TypeLink:
		b, _ := os.ReadFile(path)
		if !bytes.Equal(b, full(n)) {
			t.Errorf("%q: content differs (%d bytes, want %d)", name, len(b), n.size)
		}
		if want := os.FileMode(n.mode & 0o777); fi.Mode() != want { // setuid dropped
			t.Errorf("%q: mode %v, want %v", name, fi.Mode(), want)
		}
		if !fi.ModTime().Equal(n.mtime) {
			t.Errorf("%q: mtime %v, want %v", name, fi.ModTime(), n.mtime)
		}
		if st := fi.Sys().(*syscall.Stat_t); os.Geteuid() == 0 && int(st.Uid) != n.uid {
			t.Errorf("%q: uid %d, want %d", name, st.Uid, n.uid)
		}
	case tar.TypeSymlink:
		if l, err := os.Readlink(path); err != nil || l != n.target {
			t.Errorf("%q: link %q (%v), want %q", name, l, err, n.target)
		}
	case tar.TypeDir:
		if !fi.IsDir() || !fi.ModTime().Equal(n.mtime) {
			t.Errorf("%q: dir %v, mtime %v", name, fi.IsDir(), fi.ModTime())
		}
	}
}

// checkOutside checks that parent holds only out, the sentinel and the
// other names given, and that the sentinel is still empty.
func checkOutside(t *testing.T, parent, sentinel string, also ...string) {
	t.Helper()
	des, _ := os.ReadDir(parent)
	for _, d := range des {
		if d.Name() != "out" && d.Name() != "sentinel" && !slices.Contains(also, d.Name()) {
			t.Errorf("extraction wrote %s beside its directory", d.Name())
		}
	}
	if des, _ := os.ReadDir(sentinel); len(des) != 0 {
		t.Errorf("extraction wrote into the sentinel directory: %v", des)
	}
}

// TestFilesDiff backs up two versions of a tree through --nbd's source and
// compares them: additions, removals, a file turned into a directory (and
// what is beneath it), changed size, mtime, mode and link target, and
// with content a change that keeps size and mtime.
func TestFilesDiff(t *testing.T) {
	im := build(t)
	ro := repo.Options{Location: filepath.Join(t.TempDir(), "repo")}
	idA, idB := backuptest.RawBackup(t, ro, im.a, "web"), backuptest.RawBackup(t, ro, im.b, "web")
	// Both appliances boot at once, as files diff does.
	var a *files.Session
	var aerr error
	done := make(chan struct{})
	go func() {
		defer close(done)
		a, aerr = files.Open(t.Context(), files.Options{Repo: ro, Domain: "web", Backup: idA, RunDir: t.TempDir(), Log: backuptest.Log(t)})
	}()
	b := open(t, ro, "web", idB)
	<-done
	if aerr != nil {
		t.Fatal(aerr)
	}
	t.Cleanup(a.Close)
	use(t, a, "")
	use(t, b, "")
	diff := func(content bool) []string {
		var out []string
		err := files.Diff(t.Context(), a, b, "/", content, func(c files.Change) error {
			out = append(out, c.Op+" "+c.Path+" "+strings.Join(c.What, ","))
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
		return out
	}
	want := []string{
		"removed /etc/gone ",
		"changed /etc/kind type",
		"added /etc/kind/inside ",
		"changed /etc/link target",
		"changed /etc/mode mode",
		"changed /etc/mtime mtime",
		"added /etc/new ",
		"changed /etc/size size",
		"removed /old ",
		"removed /old/x ",
	}
	if got := diff(false); !slices.Equal(got, want) {
		t.Errorf("diff:\n%s\nwant:\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
	}
	want = slices.Insert(want, 0, "changed /etc/content content")
	if got := diff(true); !slices.Equal(got, want) {
		t.Errorf("diff with content:\n%s\nwant:\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
	}
	// A path in one backup only is all added (or removed); in neither, not found.
	var got []string
	if err := files.Diff(t.Context(), a, b, "/old", false, func(c files.Change) error { got = append(got, c.Op+" "+c.Path); return nil }); err != nil ||
		!slices.Equal(got, []string{"removed /old", "removed /old/x"}) {
		t.Errorf("diff /old: %q %v", got, err)
	}
	if err := files.Diff(t.Context(), a, b, "/nowhere", false, func(files.Change) error { return nil }); !errors.Is(err, files.ErrNotFound) {
		t.Errorf("diff /nowhere: %v", err)
	}
}
