package chunker

import (
	"bytes"
	"errors"
	"math/rand/v2"
	"slices"
	"testing"
)

// writeRandom writes n random bytes at off of p (zeroes, one time in
// four: a discard or a zeroing write) and records the blocks they touch
// (what the dirty bitmap marks) in set.
func writeRandom(rng *rand.Rand, p []byte, set Blocks, off, n int64) {
	zero := rng.IntN(4) == 0
	for i := off; i < off+n; i++ {
		p[i] = byte(rng.Uint32())
		if zero {
			p[i] = 0
		}
	}
	set.AddRange(off, n)
}

// Patches against a reference: a base, writes at random places (aligned
// or not, crossing blocks, at the chunk's end), the patch of the blocks
// they touched applied to the base gives the chunk; a second round of
// writes patched over the same base with the union of both rounds'
// blocks (one level) gives the chunk after both.
func TestPatchApplyUnion(t *testing.T) {
	rng := rand.New(rand.NewPCG(3, 4))
	for _, n := range []int64{1 << 20, 4 << 20, 300001, 256 << 10} {
		for round := range 200 {
			base := make([]byte, n)
			for i := range base {
				base[i] = byte(i * 7)
			}
			bd := Sum(base)
			chunk := bytes.Clone(base)
			first := NewBlocks(n)
			for range rng.IntN(4) + 1 {
				off := rng.Int64N(n)
				writeRandom(rng, chunk, first, off, min(n-off, rng.Int64N(PatchBlock+10)+1))
			}
			if round%5 == 0 { // the chunk's last byte
				writeRandom(rng, chunk, first, n-1, 1)
			}
			if round%3 == 0 { // a whole block discarded: a zero run
				off := rng.Int64N(int64(blockCount(n))) * PatchBlock
				end := min(off+PatchBlock, n)
				clear(chunk[off:end])
				first.AddRange(off, end-off)
			}
			check := func(what string, set Blocks, want []byte) {
				t.Helper()
				if PatchData(want, set) > MaxPatchData(n) {
					return // stored whole
				}
				p := EncodePatch(nil, bd, want, set)
				if int64(len(p)) > MaxPatchLen(n) {
					t.Fatalf("%s: %d-byte patch of a %d-byte chunk, bound %d", what, len(p), n, MaxPatchLen(n))
				}
				pt, err := ParsePatch(p, 4<<20)
				if err != nil {
					t.Fatalf("%s: %v", what, err)
				}
				if pt.Base != bd || pt.Len != n || !slices.Equal(pt.Blocks, set) {
					t.Fatalf("%s: decoded base %v len %d blocks %x, want %x", what, pt.Base, pt.Len, pt.Blocks, set)
				}
				got, err := pt.Apply(nil, base)
				if err != nil || !bytes.Equal(got, want) {
					t.Fatalf("%s: applied patch differs from the chunk (%v)", what, err)
				}
				if _, err := pt.Apply(nil, base[:n-1]); !errors.Is(err, ErrCorrupt) {
					t.Fatalf("%s: a base of the wrong length: %v", what, err)
				}
			}
			check("first", first, chunk)
			second := NewBlocks(n)
			for range rng.IntN(3) + 1 {
				off := rng.Int64N(n)
				writeRandom(rng, chunk, second, off, min(n-off, rng.Int64N(3*PatchBlock)+1))
			}
			second.Union(first)
			check("union", second, chunk)
		}
	}
}

func TestBlocksBytes(t *testing.T) {
	const n = 3*PatchBlock + 100
	b := NewBlocks(n)
	b.AddRange(0, 1)
	if got := b.Bytes(n); got != PatchBlock {
		t.Fatalf("one block: %d", got)
	}
	b.AddRange(n-1, 1)
	if got := b.Bytes(n); got != PatchBlock+100 {
		t.Fatalf("with the short last block: %d", got)
	}
	b.AddRange(PatchBlock-1, 2) // crosses into block 1
	if got := b.Bytes(n); got != 2*PatchBlock+100 {
		t.Fatalf("crossing: %d", got)
	}
}

// Hostile patches: every decoded patch is canonical (re-encoding it gives
// the same bytes), within its bounds, and applies without panicking.
func FuzzParsePatch(f *testing.F) {
	base := make([]byte, 1<<20)
	chunk := bytes.Clone(base)
	set := NewBlocks(1 << 20)
	writeRandom(rand.New(rand.NewPCG(1, 1)), chunk, set, 70000, 5)
	writeRandom(rand.New(rand.NewPCG(1, 2)), chunk, set, 1<<20-3, 3)
	f.Add(EncodePatch(nil, Sum(base), chunk, set))
	f.Add([]byte("NBP1"))
	f.Fuzz(func(t *testing.T, p []byte) {
		pt, err := ParsePatch(p, 1<<20)
		if err != nil {
			if !errors.Is(err, ErrCorrupt) {
				t.Fatalf("error %v does not match ErrCorrupt", err)
			}
			return
		}
		if int64(len(p)) > MaxPatchLen(pt.Len) || int64(len(pt.data)) > MaxPatchData(pt.Len) {
			t.Fatalf("accepted a %d-byte patch of a %d-byte chunk", len(p), pt.Len)
		}
		got, err := pt.Apply(nil, make([]byte, pt.Len))
		if err != nil {
			t.Fatal(err)
		}
		if again := EncodePatch(nil, pt.Base, got, pt.Blocks); !bytes.Equal(again, p) {
			t.Fatal("a decoded patch does not encode to the same bytes")
		}
	})
}
