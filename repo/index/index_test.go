package index

import (
	"bytes"
	"errors"
	"maps"
	"math/rand/v2"
	"slices"
	"testing"

	"github.com/nbdmover/nbdmover/chunker"
)

// indexOf builds an index of a disk of size bytes from its digests by
// chunk (zero digests are zero chunks).
func indexOf(chunkSize, size int64, digests map[int64]chunker.Digest) *Index {
	return patchedOf(chunkSize, size, digests, nil)
}

// patchedOf is indexOf with some chunks stored as patches over bases.
func patchedOf(chunkSize, size int64, digests, bases map[int64]chunker.Digest) *Index {
	var b Builder
	for i, d := range digests {
		b.Set(i, d, bases[i])
	}
	return b.Index(chunkSize, size)
}

func sampleIndex() *Index {
	return indexOf(256<<10, 5*(256<<10)+4096, map[int64]chunker.Digest{1: chunker.Sum([]byte("one")), 5: chunker.Sum([]byte("last"))})
}

// samplePatched is sampleIndex with chunk 1 a patch over "base".
func samplePatched() *Index {
	return patchedOf(256<<10, 5*(256<<10)+4096, map[int64]chunker.Digest{1: chunker.Sum([]byte("one")), 5: chunker.Sum([]byte("last"))},
		map[int64]chunker.Digest{1: chunker.Sum([]byte("base"))})
}

func TestIndexPart(t *testing.T) {
	ix, px := sampleIndex(), samplePatched()
	for _, p := range []*Part{
		{Kind: KindFull, ChunkSize: ix.ChunkSize, Size: ix.Size, Trunc: ix.Size, chunks: ix.chunks, digests: ix.digests},
		{Kind: KindFull, ChunkSize: px.ChunkSize, Size: px.Size, Trunc: px.Size, chunks: px.chunks, digests: px.digests, bases: px.bases},
		{Kind: KindDelta, ChunkSize: ix.ChunkSize, Size: ix.Size, Trunc: 256 << 10, chunks: []int64{0, 3},
			digests: []chunker.Digest{chunker.ZeroChunk, chunker.Sum([]byte("x"))}},
		{Kind: KindDelta, ChunkSize: ix.ChunkSize, Size: ix.Size, Trunc: 256 << 10, chunks: []int64{0, 3, 4},
			digests: []chunker.Digest{chunker.ZeroChunk, chunker.Sum([]byte("x")), chunker.Sum([]byte("y"))},
			bases:   map[int64]chunker.Digest{4: chunker.Sum([]byte("b"))}},
	} {
		b := p.Marshal()
		if magic := string(b[:4]); magic != map[bool]string{false: "NBX2", true: "NBX3"}[len(p.bases) > 0] {
			t.Fatalf("magic %s for a part with %d patched chunks", magic, len(p.bases))
		}
		got, err := UnmarshalPart(b)
		if err != nil || got.Size != p.Size || got.Trunc != p.Trunc || !slices.Equal(got.chunks, p.chunks) || !slices.Equal(got.digests, p.digests) ||
			!maps.Equal(got.bases, p.bases) {
			t.Fatalf("round trip: %v %+v", err, got)
		}
		for name, bad := range map[string][]byte{
			"truncated":   b[:len(b)-1],
			"header only": b[:indexHeaderSize-1],
			"bad magic":   func() []byte { c := bytes.Clone(b); c[0] = 'X'; return c }(),
			"more count":  func() []byte { c := bytes.Clone(b); c[28]++; return c }(),
			"bad kind":    func() []byte { c := bytes.Clone(b); c[4] = 9; return c }(),
			"extra byte":  append(bytes.Clone(b), 0),
		} {
			if _, err := UnmarshalPart(bad); !errors.Is(err, ErrBadIndex) {
				t.Errorf("%s: %v", name, err)
			}
		}
	}
	// A full index never lists a zero chunk, and entries lie on the grid.
	zero := &Part{Kind: KindFull, ChunkSize: 256 << 10, Size: 1 << 20, Trunc: 1 << 20, chunks: []int64{1}, digests: []chunker.Digest{{}}}
	if _, err := UnmarshalPart(zero.Marshal()); !errors.Is(err, ErrBadIndex) {
		t.Errorf("zero chunk in a full index: %v", err)
	}
	past := &Part{Kind: KindFull, ChunkSize: 256 << 10, Size: 1 << 20, Trunc: 1 << 20, chunks: []int64{4}, digests: []chunker.Digest{{1}}}
	if _, err := UnmarshalPart(past.Marshal()); !errors.Is(err, ErrBadIndex) {
		t.Errorf("chunk past the end: %v", err)
	}
	// A patch's base is a real chunk other than itself, and a version 3
	// part lists at least one patched chunk (one encoding per part).
	for name, bases := range map[string]map[int64]chunker.Digest{"self": {1: {1}}, "zero": {1: {}}} {
		p := &Part{Kind: KindFull, ChunkSize: 256 << 10, Size: 1 << 20, Trunc: 1 << 20, chunks: []int64{1}, digests: []chunker.Digest{{1}}}
		b := p.Marshal()
		b = append(b[:indexHeaderSize:indexHeaderSize], 0<<1|1)
		base := bases[1]
		b = append(append(b, p.digests[0][:]...), base[:]...)
		copy(b, "NBX3")
		if _, err := UnmarshalPart(b); !errors.Is(err, ErrBadIndex) {
			t.Errorf("patched over %s: %v", name, err)
		}
	}
	unflagged := (&Part{Kind: KindFull, ChunkSize: 256 << 10, Size: 1 << 20, Trunc: 1 << 20, chunks: []int64{0}, digests: []chunker.Digest{{1}}}).Marshal()
	copy(unflagged, "NBX3")
	if _, err := UnmarshalPart(unflagged); !errors.Is(err, ErrBadIndex) {
		t.Errorf("a version 3 part without a patched chunk: %v", err)
	}
}

