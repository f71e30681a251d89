package chunker

import (
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"strconv"
	"strings"
	"sync"

	"github.com/klauspost/compress/s2"
	"github.com/klauspost/compress/zstd"
)

// Blob header layout (little endian); see docs/format.md.
const (
	blobMagic     = "NBMC"
	blobVersion   = 1
	HeaderSize    = 20
	codecRaw      = 0
	codecZstd     = 1
	codecS2       = 2
	flagEncrypted = 1 << 0 // reserved: encryption is not implemented yet
)

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// ErrCorrupt is matched by every decoding failure.
var ErrCorrupt = errors.New("corrupt chunk")

// CorruptError says which check a blob failed.
type CorruptError struct {
	Check  string // "header", "length", "crc", "decompress", "digest"
	Detail string
}

func (e *CorruptError) Error() string {
	return fmt.Sprintf("corrupt chunk: %s check failed: %s", e.Check, e.Detail)
}

func (e *CorruptError) Is(target error) bool { return target == ErrCorrupt }

func corrupt(check, format string, args ...any) error {
	return &CorruptError{Check: check, Detail: fmt.Sprintf(format, args...)}
}

// Compression is a repository's or a backup's compression setting.
type Compression struct {
	Algorithm string // "zstd", "s2" or "none"
	Level     int    // zstd: 1 (fastest) .. 4 (best); 0 = 1
}

// ParseCompression parses "none", "s2", "zstd" or "zstd:LEVEL" (LEVEL 1-4).
// s2 (klauspost/compress/s2) is about three times faster than zstd's
// fastest level and compresses about a quarter less.
func ParseCompression(s string) (Compression, error) {
	algo, level, hasLevel := strings.Cut(s, ":")
	c := Compression{Algorithm: algo, Level: 1}
	switch {
	case (algo == "none" || algo == "s2") && !hasLevel:
		c.Level = 0
		return c, nil
	case algo == "zstd":
		if hasLevel {
			n, err := strconv.Atoi(level)
			if err != nil || n < 1 || n > 4 {
				return c, fmt.Errorf("compression %q: zstd level must be 1 (fastest) to 4 (best)", s)
			}
			c.Level = n
		}
		return c, nil
	}
	return c, fmt.Errorf("compression %q: want zstd, zstd:1..4, s2 or none", s)
}

func (c Compression) String() string {
	if c.Algorithm == "zstd" && c.Level > 1 {
		return fmt.Sprintf("zstd:%d", c.Level)
	}
	return c.Algorithm
}

// Codec encodes and decodes blobs. It is safe for concurrent use.
type Codec struct {
	algorithm string
	limit     int       // the largest plaintext: MaxChunkSize, or MaxMetaSize
	encoders  sync.Pool // *zstd.Encoder
	decoders  sync.Pool // *zstd.Decoder
}

// MaxMetaSize is the largest plaintext of a metadata blob (NewMetaCodec).
const MaxMetaSize = 256 << 20

// NewCodec returns a codec for chunks that compresses as c says. Any codec
// decodes blobs of every codec.
func NewCodec(c Compression) (*Codec, error) {
	return newCodec(c, MaxChunkSize)
}

// NewMetaCodec returns the codec of metadata blobs (indexes, manifests):
// zstd's fastest level, plaintexts up to MaxMetaSize.
func NewMetaCodec() *Codec {
	c, _ := newCodec(Compression{Algorithm: "zstd", Level: 1}, MaxMetaSize)
	return c
}

func newCodec(c Compression, limit int) (*Codec, error) {
	if _, err := ParseCompression(c.String()); err != nil {
		return nil, err
	}
	level := zstd.EncoderLevel(max(c.Level, 1))
	codec := &Codec{algorithm: c.Algorithm, limit: limit}
	codec.encoders.New = func() any {
		e, err := zstd.NewWriter(nil, zstd.WithEncoderLevel(level), zstd.WithEncoderConcurrency(1),
			zstd.WithEncoderCRC(false), zstd.WithWindowSize(MaxChunkSize))
		if err != nil {
			panic(err) // only for invalid options
		}
		return e
	}
	codec.decoders.New = func() any {
		d, err := zstd.NewReader(nil, zstd.WithDecoderConcurrency(1), zstd.WithDecoderMaxMemory(uint64(limit)),
			zstd.WithDecoderMaxWindow(MaxChunkSize))
		if err != nil {
			panic(err)
		}
		return d
	}
	return codec, nil
}

// MaxBlobLen is the largest blob a chunk of n bytes can encode to: a
// buffer of this capacity is never reallocated by Encode.
func MaxBlobLen(n int) int {
	return HeaderSize + max(s2.MaxEncodedLen(n), n+n/128+1024)
}

