// Package index is the index chain's data: an Index lists the chunks of
// one disk of one backup that hold data, a Delta what changed from one
// backup to the next, and both are stored as parts (index objects; byte
// format in docs/format.md, "Index objects"). Package repo stores and
// loads them; this package only builds, applies, merges, encodes and
// decodes them, and checks what it decodes.
package index

import (
	"cmp"
	"encoding/binary"
	"errors"
	"fmt"
	"iter"
	"slices"

	"github.com/nbdmover/nbdmover/chunker"
)

// Index lists the chunks of one disk of one backup: the digest of every
// chunk that is not all zero, in chunk order (a chunk it does not list is
// a zero chunk), and for a chunk stored as a patch the digest of its base
// (docs/format.md, "Patched chunks"). It takes 40 bytes per listed chunk,
// whatever the disk's size, and about 100 more per patched one. An Index
// is not modified once built; it may be read from any number of
// goroutines.
type Index struct {
	ChunkSize int64
	Size      int64 // disk size in bytes
	chunks    []int64
	digests   []chunker.Digest
	bases     map[int64]chunker.Digest // patched chunks' bases; nil when none is
}

// New returns an index of a disk of size bytes with every chunk zero.
func New(chunkSize, size int64) *Index {
	return &Index{ChunkSize: chunkSize, Size: size}
}

// Grid is the index's chunk grid.
func (ix *Index) Grid() chunker.Grid { return chunker.Grid{ChunkSize: ix.ChunkSize, Size: ix.Size} }

// Count is the number of chunks of the disk.
func (ix *Index) Count() int64 { return ix.Grid().Count() }

// Len is the number of chunks that are not zero.
func (ix *Index) Len() int { return len(ix.chunks) }

// At returns the k-th chunk that is not zero (0 <= k < Len).
func (ix *Index) At(k int) (int64, chunker.Digest) { return ix.chunks[k], ix.digests[k] }

// Digest returns chunk i's digest (ZeroChunk for a zero chunk).
func (ix *Index) Digest(i int64) chunker.Digest {
	k, ok := slices.BinarySearch(ix.chunks, i)
	if !ok {
		return chunker.ZeroChunk
	}
	return ix.digests[k]
}

// Base returns the base of chunk i when it is stored as a patch, and the
// zero digest when it is stored whole (or is zero).
func (ix *Index) Base(i int64) chunker.Digest { return ix.bases[i] }

// Patched is how many chunks are stored as patches.
func (ix *Index) Patched() int { return len(ix.bases) }

// All yields the chunks that are not zero, in order.
func (ix *Index) All() iter.Seq2[int64, chunker.Digest] {
	return func(yield func(int64, chunker.Digest) bool) {
		for k, i := range ix.chunks {
			if !yield(i, ix.digests[k]) {
				return
			}
		}
	}
}

// Resized returns a copy of ix for a disk that now has size bytes: chunks
// past the new end are dropped and new chunks are zero. A chunk whose
// length changed (the old or new last chunk) cannot keep its digest: it is
// dropped (zero) and returned in stale, and the caller must read it again.
func (ix *Index) Resized(size int64) (out *Index, stale []int64) {
	out = &Index{ChunkSize: ix.ChunkSize, Size: size}
	old, g := ix.Grid(), out.Grid()
	n := min(old.Count(), g.Count())
	for _, i := range []int64{old.Count() - 1, g.Count() - 1} { // only last chunks change length
		if i < 0 || i >= n || slices.Contains(stale, i) {
			continue
		}
		if _, a := old.Chunk(i); a != g.ChunkLen(i) {
			stale = append(stale, i)
		}
	}
	slices.Sort(stale)
	for k, i := range ix.chunks {
		if i < n && !slices.Contains(stale, i) {
			out.chunks = append(out.chunks, i)
			out.digests = append(out.digests, ix.digests[k])
			out.setBase(i, ix.bases[i])
		}
	}
	return out, stale
}

// setBase records chunk i's base (nothing for the zero digest: stored
// whole).
func setBase(m *map[int64]chunker.Digest, i int64, b chunker.Digest) {
	if b.IsZeroChunk() {
		return
	}
	if *m == nil {
		*m = map[int64]chunker.Digest{}
	}
	(*m)[i] = b
}

func (ix *Index) setBase(i int64, b chunker.Digest) { setBase(&ix.bases, i, b) }
func (d *Delta) setBase(i int64, b chunker.Digest)  { setBase(&d.bases, i, b) }

// Builder collects the digests of built chunks into an Index or a Delta.
type Builder struct {
	entries []entry
}

