package index

import (
	"bytes"
	"errors"
	"math/rand/v2"
	"slices"
	"testing"

	"github.com/nbdmover/nbdmover/chunker"
)

// indexOf builds an index of a disk of size bytes from its digests by
// chunk (zero digests are zero chunks).
func indexOf(chunkSize, size int64, digests map[int64]chunker.Digest) *Index {
	var b Builder
	for i, d := range digests {
		b.Set(i, d)
	}
	return b.Index(chunkSize, size)
}

func sampleIndex() *Index {
	return indexOf(256<<10, 5*(256<<10)+4096, map[int64]chunker.Digest{1: chunker.Sum([]byte("one")), 5: chunker.Sum([]byte("last"))})
}

func TestIndexPart(t *testing.T) {
	ix := sampleIndex()
	for _, p := range []*Part{
		{Kind: KindFull, ChunkSize: ix.ChunkSize, Size: ix.Size, Trunc: ix.Size, chunks: ix.chunks, digests: ix.digests},
		{Kind: KindDelta, ChunkSize: ix.ChunkSize, Size: ix.Size, Trunc: 256 << 10, chunks: []int64{0, 3},
			digests: []chunker.Digest{chunker.ZeroChunk, chunker.Sum([]byte("x"))}},
	} {
		b := p.Marshal()
		got, err := UnmarshalPart(b)
		if err != nil || got.Size != p.Size || got.Trunc != p.Trunc || !slices.Equal(got.chunks, p.chunks) || !slices.Equal(got.digests, p.digests) {
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
}

func TestResized(t *testing.T) {
	ix := sampleIndex() // 6 chunks, the last 4096 bytes
	grown, stale := ix.Resized(8 * (256 << 10))
	if grown.Count() != 8 || grown.Digest(1) != ix.Digest(1) || !grown.Digest(5).IsZeroChunk() || !slices.Equal(stale, []int64{5}) {
		t.Fatalf("grown: %d chunks, stale %v", grown.Count(), stale)
	}
	shrunk, stale := ix.Resized(2*(256<<10) - 512)
	if shrunk.Count() != 2 || !shrunk.Digest(1).IsZeroChunk() || !slices.Equal(stale, []int64{1}) {
		t.Fatalf("shrunk: %v stale %v", shrunk.chunks, stale)
	}
}

// Deltas applied one by one and merged first give the same index, through
// shrinks and grows (a chunk cut by a shrink is listed by its delta).
func TestDeltaApplyMerge(t *testing.T) {
	const cs = 256 << 10
	d := func(n int) chunker.Digest { return chunker.Sum([]byte{byte(n)}) }
	base := indexOf(cs, 8*cs, map[int64]chunker.Digest{0: d(0), 3: d(3), 6: d(6), 7: d(7)})
	b1 := Builder{} // shrink to 4.5 chunks: chunk 4 changed length (zero now)
	b1.Set(1, d(11))
	b1.Set(4, chunker.ZeroChunk)
	d1 := b1.Delta(base, 4*cs+cs/2)
	ix1 := base.Apply(d1)
	b2 := Builder{} // grow back to 8 chunks: chunk 4 again, 6 new
	b2.Set(4, d(44))
	b2.Set(6, d(66))
	b2.Set(3, d(3)) // rebuilt, unchanged: not in the delta
	d2 := b2.Delta(ix1, 8*cs)
	ix2 := ix1.Apply(d2)
	want := map[int64]chunker.Digest{0: d(0), 1: d(11), 3: d(3), 4: d(44), 6: d(66)}
	if got := base.Apply(Merge(d1, d2)); !sameIndex(got, ix2) || !sameIndex(ix2, indexOf(cs, 8*cs, want)) || d2.Len() != 2 {
		t.Fatalf("apply %v / merged %v, want %v (delta 2: %v)", ix2.chunks, got.chunks, want, d2.chunks)
	}
	if m := Merge(d1, d2); m.Backups != 2 || m.Trunc != 4*cs+cs/2 || m.Size != 8*cs {
		t.Fatalf("merged delta %+v", m)
	}
}

func sameIndex(a, b *Index) bool {
	return a.Size == b.Size && a.ChunkSize == b.ChunkSize && slices.Equal(a.chunks, b.chunks) && slices.Equal(a.digests, b.digests)
}

func FuzzUnmarshalIndexPart(f *testing.F) {
	ix := sampleIndex()
	f.Add((&Part{Kind: KindFull, ChunkSize: ix.ChunkSize, Size: ix.Size, Trunc: ix.Size, chunks: ix.chunks, digests: ix.digests}).Marshal())
	f.Add((&Part{Kind: KindDelta, ChunkSize: 4 << 20, Size: 1 << 40, Trunc: 1 << 30, chunks: []int64{7, 1 << 18},
		digests: []chunker.Digest{{}, {9}}}).Marshal())
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
		m := map[int64]chunker.Digest{}
		for i := range (size + cs - 1) / cs {
			if n := rng.IntN(4); n > 0 {
				m[i] = chunker.Sum([]byte{byte(n)})
			}
		}
		return indexOf(cs, size, m)
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
