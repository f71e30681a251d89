// Package chunker turns disk data into repository chunks and back.
//
// Words used here:
//
//   - The grid cuts a disk of Size bytes into chunks of ChunkSize bytes at
//     aligned offsets; chunk i covers [i*ChunkSize, (i+1)*ChunkSize) and the
//     last one may be short.
//   - A Digest names a chunk: the SHA-256 of its plaintext, or in an
//     encrypted repository its HMAC-SHA256 under the naming key (a Codec
//     knows which). The all-zero Digest (ZeroChunk) stands for a chunk
//     whose bytes are all zero: such chunks are never stored.
//   - A blob is how a chunk (or a meta object) is stored: a 20-byte header
//     (docs/format.md) and the payload, zstd-compressed, s2-compressed or
//     raw when compression does not pay; encrypted, the payload is sealed
//     with AES-256-GCM. Decoding checks the header, the payload's CRC32C
//     (or the AEAD tag), the plaintext length and the digest, never makes
//     more than the caller's limit, and says which check failed.
//
// zstd frames are encoded by the C library (github.com/DataDog/zstd,
// through cgo: about 1.5 times klauspost/compress's encoder per core here,
// at the same levels) and decoded by klauspost/compress's Go decoder
// (bounded in window, memory and output, and fuzzed). The format is
// zstd's either way: blobs of either encoder decode alike.
//
// Everything here is safe for concurrent use; the Codec pools its zstd
// encoders and decoders.
package chunker
