package mover

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"syscall"
)

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
			return nil, fmt.Errorf("%s: another nbdmover (a backup of it, or a cleanup) is working on it on this host; try again when it is done", name)
		}
		return nil, err
	}
	return f, nil
}

// traversableDir creates dir (and missing parents) with mode 0711, so that
// QEMU, running as another user, can reach the private directories inside
// it without listing them.
func traversableDir(dir string) error {
	if err := os.MkdirAll(dir, 0o711); err != nil {
		return err
	}
	return os.Chmod(dir, 0o711)
}
