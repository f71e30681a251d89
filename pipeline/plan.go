package pipeline

import (
	"context"
	"fmt"
	"iter"
	"math/rand/v2"

	"github.com/nbdmover/nbdmover/chunker"
	"github.com/nbdmover/nbdmover/nbdclient"
)

// span is a range of the disk, relative to a chunk's start.
type span struct{ off, n int64 }

// What a plan is for.
const (
	planBuild  = iota // build the chunk: its digest goes into the index
	planVerify        // a clean chunk: its digest must equal the parent's
)

// chunkPlan says how to build one chunk: read the spans, zero the rest.
type chunkPlan struct {
	kind  int
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
// length changed with a resize); the other chunks, clean, keep the
// parent's digest, except that a clean chunk that is all holes/zeroes now
// while the parent's digest is not the zero chunk is built (as zero: the
// bitmap missed a discard). A built chunk reads the spans that are not
// zero extents and zero-fills the rest, so a dirty chunk the guest zeroed
// or discarded becomes the zero chunk.
//
// On an incremental run the planner also picks sample clean chunks that
// hold data, uniformly at random (a reservoir), and plans them last as
// planVerify: reading them proves the bitmap did not miss their changes.
type planner struct {
	grid   chunker.Grid
	parent []chunker.Digest // the parent's digests, resized to the disk; nil on a full run
	stale  map[int64]bool
	sample int        // clean chunks to verify on an incremental run
	rng    *rand.Rand // picks them
	// minDirty: a bitmap that is never cleared must mark at least this
	// many bytes (what it marked at the parent); 0 for no such check.
	minDirty int64

	// lie records a bitmap caught lying, lied tells whether one was: the
	// planner then stops planning, and the run ends without cancelling
	// reads in flight (the connections stay usable for a full run).
	lie  func(*BitmapError)
	lied func() bool

	picked      []chunkPlan // the reservoir
	candidates  int64       // clean chunks with data seen so far
	dirtyBytes  int64       // bytes the dirty bitmap marks
	zeroedClean int64       // clean chunks planned as zero
}

// run walks the extents and calls build for each chunk to build or
// verify, and skip for each other chunk. Chunks to build come in disk
// order, the chunks to verify after them.
func (p *planner) run(ctx context.Context, extents iter.Seq2[nbdclient.Extent, error],
	build func(chunkPlan) error, skip func(index, n int64)) error {
	var cur *chunkPlan
	touched := false
	var pos int64 // the extents must cover the disk in order
	flush := func() error {
		if cur == nil {
			return nil
		}
		c := *cur
		cur = nil
		return p.decide(c, touched, build, skip)
	}
	for e, err := range extents {
		if err != nil {
			return err
		}
		if e.Offset != pos || e.Length <= 0 || e.End() > p.grid.Size {
			return fmt.Errorf("internal error: extent %d+%d does not follow %d on a %d-byte disk", e.Offset, e.Length, pos, p.grid.Size)
		}
		pos = e.End()
		if e.Flags&nbdclient.Dirty != 0 {
			p.dirtyBytes += e.Length
		}
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
	if err := flush(); err != nil {
		return err
	}
	if p.dirtyBytes < p.minDirty {
		p.lie(&BitmapError{Chunk: -1, Detail: fmt.Sprintf("marks %d bytes, fewer than the %d it marked at the last backup: "+
			"it was cleared or re-created since", p.dirtyBytes, p.minDirty)})
		return nil
	}
	for _, c := range p.picked {
		if p.lied() {
			return nil
		}
		c.kind = planVerify
		if err := build(c); err != nil {
			return err
		}
	}
	return nil
}

// decide builds or skips one chunk, and offers clean chunks with data to
// the sample.
func (p *planner) decide(c chunkPlan, touched bool, build func(chunkPlan) error, skip func(index, n int64)) error {
	if p.parent == nil {
		if len(c.reads) > 0 {
			return build(c)
		}
		skip(c.index, c.n)
		return nil
	}
	switch {
	case touched || p.stale[c.index]:
		return build(c)
	case len(c.reads) == 0 && !p.parent[c.index].IsZeroChunk():
		p.zeroedClean++
		return build(c)
	case len(c.reads) > 0:
		p.offer(c)
	}
	skip(c.index, c.n)
	return nil
}

// offer puts a clean chunk into the reservoir of chunks to verify with
// the probability that keeps the sample uniform.
func (p *planner) offer(c chunkPlan) {
	p.candidates++
	switch {
	case p.sample <= 0:
	case len(p.picked) < p.sample:
		p.picked = append(p.picked, c)
	default:
		if j := p.rng.Int64N(p.candidates); j < int64(p.sample) {
			p.picked[j] = c
		}
	}
}

// SampleSize is how many clean chunks an incremental verifies by default:
// 16 plus 0.1% of the chunks that hold data (at the parent), at most 256.
func SampleSize(parent []chunker.Digest) int {
	var data int64
	for _, d := range parent {
		if !d.IsZeroChunk() {
			data++
		}
	}
	return int(min(256, 16+(data+999)/1000))
}
