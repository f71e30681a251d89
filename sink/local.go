package sink

import (
	"context"
	"errors"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"golang.org/x/sync/errgroup"
)

// Local is a store in a directory of the local filesystem. Objects are
// files; a Put writes a temporary file, fsyncs it, renames it into place
// and fsyncs the directory, so an object is either absent or whole, even
// after a crash. PutDeferred leaves the directory's fsync to the next Sync,
// which syncs each directory once. Temporary files (".tmp-*") left by a
// crash are invisible to List and Get.
type Local struct {
	root string

	syncing  sync.Mutex // one Sync at a time: a second waits for the first's directories
	mu       sync.Mutex
	unsynced map[string]bool // directories with names not yet durable that no Sync has synced
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

func (l *Local) path(op, key string) (string, error) {
	if err := ValidKey(key); err != nil {
		return "", &Error{Op: op, Key: key, Location: l.root, Err: err}
	}
	return filepath.Join(l.root, filepath.FromSlash(key)), nil
}

func (l *Local) Put(ctx context.Context, key string, data []byte) error {
	return l.write(ctx, "put", key, data, os.Rename, false)
}

// Create writes the object like Put and links it into place: link(2)
// fails when the name exists, so of concurrent Creates one wins.
func (l *Local) Create(ctx context.Context, key string, data []byte) error {
	return l.write(ctx, "create", key, data, os.Link, false)
}

// PutDeferred is Put without the directory's fsync: the data is synced
// before the name appears, so the object is whole whenever it is seen,
// also after a crash, but its name is durable only once Sync returns.
func (l *Local) PutDeferred(ctx context.Context, key string, data []byte) error {
	return l.write(ctx, "put", key, data, os.Rename, true)
}

// SyncLater has the next Sync make key's name durable too: for an object
// found in place that another writer may have put deferred and not yet
// synced (a chunk a backup deduplicates against).
func (l *Local) SyncLater(key string) {
	if path, err := l.path("sync", key); err == nil {
		l.deferDir(filepath.Dir(path))
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
	g, ctx := errgroup.WithContext(ctx)
	g.SetLimit(8)
	for dir := range dirs {
		g.Go(func() error {
			if err := ctx.Err(); err != nil {
				l.deferDir(dir)
				return err
			}
			if err := syncDir(dir); err != nil {
				if !errors.Is(err, fs.ErrNotExist) {
					l.deferDir(dir)
				}
				return &Error{Op: "sync", Key: l.keyOf(dir), Location: l.root, Err: err}
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

// keyOf is the key prefix a directory of the store holds.
func (l *Local) keyOf(dir string) string {
	rel, err := filepath.Rel(l.root, dir)
	if err != nil {
		return dir
	}
	return filepath.ToSlash(rel) + "/"
}

// write writes data to a temporary file in the object's directory, syncs
// it and moves it into place with place (rename or link), then syncs the
// directory or, when deferred, leaves it to Sync.
func (l *Local) write(ctx context.Context, op, key string, data []byte, place func(tmp, path string) error, deferred bool) error {
	path, err := l.path(op, key)
	if err != nil {
		return err
	}
	if err := ctx.Err(); err != nil {
		return l.fail(op, key, err)
	}
	dir := filepath.Dir(path)
	if err := l.mkdirs(dir); err != nil {
		return l.fail(op, key, err)
	}
	f, err := os.CreateTemp(dir, ".tmp-*")
	if err != nil {
		return l.fail(op, key, err)
	}
	defer os.Remove(f.Name()) // gone after a rename; the extra name after a link
	_, err = f.Write(data)
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = place(f.Name(), path)
	}
	if errors.Is(err, fs.ErrExist) {
		return &Error{Op: op, Key: key, Location: l.root, Err: ErrExists}
	}
	if err != nil {
		return l.fail(op, key, err)
	}
	if deferred {
		l.deferDir(dir)
		return nil
	}
	if err := syncDir(dir); err != nil {
		return l.fail(op, key, err)
	}
	return nil
}

// mkdirs creates dir and its missing parents, and makes the new entries
// durable by syncing each parent up to the root.
func (l *Local) mkdirs(dir string) error {
	if _, err := os.Stat(dir); err == nil {
		return nil
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return err
	}
	for d := dir; d != l.root && strings.HasPrefix(d, l.root); d = filepath.Dir(d) {
		if err := syncDir(filepath.Dir(d)); err != nil {
			return err
		}
	}
	return nil
}

func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	err = d.Sync()
	if cerr := d.Close(); err == nil {
		err = cerr
	}
	return err
}

func (l *Local) Get(ctx context.Context, key string, buf []byte) ([]byte, error) {
	path, err := l.path("get", key)
	if err != nil {
		return nil, err
	}
	if err := ctx.Err(); err != nil {
		return nil, l.fail("get", key, err)
	}
	f, err := os.Open(path)
	if err != nil {
		return nil, l.fail("get", key, err)
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return nil, l.fail("get", key, err)
	}
	if !st.Mode().IsRegular() {
		return nil, l.fail("get", key, ErrNotFound)
	}
	buf = append(buf[:0], make([]byte, st.Size())...)
	if _, err := io.ReadFull(f, buf); err != nil {
		return nil, l.fail("get", key, err)
	}
	return buf, nil
}

func (l *Local) Stat(ctx context.Context, key string) (ObjectInfo, error) {
	path, err := l.path("stat", key)
	if err != nil {
		return ObjectInfo{}, err
	}
	st, err := os.Stat(path)
	if err == nil && !st.Mode().IsRegular() {
		err = ErrNotFound
	}
	if err != nil {
		return ObjectInfo{}, l.fail("stat", key, err)
	}
	return ObjectInfo{Key: key, Size: st.Size(), Modified: st.ModTime()}, nil
}

func (l *Local) List(ctx context.Context, prefix string, fn func(ObjectInfo) error) error {
	if err := validPrefix(prefix); err != nil {
		return &Error{Op: "list", Key: prefix, Location: l.root, Err: err}
	}
	// Walk the deepest directory the prefix names; filter the rest.
	start := l.root
	if i := strings.LastIndex(prefix, "/"); i >= 0 {
		start = filepath.Join(l.root, filepath.FromSlash(prefix[:i]))
	}
	err := walkFiles(ctx, start, func(path string, d fs.DirEntry) error {
		if strings.HasPrefix(d.Name(), ".tmp-") {
			return nil
		}
		key := filepath.ToSlash(strings.TrimPrefix(path, l.root+string(filepath.Separator)))
		if !strings.HasPrefix(key, prefix) {
			return nil
		}
		info, err := d.Info()
		if err != nil {
			return err
		}
		if err := fn(ObjectInfo{Key: key, Size: info.Size(), Modified: info.ModTime()}); err != nil {
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

// walkFiles calls fn for every regular file below dir (none when dir does
// not exist), checking ctx as it goes.
func walkFiles(ctx context.Context, dir string, fn func(path string, d fs.DirEntry) error) error {
	return filepath.WalkDir(dir, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			if errors.Is(err, fs.ErrNotExist) {
				return nil
			}
			return err
		}
		if err := ctx.Err(); err != nil {
			return err
		}
		if !d.Type().IsRegular() {
			return nil
		}
		return fn(path, d)
	})
}

// callerError carries an error of List's callback through a walk unchanged.
type callerError struct{ err error }

func (e callerError) Error() string { return e.err.Error() }

func (l *Local) Delete(ctx context.Context, key string) error {
	path, err := l.path("delete", key)
	if err != nil {
		return err
	}
	if err := os.Remove(path); err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return nil
		}
		return l.fail("delete", key, err)
	}
	if err := syncDir(filepath.Dir(path)); err != nil {
		return l.fail("delete", key, err)
	}
	return nil
}

// RemoveTemp removes the temporary files (".tmp-*") that crashed writes
// left, if they are older than age, and returns how many it removed. A
// write in progress keeps its file younger than any sensible age.
func (l *Local) RemoveTemp(ctx context.Context, age time.Duration) (int, error) {
	cutoff := time.Now().Add(-age)
	n := 0
	err := walkFiles(ctx, l.root, func(path string, d fs.DirEntry) error {
		if !strings.HasPrefix(d.Name(), ".tmp-") {
			return nil
		}
		if info, err := d.Info(); err == nil && info.ModTime().Before(cutoff) {
			if err := os.Remove(path); err == nil {
				n++
			}
		}
		return nil
	})
	if err != nil {
		return n, l.fail("remove temporary files", "", err)
	}
	return n, nil
}
