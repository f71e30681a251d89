package repo

import (
	"context"
	"fmt"
	"strings"

	"github.com/nbdmover/nbdmover/chunker"
)

// Every object kind has a largest size a reader accepts (docs/format.md,
// "Bounds"), derived from what writers write: the store refuses a larger
// object before it allocates (sink.ErrDamaged, with its size), and a meta
// blob whose header states a larger plaintext is refused before it is
// decompressed. So a planted object costs a reader at most its kind's
// bound, whatever its size in the store. Writers check the bounds of
// what they write, so nothing nbdmover commits is ever refused by them.
const (
	maxSmallObject = 64 << 10 // config, key objects, locks, tombstones, protection markers
	maxManifest    = 16 << 20 // a manifest's JSON
	maxIndexObject = 16 << 20 // an index object: at most 262,144 entries of at most 42 bytes, or 131,072 of at most 74
	maxFile        = 16 << 20 // an extra file of a backup (domain.xml, checkpoint.xml)
	maxCatalog     = 64 << 20 // a catalog's JSON (a cache: not written above this)
	maxState       = 4 << 20  // a damage record (at most 10,000 backups named), state/verified
	blobOverhead   = chunker.HeaderSize + 12 + 16 + 1024
)

// bound is the largest plaintext an object at key may hold, and so (with
// blobOverhead) the largest object read from there.
func (r *Repo) bound(key string) int64 {
	switch {
	case strings.HasPrefix(key, "chunks/"):
		return r.cfg.ChunkSize
	case strings.HasPrefix(key, "patches/"):
		return chunker.MaxPatchLen(r.cfg.ChunkSize)
	case strings.HasPrefix(key, "manifests/"):
		return maxManifest
	case strings.HasPrefix(key, "indexes/"):
		return maxIndexObject
	case strings.HasPrefix(key, "files/"):
		return maxFile
	case strings.HasPrefix(key, "catalog/"):
		return maxCatalog
	case strings.HasPrefix(key, "state/"):
		return maxState
	}
	return maxSmallObject
}

// get reads the object at key, refusing one larger than its kind allows
// (an error matching sink.ErrDamaged, with its size).
func (r *Repo) get(ctx context.Context, key string, buf []byte) ([]byte, error) {
	limit := r.bound(key) + blobOverhead
	if strings.HasPrefix(key, "chunks/") {
		limit = int64(chunker.MaxBlobLen(int(r.cfg.ChunkSize)))
	}
	return r.store.Get(ctx, key, buf, limit)
}

// fits refuses to write under key a plaintext of n bytes that readers
// would refuse.
func (r *Repo) fits(key string, n int) error {
	if max := r.bound(key); int64(n) > max {
		return fmt.Errorf("%s: %d bytes, more than the %d a reader accepts for its kind", key, n, max)
	}
	return nil
}