type entry struct {
	chunk  int64
	digest chunker.Digest
	base   chunker.Digest
}

// Set records chunk i's digest (ZeroChunk for a zero chunk) and, for a
// chunk stored as a patch, its base (the zero digest otherwise). Each
// chunk is set at most once. Set is not safe for concurrent use: callers
// hold a lock.
func (b *Builder) Set(i int64, d, base chunker.Digest) {
	b.entries = append(b.entries, entry{i, d, base})
}

// sorted returns the entries in chunk order.
func (b *Builder) sorted() []entry {
	slices.SortFunc(b.entries, func(x, y entry) int { return cmp.Compare(x.chunk, y.chunk) })
	return b.entries
}

// Index returns the index of a full backup: the chunks set to a digest
// that is not zero (the others are zero).
func (b *Builder) Index(chunkSize, size int64) *Index {
	ix := &Index{ChunkSize: chunkSize, Size: size}
	for _, e := range b.sorted() {
		if !e.digest.IsZeroChunk() {
			ix.chunks = append(ix.chunks, e.chunk)
			ix.digests = append(ix.digests, e.digest)
			ix.setBase(e.chunk, e.base)
		}
	}
	return ix
}

// Delta returns what an incremental changed of parent (the disk's index
// at the parent backup, before any resize) for a disk that now has size
// bytes: the chunks set to a digest or base other than parent's. Every chunk whose
// length changed with the resize, and every chunk past the old end that is
// not zero, must have been set.
func (b *Builder) Delta(parent *Index, size int64) *Delta {
	d := &Delta{ChunkSize: parent.ChunkSize, Size: size, Trunc: min(parent.Size, size), Backups: 1}
	for _, e := range b.sorted() {
		if e.digest != parent.Digest(e.chunk) || e.base != parent.Base(e.chunk) {
			d.chunks = append(d.chunks, e.chunk)
			d.digests = append(d.digests, e.digest)
			d.setBase(e.chunk, e.base)
		}
	}
	return d
}

// Delta is what one or more incrementals in a row changed of a disk's
// index: the chunks whose digest or base changed (ZeroChunk: it became zero), the
// disk's size after them, and the smallest size the disk had in between
// (Trunc: chunks past it were dropped from the index the delta applies
// to).
type Delta struct {
	ChunkSize   int64
	Size, Trunc int64
	Backups     int // how many incrementals' changes it holds
	chunks      []int64
	digests     []chunker.Digest
	bases       map[int64]chunker.Digest
}

// Len is the number of chunks the delta lists.
func (d *Delta) Len() int { return len(d.chunks) }

// truncCount is the number of chunks of base that survive a truncation to
// trunc bytes: the chunks wholly or partly below it. (A chunk cut by it
// changed length and is listed by the delta that cut it.)
func truncCount(chunkSize, trunc int64) int64 {
	return (trunc + chunkSize - 1) / chunkSize
}

// Apply returns base with the delta applied.
func (ix *Index) Apply(d *Delta) *Index {
	out := &Index{ChunkSize: ix.ChunkSize, Size: d.Size}
	keep := truncCount(ix.ChunkSize, d.Trunc)
	a, b := 0, 0
	for a < len(ix.chunks) || b < len(d.chunks) {
		var i int64
		var dg, base chunker.Digest
		switch {
		case b >= len(d.chunks) || a < len(ix.chunks) && ix.chunks[a] < d.chunks[b]:
			i, dg, base = ix.chunks[a], ix.digests[a], ix.bases[ix.chunks[a]]
			a++
			if i >= keep {
				continue
			}
		case a >= len(ix.chunks) || d.chunks[b] < ix.chunks[a]:
			i, dg, base = d.chunks[b], d.digests[b], d.bases[d.chunks[b]]
			b++
		default: // both: the delta wins
			i, dg, base = d.chunks[b], d.digests[b], d.bases[d.chunks[b]]
			a++
			b++
		}
		if !dg.IsZeroChunk() {
			out.chunks = append(out.chunks, i)
			out.digests = append(out.digests, dg)
			out.setBase(i, base)
		}
	}
	return out
}

