package repo

import (
	"context"
	"log/slog"

	"github.com/nbdmover/nbdmover/repo/lock"
)

// The repository's locks: the protocol is package lock's; gc's side of
// it (when it may take the exclusive lock, what it deletes under it) is
// here, in gc.go.

// Lock takes a lock of kind (lock.Shared or lock.Exclusive) for purpose
// (a short description: "backup web1", "gc"); see lock.Locks.Take.
func (r *Repo) Lock(ctx context.Context, kind, purpose string, log *slog.Logger) (*lock.Lock, context.Context, error) {
	return r.locks.Take(ctx, kind, purpose, log)
}

// Locks returns every lock object in the repository.
func (r *Repo) Locks(ctx context.Context) ([]*lock.Info, error) { return r.locks.List(ctx) }

// Unlock removes the stale locks (and every lock when all); see
// lock.Locks.Unlock.
func (r *Repo) Unlock(ctx context.Context, all bool) (removed, live []*lock.Info, err error) {
	return r.locks.Unlock(ctx, all)
}

// newLocks are the locks of r's store, written as r writes meta blobs
// (r's own methods: views of r, which share its store and meta codec,
// share its locks; a view must not change either).
func newLocks(r *Repo) *lock.Locks {
	return lock.New(lock.Config{Store: r.store, Location: r.store.Location(), Version: formatVersion,
		Encode: r.encodeMeta, Decode: r.decodeMeta, MaxObject: maxSmallObject + blobOverhead, Fits: r.fits})
}