func TestResized(t *testing.T) {
	ix := samplePatched() // 6 chunks, the last 4096 bytes
	grown, stale := ix.Resized(8 * (256 << 10))
	if grown.Count() != 8 || grown.Digest(1) != ix.Digest(1) || grown.Base(1) != ix.Base(1) || grown.Patched() != 1 || !grown.Digest(5).IsZeroChunk() || !slices.Equal(stale, []int64{5}) {
		t.Fatalf("grown: %d chunks, stale %v", grown.Count(), stale)
	}
	shrunk, stale := ix.Resized(2*(256<<10) - 512)
	if shrunk.Count() != 2 || !shrunk.Digest(1).IsZeroChunk() || shrunk.Patched() != 0 || !slices.Equal(stale, []int64{1}) {
		t.Fatalf("shrunk: %v stale %v", shrunk.chunks, stale)
	}
}

// Deltas applied one by one and merged first give the same index, through
// shrinks and grows (a chunk cut by a shrink is listed by its delta).
func TestDeltaApplyMerge(t *testing.T) {
	const cs = 256 << 10
	d := func(n int) chunker.Digest { return chunker.Sum([]byte{byte(n)}) }
	base := patchedOf(cs, 8*cs, map[int64]chunker.Digest{0: d(0), 3: d(3), 6: d(6), 7: d(7)}, map[int64]chunker.Digest{7: d(70)})
	b1 := Builder{} // shrink to 4.5 chunks: chunk 4 changed length (zero now)
	b1.Set(1, d(11), chunker.Digest{})
	b1.Set(4, chunker.ZeroChunk, chunker.Digest{})
	b1.Set(0, d(10), d(0)) // patched over what it was
	b1.Set(2, d(2), chunker.Digest{})
	d1 := b1.Delta(base, 4*cs+cs/2)
	ix1 := base.Apply(d1)
	b2 := Builder{} // grow back to 8 chunks: chunk 4 again, 6 new
	b2.Set(4, d(44), chunker.Digest{})
	b2.Set(6, d(66), chunker.Digest{})
	b2.Set(3, d(3), chunker.Digest{})  // rebuilt, unchanged: not in the delta
	b2.Set(0, d(10), chunker.Digest{}) // the same digest stored whole (a healed patch): in the delta
	b2.Set(2, d(2), d(3))              // the same digest now a patch: in the delta
	d2 := b2.Delta(ix1, 8*cs)
	ix2 := ix1.Apply(d2)
	want := map[int64]chunker.Digest{0: d(10), 1: d(11), 2: d(2), 3: d(3), 4: d(44), 6: d(66)}
	if got := base.Apply(Merge(d1, d2)); !sameIndex(got, ix2) || !sameIndex(ix2, patchedOf(cs, 8*cs, want, map[int64]chunker.Digest{2: d(3)})) || d2.Len() != 4 {
		t.Fatalf("apply %v / merged %v, want %v (delta 2: %v)", ix2.chunks, got.chunks, want, d2.chunks)
	}
	if m := Merge(d1, d2); m.Backups != 2 || m.Trunc != 4*cs+cs/2 || m.Size != 8*cs {
		t.Fatalf("merged delta %+v", m)
	}
}

