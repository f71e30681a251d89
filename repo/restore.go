package repo

import (
	"context"
	"fmt"
	"runtime"
	"sync"
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
// chunks and zero runs are not written. parallel chunks are fetched at
// once, by fetchers that only wait for the store; as many decoders as
// CPUs decompress, check and write them. A missing or damaged chunk stops
// the restore with a *ChunkError naming it.
func (r *Repo) RestoreDisk(ctx context.Context, m *Manifest, disk string, t Target, parallel int) error {
	ix, err := r.LoadIndex(ctx, m, disk)
	if err != nil {
		return err
	}
	g := ix.Grid()
	fetchers, decoders := max(parallel, 1), runtime.NumCPU()
	type fetched struct {
		k    int
		blob []byte
	}
	// Blob buffers: one per fetch in flight and per decode, reused.
	free := make(chan []byte, fetchers+decoders)
	for range fetchers + decoders {
		free <- nil
	}
	blobs := make(chan fetched, decoders)
	var next atomic.Int64
	eg, ctx := errgroup.WithContext(ctx)
	var fetching sync.WaitGroup
	for range fetchers {
		fetching.Add(1)
		eg.Go(func() error {
			defer fetching.Done()
			for {
				k := int(next.Add(1) - 1)
				if k >= ix.Len() {
					return nil
				}
				var blob []byte
				select {
				case blob = <-free:
				case <-ctx.Done():
					return context.Cause(ctx)
				}
				_, dg := ix.At(k)
				key := ChunkKey(dg)
				blob, err := r.get(ctx, key, blob)
				if err != nil {
					return &ChunkError{Key: key, Err: err}
				}
				select {
				case blobs <- fetched{k, blob}:
				case <-ctx.Done():
					return context.Cause(ctx)
				}
			}
		})
	}
	eg.Go(func() error { fetching.Wait(); close(blobs); return nil })
	for range decoders {
		eg.Go(func() error {
			var plain []byte
			for f := range blobs {
				i, dg := ix.At(f.k)
				off, n := g.Chunk(i)
				key := ChunkKey(dg)
				var err error
				if plain, err = r.codec.DecodeChunk(plain, f.blob, key, dg, int(r.cfg.ChunkSize)); err != nil {
					return &ChunkError{Key: key, Err: err}
				}
				free <- f.blob
				if int64(len(plain)) != n {
					return &ChunkError{Key: key, Err: fmt.Errorf("%w: %d bytes for chunk %d of %d bytes", chunker.ErrCorrupt, len(plain), i, n)}
				}
				if err := writeNonZero(ctx, t, plain, off); err != nil {
					return err
				}
			}
			return nil
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
