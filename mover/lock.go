package mover

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"syscall"

	"github.com/nbdmover/nbdmover/internal/safedir"
)

// ErrBusy is matched by the error of a backup or cleanup of a name
// another nbdmover on this host is working on.
var ErrBusy = errors.New("busy")

// LockName takes the host-wide lock of a name's backups
// (<runDir>/locks/<name>.lock, flock). Holding it proves that no other
// nbdmover on this host works on the name, so a backup job or files found
// for it were left by a crashed run. The lock ends with the process.
func LockName(runDir, name string) (*os.File, error) {
	if err := TraversableDir(runDir); err != nil {
		return nil, err
	}
	dir := filepath.Join(runDir, "locks")
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, err
	}
	f, err := os.OpenFile(filepath.Join(dir, name+".lock"), os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, err
	}
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); err != nil {
		f.Close()
		if errors.Is(err, syscall.EWOULDBLOCK) {
			return nil, fmt.Errorf("%s: %w: another nbdmover (a backup of it, or a cleanup) is working on it on this host; try again when it is done", name, ErrBusy)
		}
		return nil, err
	}
	return f, nil
}

// TraversableDir creates dir (and missing parents) with mode 0711, so that
// QEMU, running as another user, can reach the private directories inside
// it without listing them. A directory that exists keeps its mode (a
// shared one such as /tmp must not be made private), and must pass
// CheckDir.
func TraversableDir(dir string) error {
	if err := CheckDir(dir); err != nil {
		return err
	}
	f, err := safedir.Open(dir, safedir.Options{Chain: true})
	if err == nil {
		return f.Close() // there, and checked
	}
	if f, err = safedir.Open(dir, safedir.Options{Create: true, Perm: 0o711, Chain: true}); err != nil {
		return Invalidf("%v", err)
	}
	defer f.Close()
	return f.Chmod(0o711) // whatever the umask
}

// CheckDir refuses, as a run or scratch directory, a directory that
// another user could replace what nbdmover keeps in: one owned by another
// user or writable by others, or one reached through a directory (or a
// symbolic link) another user could rename or change. Backups, libvirt
// and cleanup reach what is inside by its path. A directory that does
// not exist yet is fine (it is made with mode 0711, through trusted
// directories). Errors match ErrInvalid.
func CheckDir(dir string) error {
	f, err := safedir.Open(dir, safedir.Options{Chain: true})
	switch {
	case errors.Is(err, syscall.ENOENT):
		return nil
	case errors.Is(err, safedir.ErrUntrusted), errors.Is(err, syscall.ENOTDIR):
		return Invalidf("%v: nbdmover keeps its locks and the backup jobs' sockets and scratch files there; give a directory only root can change", err)
	case err != nil:
		return fmt.Errorf("%s: %w", dir, err)
	}
	defer f.Close()
	if err := safedir.Private(f); err != nil {
		return Invalidf("%v; give a directory only root can write (one that does not exist is made with mode 0711)", err)
	}
	return nil
}
