package listen

import (
	"errors"
	"net"
	"os"
	"path/filepath"
	"runtime"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// A socket is 0600 from birth; a stale one is replaced, a live one, a
// file or a link in its place is not; closing removes only its own
// socket, not one another process made at the name since; a directory
// others may write is refused.
func TestUnix(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "s.sock")
	l, err := Unix(path)
	if err != nil {
		t.Fatal(err)
	}
	if st, err := os.Lstat(path); err != nil || st.Mode()&os.ModeSocket == 0 || st.Mode().Perm() != 0o600 {
		t.Fatalf("socket %v %v", st, err)
	}
	if l.Addr().String() != path {
		t.Fatalf("address %s", l.Addr())
	}
	if _, err := Unix(path); err == nil {
		t.Fatal("a live socket was taken over")
	}
	// Another process's socket replaces ours at the name: our Close
	// leaves it.
	os.Remove(path)
	other, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	l.Close()
	if _, err := os.Lstat(path); err != nil {
		t.Fatal("Close removed another process's socket")
	}
	other.(*net.UnixListener).SetUnlinkOnClose(false)
	other.Close() // stale now
	l, err = Unix(path)
	if err != nil {
		t.Fatalf("a stale socket: %v", err)
	}
	l.Close()
	if _, err := os.Lstat(path); err == nil {
		t.Fatal("Close left the socket")
	}

	file := filepath.Join(dir, "file")
	os.WriteFile(file, []byte("x"), 0o600)
	link := filepath.Join(dir, "link")
	os.Symlink(file, link)
	for _, p := range []string{file, link} {
		if _, err := Unix(p); !errors.Is(err, ErrInvalid) {
			t.Errorf("%s: %v", p, err)
		}
	}
	if b, _ := os.ReadFile(file); string(b) != "x" {
		t.Fatal("the file was changed")
	}
	open := filepath.Join(dir, "open")
	os.Mkdir(open, 0o777)
	os.Chmod(open, 0o777)
	if _, err := Unix(filepath.Join(open, "s.sock")); !errors.Is(err, ErrInvalid) {
		t.Errorf("a socket in a directory others may write: %v", err)
	}
	if left, _ := filepath.Glob(filepath.Join(dir, ".*")); len(left) != 0 {
		t.Fatalf("temporary directories left: %v", left)
	}
}

// Two processes (here two listeners) starting on one path at once: one
// gets the name, the other an error; never both, never neither's socket
// removed by the other.
func TestUnixRace(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "s.sock")
	for range 200 {
		type result struct {
			l   net.Listener
			err error
		}
		out := make(chan result, 2)
		for range 2 {
			go func() { l, err := Unix(path); out <- result{l, err} }()
		}
		a, b := <-out, <-out
		if (a.err == nil) == (b.err == nil) {
			t.Fatalf("two listeners at once: %v, %v", a.err, b.err)
		}
		l := a.l
		if l == nil {
			l = b.l
		}
		c, err := net.Dial("unix", path)
		if err != nil {
			t.Fatalf("the winner's socket: %v", err)
		}
		c.Close()
		l.Close()
	}
}

// Sweep removes the sockets of dead listeners (and their locks) and old
// bind leftovers, and leaves a live listener's socket and everything
// else.
func TestSweep(t *testing.T) {
	dir := t.TempDir()
	live, err := Unix(filepath.Join(dir, "live.sock"))
	if err != nil {
		t.Fatal(err)
	}
	defer live.Close()
	dead, err := net.Listen("unix", filepath.Join(dir, "dead.sock"))
	if err != nil {
		t.Fatal(err)
	}
	dead.(*net.UnixListener).SetUnlinkOnClose(false)
	dead.Close()
	os.WriteFile(filepath.Join(dir, ".dead.sock.lock"), nil, 0o600)
	os.Mkdir(filepath.Join(dir, ".l123"), 0o700)
	old := time.Now().Add(-time.Hour)
	os.Chtimes(filepath.Join(dir, ".l123"), old, old)
	os.Mkdir(filepath.Join(dir, ".l456"), 0o700) // a bind in progress
	os.WriteFile(filepath.Join(dir, "other"), []byte("x"), 0o600)
	n, err := Sweep(dir)
	if err != nil || n != 2 {
		t.Fatalf("Sweep: %d %v, want 2 removed", n, err)
	}
	for name, want := range map[string]bool{"live.sock": true, ".live.sock.lock": true, "dead.sock": false, ".dead.sock.lock": false,
		".l123": false, ".l456": true, "other": true} {
		if _, err := os.Lstat(filepath.Join(dir, name)); (err == nil) != want {
			t.Errorf("%s: present %v, want %v", name, err == nil, want)
		}
	}
	if c, err := net.Dial("unix", filepath.Join(dir, "live.sock")); err != nil {
		t.Fatalf("the live socket after a sweep: %v", err)
	} else {
		c.Close()
	}
}

// UnixFor gives the socket to its owner (QEMU's user): mode 0600, owned
// by that user, who can connect, and nobody else but root.
func TestUnixFor(t *testing.T) {
	dir := t.TempDir()
	os.Chmod(dir, 0o711)
	os.Chmod(filepath.Dir(dir), 0o711)
	path := filepath.Join(dir, "s.sock")
	l, err := UnixFor(path, &Owner{UID: 65534, GID: 65534})
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil || st.Uid != 65534 || st.Gid != 65534 || st.Mode&0o777 != 0o600 {
		t.Fatalf("socket uid %d gid %d mode %o: %v", st.Uid, st.Gid, st.Mode&0o777, err)
	}
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			c.Close()
		}
	}()
	// The check is the file's permissions against the connecting
	// thread's filesystem ids: set them on one locked thread.
	connectAs := func(id int) error {
		runtime.LockOSThread()
		defer runtime.UnlockOSThread()
		unix.Setfsgid(id)
		unix.Setfsuid(id)
		defer unix.Setfsgid(0)
		defer unix.Setfsuid(0)
		fd, err := unix.Socket(unix.AF_UNIX, unix.SOCK_STREAM, 0)
		if err != nil {
			return err
		}
		defer unix.Close(fd)
		return unix.Connect(fd, &unix.SockaddrUnix{Name: path})
	}
	if err := connectAs(65534); err != nil {
		t.Errorf("its owner cannot connect: %v", err)
	}
	if err := connectAs(1); !errors.Is(err, unix.EACCES) {
		t.Errorf("another user connecting: %v", err)
	}
}
