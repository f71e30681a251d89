package chunker

import (
	"encoding/binary"
	"fmt"
	"math/bits"
)

// A patch stores a chunk as the 64 KiB blocks in which it may differ
// from a whole chunk, its base (docs/format.md, "Patched chunks"). Its
// plaintext: magic "NBP1", the base's digest, the chunk's length (4
// bytes), the run count n (4), n runs of blocks (offset 4, length 4, its
// top bit set for a run of zeroes) in increasing order on the PatchBlock
// grid (a run ends at the chunk's end or on the grid; two runs that
// touch are of different kinds; a block of data is not all zero), then
// the data runs' bytes in that order. Little endian.
const (
	PatchBlock  = ChunkAlign
	patchMagic  = "NBP1"
	patchHeader = 4 + 32 + 4 + 4
	zeroRun     = 1 << 31 // a run's length flag: zeroes, no bytes stored
)

// Blocks is a set of the PatchBlock blocks of one chunk (bit k: bytes
// k*PatchBlock up to the next block or the chunk's end).
type Blocks []uint64

// NewBlocks returns an empty set for a chunk of n bytes.
func NewBlocks(n int64) Blocks { return make(Blocks, (blockCount(n)+63)/64) }

func blockCount(n int64) int { return int((n + PatchBlock - 1) / PatchBlock) }

// AddRange adds the blocks that bytes off .. off+n-1 of the chunk touch.
func (b Blocks) AddRange(off, n int64) {
	for k := off / PatchBlock; k*PatchBlock < off+n; k++ {
		b[k/64] |= 1 << (k % 64)
	}
}

// Union adds the blocks of o (a set of a chunk of the same length).
func (b Blocks) Union(o Blocks) {
	for i := range b {
		b[i] |= o[i]
	}
}

// Bytes is how many bytes of a chunk of n bytes the set covers.
func (b Blocks) Bytes(n int64) int64 {
	var c int64
	for _, w := range b {
		c += int64(bits.OnesCount64(w))
	}
	c *= PatchBlock
	if last := int64(blockCount(n)-1) * PatchBlock; b.has(int(last / PatchBlock)) {
		c -= PatchBlock - (n - last)
	}
	return c
}

func (b Blocks) has(k int) bool { return k >= 0 && k/64 < len(b) && b[k/64]&(1<<(k%64)) != 0 }

// patchRun is a run of blocks of a patch: bytes off .. off+length-1,
// zero when they are all zero (none stored).
type patchRun struct {
	off, length int64
	zero        bool
}

// runs returns the set's blocks of chunk as maximal runs of one kind:
// data, or all zero.
func (b Blocks) runs(chunk []byte) []patchRun {
	n := int64(len(chunk))
	var out []patchRun
	for k := range blockCount(n) {
		if !b.has(k) {
			continue
		}
		off := int64(k) * PatchBlock
		end := min(off+PatchBlock, n)
		zero := IsZero(chunk[off:end])
		if l := len(out) - 1; l >= 0 && out[l].off+out[l].length == off && out[l].zero == zero {
			out[l].length = end - out[l].off
			continue
		}
		out = append(out, patchRun{off, end - off, zero})
	}
	return out
}

// PatchData is how many bytes a patch of chunk holding the blocks of set
// stores: those of its blocks that are not all zero.
func PatchData(chunk []byte, set Blocks) int64 {
	var n int64
	for _, r := range set.runs(chunk) {
		if !r.zero {
			n += r.length
		}
	}
	return n
}

// MaxPatchData is the most bytes of data a patch of a chunk of n bytes
// stores: a quarter of the chunk. A chunk that would need more is stored
// whole.
func MaxPatchData(n int64) int64 { return n / 4 }

// MaxPatchLen bounds the plaintext of a patch of a chunk of n bytes.
func MaxPatchLen(n int64) int64 {
	return patchHeader + 8*int64(blockCount(n)) + MaxPatchData(n)
}