// Merge returns the delta of older followed by newer.
func Merge(older, newer *Delta) *Delta {
	out := &Delta{ChunkSize: older.ChunkSize, Size: newer.Size, Trunc: min(older.Trunc, newer.Trunc),
		Backups: older.Backups + newer.Backups}
	keep := truncCount(older.ChunkSize, newer.Trunc)
	a, b := 0, 0
	for a < len(older.chunks) || b < len(newer.chunks) {
		switch {
		case b >= len(newer.chunks) || a < len(older.chunks) && older.chunks[a] < newer.chunks[b]:
			if i := older.chunks[a]; i < keep {
				out.chunks = append(out.chunks, i)
				out.digests = append(out.digests, older.digests[a])
				out.setBase(i, older.bases[i])
			}
			a++
		case a >= len(older.chunks) || newer.chunks[b] < older.chunks[a]:
			i := newer.chunks[b]
			out.chunks = append(out.chunks, i)
			out.digests = append(out.digests, newer.digests[b])
			out.setBase(i, newer.bases[i])
			b++
		default:
			i := newer.chunks[b]
			out.chunks = append(out.chunks, i)
			out.digests = append(out.digests, newer.digests[b])
			out.setBase(i, newer.bases[i])
			a++
			b++
		}
	}
	return out
}

// Index objects (format 2; see docs/format.md): the plaintext of a meta
// blob under indexes/, little endian. A part that lists a patched chunk
// is of version 3 (magic NBX3), whose entries carry a flag and the base.
const (
	indexMagic      = "NBX2"
	patchedMagic    = "NBX3"
	indexHeaderSize = 40
	KindFull        = 1
	KindDelta       = 2
	// PartEntries bounds the entries of one index object, so that its
	// plaintext stays well under chunker.MaxChunkSize: 256 Ki entries of
	// at most 42 bytes, or in a part with patched chunks (entries of up
	// to 74 bytes) half as many.
	PartEntries = 256 << 10
)

// ErrBadIndex is matched by every index decoding failure.
var ErrBadIndex = errors.New("bad index")

func badIndex(format string, args ...any) error {
	return fmt.Errorf("%w: %s", ErrBadIndex, fmt.Sprintf(format, args...))
}

// Part is the content of one index object: its header, and (decoded by
// UnmarshalPart, or split from an index) its entries.
type Part struct {
	Kind        byte // KindFull or KindDelta
	ChunkSize   int64
	Size, Trunc int64
	Count       uint64 // entries, as the header says (WalkPart)
	chunks      []int64
	digests     []chunker.Digest
	bases       map[int64]chunker.Digest
}

// Add appends an entry to a part being built by hand (entries in
// increasing chunk order; the part's header set by the caller); base is
// the zero digest for a chunk stored whole.
func (p *Part) Add(i int64, d, base chunker.Digest) {
	p.chunks = append(p.chunks, i)
	p.digests = append(p.digests, d)
	setBase(&p.bases, i, base)
}

// Len is the number of entries the part holds.
func (p *Part) Len() int { return len(p.chunks) }

// Marshal encodes the part: header, then per entry the gap to the previous
// chunk (uvarint) and the digest; in a part with patched chunks (NBX3)
// the gap shifted left by one with the low bit set for a patched chunk,
// whose digest its base's follows.
func (p *Part) Marshal() []byte {
	b := make([]byte, indexHeaderSize, indexHeaderSize+34*len(p.chunks)+32*len(p.bases))
	copy(b, indexMagic)
	if len(p.bases) > 0 {
		copy(b, patchedMagic)
	}
	b[4] = p.Kind
	binary.LittleEndian.PutUint32(b[8:], uint32(p.ChunkSize))
	binary.LittleEndian.PutUint64(b[12:], uint64(p.Size))
	binary.LittleEndian.PutUint64(b[20:], uint64(p.Trunc))
	binary.LittleEndian.PutUint64(b[28:], uint64(len(p.chunks)))
	prev := int64(-1)
	for k, i := range p.chunks {
		gap := uint64(i - prev - 1)
		base, patched := p.bases[i]
		switch {
		case patched:
			gap = gap<<1 | 1
		case len(p.bases) > 0:
			gap <<= 1
		}
		b = binary.AppendUvarint(b, gap)
		b = append(b, p.digests[k][:]...)
		if patched {
			b = append(b, base[:]...)
		}
		prev = i
	}
	return b
}

// UnmarshalPart decodes and checks an index object's plaintext.
func UnmarshalPart(b []byte) (*Part, error) {
	p := &Part{}
	err := WalkPart(b, p, func(i int64, d, base chunker.Digest) {
		if p.chunks == nil {
			p.chunks = make([]int64, 0, p.Count)
			p.digests = make([]chunker.Digest, 0, p.Count)
		}
		p.chunks = append(p.chunks, i)
		p.digests = append(p.digests, d)
		setBase(&p.bases, i, base)
	})
	if err != nil {
		return nil, err
	}
	return p, nil
}

