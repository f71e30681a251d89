package repo

import (
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"

	"github.com/nbdmover/nbdmover/chunker"
)

// Index layout (little endian): see docs/format.md.
const (
	indexMagic      = "NBMI"
	indexVersion    = 1
	indexHeaderSize = 32
)

// Index lists the chunks of one disk of one backup.
type Index struct {
	ChunkSize int64
	Size      int64            // disk size in bytes
	Digests   []chunker.Digest // one per chunk of the grid; ZeroChunk for all-zero chunks
}

// NewIndex returns an index of a disk of size bytes with every chunk zero.
func NewIndex(chunkSize, size int64) *Index {
	g := chunker.Grid{ChunkSize: chunkSize, Size: size}
	return &Index{ChunkSize: chunkSize, Size: size, Digests: make([]chunker.Digest, g.Count())}
}

// Grid is the index's chunk grid.
func (ix *Index) Grid() chunker.Grid { return chunker.Grid{ChunkSize: ix.ChunkSize, Size: ix.Size} }

// Resized returns a copy of ix for a disk that now has size bytes: chunks
// past the new end are dropped and new chunks are zero. A chunk whose length
// changed (the old or new last chunk) cannot keep its digest: it is set to
// zero and returned in stale, and the caller must read it again.
func (ix *Index) Resized(size int64) (out *Index, stale []int64) {
	out = NewIndex(ix.ChunkSize, size)
	n := copy(out.Digests, ix.Digests)
	old, g := ix.Grid(), out.Grid()
	for i := range int64(n) {
		_, a := old.Chunk(i)
		_, b := g.Chunk(i)
		if a != b {
			out.Digests[i] = chunker.ZeroChunk
			stale = append(stale, i)
		}
	}
	return out, stale
}

// Marshal encodes the index: header, digests, SHA-256 of both.
func (ix *Index) Marshal() []byte {
	b := make([]byte, indexHeaderSize, indexHeaderSize+32*len(ix.Digests)+32)
	copy(b, indexMagic)
	binary.LittleEndian.PutUint16(b[4:], indexVersion)
	binary.LittleEndian.PutUint16(b[6:], 0) // flags
	binary.LittleEndian.PutUint32(b[8:], uint32(ix.ChunkSize))
	binary.LittleEndian.PutUint64(b[12:], uint64(ix.Size))
	binary.LittleEndian.PutUint64(b[20:], uint64(len(ix.Digests)))
	// b[28:32] reserved, zero
	for _, d := range ix.Digests {
		b = append(b, d[:]...)
	}
	sum := sha256.Sum256(b)
	return append(b, sum[:]...)
}

// ErrBadIndex is matched by every index decoding failure.
var ErrBadIndex = errors.New("bad index")

func badIndex(format string, args ...any) error {
	return fmt.Errorf("%w: %s", ErrBadIndex, fmt.Sprintf(format, args...))
}

// UnmarshalIndex decodes and checks an index.
func UnmarshalIndex(b []byte) (*Index, error) {
	if len(b) < indexHeaderSize+32 {
		return nil, badIndex("%d bytes is too short (truncated?)", len(b))
	}
	if string(b[:4]) != indexMagic {
		return nil, badIndex("bad magic %q", b[:4])
	}
	if v := binary.LittleEndian.Uint16(b[4:]); v != indexVersion {
		return nil, badIndex("unknown version %d", v)
	}
	if f := binary.LittleEndian.Uint16(b[6:]); f != 0 {
		return nil, badIndex("unknown flags %#x", f)
	}
	ix := &Index{
		ChunkSize: int64(binary.LittleEndian.Uint32(b[8:])),
		Size:      int64(binary.LittleEndian.Uint64(b[12:])),
	}
	count := binary.LittleEndian.Uint64(b[20:])
	if err := chunker.CheckChunkSize(ix.ChunkSize); err != nil {
		return nil, badIndex("%v", err)
	}
	if ix.Size < 0 || uint64(ix.Grid().Count()) != count {
		return nil, badIndex("disk size %d and %d chunks do not fit the %d-byte grid", ix.Size, count, ix.ChunkSize)
	}
	if want := uint64(indexHeaderSize) + 32*count + 32; count > uint64(len(b)) || uint64(len(b)) != want {
		return nil, badIndex("%d bytes, want %d for %d chunks (truncated?)", len(b), want, count)
	}
	body, sum := b[:len(b)-32], b[len(b)-32:]
	if got := sha256.Sum256(body); !bytes.Equal(got[:], sum) {
		return nil, badIndex("checksum mismatch")
	}
	ix.Digests = make([]chunker.Digest, count)
	for i := range ix.Digests {
		copy(ix.Digests[i][:], body[indexHeaderSize+32*i:])
	}
	return ix, nil
}
