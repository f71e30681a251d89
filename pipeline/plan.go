package pipeline

import (
	"context"
	"fmt"
	"iter"
	"math/rand/v2"

	"github.com/nbdmover/nbdmover/chunker"
	"github.com/nbdmover/nbdmover/nbdclient"
	"github.com/nbdmover/nbdmover/repo/index"
)

// span is a range of the disk, relative to a chunk's start.
type span struct{ off, n int64 }

// What a plan is for.
const (
	planBuild  = iota // build the chunk: its digest goes into the index
	planVerify        // a clean chunk: its digest must equal the parent's
	planHeal          // a clean chunk whose stored copy is damaged: built, and must equal the parent's
)

// chunkPlan says how to build one chunk: read the spans, zero the rest.
type chunkPlan struct {
	kind  int
	index int64
	off   int64 // disk offset of the chunk
	n     int64 // chunk length
	reads []span
	// dirty: the 64 KiB blocks the dirty bitmap marks (nil when none
	// is), what a patch of the chunk would hold.
	dirty chunker.Blocks
}

// readBytes is how many bytes the plan reads from the disk.
func (p chunkPlan) readBytes() int64 {
	var n int64
	for _, s := range p.reads {
		n += s.n
	}
	return n
}

// addRead adds n bytes at rel (relative to the chunk) to read, joining
// them with the span before when adjacent.
func (p *chunkPlan) addRead(rel, n int64) {
	if k := len(p.reads) - 1; k >= 0 && p.reads[k].off+p.reads[k].n == rel {
		p.reads[k].n += n
		return
	}
	p.reads = append(p.reads, span{rel, n})
}

// planner decides which chunks of a disk to build, from the disk's extents
// walked in order.
//
// On a full run (parent nil) every chunk that is not all holes/zeroes is
// built; the others are zero chunks. On an incremental run every chunk a
// dirty extent touches is built, and so is every stale chunk (one whose
// length changed with a resize) and every chunk a grow of the disk added;
// the other chunks, clean, keep the parent's digest, except that a clean
// chunk that is all holes/zeroes now while the parent's digest is not the
// zero chunk is built (as zero: the bitmap missed a discard). A built
// chunk reads the spans that are not zero extents and zero-fills the rest,
// so a dirty chunk the guest zeroed or discarded becomes the zero chunk; a
// chunk to build with nothing to read is the zero chunk at once (zero),
// never sent to the readers.
//
// On an incremental run the planner also picks sample clean chunks that
// hold data, uniformly at random (a reservoir), and plans them last as
// planVerify: reading them proves the bitmap did not miss their changes.
type planner struct {
	grid   chunker.Grid
	parent *index.Index // the parent's index, resized to the disk; nil on a full run
	stale  map[int64]bool
	// grown: chunks from this index on were past the end of the disk at
	// the parent (it grew): they are built, whatever the bitmap says.
	grown  int64
	sample int        // clean chunks to verify on an incremental run
	rng    *rand.Rand // picks them
	// heal reports whether the parent's digest of clean chunk i is
	// damaged in the repository (nil: none is): the chunk is built then.
	heal func(i int64) bool
	// minDirty: a bitmap that is never cleared must mark at least this
	// many bytes (what it marked at the parent); 0 for no such check.
	minDirty int64

	// The outcomes: build sends a plan to the readers; zero records a
	// chunk built as the zero chunk without reading; skip accounts for
	// chunks first .. first+count-1 (bytes in all) that keep their digest.
	build func(chunkPlan) error
	zero  func(index, n int64)
	skip  func(first, count, bytes int64)
	// lie records a bitmap caught lying, lied tells whether one was: the
	// planner then stops planning, and the run ends without cancelling
	// reads in flight (the connections stay usable for a full run).
	lie  func(*BitmapError)
	lied func() bool

	next        int         // the parent's first entry not yet passed (a cursor: chunks come in order)
	picked      []chunkPlan // the reservoir
	candidates  int64       // clean chunks with data seen so far
	dirtyBytes  int64       // bytes the dirty bitmap marks
	zeroedClean int64       // clean chunks planned as zero
}

// run walks the extents and decides every chunk of the disk. Chunks to
// build come in disk order, the chunks to verify after them.
func (p *planner) run(ctx context.Context, extents iter.Seq2[nbdclient.Extent, error]) error {
	w := walk{p: p}
	for e, err := range extents {
		if err != nil {
			return err
		}
		if err := w.extent(e); err != nil {
			return err
		}
	}
	if w.pos != p.grid.Size {
		return fmt.Errorf("internal error: the extents end at %d of a %d-byte disk", w.pos, p.grid.Size)
	}
	if err := w.flush(); err != nil {
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
		if err := p.build(c); err != nil {
			return err
		}
	}
	return nil
}

// parentHas reports whether the parent lists chunk i (a digest that is
// not zero). Calls come with i not decreasing.
func (p *planner) parentHas(i int64) bool {
	for p.next < p.parent.Len() {
		c, _ := p.parent.At(p.next)
		if c >= i {
			return c == i
		}
		p.next++
	}
	return false
}