// WalkPart checks an index object's plaintext, sets p's header
// fields (not its entries) and calls fn for each entry (base: the zero
// digest unless the chunk is patched), without keeping them. Entries are
// checked as they are walked: fn may have seen some when an error is
// returned.
func WalkPart(b []byte, p *Part, fn func(i int64, d, base chunker.Digest)) error {
	if len(b) < indexHeaderSize {
		return badIndex("%d bytes is too short (truncated?)", len(b))
	}
	flagged := string(b[:4]) == patchedMagic
	if string(b[:4]) != indexMagic && !flagged {
		return badIndex("bad magic %q", b[:4])
	}
	*p = Part{Kind: b[4], ChunkSize: int64(binary.LittleEndian.Uint32(b[8:])),
		Size: int64(binary.LittleEndian.Uint64(b[12:])), Trunc: int64(binary.LittleEndian.Uint64(b[20:])),
		Count: binary.LittleEndian.Uint64(b[28:])}
	switch {
	case p.Kind != KindFull && p.Kind != KindDelta:
		return badIndex("unknown kind %d", p.Kind)
	case b[5] != 0 || b[6] != 0 || b[7] != 0 || binary.LittleEndian.Uint32(b[36:]) != 0:
		return badIndex("reserved bytes are not zero")
	case chunker.CheckChunkSize(p.ChunkSize) != nil:
		return badIndex("chunk size %d", p.ChunkSize)
	case p.Size < 0 || p.Trunc < 0 || p.Trunc > p.Size && p.Kind == KindDelta || p.Kind == KindFull && p.Trunc != p.Size:
		return badIndex("disk size %d, truncated to %d", p.Size, p.Trunc)
	case p.Count > uint64(len(b)-indexHeaderSize)/33:
		return badIndex("%d entries do not fit %d bytes (truncated?)", p.Count, len(b))
	}
	grid := chunker.Grid{ChunkSize: p.ChunkSize, Size: p.Size}
	rest, prev, patched := b[indexHeaderSize:], int64(-1), 0
	for k := range p.Count {
		gap, n := binary.Uvarint(rest)
		if n <= 0 || n != uvarintLen(gap) {
			return badIndex("entry %d is damaged (truncated?)", k)
		}
		flag := false
		if flagged {
			gap, flag = gap>>1, gap&1 == 1
		}
		size := n + 32
		if flag {
			size += 32
			patched++
		}
		if len(rest) < size || gap >= uint64(grid.Count()) {
			return badIndex("entry %d is damaged (truncated?)", k)
		}
		i := prev + 1 + int64(gap)
		if i >= grid.Count() {
			return badIndex("chunk %d is past the end of a %d-byte disk", i, p.Size)
		}
		d := chunker.Digest(rest[n : n+32])
		if d.IsZeroChunk() && p.Kind == KindFull {
			return badIndex("a full index lists zero chunk %d", i)
		}
		var base chunker.Digest
		if flag {
			base = chunker.Digest(rest[n+32 : n+64])
			if d.IsZeroChunk() || base.IsZeroChunk() || base == d {
				return badIndex("chunk %d is patched with a zero digest or itself as base", i)
			}
		}
		fn(i, d, base)
		rest, prev = rest[n+32:], i
		if flag {
			rest = rest[32:]
		}
	}
	if len(rest) != 0 {
		return badIndex("%d bytes after the last entry", len(rest))
	}
	if flagged && patched == 0 {
		return badIndex("a version 3 part lists no patched chunk") // one encoding per part
	}
	return nil
}

// Parts splits the index into its index objects.
func (ix *Index) Parts() []*Part {
	return splitParts(KindFull, ix.ChunkSize, ix.Size, ix.Size, ix.chunks, ix.digests, ix.bases)
}

// Parts splits the delta into its index objects.
func (d *Delta) Parts() []*Part {
	return splitParts(KindDelta, d.ChunkSize, d.Size, d.Trunc, d.chunks, d.digests, d.bases)
}

// splitParts splits a full index or a delta into index objects of at most
// PartEntries entries (at least one, also when empty).
func splitParts(kind byte, chunkSize, size, trunc int64, chunks []int64, digests []chunker.Digest, bases map[int64]chunker.Digest) []*Part {
	var out []*Part
	step := PartEntries
	if len(bases) > 0 {
		step /= 2
	}
	for lo := 0; lo == 0 || lo < len(chunks); lo += step {
		hi := min(lo+step, len(chunks))
		p := &Part{Kind: kind, ChunkSize: chunkSize, Size: size, Trunc: trunc,
			chunks: chunks[lo:hi], digests: digests[lo:hi]}
		if len(bases) > 0 {
			for _, i := range p.chunks {
				setBase(&p.bases, i, bases[i])
			}
		}
		out = append(out, p)
	}
	return out
}

