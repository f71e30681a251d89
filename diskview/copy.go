package diskview

import (
	"context"
	"fmt"
	"runtime"
	"sync/atomic"

	"github.com/nbdmover/nbdmover/chunker"
	"github.com/nbdmover/nbdmover/repo"
	"golang.org/x/sync/errgroup"
)

// Target receives a disk. WriteAt may be called concurrently for
// different ranges.
type Target interface {
	WriteAt(ctx context.Context, p []byte, off int64) error
}

// sparseBlock is the granularity at which a copy skips zero runs inside a
// chunk, so a restored image stays as sparse as the source.
const sparseBlock = 64 << 10

// Copy writes the disk to t, which must read as zeroes where nothing is
// written (a new sparse file, a new qcow2 image): zero chunks and zero
// runs are not written. Workers take the data chunks in order, each
// fetching, decoding and writing one at a time into buffers of its own,
// reused (not the view's cache: a copy reads each chunk once, and fresh
// buffers per chunk cost the allocator and the garbage collector what a
// restore is bound by): from S3, as many workers as the view reads ahead
// (ReadAhead: 32 MiB of chunks), each waiting a round trip; from a local
// store two more than CPUs (decoding is the work). A
// missing or damaged chunk stops it with an error naming the chunk.
// count, if not nil, is told the length of each data chunk written (from
// any goroutine).
func (v *View) Copy(ctx context.Context, t Target, count func(n int64)) error {
	var next atomic.Int64
	g, ctx := errgroup.WithContext(ctx)
	workers := runtime.NumCPU() + 2
	if v.r.Remote() {
		workers = v.o.ReadAhead
	}
	for range max(workers, 1) {
		g.Go(func() error {
			var plain, blob []byte
			for {
				k := int(next.Add(1) - 1)
				if k >= v.ix.Len() {
					return nil
				}
				i, d := v.ix.At(k)
				var err error
				if plain, blob, err = v.r.GetEntry(ctx, d, v.ix.Base(i), plain, blob); err != nil {
					return fmt.Errorf("%s: %w", v.name, err)
				}
				off, n := v.grid.Chunk(i)
				if int64(len(plain)) != n {
					return fmt.Errorf("%s: %w", v.name, &repo.ChunkError{Key: repo.ChunkKey(d),
						Err: fmt.Errorf("%w: %d bytes for chunk %d of %d bytes", chunker.ErrCorrupt, len(plain), i, n)})
				}
				if err := writeNonZero(ctx, t, plain, off); err != nil {
					return err
				}
				v.fetches.Add(1)
				if count != nil {
					count(n)
				}
			}
		})
	}
	return g.Wait()
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