// decide builds or skips one chunk, and offers clean chunks with data to
// the sample.
func (p *planner) decide(c chunkPlan, touched bool) error {
	if p.parent == nil {
		if len(c.reads) > 0 {
			return p.build(c)
		}
		p.skip(c.index, 1, c.n)
		return nil
	}
	switch {
	case touched || p.stale[c.index] || c.index >= p.grown:
	case len(c.reads) == 0 && p.parentHas(c.index):
		p.zeroedClean++
	case len(c.reads) > 0 && p.heal != nil && p.heal(c.index):
		c.kind = planHeal
	case len(c.reads) > 0:
		p.offer(c)
		fallthrough
	default:
		p.skip(c.index, 1, c.n)
		return nil
	}
	if len(c.reads) == 0 {
		p.zero(c.index, c.n)
		return nil
	}
	return p.build(c)
}

// zeroRun decides chunks lo .. hi-1, which lie wholly in one clean zero
// extent: without a parent they are zero chunks; with one, those it lists
// (and stale ones) become zero, the others keep their zero digest. Cost:
// the parent's entries in the run, not the run's length.
func (p *planner) zeroRun(lo, hi int64) {
	cs := p.grid.ChunkSize
	if p.parent == nil {
		p.skip(lo, hi-lo, (hi-lo)*cs)
		return
	}
	from := lo
	for i := lo; i < hi; {
		// the next chunk in the run that the parent lists, or is stale
		next := hi
		if p.parentHasFrom(i, hi) {
			c, _ := p.parent.At(p.next)
			next = c
		}
		for s := range p.stale {
			if s >= i && s < next {
				next = s
			}
		}
		if next == hi {
			break
		}
		if next > from {
			p.skip(from, next-from, (next-from)*cs)
		}
		if !p.stale[next] {
			p.zeroedClean++
		}
		p.zero(next, cs)
		i, from = next+1, next+1
	}
	if hi > from {
		p.skip(from, hi-from, (hi-from)*cs)
	}
}

// parentHasFrom reports whether the parent lists a chunk in [i, hi), and
// leaves the cursor on the first such.
func (p *planner) parentHasFrom(i, hi int64) bool {
	p.parentHas(i)
	if p.next >= p.parent.Len() {
		return false
	}
	c, _ := p.parent.At(p.next)
	return c < hi
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

// walk is the state of one run over the extents: the chunk being put
// together from them.
type walk struct {
	p       *planner
	cur     *chunkPlan
	touched bool  // a dirty extent touches cur
	pos     int64 // the extents must cover the disk in order
}

// extent adds an extent to the chunks it covers, deciding each chunk it
// completes. Whole chunks in a clean zero extent are decided in bulk.
func (w *walk) extent(e nbdclient.Extent) error {
	g := w.p.grid
	if e.Offset != w.pos || e.Length <= 0 || e.End() > g.Size {
		return fmt.Errorf("internal error: extent %d+%d does not follow %d on a %d-byte disk", e.Offset, e.Length, w.pos, g.Size)
	}
	w.pos = e.End()
	if e.Flags&nbdclient.Dirty != 0 {
		w.p.dirtyBytes += e.Length
	}
	clean := e.Flags&nbdclient.Zero != 0 && e.Flags&nbdclient.Dirty == 0
	for off := e.Offset; off < e.End(); {
		if clean && off%g.ChunkSize == 0 && (e.End()-off)/g.ChunkSize > 1 {
			// Chunks off.. wholly inside the extent but the last (which
			// may go on into the next extent): decided in bulk.
			if err := w.flush(); err != nil {
				return err
			}
			lo := g.Index(off)
			hi := lo + (e.End()-off)/g.ChunkSize - 1
			w.p.zeroRun(lo, hi)
			off = hi * g.ChunkSize
			continue
		}
		if i := g.Index(off); w.cur == nil || w.cur.index != i {
			if err := w.flush(); err != nil {
				return err
			}
			coff, n := g.Chunk(i)
			w.cur, w.touched = &chunkPlan{index: i, off: coff, n: n}, false
		}
		end := min(e.End(), w.cur.off+w.cur.n)
		if e.Flags&nbdclient.Zero == 0 {
			w.cur.addRead(off-w.cur.off, end-off)
		}
		if e.Flags&nbdclient.Dirty != 0 {
			w.touched = true
			if w.cur.dirty == nil {
				w.cur.dirty = chunker.NewBlocks(w.cur.n)
			}
			w.cur.dirty.AddRange(off-w.cur.off, end-off)
		}
		off = end
	}
	return nil
}

// flush decides the chunk put together so far.
func (w *walk) flush() error {
	if w.cur == nil {
		return nil
	}
	c := *w.cur
	w.cur = nil
	return w.p.decide(c, w.touched)
}

// SampleSize is how many clean chunks an incremental verifies by default:
// 16 plus 0.1% of the chunks that hold data (at the parent), at most 256.
func SampleSize(parent *index.Index) int {
	return int(min(256, 16+(int64(parent.Len())+999)/1000))
}