// Encode appends the blob of plain to dst[:0] and returns it. len(plain)
// must be at most the codec's limit (MaxChunkSize, or MaxMetaSize for
// NewMetaCodec).
func (c *Codec) Encode(dst, plain []byte) []byte {
	if len(plain) > c.limit {
		panic("chunker: plaintext larger than the codec's limit")
	}
	dst = append(dst[:0], make([]byte, HeaderSize)...)
	codec := byte(codecRaw)
	switch c.algorithm {
	case "zstd":
		e := c.encoders.Get().(*zstd.Encoder)
		dst = e.EncodeAll(plain, dst)
		c.encoders.Put(e)
		codec = codecZstd
	case "s2":
		need := HeaderSize + s2.MaxEncodedLen(len(plain))
		if cap(dst) < need {
			dst = append(dst, make([]byte, need-len(dst))...)
		}
		n := len(s2.Encode(dst[HeaderSize:need], plain))
		dst = dst[:HeaderSize+n]
		codec = codecS2
	}
	// Keep the compressed form only when it saves at least 1/64.
	if codec != codecRaw && len(dst)-HeaderSize >= len(plain)-len(plain)/64 {
		dst, codec = dst[:HeaderSize], codecRaw
	}
	if codec == codecRaw {
		dst = append(dst, plain...)
	}
	payload := dst[HeaderSize:]
	copy(dst, blobMagic)
	dst[4] = blobVersion
	dst[5] = codec
	binary.LittleEndian.PutUint16(dst[6:], 0)
	binary.LittleEndian.PutUint32(dst[8:], uint32(len(plain)))
	binary.LittleEndian.PutUint32(dst[12:], uint32(len(payload)))
	binary.LittleEndian.PutUint32(dst[16:], crc32.Checksum(payload, castagnoli))
	return dst
}

// Decode checks blob and appends its plaintext to dst[:0]. The plaintext
// must hash to want. Every failure matches ErrCorrupt and is a
// *CorruptError naming the check.
func (c *Codec) Decode(dst, blob []byte, want Digest) ([]byte, error) {
	out, err := c.DecodeMeta(dst, blob)
	if err != nil {
		return nil, err
	}
	if got := Sum(out); got != want {
		return nil, corrupt("digest", "plaintext hashes to %s", got)
	}
	return out, nil
}

// DecodeMeta checks a blob that holds metadata rather than a chunk (an
// index, a manifest: whose names are not the digest of their plaintext)
// and appends its plaintext to dst[:0]: every check of Decode but the
// digest.
func (c *Codec) DecodeMeta(dst, blob []byte) ([]byte, error) {
	if len(blob) < HeaderSize {
		return nil, corrupt("length", "%d bytes is shorter than the %d-byte header", len(blob), HeaderSize)
	}
	if string(blob[:4]) != blobMagic {
		return nil, corrupt("header", "bad magic %q", blob[:4])
	}
	if blob[4] != blobVersion {
		return nil, corrupt("header", "unknown blob version %d", blob[4])
	}
	if flags := binary.LittleEndian.Uint16(blob[6:]); flags != 0 {
		return nil, corrupt("header", "unsupported flags %#x (encrypted blobs need a newer nbdmover)", flags)
	}
	plainLen := int(binary.LittleEndian.Uint32(blob[8:]))
	storedLen := int(binary.LittleEndian.Uint32(blob[12:]))
	payload := blob[HeaderSize:]
	if storedLen != len(payload) {
		return nil, corrupt("length", "header says %d payload bytes, blob has %d (truncated?)", storedLen, len(payload))
	}
	if plainLen > c.limit {
		return nil, corrupt("header", "plaintext length %d exceeds the limit of %d", plainLen, c.limit)
	}
	if sum := crc32.Checksum(payload, castagnoli); sum != binary.LittleEndian.Uint32(blob[16:]) {
		return nil, corrupt("crc", "CRC32C of the payload is %08x, header says %08x", sum, binary.LittleEndian.Uint32(blob[16:]))
	}
	var out []byte
	switch blob[5] {
	case codecRaw:
		out = append(dst[:0], payload...)
	case codecZstd:
		d := c.decoders.Get().(*zstd.Decoder)
		var err error
		out, err = d.DecodeAll(payload, dst[:0])
		c.decoders.Put(d)
		if err != nil {
			return nil, corrupt("decompress", "%v", err)
		}
	case codecS2:
		n, err := s2.DecodedLen(payload)
		if err != nil || n != plainLen {
			return nil, corrupt("decompress", "s2 block of %d bytes (%v), header says %d", n, err, plainLen)
		}
		out = append(dst[:0], make([]byte, n)...)
		if _, err := s2.Decode(out, payload); err != nil {
			return nil, corrupt("decompress", "%v", err)
		}
	default:
		return nil, corrupt("header", "unknown codec %d", blob[5])
	}
	if len(out) != plainLen {
		return nil, corrupt("length", "plaintext is %d bytes, header says %d", len(out), plainLen)
	}
	return out, nil
}
