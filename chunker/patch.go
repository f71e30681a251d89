package chunker

import (
	"encoding/binary"
	"fmt"
	"math/bits"
)

// A patch stores a chunk as the 64 KiB blocks in which it differs from a
// whole chunk, its base (docs/format.md, "Patched chunks"). Its
// plaintext: magic "NBP1", the base's digest, the chunk's length (4
// bytes), the run count n (4), n runs of blocks (offset 4, length 4) in
// increasing order with a gap between each two, on the PatchBlock grid
// (a run ends at the chunk's end or on the grid), then the runs' bytes in
// that order. Little endian.
const (
	PatchBlock  = ChunkAlign
	patchMagic  = "NBP1"
	patchHeader = 4 + 32 + 4 + 4
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

// runs yields the set's maximal runs of blocks as byte ranges of a chunk
// of n bytes.
func (b Blocks) runs(n int64, fn func(off, length int64)) {
	count := blockCount(n)
	for k := 0; k < count; {
		if !b.has(k) {
			k++
			continue
		}
		start := k
		for k < count && b.has(k) {
			k++
		}
		off := int64(start) * PatchBlock
		fn(off, min(int64(k)*PatchBlock, n)-off)
	}
}

// MaxPatchData is the most bytes of blocks a patch of a chunk of n bytes
// holds: a quarter of the chunk. A chunk that differs from its base in
// more is stored whole.
func MaxPatchData(n int64) int64 { return n / 4 }

// MaxPatchLen bounds the plaintext of a patch of a chunk of n bytes.
func MaxPatchLen(n int64) int64 {
	runs := (int64(blockCount(n)) + 1) / 2
	return patchHeader + 8*runs + MaxPatchData(n)
}

// EncodePatch appends to dst[:0] the patch that makes base (its digest)
// into chunk, holding the blocks of set (which must cover every byte in
// which they differ).
func EncodePatch(dst []byte, base Digest, chunk []byte, set Blocks) []byte {
	n := int64(len(chunk))
	dst = append(dst[:0], patchMagic...)
	dst = append(dst, base[:]...)
	dst = binary.LittleEndian.AppendUint32(dst, uint32(n))
	countAt := len(dst)
	dst = append(dst, 0, 0, 0, 0)
	var count uint32
	set.runs(n, func(off, length int64) {
		dst = binary.LittleEndian.AppendUint32(dst, uint32(off))
		dst = binary.LittleEndian.AppendUint32(dst, uint32(length))
		count++
	})
	binary.LittleEndian.PutUint32(dst[countAt:], count)
	set.runs(n, func(off, length int64) { dst = append(dst, chunk[off:off+length]...) })
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
	if pt.Len <= 0 || pt.Len > chunkSize || count == 0 || count > int64(blockCount(pt.Len)+1)/2 ||
		int64(len(p)) < patchHeader+8*count {
		return nil, corrupt("patch", "chunk of %d bytes, %d runs, in %d bytes", pt.Len, count, len(p))
	}
	pt.runs, pt.data = p[patchHeader:patchHeader+8*count], p[patchHeader+8*count:]
	pt.Blocks = NewBlocks(pt.Len)
	var total, end int64 = 0, -1
	for k := range count {
		off := int64(binary.LittleEndian.Uint32(pt.runs[8*k:]))
		length := int64(binary.LittleEndian.Uint32(pt.runs[8*k+4:]))
		switch {
		case off%PatchBlock != 0 || off <= end || length <= 0 || off+length > pt.Len,
			(off+length)%PatchBlock != 0 && off+length != pt.Len:
			return nil, corrupt("patch", "run %d: %d bytes at %d of a %d-byte chunk", k, length, off, pt.Len)
		}
		pt.Blocks.AddRange(off, length)
		total, end = total+length, off+length
	}
	if total != int64(len(pt.data)) || total > MaxPatchData(pt.Len) {
		return nil, corrupt("patch", "%d bytes of blocks, %d stored, for a %d-byte chunk", total, len(pt.data), pt.Len)
	}
	return pt, nil
}

// Apply appends to dst[:0] the chunk: base's bytes with the patch's
// blocks written over them.
func (pt *Patch) Apply(dst, base []byte) ([]byte, error) {
	if int64(len(base)) != pt.Len {
		return nil, fmt.Errorf("%w: the base has %d bytes, the patch is of a %d-byte chunk", ErrCorrupt, len(base), pt.Len)
	}
	dst = append(dst[:0], base...)
	data := pt.data
	for k := 0; k < len(pt.runs); k += 8 {
		off := int64(binary.LittleEndian.Uint32(pt.runs[k:]))
		length := int64(binary.LittleEndian.Uint32(pt.runs[k+4:]))
		copy(dst[off:off+length], data[:length])
		data = data[length:]
	}
	return dst, nil
}
