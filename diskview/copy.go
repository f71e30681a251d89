package diskview

import (
	"context"
	"runtime"
	"sync/atomic"

	"github.com/nbdmover/nbdmover/chunker"
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
// runs are not written. It reads the data chunks in order, with as many
// writers as CPUs, each asking for the chunk ReadAhead places ahead of
// the one it takes, so fetches stay in flight while chunks are decoded
// and written. A missing or damaged chunk stops it with an error naming
// the chunk. count, if not nil, is told the length of each data chunk
// written (from any goroutine).
func (v *View) Copy(ctx context.Context, t Target, count func(n int64)) error {
	var next atomic.Int64
	for k := range min(v.o.ReadAhead, v.ix.Len()) {
		v.Prefetch(v.DataChunk(k))
	}
	g, ctx := errgroup.WithContext(ctx)
	for range runtime.NumCPU() {
		g.Go(func() error {
			for {
				k := int(next.Add(1) - 1)
				if k >= v.ix.Len() {
					return nil
				}
				if a := k + v.o.ReadAhead; a < v.ix.Len() {
					v.Prefetch(v.DataChunk(a))
				}
				i := v.DataChunk(k)
				data, err := v.Chunk(ctx, i)
				if err != nil {
					return err
				}
				off, _ := v.grid.Chunk(i)
				if err := writeNonZero(ctx, t, data, off); err != nil {
					return err
				}
				if count != nil {
					count(int64(len(data)))
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
