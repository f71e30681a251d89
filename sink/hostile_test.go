package sink_test

import (
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/nbdmover/nbdmover/internal/sentinel"
	"github.com/nbdmover/nbdmover/sink"
)

// TestLocalNeverLeavesRoot plants what a writer of the repository
// directory (an NFS export others mount) can plant, and checks that no
// operation of the local store creates, changes, reads or deletes anything
// outside the root, that none hangs, and that each refusal names the
// object and matches sink.ErrDamaged. With and without openat2.
func TestLocalNeverLeavesRoot(t *testing.T) {
	t.Run("openat2", testNeverLeavesRoot)
	t.Run("walk", func(t *testing.T) {
		defer sink.WithoutOpenat2()()
		testNeverLeavesRoot(t)
	})
}

func testNeverLeavesRoot(t *testing.T) {
	ctx := t.Context()
	outside, check := sentinel.New(t)
	defer check()
	dir := t.TempDir()
	s, _ := sink.NewLocal(dir)
	put := func(key, data string) {
		t.Helper()
		if err := s.Put(ctx, key, []byte(data)); err != nil {
			t.Fatal(err)
		}
	}
	damaged := func(what string, err error, name string) {
		t.Helper()
		if !errors.Is(err, sink.ErrDamaged) || !strings.Contains(err.Error(), name) {
			t.Errorf("%s: got %v, want a damaged-object error naming %s", what, err, name)
		}
	}
	put("chunks/00/good", "good")
	put("state/quarantine/chunks/cd/x", "q")

	// A fan-out directory replaced by a link to a host directory.
	link := func(target, at string) {
		t.Helper()
		os.MkdirAll(filepath.Dir(filepath.Join(dir, at)), 0o700)
		os.RemoveAll(filepath.Join(dir, at))
		if err := os.Symlink(target, filepath.Join(dir, at)); err != nil {
			t.Fatal(err)
		}
	}
	link(outside, "chunks/ab")
	link(outside, "state/quarantine/chunks/cd")
	link(outside, "locks")
	for _, key := range []string{"chunks/ab/victim", "chunks/ab/new", "state/quarantine/chunks/cd/ab", "locks/shared-0123456789abcdef"} {
		damaged("put "+key, s.Put(ctx, key, []byte("planted")), strings.Join(strings.Split(key, "/")[:len(strings.Split(key, "/"))-1], "/"))
		damaged("create "+key, s.Create(ctx, key, []byte("planted")), "")
		damaged("put deferred "+key, s.PutDeferred(ctx, key, []byte("planted")), "")
		_, err := s.Get(ctx, key, nil, 1<<20)
		damaged("get "+key, err, key[:strings.LastIndex(key, "/")])
		_, err = s.Stat(ctx, key)
		damaged("stat "+key, err, "")
		if err := s.Delete(ctx, key); err == nil && key == "chunks/ab/victim" {
			t.Errorf("delete %s through a link: no error", key)
		}
	}
	if err := sink.DeleteMany(ctx, s, []string{"chunks/ab/victim", "chunks/ab/ab", "locks/victim"}, 2, nil); !errors.Is(err, sink.ErrDamaged) {
		t.Errorf("DeleteMany through a link: %v", err)
	}
	var listed []string
	if err := s.List(ctx, "", func(o sink.ObjectInfo) error { listed = append(listed, o.Key); return nil }); err != nil {
		t.Fatal(err)
	}
	for _, prefix := range []string{"chunks/ab/", "locks/", "state/quarantine/chunks/cd/"} {
		err := s.List(ctx, prefix, func(o sink.ObjectInfo) error { listed = append(listed, o.Key); return nil })
		damaged("list "+prefix, err, strings.TrimSuffix(prefix, "/")+" is a symbolic link")
	}
	if strings.Join(listed, " ") != "chunks/00/good" {
		t.Errorf("listed %v: a listing went through a link", listed)
	}
	if n, err := s.RemoveTemp(ctx, time.Hour); err != nil || n != 0 {
		t.Errorf("RemoveTemp removed %d files (%v): it went through a link", n, err)
	}

	// Objects that are links to host files, FIFOs, devices, oversized.
	os.MkdirAll(filepath.Join(dir, "manifests/web1"), 0o700)
	os.Symlink(filepath.Join(outside, "victim"), filepath.Join(dir, "manifests/web1/link"))
	if err := syscall.Mkfifo(filepath.Join(dir, "manifests/web1/fifo"), 0o600); err != nil {
		t.Fatal(err)
	}
	objects := []string{"manifests/web1/link", "manifests/web1/fifo"}
	if syscall.Mknod(filepath.Join(dir, "manifests/web1/zero"), syscall.S_IFCHR|0o600, 1<<8|5) == nil { // /dev/zero, as root
		objects = append(objects, "manifests/web1/zero")
	}
	for _, key := range objects {
		done := make(chan error, 1)
		go func() { _, err := s.Get(ctx, key, nil, 1<<20); done <- err }()
		select {
		case err := <-done:
			damaged("get "+key, err, key)
		case <-time.After(5 * time.Second):
			t.Fatalf("get %s hangs", key)
		}
		_, err := s.Stat(ctx, key)
		damaged("stat "+key, err, key)
	}
	// A sparse file of 768 MiB costs its planter nothing: it is refused by
	// its size, never read.
	big := filepath.Join(dir, "manifests/web1/big")
	if err := os.WriteFile(big, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	os.Truncate(big, 768<<20)
	_, err := s.Get(ctx, "manifests/web1/big", nil, 1<<20)
	damaged("get an oversized object", err, "805306368 bytes")
	// Putting over a planted link replaces the link, never its target;
	// deleting one removes the link.
	put("manifests/web1/link", "mine")
	if got, err := s.Get(ctx, "manifests/web1/link", nil, 1<<20); err != nil || string(got) != "mine" {
		t.Fatalf("after a put over a link: %q %v", got, err)
	}
	os.Symlink(filepath.Join(outside, "ab"), filepath.Join(dir, "manifests/web1/link2"))
	if err := s.Delete(ctx, "manifests/web1/link2"); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Lstat(filepath.Join(dir, "manifests/web1/link2")); !os.IsNotExist(err) {
		t.Fatalf("the planted link is still there: %v", err)
	}
	var strays []string
	if err := s.Strays(ctx, "", func(key, what string) error { strays = append(strays, key+" "+what); return nil }); err != nil {
		t.Fatal(err)
	}
	want := []string{"chunks/ab a symbolic link", "locks a symbolic link", "manifests/web1/fifo a FIFO"}
	if len(objects) == 3 {
		want = append(want, "manifests/web1/zero a character device")
	}
	want = append(want, "state/quarantine/chunks/cd a symbolic link")
	if strings.Join(strays, ", ") != strings.Join(want, ", ") {
		t.Errorf("strays: %v, want %v", strays, want)
	}
}

// A directory tree thousands deep (a few thousand mkdirs for whoever
// writes the repository) is not descended past the deepest level the
// repository has: a walk keeps a descriptor and a key per level. The
// deep directory, and one whose name no key can have, are strays.
func TestLocalDeepTree(t *testing.T) {
	dir := t.TempDir()
	s, _ := sink.NewLocal(dir)
	ctx := t.Context()
	if err := s.Put(ctx, "chunks/00/good", []byte("x")); err != nil {
		t.Fatal(err)
	}
	deep := filepath.Join(dir, "chunks")
	name := strings.Repeat("d", 200)
	for range 15 { // as deep as a path name may be
		deep = filepath.Join(deep, name)
		if err := os.Mkdir(deep, 0o700); err != nil {
			t.Fatal(err)
		}
	}
	os.Mkdir(filepath.Join(dir, "chunks", "no spaces allowed"), 0o700)
	var keys, strays []string
	if err := s.List(ctx, "", func(o sink.ObjectInfo) error { keys = append(keys, o.Key); return nil }); err != nil {
		t.Fatal(err)
	}
	if err := s.Strays(ctx, "", func(key, what string) error { strays = append(strays, key); return nil }); err != nil {
		t.Fatal(err)
	}
	if strings.Join(keys, " ") != "chunks/00/good" || len(strays) != 2 || strings.Count(strays[0], "/") != 8 || strays[1] != "chunks/no spaces allowed" {
		t.Fatalf("listed %v, %d strays", keys, len(strays))
	}
}

// A file someone holds a write lease on would make every open of it wait
// for the lease to break (45 s, and the holder takes it again): a read
// refuses it at once.
func TestLocalLeasedObject(t *testing.T) {
	py, err := exec.LookPath("/usr/bin/python3")
	if err != nil {
		t.Skip("no python3 to hold a lease")
	}
	dir := t.TempDir()
	s, _ := sink.NewLocal(dir)
	ctx := t.Context()
	if err := s.Put(ctx, "locks/shared-0123456789abcdef", []byte("x")); err != nil {
		t.Fatal(err)
	}
	holder := exec.Command(py, "-c", `import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_WRONLY)
fcntl.fcntl(fd, 1024, fcntl.F_WRLCK)  # F_SETLEASE
print("held", flush=True)
time.sleep(60)`, filepath.Join(dir, "locks/shared-0123456789abcdef"))
	out, _ := holder.StdoutPipe()
	holder.Stderr = os.Stderr
	if err := holder.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { holder.Process.Kill(); holder.Wait() }()
	if b := make([]byte, 5); func() bool { n, _ := out.Read(b); return string(b[:n]) != "held\n" }() {
		t.Skip("the lease could not be taken here")
	}
	start := time.Now()
	_, err = s.Get(ctx, "locks/shared-0123456789abcdef", nil, 1<<20)
	if !errors.Is(err, sink.ErrDamaged) || !strings.Contains(err.Error(), "leased") || time.Since(start) > 5*time.Second {
		t.Fatalf("get of a leased object: %v after %v", err, time.Since(start))
	}
}
