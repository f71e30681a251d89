// Package safedir opens directories that root writes into (restore
// outputs, run and scratch directories) so that no other user can
// redirect the writes: a symbolic link is followed only where no other
// user could have planted it (in a directory only root, or this process's
// user, can write, or one with the sticky bit whose link is root's), and
// the directory is then used through its descriptor.
package safedir

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"golang.org/x/sys/unix"
)

// ErrUntrusted is matched by the error for a path that goes through a
// symbolic link (or, with Chain, any entry) another user could have
// planted, renamed or changed.
var ErrUntrusted = errors.New("another user could change it")

// Options say how Open resolves a path.
type Options struct {
	// Create makes missing directories, with mode Perm.
	Create bool
	Perm   uint32
	// Chain: every directory on the way, not only the links, must be one
	// no other user could rename or replace (for a directory that is also
	// reached by its path later: by libvirt, or another nbdmover).
	Chain bool
}

// Open opens the directory at path (O_RDONLY|O_DIRECTORY), resolving it
// one component at a time from the root. A symbolic link is followed only
// when no other user could have made or changed it: the directory holding
// it is owned by root or this process's user and writable by no one else,
// or sticky (like /tmp) with the link owned by root or this user.
func Open(path string, o Options) (*os.File, error) {
	abs, err := filepath.Abs(path)
	if err != nil {
		return nil, err
	}
	fd, err := unix.Open("/", unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, err
	}
	comps := strings.Split(strings.Trim(abs, "/"), "/")
	done := "/"
	for links := 0; len(comps) > 0; {
		c := comps[0]
		comps = comps[1:]
		switch c {
		case "", ".":
			continue
		case "..":
			// Only met after a link's target: resolved against what was
			// walked, as the kernel would.
			next, err := unix.Openat(fd, "..", unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
			unix.Close(fd)
			if err != nil {
				return nil, fmt.Errorf("%s: %w", path, err)
			}
			fd, done = next, filepath.Dir(done)
			continue
		}
		var st unix.Stat_t
		err := unix.Fstatat(fd, c, &st, unix.AT_SYMLINK_NOFOLLOW)
		if errors.Is(err, unix.ENOENT) && o.Create {
			if err = unix.Mkdirat(fd, c, o.Perm); err == nil || errors.Is(err, unix.EEXIST) {
				err = unix.Fstatat(fd, c, &st, unix.AT_SYMLINK_NOFOLLOW)
			}
		}
		if err != nil {
			unix.Close(fd)
			return nil, fmt.Errorf("%s: %w", filepath.Join(done, c), err)
		}
		if o.Chain || st.Mode&unix.S_IFMT == unix.S_IFLNK {
			if err := trusted(fd, st); err != nil {
				unix.Close(fd)
				return nil, fmt.Errorf("%s: %w", filepath.Join(done, c), err)
			}
		}
		if st.Mode&unix.S_IFMT == unix.S_IFLNK {
			if links++; links > 40 {
				unix.Close(fd)
				return nil, fmt.Errorf("%s: %w", path, unix.ELOOP)
			}
			target, err := readlinkat(fd, c)
			if err != nil {
				unix.Close(fd)
				return nil, fmt.Errorf("%s: %w", filepath.Join(done, c), err)
			}
			comps = append(strings.Split(target, "/"), comps...)
			if strings.HasPrefix(target, "/") {
				unix.Close(fd)
				if fd, err = unix.Open("/", unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0); err != nil {
					return nil, err
				}
				done = "/"
			}
			continue
		}
		next, err := unix.Openat(fd, c, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
		unix.Close(fd)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", filepath.Join(done, c), err)
		}
		fd, done = next, filepath.Join(done, c)
	}
	return os.NewFile(uintptr(fd), abs), nil
}

// trusted says whether the entry (whose stat is st) in the directory dfd
// is one no other user could have made, renamed or changed.
func trusted(dfd int, st unix.Stat_t) error {
	var dir unix.Stat_t
	if err := unix.Fstat(dfd, &dir); err != nil {
		return err
	}
	me := uint32(os.Geteuid())
	ours := func(uid uint32) bool { return uid == 0 || uid == me }
	switch {
	case !ours(dir.Uid):
		return fmt.Errorf("%w (its directory belongs to user %d)", ErrUntrusted, dir.Uid)
	case dir.Mode&0o022 == 0:
		return nil
	case dir.Mode&unix.S_ISVTX != 0 && ours(st.Uid):
		return nil // sticky: only its owner (ours) may change the link
	}
	return fmt.Errorf("%w (its directory may be written by others, mode %04o)", ErrUntrusted, dir.Mode&0o7777)
}

func readlinkat(dfd int, name string) (string, error) {
	buf := make([]byte, 4096)
	n, err := unix.Readlinkat(dfd, name, buf)
	if err != nil {
		return "", err
	}
	if n == len(buf) {
		return "", unix.ENAMETOOLONG
	}
	return string(buf[:n]), nil
}

// Private checks that the directory f was opened as is safe to keep
// root's files in: owned by root or this process's user, and writable by
// no one else. Its parents need no check: Open followed no link another
// user could change, and the directory is used through f.
func Private(f *os.File) error {
	var st unix.Stat_t
	if err := unix.Fstat(int(f.Fd()), &st); err != nil {
		return err
	}
	me := uint32(os.Geteuid())
	if st.Uid != 0 && st.Uid != me {
		return fmt.Errorf("%s belongs to user %d: another user could replace what nbdmover keeps there", f.Name(), st.Uid)
	}
	if st.Mode&0o022 != 0 {
		return fmt.Errorf("%s may be written by others (mode %04o): another user could replace what nbdmover keeps there", f.Name(), st.Mode&0o7777)
	}
	return nil
}
