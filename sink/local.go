package sink

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"time"

	"golang.org/x/sync/errgroup"
	"golang.org/x/sys/unix"
)

// Local is a store in a directory of the local filesystem. Objects are
// files; a Put writes a temporary file, fsyncs it, renames it into place
// and fsyncs the directory, so an object is either absent or whole, even
// after a crash. PutDeferred leaves the directory's fsync to the next Sync,
// which syncs each directory once. Temporary files (".tmp-*") left by a
// crash are invisible to List and Get. No operation follows a symbolic
// link beneath the root or reads anything but a regular file (beneath.go).
type Local struct {
	root string

	syncing  sync.Mutex // one Sync at a time: a second waits for the first's directories
	mu       sync.Mutex
	unsynced map[string]bool // directories (keys' directory parts) with names not yet durable that no Sync has synced
}

var _ Store = (*Local)(nil)

// NewLocal returns the store rooted at dir (made absolute). The directory
// is created on the first Put.
func NewLocal(dir string) (*Local, error) {
	abs, err := filepath.Abs(dir)
	if err != nil {
		return nil, &Error{Op: "open", Location: dir, Err: err}
	}
	return &Local{root: abs}, nil
}

func (l *Local) Location() string { return l.root }

func (l *Local) fail(op, key string, err error) error {
	if errors.Is(err, fs.ErrNotExist) {
		err = ErrNotFound
	}
	return &Error{Op: op, Key: key, Location: l.root, Err: err}
}

func (l *Local) check(op, key string) error {
	if err := ValidKey(key); err != nil {
		return &Error{Op: op, Key: key, Location: l.root, Err: err}
	}
	return nil
}

func (l *Local) Put(ctx context.Context, key string, data []byte) error {
	return l.write(ctx, "put", key, data, false, false)
}

// Create writes the object like Put and links it into place: link(2)
// fails when the name exists, so of concurrent Creates one wins.
func (l *Local) Create(ctx context.Context, key string, data []byte) error {
	return l.write(ctx, "create", key, data, true, false)
}

// PutDeferred is Put without the directory's fsync: the data is synced
// before the name appears, so the object is whole whenever it is seen,
// also after a crash, but its name is durable only once Sync returns.
func (l *Local) PutDeferred(ctx context.Context, key string, data []byte) error {
	return l.write(ctx, "put", key, data, false, true)
}

// SyncLater has the next Sync make key's name durable too: for an object
// found in place that another writer may have put deferred and not yet
// synced (a chunk a backup deduplicates against).
func (l *Local) SyncLater(key string) {
	if ValidKey(key) == nil {
		l.deferDir(dirOf(key))
	}
}

// Sync makes the names of every PutDeferred (and SyncLater) so far
// durable: it fsyncs each of their directories once. A directory that
// fails stays to be synced by the next Sync, unless it is gone (and its
// names with it).
func (l *Local) Sync(ctx context.Context) error {
	l.syncing.Lock()
	defer l.syncing.Unlock()
	l.mu.Lock()
	dirs := l.unsynced
	l.unsynced = nil
	l.mu.Unlock()
	if len(dirs) == 0 {
		return nil
	}
	root, err := l.openRoot(false)
	if err != nil {
		for dir := range dirs {
			l.deferDir(dir)
		}
		return l.fail("sync", "", err)
	}
	defer unix.Close(root)
	g, ctx := errgroup.WithContext(ctx)
	g.SetLimit(8)
	for dir := range dirs {
		g.Go(func() error {
			if err := ctx.Err(); err != nil {
				l.deferDir(dir)
				return err
			}
			if err := l.syncDir(root, dir); err != nil {
				if !errors.Is(err, fs.ErrNotExist) {
					l.deferDir(dir)
				}
				return &Error{Op: "sync", Key: dir + "/", Location: l.root, Err: err}
			}
			return nil
		})
	}
	return g.Wait()
}

