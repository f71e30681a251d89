package listen

import (
	"errors"
	"net"
	"os"
	"path/filepath"
	"testing"
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
