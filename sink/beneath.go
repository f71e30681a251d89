package sink

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync/atomic"

	"golang.org/x/sys/unix"
)

// The local store never leaves its root. A repository directory may be
// writable by others (an NFS export every hypervisor mounts), and nbdmover
// runs as root: a symbolic link planted as chunks/ab or state/quarantine
// must not make a backup, verify or gc write, read or delete anything
// outside the repository. So every path beneath the root is resolved from
// a descriptor of the root without following a symbolic link in any
// component (openat2 with RESOLVE_BENEATH|RESOLVE_NO_SYMLINKS, or, where
// the kernel lacks openat2, a walk of O_NOFOLLOW|O_DIRECTORY opens), and
// files are then created, renamed, linked, unlinked and synced relative to
// the descriptor of their directory. The root's own path is the
// operator's and is resolved as given.

// noOpenat2 is set when the kernel has no openat2 (Linux before 5.6, or a
// seccomp filter that hides it); tests set it to exercise the walk.
var noOpenat2 atomic.Bool

const resolveFlags = unix.RESOLVE_BENEATH | unix.RESOLVE_NO_SYMLINKS | unix.RESOLVE_NO_MAGICLINKS

// openRoot opens the store's root directory (O_PATH); with create, it is
// made (0700) when missing, and its missing parents 0711: a parent such as
// /var/lib/nbdmover also holds the backups' scratch directories, which
// QEMU (another user) must traverse.
func (l *Local) openRoot(create bool) (int, error) {
	fd, err := unix.Open(l.root, unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if errors.Is(err, unix.ENOENT) && create {
		if err = os.MkdirAll(filepath.Dir(l.root), 0o711); err == nil {
			if err = os.Mkdir(l.root, 0o700); errors.Is(err, os.ErrExist) {
				err = nil // made meanwhile
			}
		}
		if err == nil {
			fd, err = unix.Open(l.root, unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
		}
	}
	if err != nil {
		return -1, &os.PathError{Op: "open", Path: l.root, Err: err}
	}
	return fd, nil
}

// openBeneath opens rel (a valid key or key prefix without the trailing
// slash) beneath the directory root with flags, following no symbolic
// link. A symbolic link or a non-directory in a directory's place is a
// *DamagedError naming it.
func (l *Local) openBeneath(root int, rel string, flags int) (int, error) {
	flags |= unix.O_CLOEXEC | unix.O_NOFOLLOW
	if !noOpenat2.Load() {
		fd, err := unix.Openat2(root, rel, &unix.OpenHow{Flags: uint64(flags), Resolve: resolveFlags})
		if err == nil {
			return fd, nil
		}
		if !errors.Is(err, unix.ENOSYS) && !errors.Is(err, unix.EPERM) {
			return -1, l.resolveError(root, rel, err)
		}
		noOpenat2.Store(true)
	}
	dirs, name := splitPath(rel)
	dir := root
	if len(dirs) > 0 {
		var err error
		if dir, err = l.walk(root, dirs, false); err != nil {
			return -1, err
		}
		defer unix.Close(dir)
	}
	fd, err := unix.Openat(dir, name, flags, 0)
	if err != nil {
		return -1, l.resolveError(root, rel, err)
	}
	return fd, nil
}

// openDir opens the directory rel ("" is the root) beneath root for
// fsync, unlinkat and the like. With create, missing directories are
// made (0700), each new one's parent synced so that it survives a crash.
func (l *Local) openDir(root int, rel string, create bool) (int, error) {
	if rel == "" {
		return unix.Openat(root, ".", unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	}
	fd, err := l.openBeneath(root, rel, unix.O_RDONLY|unix.O_DIRECTORY)
	if err == nil || !create || !errors.Is(err, os.ErrNotExist) {
		return fd, err
	}
	return l.walk(root, strings.Split(rel, "/"), true)
}

// walk opens the directory root/dirs... one component at a time with
// O_NOFOLLOW|O_DIRECTORY, making missing ones when create.
func (l *Local) walk(root int, dirs []string, create bool) (int, error) {
	cur, err := unix.Openat(root, ".", unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return -1, err
	}
	for i, d := range dirs {
		next, err := unix.Openat(cur, d, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
		if errors.Is(err, unix.ENOENT) && create {
			err = unix.Mkdirat(cur, d, 0o700)
			if err == nil {
				err = unix.Fsync(cur) // the new entry survives a crash
			} else if errors.Is(err, unix.EEXIST) {
				err = nil // made meanwhile by another writer
			}
			if err == nil {
				next, err = unix.Openat(cur, d, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
			}
		}
		unix.Close(cur)
		if err != nil {
			return -1, l.resolveError(root, strings.Join(dirs[:i+1], "/"), err)
		}
		cur = next
	}
	return cur, nil
}

// resolveError turns the failure to resolve rel into an error: a missing
// entry matches os.ErrNotExist; a symbolic link or another non-directory
// where a directory belongs is a *DamagedError naming the first such
// component.
func (l *Local) resolveError(root int, rel string, err error) error {
	if !errors.Is(err, unix.ELOOP) && !errors.Is(err, unix.ENOTDIR) && !errors.Is(err, unix.EXDEV) {
		return &os.PathError{Op: "open", Path: rel, Err: err}
	}
	comps := strings.Split(rel, "/")
	for i := range comps {
		// Only to name the culprit: a race here changes the message,
		// never what was opened.
		var st unix.Stat_t
		p := strings.Join(comps[:i+1], "/")
		if unix.Fstatat(root, p, &st, unix.AT_SYMLINK_NOFOLLOW) != nil {
			break
		}
		if st.Mode&unix.S_IFMT != unix.S_IFDIR {
			return &DamagedError{Why: fmt.Sprintf("%s is %s where the repository has a directory", p, describe(st.Mode))}
		}
	}
	return &DamagedError{Why: fmt.Sprintf("%s lies beneath a symbolic link or a file", rel)}
}

// irregular names what a file of mode is when it is neither a regular
// file nor a directory ("" when it is one of those).
func irregular(mode uint32) string {
	switch mode & unix.S_IFMT {
	case unix.S_IFREG, unix.S_IFDIR:
		return ""
	}
	return describe(mode)
}

func describe(mode uint32) string {
	switch mode & unix.S_IFMT {
	case unix.S_IFREG:
		return "a regular file"
	case unix.S_IFDIR:
		return "a directory"
	case unix.S_IFLNK:
		return "a symbolic link"
	case unix.S_IFIFO:
		return "a FIFO"
	case unix.S_IFCHR:
		return "a character device"
	case unix.S_IFBLK:
		return "a block device"
	case unix.S_IFSOCK:
		return "a socket"
	}
	return "a file of unknown type"
}

// splitPath splits a key into its directories and its name.
func splitPath(key string) ([]string, string) {
	i := strings.LastIndexByte(key, '/')
	if i < 0 {
		return nil, key
	}
	return strings.Split(key[:i], "/"), key[i+1:]
}

// dirOf is the directory part of a key ("" for a key at the root).
func dirOf(key string) string {
	if i := strings.LastIndexByte(key, '/'); i >= 0 {
		return key[:i]
	}
	return ""
}

// reopen opens for reading the regular file that the O_PATH descriptor
// fd refers to, through /proc/self/fd: the file checked is the file read,
// whatever happened to its name meanwhile.
// O_NONBLOCK: a file another process holds a lease on (F_SETLEASE) fails
// with EWOULDBLOCK instead of stalling the open until the lease breaks;
// reads of a regular file are unaffected.
func reopen(fd int) (int, error) {
	rfd, err := unix.Open("/proc/self/fd/"+strconv.Itoa(fd), unix.O_RDONLY|unix.O_CLOEXEC|unix.O_NOCTTY|unix.O_NONBLOCK, 0)
	if errors.Is(err, unix.EWOULDBLOCK) {
		return -1, &DamagedError{Why: "the file is leased by another process, which would make every read of it wait"}
	}
	return rfd, err
}
