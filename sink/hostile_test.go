package sink_test

import (
	"errors"
	"os"
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
