package chunker

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
)

// Digest names a chunk: the SHA-256 of its plaintext.
type Digest [32]byte

// ZeroChunk is the digest recorded for a chunk whose bytes are all zero.
// No such chunk is stored; SHA-256 never yields it for real data.
var ZeroChunk Digest

// Sum returns the digest of a chunk's plaintext.
func Sum(p []byte) Digest { return sha256.Sum256(p) }

// IsZeroChunk reports whether d is the zero-chunk marker.
func (d Digest) IsZeroChunk() bool { return d == ZeroChunk }

func (d Digest) String() string { return hex.EncodeToString(d[:]) }

// ParseDigest parses 64 lowercase hex digits.
func ParseDigest(s string) (Digest, error) {
	var d Digest
	if len(s) != 2*len(d) {
		return d, fmt.Errorf("digest %q: want %d hex digits", s, 2*len(d))
	}
	if _, err := hex.Decode(d[:], []byte(s)); err != nil || hex.EncodeToString(d[:]) != s {
		return d, fmt.Errorf("digest %q: not lowercase hex", s)
	}
	return d, nil
}

var zeroes [64 << 10]byte

// IsZero reports whether every byte of p is zero.
func IsZero(p []byte) bool {
	for len(p) > 0 {
		n := min(len(p), len(zeroes))
		if !bytes.Equal(p[:n], zeroes[:n]) {
			return false
		}
		p = p[n:]
	}
	return true
}