// deferDir records dir as holding names not yet durable.
func (l *Local) deferDir(dir string) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.unsynced == nil {
		l.unsynced = map[string]bool{}
	}
	l.unsynced[dir] = true
}

// syncDir fsyncs the directory dir beneath root.
func (l *Local) syncDir(root int, dir string) error {
	fd, err := l.openDir(root, dir, false)
	if err != nil {
		return err
	}
	defer unix.Close(fd)
	return unix.Fsync(fd)
}

// write writes data to a temporary file in the object's directory, syncs
// it and moves it into place (renameat, or linkat when exclusive), then
// syncs the directory or, when deferred, leaves it to Sync.
func (l *Local) write(ctx context.Context, op, key string, data []byte, exclusive, deferred bool) error {
	if err := l.check(op, key); err != nil {
		return err
	}
	if err := ctx.Err(); err != nil {
		return l.fail(op, key, err)
	}
	dir, name := dirOf(key), key[strings.LastIndexByte(key, '/')+1:]
	root, err := l.openRoot(true)
	if err != nil {
		return l.fail(op, key, err)
	}
	defer unix.Close(root)
	dfd, err := l.openDir(root, dir, true)
	if err != nil {
		return l.fail(op, key, err)
	}
	defer unix.Close(dfd)
	tmp, err := writeTemp(dfd, data)
	if err != nil {
		return l.fail(op, key, err)
	}
	if exclusive {
		err = unix.Linkat(dfd, tmp, dfd, name, 0)
		unix.Unlinkat(dfd, tmp, 0)
	} else if err = unix.Renameat(dfd, tmp, dfd, name); err != nil {
		unix.Unlinkat(dfd, tmp, 0)
	}
	if errors.Is(err, unix.EEXIST) {
		return &Error{Op: op, Key: key, Location: l.root, Err: ErrExists}
	}
	if err != nil {
		return l.fail(op, key, err)
	}
	if deferred {
		l.deferDir(dir)
		return nil
	}
	if err := unix.Fsync(dfd); err != nil {
		return l.fail(op, key, err)
	}
	return nil
}

// writeTemp writes data to a new temporary file (".tmp-*", 0600) in the
// directory dfd, syncs it, and returns its name.
func writeTemp(dfd int, data []byte) (string, error) {
	for range 8 {
		name := fmt.Sprintf(".tmp-%016x", rand.Uint64())
		fd, err := unix.Openat(dfd, name, unix.O_WRONLY|unix.O_CREAT|unix.O_EXCL|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0o600)
		if errors.Is(err, unix.EEXIST) {
			continue
		}
		if err != nil {
			return "", err
		}
		f := os.NewFile(uintptr(fd), name)
		_, err = f.Write(data)
		if err == nil {
			err = f.Sync()
		}
		if cerr := f.Close(); err == nil {
			err = cerr
		}
		if err != nil {
			unix.Unlinkat(dfd, name, 0)
			return "", err
		}
		return name, nil
	}
	return "", errors.New("no free temporary file name")
}

// openObject opens key's object with O_PATH (no read, no side effect on a
// FIFO or device) and returns it with its stat; a missing object matches
// fs.ErrNotExist, anything but a regular file is a *DamagedError.
func (l *Local) openObject(key string) (int, unix.Stat_t, error) {
	var st unix.Stat_t
	root, err := l.openRoot(false)
	if err != nil {
		return -1, st, err
	}
	defer unix.Close(root)
	fd, err := l.openBeneath(root, key, unix.O_PATH)
	if err != nil {
		return -1, st, err
	}
	if err := unix.Fstat(fd, &st); err != nil {
		unix.Close(fd)
		return -1, st, err
	}
	switch st.Mode & unix.S_IFMT {
	case unix.S_IFREG:
		return fd, st, nil
	case unix.S_IFDIR: // a key prefix, as "a" is of "a/b"
		unix.Close(fd)
		return -1, st, fs.ErrNotExist
	}
	unix.Close(fd)
	return -1, st, &DamagedError{Why: fmt.Sprintf("%s is %s where an object belongs", key, describe(st.Mode))}
}

