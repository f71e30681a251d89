package sink

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"time"
)

// AsOf returns a read-only view of the versioned S3 store beneath s as
// it was at t: every immutable key (Immutable) reads as its newest
// version last modified at or before t (by the server's clock), and a
// key whose newest such version is a delete marker, or that had none
// then, is missing; later versions and delete markers are ignored.
// Mutable keys (locks, state) are read as they are now. Nothing but
// locks (so that a reader can take the repository's shared lock) is
// written through it: what a reader of the past would record (damage,
// verification state) would be about the past.
func AsOf(s Store, t time.Time) (Store, error) {
	x, ok := underlying[*S3](s)
	if !ok {
		return nil, fmt.Errorf("%s: --as-of reads object versions, which only an S3 bucket with versioning keeps", s.Location())
	}
	return &asOf{Store: s, s3: x, t: t, seen: map[string]string{}}, nil
}

type asOf struct {
	Store // the current store, for mutable keys
	s3    *S3
	t     time.Time

	mu   sync.Mutex
	seen map[string]string // key -> version id, of keys listed
}

func (a *asOf) Unwrap() Store { return a.Store }

// An AsOf view deletes key by key (Delete), so that DeleteMany cannot
// reach the store beneath it.
func (a *asOf) maxBatch() int { return 1 }

func (a *asOf) deleteBatch(ctx context.Context, keys []string) error {
	for _, k := range keys {
		if err := a.Delete(ctx, k); err != nil {
			return err
		}
	}
	return nil
}

// ErrAsOf is matched by the error of a write through an AsOf view.
var ErrAsOf = errors.New("the repository is read as of a past time (--as-of): nothing is written to it")

func (a *asOf) refuse(op, key string) error {
	return &Error{Op: op, Key: key, Location: a.Location(), Err: ErrAsOf}
}

// pick returns the version of a key's versions (newest first) that was
// current at t; ok false when the key was missing then.
func (a *asOf) pick(vs []Version) (Version, bool) {
	for _, v := range vs {
		if !v.Modified.After(a.t) {
			return v, !v.Marker
		}
	}
	return Version{}, false
}

// version returns the id of key's version current at t.
func (a *asOf) version(ctx context.Context, op, key string) (Version, error) {
	a.mu.Lock()
	id, ok := a.seen[key]
	a.mu.Unlock()
	if ok {
		return Version{Key: key, ID: id}, nil
	}
	var vs []Version
	err := Retried(ctx, a.Store, func() (err error) {
		vs, err = a.s3.KeyVersions(ctx, key)
		return err
	})
	if err != nil {
		return Version{}, err
	}
	v, ok := a.pick(vs)
	if !ok {
		return Version{}, &Error{Op: op, Key: key, Location: a.Location(),
			Err: fmt.Errorf("%w as of %s", ErrNotFound, a.t.UTC().Format(time.RFC3339))}
	}
	return v, nil
}

func (a *asOf) Get(ctx context.Context, key string, buf []byte, limit int64) ([]byte, error) {
	if !Immutable(key) {
		return a.Store.Get(ctx, key, buf, limit)
	}
	v, err := a.version(ctx, "get", key)
	if err != nil {
		return nil, err
	}
	var out []byte
	err = Retried(ctx, a.Store, func() (err error) {
		out, err = a.s3.get(ctx, key, v.ID, buf, limit)
		return err
	})
	return out, err
}

func (a *asOf) Stat(ctx context.Context, key string) (ObjectInfo, error) {
	if !Immutable(key) {
		return a.Store.Stat(ctx, key)
	}
	v, err := a.version(ctx, "stat", key)
	if err != nil {
		return ObjectInfo{}, err
	}
	var info ObjectInfo
	err = Retried(ctx, a.Store, func() (err error) {
		info, err = a.s3.stat(ctx, key, v.ID)
		return err
	})
	return info, err
}

// List lists the keys as of t (mutable ones as they are now), and
// remembers the version of each for Get and Stat.
func (a *asOf) List(ctx context.Context, prefix string, fn func(ObjectInfo) error) error {
	if prefix != "" && !Immutable(prefix) {
		return a.Store.List(ctx, prefix, fn)
	}
	var key string
	var vs []Version
	emit := func() error {
		v, ok := a.pick(vs)
		vs = vs[:0]
		if !ok {
			return nil
		}
		if !Immutable(v.Key) {
			return nil // listed from the current store below
		}
		a.mu.Lock()
		a.seen[v.Key] = v.ID
		a.mu.Unlock()
		return fn(ObjectInfo{Key: v.Key, Size: v.Size, Modified: v.Modified})
	}
	err := a.s3.Versions(ctx, prefix, func(v Version) error {
		if v.Key != key && len(vs) > 0 {
			if err := emit(); err != nil {
				return err
			}
		}
		key = v.Key
		vs = append(vs, v)
		return nil
	})
	if err == nil && len(vs) > 0 {
		err = emit()
	}
	if err != nil || prefix != "" {
		return err
	}
	// The whole store: the mutable keys as they are now (after the
	// immutable ones: callers of a whole listing do not rely on order).
	return a.Store.List(ctx, prefix, func(o ObjectInfo) error {
		if Immutable(o.Key) {
			return nil
		}
		return fn(o)
	})
}

// writable: the keys a reader of the past writes, its locks.
func writable(key string) bool { return strings.HasPrefix(key, "locks/") }

func (a *asOf) Put(ctx context.Context, key string, data []byte) error {
	if !writable(key) {
		return a.refuse("put", key)
	}
	return a.Store.Put(ctx, key, data)
}

func (a *asOf) Create(ctx context.Context, key string, data []byte) error {
	if !writable(key) {
		return a.refuse("create", key)
	}
	return a.Store.Create(ctx, key, data)
}

func (a *asOf) Delete(ctx context.Context, key string) error {
	if !writable(key) {
		return a.refuse("delete", key)
	}
	return a.Store.Delete(ctx, key)
}

func (a *asOf) Location() string {
	return a.Store.Location() + " as of " + a.t.UTC().Format(time.RFC3339)
}
