package repo

import (
	"context"
	"errors"
	"sync"
	"time"

	"github.com/nbdmover/nbdmover/chunker"
	"github.com/nbdmover/nbdmover/sink"
)

// The repository owns how chunks are written and what makes them durable
// (restic's Repository.SaveBlob, PBS's ChunkStore::insert_chunk do too): a
// backup hands it a chunk's blob, and it decides whether to ask the store
// first, put, or create, and notes what its Commit must make durable.

// Putter stores the chunks of one stream of a backup (a disk) and keeps
// what its policy learns of the store. It is safe for concurrent use.
type Putter struct {
	r      *Repo
	remote bool // S3: a question costs a round trip

	mu            sync.Mutex
	offers, holds int // of the chunks offered lately, and of those the store held
}

// NewPutter returns a putter for one stream of chunks.
func (r *Repo) NewPutter() *Putter {
	return &Putter{r: r, remote: sink.Remote(r.store)}
}

// Put stores the blob of chunk d (EncodeChunk's), unless the repository
// holds the chunk already; held says it did (nothing was stored). A chunk
// recorded as damaged (heal) is put whatever the store holds: that heals
// it, and every backup that references it.
//
// Durability: a chunk put or found held is durable once the backup's
// Commit returns (the local store syncs each directory once there, not
// once per chunk), also one another backup put and has not committed; a
// healed chunk is durable when Put returns, since a verify may read it
// whole and delete its damage record before this backup commits.
//
// With S3 Object Lock, a chunk found held is locked anew for as long as
// one put now would be (it may be another backup's, locked for less).
//
// Asking first (a HEAD) spares the upload of a chunk the store holds, at
// a round trip for every chunk it lacks. On a remote store, once 16
// chunks were offered and fewer than a quarter of those offered lately
// were held (a new disk), Put creates instead (a conditional PUT, one
// round trip), and a chunk held costs its upload; it asks again when the
// share rises.
func (p *Putter) Put(ctx context.Context, d chunker.Digest, blob []byte, heal bool) (held bool, err error) {
	return p.put(ctx, ChunkKey(d), blob, heal)
}

// PutPatch stores the blob of the patch of chunk d over base
// (EncodePatch's) as Put stores a chunk: unless the repository holds it.
func (p *Putter) PutPatch(ctx context.Context, d, base chunker.Digest, blob []byte) (held bool, err error) {
	return p.put(ctx, PatchKey(d, base), blob, false)
}

func (p *Putter) put(ctx context.Context, key string, blob []byte, heal bool) (held bool, err error) {
	switch {
	case heal:
		return false, p.r.store.Put(ctx, key, blob)
	case p.askFirst():
		held, err := p.r.has(ctx, key)
		if err != nil {
			return false, err
		}
		if p.offered(held) {
			// Held, perhaps put deferred by another backup that has not
			// committed: this backup's commit makes its name durable too.
			sink.SyncLater(p.r.store, key)
			return true, p.r.extendHeld(ctx, key)
		}
		return false, sink.PutDeferred(ctx, p.r.store, key, blob)
	default:
		err := p.r.store.Create(ctx, key, blob)
		if p.offered(errors.Is(err, sink.ErrExists)) {
			return true, p.r.extendHeld(ctx, key)
		}
		return false, err
	}
}

// askFirst says whether Put asks the store before it puts.
func (p *Putter) askFirst() bool {
	if !p.remote {
		return true // a stat is cheap
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.offers < 16 || p.holds*4 >= p.offers
}

// offered counts a chunk offered to the store, and returns held. The
// counts are halved every 64 offers: the share is a recent one.
func (p *Putter) offered(held bool) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.offers++
	if held {
		p.holds++
	}
	if p.offers == 64 {
		p.offers, p.holds = 32, p.holds/2
	}
	return held
}

// Remote reports whether the repository's store is reached over the
// network (S3): worth keeping many requests in flight.
func (r *Repo) Remote() bool { return sink.Remote(r.store) }

// RemoveTemp removes the store's temporary files older than age (left by
// crashed writes to a local store) and returns how many it removed.
func (r *Repo) RemoveTemp(ctx context.Context, age time.Duration) (int, error) {
	return sink.RemoveTemp(ctx, r.store, age)
}
