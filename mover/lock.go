package mover

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"syscall"
)

// ErrBusy is matched by the error of a backup or cleanup of a name
// another nbdmover on this host is working on.
var ErrBusy = errors.New("busy")

// lockName takes the host-wide lock of a name's backups
// (<runDir>/locks/<name>.lock, flock). Holding it proves that no other
// nbdmover on this host works on the name, so a backup job or files found
// for it were left by a crashed run. The lock ends with the process.
func lockName(runDir, name string) (*os.File, error) {
	if err := traversableDir(runDir); err != nil {
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

// traversableDir creates dir (and missing parents) with mode 0711, so that
// QEMU, running as another user, can reach the private directories inside
// it without listing them. A directory that exists keeps its mode (a
// shared one such as /tmp must not be made private), and must pass
// CheckDir.
func traversableDir(dir string) error {
	if err := CheckDir(dir); err != nil {
		return err
	}
	if _, err := os.Stat(dir); err == nil {
		return nil
	}
	if err := os.MkdirAll(dir, 0o711); err != nil {
		return err
	}
	return os.Chmod(dir, 0o711) // whatever the umask
}

// CheckDir refuses, as a run or scratch directory, an existing directory
// that others may write (or a file): whoever can write it could replace
// the locks and the backup jobs' sockets and scratch files nbdmover keeps
// there. A directory that does not exist is fine (it is made with mode
// 0711). Errors match ErrInvalid.
func CheckDir(dir string) error {
	var st syscall.Stat_t
	err := syscall.Stat(dir, &st)
	switch {
	case errors.Is(err, syscall.ENOENT):
		return nil
	case err != nil:
		return fmt.Errorf("%s: %w", dir, err)
	case st.Mode&syscall.S_IFMT != syscall.S_IFDIR:
		return invalidf("%s is not a directory", dir)
	case st.Mode&0o022 != 0:
		return invalidf("%s may be written by others (mode %04o): nbdmover keeps its locks and the backup jobs' sockets and scratch files there, "+
			"which another user could replace; give a directory only root can write (one that does not exist is made with mode 0711)",
			dir, st.Mode&0o7777)
	}
	return nil
}
