package repo

import (
	"context"
	"fmt"
	"sync/atomic"

	"github.com/nbdmover/nbdmover/chunker"
	"golang.org/x/sync/errgroup"
)

// Target receives a restored disk. WriteAt may be called concurrently for
// different ranges.
type Target interface {
	WriteAt(ctx context.Context, p []byte, off int64) error
}

// sparseBlock is the granularity at which restore skips zero runs inside a
// chunk, so a restored image stays as sparse as the source.
const sparseBlock = 64 << 10

// RestoreDisk writes one disk of a backup to t, which must read as zeroes
// where nothing is written (a new sparse file or a new qcow2 image): zero
// chunks and zero runs are not written. parallel chunks are fetched at once.
// A missing or damaged chunk stops the restore with a *ChunkError naming it.
func (r *Repo) RestoreDisk(ctx context.Context, m *Manifest, disk string, t Target, parallel int) error {
	ix, err := r.LoadIndex(ctx, m, disk)
	if err != nil {
		return err
	}
	g := ix.Grid()
	var next atomic.Int64
	eg, ctx := errgroup.WithContext(ctx)
	for range max(parallel, 1) {
		eg.Go(func() error {
			var plain, blob []byte
			for {
				k := int(next.Add(1) - 1)
				if k >= ix.Len() {
					return nil
				}
				i, dg := ix.At(k)
				off, n := g.Chunk(i)
				var err error
				if plain, blob, err = r.GetChunk(ctx, dg, plain, blob); err != nil {
					return err
				}
				if int64(len(plain)) != n {
					return &ChunkError{Key: ChunkKey(dg), Err: fmt.Errorf("%w: %d bytes for chunk %d of %d bytes", chunker.ErrCorrupt, len(plain), i, n)}
				}
				if err := writeNonZero(ctx, t, plain, off); err != nil {
					return err
				}
			}
		})
	}
	return eg.Wait()
}

// writeNonZero writes the runs of p that are not all-zero blocks.
func writeNonZero(ctx context.Context, t Target, p []byte, off int64) error {
	start := -1 // start of the pending non-zero run
	for i := 0; i < len(p); i += sparseBlock {
		if !chunker.IsZero(p[i:min(i+sparseBlock, len(p))]) {
			if start < 0 {
				start = i
			}
			continue
		}
		if start >= 0 {
			if err := t.WriteAt(ctx, p[start:i], off+int64(start)); err != nil {
				return err
			}
			start = -1
		}
	}
	if start >= 0 {
		return t.WriteAt(ctx, p[start:], off+int64(start))
	}
	return nil
}
