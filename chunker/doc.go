// Package chunker turns disk data into repository chunks and back.
//
// Words used here:
//
//   - The grid cuts a disk of Size bytes into chunks of ChunkSize bytes at
//     aligned offsets; chunk i covers [i*ChunkSize, (i+1)*ChunkSize) and the
//     last one may be short.
//   - A Digest is the SHA-256 of a chunk's plaintext. The all-zero Digest
//     (ZeroChunk) stands for a chunk whose bytes are all zero: such chunks
//     are never stored.
//   - A blob is how a chunk is stored: a 20-byte header (see docs/format.md)
//     and the payload, zstd-compressed or raw when compression does not pay.
//     Decoding checks the header, the payload's CRC32C, the plaintext length
//     and the digest, and says which check failed.
//
// Everything here is safe for concurrent use; the Codec pools its zstd
// encoders and decoders.
package chunker
