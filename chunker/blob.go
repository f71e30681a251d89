package chunker

import (
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"slices"
	"strconv"
	"strings"
	"sync"

	czstd "github.com/DataDog/zstd"
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
	flagEncrypted = 1 << 0 // payload: nonce, AES-256-GCM ciphertext, tag
	nonceSize     = 12
	tagSize       = 16
	aadHeader     = 12 // header bytes bound as additional data: magic .. plaintext length
)

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// ErrCorrupt is matched by every decoding failure.
var ErrCorrupt = errors.New("corrupt chunk")

// CorruptError says which check a blob failed.
type CorruptError struct {
	Check  string // "header", "length", "crc", "auth", "decompress", "digest"
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
	algorithm   string
	compression int       // the Compression's level, 1..4
	level       int       // the C library's level for it
	limit       int       // the largest plaintext: MaxChunkSize, or MaxMetaSize
	secret      *Secret   // encrypted repositories: names and seals blobs
	encoders    sync.Pool // czstd.Ctx: the C library encodes (twice as fast here)
	decoders    sync.Pool // *zstd.Decoder: bounded, fuzzed Go decoding
}

// MaxMetaSize is the largest plaintext of a metadata blob (NewMetaCodec).
const MaxMetaSize = 256 << 20

// cLevels are the C library's levels for Compression levels 1 to 4: the
// levels klauspost/compress's encoder mirrors (fastest, default, better,
// best), so a repository's compression setting means what it meant.
var cLevels = [5]int{1: 1, 2: 3, 3: 7, 4: 11}

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
	codec := &Codec{algorithm: c.Algorithm, compression: c.Level, level: cLevels[max(c.Level, 1)], limit: limit}
	codec.encoders.New = func() any { return czstd.NewCtx() }
	codec.decoders.New = func() any {
		// DecodeAll decodes into at most the capacity it is given: the
		// plaintext length the header states, which the caller bounds.
		d, err := zstd.NewReader(nil, zstd.WithDecoderConcurrency(1), zstd.WithDecoderMaxMemory(uint64(limit)),
			zstd.WithDecoderMaxWindow(MaxChunkSize), zstd.WithDecodeAllCapLimit(true))
		if err != nil {
			panic(err)
		}
		return d
	}
	return codec, nil
}

// Encrypted returns a codec like c that encrypts what it encodes, and
// decodes only encrypted blobs, under s; names are keyed digests (Sum).
func (c *Codec) Encrypted(s *Secret) *Codec {
	e, _ := newCodec(Compression{Algorithm: c.algorithm, Level: c.compression}, c.limit)
	e.secret = s
	return e
}

// IsEncrypted reports whether the codec encrypts.
func (c *Codec) IsEncrypted() bool { return c.secret != nil }

// Sum names a chunk's plaintext: its SHA-256, or in an encrypted
// repository its keyed digest.
func (c *Codec) Sum(p []byte) Digest {
	if c.secret != nil {
		return c.secret.Sum(p)
	}
	return Sum(p)
}

// MaxBlobLen is the largest blob a chunk of n bytes can encode to: a
// buffer of this capacity is never reallocated by Encode.
func MaxBlobLen(n int) int {
	return HeaderSize + nonceSize + tagSize + max(s2.MaxEncodedLen(n), n+n/128+1024)
}

// Encode appends the blob of plain to dst[:0] and returns it; name is the
// object key it is stored under, which an encrypted blob is bound to (a
// blob copied under another name does not decode). len(plain) must be at
// most the codec's limit (MaxChunkSize, or MaxMetaSize for NewMetaCodec).
func (c *Codec) Encode(dst, plain []byte, name string) []byte {
	if len(plain) > c.limit {
		panic("chunker: plaintext larger than the codec's limit")
	}
	base := HeaderSize
	if c.secret != nil {
		base += nonceSize
	}
	dst = append(dst[:0], make([]byte, base)...)
	codec := byte(codecRaw)
	switch c.algorithm {
	case "zstd":
		e := c.encoders.Get().(czstd.Ctx)
		// Into dst after the header: no copy when dst has the capacity
		// MaxBlobLen gives (zstd's bound is within it).
		out, err := e.CompressLevel(dst[base:cap(dst)], plain, c.level)
		c.encoders.Put(e)
		if err != nil {
			panic("chunker: zstd: " + err.Error()) // only for a bad level or memory
		}
		if len(out) > 0 && cap(dst) > base && &out[0] == &dst[base:cap(dst)][0] {
			dst = dst[:base+len(out)]
		} else {
			dst = append(dst[:base], out...)
		}
		codec = codecZstd
	case "s2":
		need := base + s2.MaxEncodedLen(len(plain))
		if cap(dst) < need {
			dst = append(dst, make([]byte, need-len(dst))...)
		}
		n := len(s2.Encode(dst[base:need], plain))
		dst = dst[:base+n]
		codec = codecS2
	}
	// Keep the compressed form only when it saves at least 1/64.
	if codec != codecRaw && len(dst)-base >= len(plain)-len(plain)/64 {
		dst, codec = dst[:base], codecRaw
	}
	if codec == codecRaw {
		dst = append(dst, plain...)
	}
	copy(dst, blobMagic)
	dst[4] = blobVersion
	dst[5] = codec
	binary.LittleEndian.PutUint16(dst[6:], 0)
	binary.LittleEndian.PutUint32(dst[8:], uint32(len(plain)))
	if c.secret != nil {
		binary.LittleEndian.PutUint16(dst[6:], flagEncrypted)
		nonce := dst[HeaderSize:base]
		rand.Read(nonce)
		if cap(dst)-len(dst) < tagSize {
			dst = append(dst, make([]byte, tagSize)...)[:len(dst)]
		}
		sealed := c.secret.aead.Seal(dst[base:base], nonce, dst[base:], additionalData(dst, name))
		dst = dst[:base+len(sealed)]
	}
	payload := dst[HeaderSize:]
	binary.LittleEndian.PutUint32(dst[12:], uint32(len(payload)))
	binary.LittleEndian.PutUint32(dst[16:], crc32.Checksum(payload, castagnoli))
	return dst
}