// EncodePatch appends to dst[:0] the patch that makes base (its digest)
// into chunk, holding the blocks of set (which must cover every byte in
// which they may differ); PatchData(chunk, set) must be at most
// MaxPatchData.
func EncodePatch(dst []byte, base Digest, chunk []byte, set Blocks) []byte {
	runs := set.runs(chunk)
	dst = append(dst[:0], patchMagic...)
	dst = append(dst, base[:]...)
	dst = binary.LittleEndian.AppendUint32(dst, uint32(len(chunk)))
	dst = binary.LittleEndian.AppendUint32(dst, uint32(len(runs)))
	for _, r := range runs {
		length := uint32(r.length)
		if r.zero {
			length |= zeroRun
		}
		dst = binary.LittleEndian.AppendUint32(dst, uint32(r.off))
		dst = binary.LittleEndian.AppendUint32(dst, length)
	}
	for _, r := range runs {
		if !r.zero {
			dst = append(dst, chunk[r.off:r.off+r.length]...)
		}
	}
	return dst
}

// Patch is a decoded patch: its plaintext, checked.
type Patch struct {
	Base   Digest
	Len    int64  // the chunk's length
	Blocks Blocks // the blocks it holds
	runs   []byte // n runs of (offset, length)
	data   []byte
}

// ParsePatch checks a patch's plaintext for a chunk of at most chunkSize
// bytes. Every failure matches ErrCorrupt.
func ParsePatch(p []byte, chunkSize int64) (*Patch, error) {
	if len(p) < patchHeader || string(p[:4]) != patchMagic {
		return nil, corrupt("patch", "not a patch (%d bytes)", len(p))
	}
	pt := &Patch{Base: Digest(p[4:36]), Len: int64(binary.LittleEndian.Uint32(p[36:]))}
	count := int64(binary.LittleEndian.Uint32(p[40:]))
	if pt.Len <= 0 || pt.Len > chunkSize || count == 0 || count > int64(blockCount(pt.Len)) ||
		int64(len(p)) < patchHeader+8*count {
		return nil, corrupt("patch", "chunk of %d bytes, %d runs, in %d bytes", pt.Len, count, len(p))
	}
	pt.runs, pt.data = p[patchHeader:patchHeader+8*count], p[patchHeader+8*count:]
	pt.Blocks = NewBlocks(pt.Len)
	var total, end int64 = 0, 0
	prevZero := false
	for k := range count {
		off, length, zero := pt.run(int(k))
		switch {
		case off%PatchBlock != 0 || off < end || k > 0 && off == end && zero == prevZero || length <= 0 || off+length > pt.Len,
			(off+length)%PatchBlock != 0 && off+length != pt.Len:
			return nil, corrupt("patch", "run %d: %d bytes at %d of a %d-byte chunk", k, length, off, pt.Len)
		}
		pt.Blocks.AddRange(off, length)
		if !zero {
			if total+length > int64(len(pt.data)) {
				return nil, corrupt("patch", "run %d: %d bytes of data, %d left", k, length, int64(len(pt.data))-total)
			}
			for b := int64(0); b < length; b += PatchBlock { // a block of zeroes is a zero run: one encoding
				if IsZero(pt.data[total+b : total+min(b+PatchBlock, length)]) {
					return nil, corrupt("patch", "run %d: a block of zeroes stored as data", k)
				}
			}
			total += length
		}
		end, prevZero = off+length, zero
	}
	if total != int64(len(pt.data)) || total > MaxPatchData(pt.Len) {
		return nil, corrupt("patch", "%d bytes of data in runs, %d stored, for a %d-byte chunk", total, len(pt.data), pt.Len)
	}
	return pt, nil
}

// run decodes run k: its offset, length and kind.
func (pt *Patch) run(k int) (off, length int64, zero bool) {
	off = int64(binary.LittleEndian.Uint32(pt.runs[8*k:]))
	l := binary.LittleEndian.Uint32(pt.runs[8*k+4:])
	return off, int64(l &^ zeroRun), l&zeroRun != 0
}

// Apply appends to dst[:0] the chunk: base's bytes with the patch's
// blocks written over them.
func (pt *Patch) Apply(dst, base []byte) ([]byte, error) {
	if int64(len(base)) != pt.Len {
		return nil, fmt.Errorf("%w: the base has %d bytes, the patch is of a %d-byte chunk", ErrCorrupt, len(base), pt.Len)
	}
	dst = append(dst[:0], base...)
	data := pt.data
	for k := range len(pt.runs) / 8 {
		off, length, zero := pt.run(k)
		if zero {
			clear(dst[off : off+length])
			continue
		}
		copy(dst[off:off+length], data[:length])
		data = data[length:]
	}
	return dst, nil
}
