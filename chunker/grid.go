package chunker

import "fmt"

// Chunk size limits. The chunk size is a repository parameter.
const (
	MinChunkSize     = 256 << 10
	MaxChunkSize     = 16 << 20
	DefaultChunkSize = 1 << 20
	// ChunkAlign is QEMU's default dirty-bitmap granularity: chunk
	// boundaries fall on bitmap granule boundaries.
	ChunkAlign = 64 << 10
)

// CheckChunkSize says why n is not a valid chunk size, or returns nil.
func CheckChunkSize(n int64) error {
	if n < MinChunkSize || n > MaxChunkSize || n%ChunkAlign != 0 {
		return fmt.Errorf("chunk size %d: must be a multiple of 64 KiB between 256 KiB and 16 MiB", n)
	}
	return nil
}

// Grid is the chunk grid of one disk.
type Grid struct {
	ChunkSize int64
	Size      int64 // disk size in bytes
}

// Count is the number of chunks, the last possibly short.
func (g Grid) Count() int64 { return (g.Size + g.ChunkSize - 1) / g.ChunkSize }

// Chunk returns the offset and length of chunk i.
func (g Grid) Chunk(i int64) (off, n int64) {
	off = i * g.ChunkSize
	return off, min(g.ChunkSize, g.Size-off)
}

// ChunkLen returns the length of chunk i.
func (g Grid) ChunkLen(i int64) int64 {
	_, n := g.Chunk(i)
	return n
}

// Index returns the chunk that holds byte off.
func (g Grid) Index(off int64) int64 { return off / g.ChunkSize }