func (l *Local) Get(ctx context.Context, key string, buf []byte, limit int64) ([]byte, error) {
	if err := l.check("get", key); err != nil {
		return nil, err
	}
	if err := ctx.Err(); err != nil {
		return nil, l.fail("get", key, err)
	}
	pfd, st, err := l.openObject(key)
	if err != nil {
		return nil, l.fail("get", key, err)
	}
	defer unix.Close(pfd)
	if st.Size > limit {
		return nil, l.fail("get", key, tooLarge(st.Size, limit))
	}
	fd, err := reopen(pfd)
	if err != nil {
		return nil, l.fail("get", key, err)
	}
	f := os.NewFile(uintptr(fd), key)
	defer f.Close()
	if err := unix.Fstat(fd, &st); err != nil {
		return nil, l.fail("get", key, err)
	}
	if st.Size > limit { // grew since
		return nil, l.fail("get", key, tooLarge(st.Size, limit))
	}
	buf = append(buf[:0], make([]byte, st.Size)...)
	if _, err := io.ReadFull(f, buf); err != nil {
		return nil, l.fail("get", key, err)
	}
	return buf, nil
}

func (l *Local) Stat(ctx context.Context, key string) (ObjectInfo, error) {
	if err := l.check("stat", key); err != nil {
		return ObjectInfo{}, err
	}
	fd, st, err := l.openObject(key)
	if err != nil {
		return ObjectInfo{}, l.fail("stat", key, err)
	}
	unix.Close(fd)
	return ObjectInfo{Key: key, Size: st.Size, Modified: time.Unix(st.Mtim.Unix())}, nil
}

func (l *Local) List(ctx context.Context, prefix string, fn func(ObjectInfo) error) error {
	if err := validPrefix(prefix); err != nil {
		return &Error{Op: "list", Key: prefix, Location: l.root, Err: err}
	}
	// Walk the deepest directory the prefix names; filter the rest.
	start := ""
	if i := strings.LastIndex(prefix, "/"); i >= 0 {
		start = prefix[:i]
	}
	err := l.walkFiles(ctx, start, func(e entry) error {
		if e.what != "" || strings.HasPrefix(e.name, ".tmp-") || !strings.HasPrefix(e.key, prefix) {
			return nil
		}
		if err := fn(ObjectInfo{Key: e.key, Size: e.st.Size, Modified: time.Unix(e.st.Mtim.Unix())}); err != nil {
			return callerError{err}
		}
		return nil
	})
	var ce callerError
	if errors.As(err, &ce) {
		return ce.err
	}
	if err != nil {
		return l.fail("list", prefix, err)
	}
	return nil
}

// entry is a file walkFiles found.
type entry struct {
	dfd  int    // its directory
	name string // its name there
	key  string // its key
	st   unix.Stat_t
	what string // "" for a regular file; else what it is (a symbolic link, a FIFO, ...)
}

// walkFiles calls fn for every entry below the directory dir ("" for the
// root) that is not a directory, in key order, checking ctx as it goes:
// regular files, and, with what set, symbolic links and special files. It
// descends into directories only, never through a symbolic link. A
// missing dir has no entries; a link or file in its place is an error
// (below it, links are skipped: Strays reports them).
func (l *Local) walkFiles(ctx context.Context, dir string, fn func(entry) error) error {
	root, err := l.openRoot(false)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	defer unix.Close(root)
	dfd, err := l.openDir(root, dir, false)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	return l.walkDir(ctx, dfd, dir, fn) // closes dfd
}

// maxDepth bounds the directories a walk descends: the deepest the
// repository has is state/quarantine/chunks/ab. Deeper ones are planted
// (each level of a walk keeps a descriptor and its key's prefix: a tree
// thousands deep would take memory quadratic in its depth), reported as
// strays and never descended.
const maxDepth = 8