// additionalData is what an encrypted blob's tag covers besides its
// ciphertext: the header's first 12 bytes (magic, version, codec, flags,
// plaintext length) and the object key the blob is stored under.
func additionalData(blob []byte, name string) []byte {
	return append(append(make([]byte, 0, aadHeader+len(name)), blob[:aadHeader]...), name...)
}

// Decode checks blob and appends its plaintext to dst[:0]. The plaintext
// must hash to want (Sum). An encrypted blob is decrypted in place: blob's
// bytes are not kept. Every failure matches ErrCorrupt and is a
// *CorruptError naming the check.
func (c *Codec) Decode(dst, blob []byte, name string, want Digest) ([]byte, error) {
	return c.DecodeChunk(dst, blob, name, want, c.limit)
}

// DecodeChunk is Decode for a chunk of at most limit bytes (a repository's
// chunk size): a blob whose header states more is refused before it is
// decompressed.
func (c *Codec) DecodeChunk(dst, blob []byte, name string, want Digest, limit int) ([]byte, error) {
	out, err := c.DecodeMeta(dst, blob, name, limit)
	if err != nil {
		return nil, err
	}
	if got := c.Sum(out); got != want {
		return nil, corrupt("digest", "plaintext hashes to %s", got)
	}
	return out, nil
}

// DecodeMeta checks a blob that holds metadata rather than a chunk (an
// index, a manifest: whose names are not the digest of their plaintext)
// and appends its plaintext to dst[:0]: every check of Decode but the
// digest. name is the object key the blob was read from. A plaintext of
// more than limit bytes (or the codec's limit) is refused before anything
// is decoded: the memory a blob can make a reader take is bounded by what
// the reader expects of its kind.
func (c *Codec) DecodeMeta(dst, blob []byte, name string, limit int) ([]byte, error) {
	if len(blob) < HeaderSize {
		return nil, corrupt("length", "%d bytes is shorter than the %d-byte header", len(blob), HeaderSize)
	}
	if string(blob[:4]) != blobMagic {
		return nil, corrupt("header", "bad magic %q", blob[:4])
	}
	if blob[4] != blobVersion {
		return nil, corrupt("header", "unknown blob version %d", blob[4])
	}
	switch flags := binary.LittleEndian.Uint16(blob[6:]); {
	case flags&^flagEncrypted != 0:
		return nil, corrupt("header", "unknown flags %#x", flags)
	case flags == flagEncrypted && c.secret == nil:
		return nil, corrupt("header", "the blob is encrypted but the repository is not")
	case flags == 0 && c.secret != nil:
		return nil, corrupt("header", "the blob is not encrypted but the repository is (planted or mixed data is refused)")
	}
	plainLen := int(binary.LittleEndian.Uint32(blob[8:]))
	storedLen := int(binary.LittleEndian.Uint32(blob[12:]))
	payload := blob[HeaderSize:]
	if storedLen != len(payload) {
		return nil, corrupt("length", "header says %d payload bytes, blob has %d (truncated?)", storedLen, len(payload))
	}
	if limit = min(limit, c.limit); plainLen > limit {
		return nil, corrupt("header", "plaintext length %d exceeds the limit of %d", plainLen, limit)
	}
	if sum := crc32.Checksum(payload, castagnoli); sum != binary.LittleEndian.Uint32(blob[16:]) {
		return nil, corrupt("crc", "CRC32C of the payload is %08x, header says %08x", sum, binary.LittleEndian.Uint32(blob[16:]))
	}
	if c.secret != nil {
		if len(payload) < nonceSize+tagSize {
			return nil, corrupt("length", "%d payload bytes cannot hold a nonce and a tag", len(payload))
		}
		sealed := payload[nonceSize:]
		// Decrypted in place: blob is the caller's scratch space.
		opened, err := c.secret.aead.Open(sealed[:0], payload[:nonceSize], sealed, additionalData(blob, name))
		if err != nil {
			return nil, corrupt("auth", "the blob does not authenticate as %s: it was changed, or belongs under another name", name)
		}
		payload = opened
	}
	var out []byte
	switch blob[5] {
	case codecRaw:
		out = append(dst[:0], payload...)
	case codecZstd:
		d := c.decoders.Get().(*zstd.Decoder)
		var err error
		out, err = d.DecodeAll(payload, slices.Grow(dst[:0], plainLen)[:0])
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