func sameIndex(a, b *Index) bool {
	return a.Size == b.Size && a.ChunkSize == b.ChunkSize && slices.Equal(a.chunks, b.chunks) && slices.Equal(a.digests, b.digests) &&
		maps.Equal(a.bases, b.bases)
}

func FuzzUnmarshalIndexPart(f *testing.F) {
	ix := sampleIndex()
	f.Add((&Part{Kind: KindFull, ChunkSize: ix.ChunkSize, Size: ix.Size, Trunc: ix.Size, chunks: ix.chunks, digests: ix.digests}).Marshal())
	f.Add((&Part{Kind: KindDelta, ChunkSize: 4 << 20, Size: 1 << 40, Trunc: 1 << 30, chunks: []int64{7, 1 << 18},
		digests: []chunker.Digest{{}, {9}}}).Marshal())
	px := samplePatched()
	f.Add((&Part{Kind: KindFull, ChunkSize: px.ChunkSize, Size: px.Size, Trunc: px.Size, chunks: px.chunks, digests: px.digests, bases: px.bases}).Marshal())
	f.Fuzz(func(t *testing.T, b []byte) {
		p, err := UnmarshalPart(b)
		if err != nil {
			if !errors.Is(err, ErrBadIndex) {
				t.Fatalf("error %v does not match ErrBadIndex", err)
			}
			return
		}
		count := (chunker.Grid{ChunkSize: p.ChunkSize, Size: p.Size}).Count()
		for k, i := range p.chunks {
			if i < 0 || i >= count || k > 0 && i <= p.chunks[k-1] || p.Kind == KindFull && p.digests[k].IsZeroChunk() {
				t.Fatalf("accepted entry %d: chunk %d of %d", k, i, count)
			}
			if b, ok := p.bases[i]; ok && (b.IsZeroChunk() || b == p.digests[k]) {
				t.Fatalf("accepted entry %d: patched over %v", k, b)
			}
		}
		if !bytes.Equal(p.Marshal(), b) {
			t.Fatal("a decoded index part does not encode to the same bytes")
		}
	})
}

// Diff makes a parent into any index: random pairs of indexes of random
// sizes (grown, shrunk, the same) over a few digests, so that equal
// digests at one place are common.
func TestDiff(t *testing.T) {
	const cs = 4096
	rng := rand.New(rand.NewPCG(1, 2))
	random := func() *Index {
		size := rng.Int64N(20*cs) + 1
		m, bases := map[int64]chunker.Digest{}, map[int64]chunker.Digest{}
		for i := range (size + cs - 1) / cs {
			if n := rng.IntN(4); n > 0 {
				m[i] = chunker.Sum([]byte{byte(n)})
				if rng.IntN(3) == 0 { // the same digest, whole or patched over one of two bases
					bases[i] = chunker.Sum([]byte{byte(10 + rng.IntN(2))})
				}
			}
		}
		return patchedOf(cs, size, m, bases)
	}
	for range 2000 {
		parent, ix := random(), random()
		if rng.IntN(4) == 0 {
			ix = indexOf(cs, parent.Size, map[int64]chunker.Digest{}) // all zero now
		}
		d := Diff(parent, ix)
		if got := parent.Apply(d); !sameIndex(got, ix) {
			t.Fatalf("parent %d bytes %v, index %d bytes %v: diff %v %v makes %v", parent.Size, parent.chunks, ix.Size, ix.chunks, d.chunks, d.digests, got.chunks)
		}
		if same := Diff(ix, ix); same.Len() != 0 {
			t.Fatalf("an index against itself: %v", same.chunks)
		}
	}
}

// A part with patched chunks holds half as many entries, so that the
// largest one stays under what a reader accepts (16 MiB).
func TestPatchedPartSize(t *testing.T) {
	const n = PartEntries/2 + 3
	var b Builder
	for i := range int64(n) {
		b.Set(i*1000, chunker.Digest{1, byte(i), byte(i >> 8), byte(i >> 16)}, chunker.Digest{2, byte(i), byte(i >> 8), byte(i >> 16)})
	}
	parts := b.Index(256<<10, int64(n)*1000*(256<<10)).Parts()
	if len(parts) != 2 || parts[0].Len() != PartEntries/2 {
		t.Fatalf("%d parts, the first of %d entries", len(parts), parts[0].Len())
	}
	if size := len(parts[0].Marshal()); size > 16<<20 {
		t.Fatalf("a part of %d bytes", size)
	}
}