// walkDir walks the open directory dfd, whose key prefix is dir, and
// closes it.
func (l *Local) walkDir(ctx context.Context, dfd int, dir string, fn func(entry) error) error {
	f := os.NewFile(uintptr(dfd), dir)
	defer f.Close()
	names, err := f.Readdirnames(-1)
	if err != nil {
		return err
	}
	slices.Sort(names)
	for _, name := range names {
		if err := ctx.Err(); err != nil {
			return err
		}
		e := entry{dfd: dfd, name: name, key: name}
		if dir != "" {
			e.key = dir + "/" + name
		}
		if err := unix.Fstatat(dfd, name, &e.st, unix.AT_SYMLINK_NOFOLLOW); err != nil {
			if errors.Is(err, unix.ENOENT) {
				continue // removed meanwhile
			}
			return err
		}
		if e.key == "lost+found" { // a file system's, when the repository is its root
			continue
		}
		if e.st.Mode&unix.S_IFMT == unix.S_IFDIR && (strings.Count(e.key, "/") >= maxDepth || ValidKey(e.key) != nil) {
			e.what = "a directory no key can name (too deep, or a name a key cannot have)"
			if err := fn(e); err != nil {
				return err
			}
			continue
		}
		if e.st.Mode&unix.S_IFMT == unix.S_IFDIR {
			sub, err := unix.Openat(dfd, name, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
			if errors.Is(err, unix.ENOENT) {
				continue
			}
			if err != nil {
				return err
			}
			if err := l.walkDir(ctx, sub, e.key, fn); err != nil {
				return err
			}
			continue
		}
		e.what = irregular(e.st.Mode)
		if err := fn(e); err != nil {
			return err
		}
	}
	return nil
}

// callerError carries an error of a callback through a walk unchanged.
type callerError struct{ err error }

func (e callerError) Error() string { return e.err.Error() }

// Strays calls fn with the key of everything whose key starts with prefix
// that is neither a regular file nor a directory (symbolic links, FIFOs,
// devices, sockets) and says what it is: nbdmover never makes one, List
// skips them and reads refuse them. verify reports them.
func (l *Local) Strays(ctx context.Context, prefix string, fn func(key, what string) error) error {
	if err := validPrefix(prefix); err != nil {
		return &Error{Op: "list", Key: prefix, Location: l.root, Err: err}
	}
	start := ""
	if i := strings.LastIndex(prefix, "/"); i >= 0 {
		start = prefix[:i]
	}
	err := l.walkFiles(ctx, start, func(e entry) error {
		if e.what == "" || !strings.HasPrefix(e.key, prefix) {
			return nil
		}
		if err := fn(e.key, e.what); err != nil {
			return callerError{err}
		}
		return nil
	})
	var ce callerError
	if errors.As(err, &ce) {
		return ce.err
	}
	if err != nil {
		return l.fail("list", "", err)
	}
	return nil
}

func (l *Local) Delete(ctx context.Context, key string) error {
	if err := l.check("delete", key); err != nil {
		return err
	}
	return l.deleteBatch(ctx, []string{key})
}

// RemoveTemp removes the temporary files (".tmp-*") that crashed writes
// left, if they are older than age, and returns how many it removed. A
// write in progress keeps its file younger than any sensible age.
func (l *Local) RemoveTemp(ctx context.Context, age time.Duration) (int, error) {
	cutoff := time.Now().Add(-age)
	n := 0
	err := l.walkFiles(ctx, "", func(e entry) error {
		if e.what != "" || !strings.HasPrefix(e.name, ".tmp-") || !time.Unix(e.st.Mtim.Unix()).Before(cutoff) {
			return nil
		}
		if unix.Unlinkat(e.dfd, e.name, 0) == nil {
			n++
		}
		return nil
	})
	if err != nil {
		return n, l.fail("remove temporary files", "", err)
	}
	return n, nil
}
