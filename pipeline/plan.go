package pipeline

import (
	"context"
	"fmt"
	"iter"

	"github.com/nbdmover/nbdmover/chunker"
	"github.com/nbdmover/nbdmover/nbdclient"
)

// span is a range of the disk, relative to a chunk's start.
type span struct{ off, n int64 }

// chunkPlan says how to build one chunk: read the spans, zero the rest.
type chunkPlan struct {
	index int64
	off   int64 // disk offset of the chunk
	n     int64 // chunk length
	reads []span
}

// readBytes is how many bytes the plan reads from the disk.
func (p chunkPlan) readBytes() int64 {
	var n int64
	for _, s := range p.reads {
		n += s.n
	}
	return n
}

// planner decides which chunks of a disk to build, from the disk's extents
// walked in order.
//
// On a full run (parent nil) every chunk that is not all holes/zeroes is
// built; the others are zero chunks. On an incremental run every chunk a
// dirty extent touches is built, and so is every stale chunk (one whose
// length changed with a resize); the other chunks keep the parent's
// digest. A built chunk reads the spans that are not zero extents and
// zero-fills the rest, so a dirty chunk the guest zeroed or discarded
// becomes the zero chunk.
type planner struct {
	grid   chunker.Grid
	parent []chunker.Digest // the parent's digests, resized to the disk; nil on a full run
	stale  map[int64]bool
}

// run walks the extents and calls build for each chunk to build and skip
// for each other chunk, in disk order.
func (p *planner) run(ctx context.Context, extents iter.Seq2[nbdclient.Extent, error],
	build func(chunkPlan) error, skip func(index, n int64)) error {
	incremental := p.parent != nil
	var cur *chunkPlan
	touched := false
	var pos int64 // the extents must cover the disk in order
	flush := func() error {
		if cur == nil {
			return nil
		}
		c := *cur
		cur = nil
		if incremental && (touched || p.stale[c.index]) || !incremental && len(c.reads) > 0 {
			return build(c)
		}
		skip(c.index, c.n)
		return nil
	}
	for e, err := range extents {
		if err != nil {
			return err
		}
		if e.Offset != pos || e.Length <= 0 || e.End() > p.grid.Size {
			return fmt.Errorf("internal error: extent %d+%d does not follow %d on a %d-byte disk", e.Offset, e.Length, pos, p.grid.Size)
		}
		pos = e.End()
		for off := e.Offset; off < e.End(); {
			i := p.grid.Index(off)
			if cur == nil || cur.index != i {
				if err := flush(); err != nil {
					return err
				}
				coff, n := p.grid.Chunk(i)
				cur = &chunkPlan{index: i, off: coff, n: n}
				touched = false
			}
			end := min(e.End(), cur.off+cur.n)
			if e.Flags&nbdclient.Zero == 0 {
				rel := off - cur.off
				if k := len(cur.reads) - 1; k >= 0 && cur.reads[k].off+cur.reads[k].n == rel {
					cur.reads[k].n += end - off
				} else {
					cur.reads = append(cur.reads, span{rel, end - off})
				}
			}
			if e.Flags&nbdclient.Dirty != 0 {
				touched = true
			}
			off = end
		}
	}
	if pos != p.grid.Size {
		return fmt.Errorf("internal error: the extents end at %d of a %d-byte disk", pos, p.grid.Size)
	}
	return flush()
}