// uvarintLen is the length of gap's minimal uvarint, the only encoding a
// decoder accepts (so that an object has one encoding).
func uvarintLen(gap uint64) int {
	var b [binary.MaxVarintLen64]byte
	return binary.PutUvarint(b[:], gap)
}

// Link assembles one link of a chain (a full index, or a delta) from its
// parts, in order, checking that they belong together.
type Link struct {
	kind      byte
	chunkSize int64
	full      Index
	delta     Delta
	parts     int
}

// NewLink starts a link of kind (KindFull or KindDelta) of chunkSize-byte
// chunks, holding backups incrementals' changes (a delta's).
func NewLink(kind byte, chunkSize int64, backups int) *Link {
	return &Link{kind: kind, chunkSize: chunkSize, delta: Delta{Backups: backups}}
}

// Add decodes the next part (an index object's plaintext) and appends it.
func (l *Link) Add(b []byte) error {
	p, err := UnmarshalPart(b)
	if err != nil {
		return err
	}
	prevSize, prevTrunc := l.full.Size, l.delta.Trunc
	if l.kind == KindDelta {
		prevSize = l.delta.Size
	}
	what := "full"
	if l.kind == KindDelta {
		what = "delta"
	}
	switch {
	case p.Kind != l.kind || p.ChunkSize != l.chunkSize:
		return badIndex("not a %s index of %d-byte chunks", what, l.chunkSize)
	case l.parts > 0 && (p.Size != prevSize || p.Trunc != prevTrunc && l.kind == KindDelta):
		return badIndex("its parts disagree on the disk's size")
	case len(p.chunks) > 0 && (len(l.full.chunks) > 0 && p.chunks[0] <= l.full.chunks[len(l.full.chunks)-1] ||
		len(l.delta.chunks) > 0 && p.chunks[0] <= l.delta.chunks[len(l.delta.chunks)-1]):
		return badIndex("its parts overlap")
	}
	l.parts++
	l.full.ChunkSize, l.full.Size = l.chunkSize, p.Size
	l.delta.ChunkSize, l.delta.Size, l.delta.Trunc = l.chunkSize, p.Size, p.Trunc
	if l.kind == KindFull {
		l.full.chunks, l.full.digests = append(l.full.chunks, p.chunks...), append(l.full.digests, p.digests...)
		for i, b := range p.bases {
			l.full.setBase(i, b)
		}
	} else {
		l.delta.chunks, l.delta.digests = append(l.delta.chunks, p.chunks...), append(l.delta.digests, p.digests...)
		for i, b := range p.bases {
			l.delta.setBase(i, b)
		}
	}
	return nil
}

// Entries is how many entries the parts added so far hold.
func (l *Link) Entries() int64 { return int64(len(l.full.chunks) + len(l.delta.chunks)) }

// Index is the link as a full index (a full link's), Delta as a delta.
func (l *Link) Index() *Index { return &l.full }
func (l *Link) Delta() *Delta { return &l.delta }

// Diff returns the delta that makes parent into ix (parent.Apply(Diff)
// equals ix): the chunks whose digest or base differs, with ZeroChunk for those
// that became zero, and the truncation a change of size needs.
func Diff(parent, ix *Index) *Delta {
	d := &Delta{ChunkSize: ix.ChunkSize, Size: ix.Size, Trunc: min(parent.Size, ix.Size), Backups: 1}
	keep := truncCount(parent.ChunkSize, d.Trunc) // the parent's chunks past it are dropped by Apply
	a, b := 0, 0
	for a < len(parent.chunks) || b < len(ix.chunks) {
		switch {
		case b >= len(ix.chunks) || a < len(parent.chunks) && parent.chunks[a] < ix.chunks[b]:
			if i := parent.chunks[a]; i < keep { // zero now
				d.chunks = append(d.chunks, i)
				d.digests = append(d.digests, chunker.ZeroChunk)
			}
			a++
		case a >= len(parent.chunks) || ix.chunks[b] < parent.chunks[a]:
			i := ix.chunks[b]
			d.chunks = append(d.chunks, i)
			d.digests = append(d.digests, ix.digests[b])
			d.setBase(i, ix.bases[i])
			b++
		default:
			if i := ix.chunks[b]; i >= keep || ix.digests[b] != parent.digests[a] || ix.bases[i] != parent.bases[i] {
				d.chunks = append(d.chunks, i)
				d.digests = append(d.digests, ix.digests[b])
				d.setBase(i, ix.bases[i])
			}
			a++
			b++
		}
	}
	return d
}
