package chunker

import (
	"bytes"
	"encoding/binary"
	"errors"
	"hash/crc32"
	"math/rand/v2"
	"strings"
	"testing"
)

func randomBytes(n int, seed uint64) []byte {
	r := rand.New(rand.NewPCG(seed, seed))
	p := make([]byte, n)
	for i := range p {
		p[i] = byte(r.Uint32())
	}
	return p
}

func TestCheckChunkSize(t *testing.T) {
	for _, tt := range []struct {
		n  int64
		ok bool
	}{
		{256 << 10, true}, {4 << 20, true}, {16 << 20, true}, {320 << 10, true},
		{192 << 10, false}, {32 << 20, false}, {4<<20 + 4096, false}, {0, false},
	} {
		if err := CheckChunkSize(tt.n); (err == nil) != tt.ok {
			t.Errorf("CheckChunkSize(%d) = %v", tt.n, err)
		}
	}
}

func TestGrid(t *testing.T) {
	g := Grid{ChunkSize: 4 << 20, Size: 10<<20 + 512}
	if g.Count() != 3 {
		t.Fatalf("count %d", g.Count())
	}
	if off, n := g.Chunk(2); off != 8<<20 || n != 2<<20+512 {
		t.Fatalf("last chunk %d+%d", off, n)
	}
	if g.Index(8<<20-1) != 1 || g.Index(8<<20) != 2 {
		t.Fatal("index")
	}
	if (Grid{ChunkSize: 4 << 20, Size: 8 << 20}).Count() != 2 || (Grid{ChunkSize: 4 << 20}).Count() != 0 {
		t.Fatal("exact and empty counts")
	}
}

func TestParseCompression(t *testing.T) {
	for in, want := range map[string]string{"none": "none", "zstd": "zstd", "zstd:1": "zstd", "zstd:4": "zstd:4", "s2": "s2"} {
		c, err := ParseCompression(in)
		if err != nil || c.String() != want {
			t.Errorf("%q -> %v, %v", in, c, err)
		}
	}
	for _, in := range []string{"", "lz4", "zstd:0", "zstd:5", "none:1", "zstd:x", "s2:2"} {
		if _, err := ParseCompression(in); err == nil {
			t.Errorf("%q accepted", in)
		}
	}
}

func TestIsZero(t *testing.T) {
	p := make([]byte, 200<<10)
	if !IsZero(p) || !IsZero(nil) {
		t.Fatal("zeroes not recognised")
	}
	for _, i := range []int{0, 65535, 65536, len(p) - 1} {
		p[i] = 1
		if IsZero(p) {
			t.Fatalf("byte %d set, still zero", i)
		}
		p[i] = 0
	}
}

func TestDigest(t *testing.T) {
	d := Sum([]byte("x"))
	back, err := ParseDigest(d.String())
	if err != nil || back != d {
		t.Fatal(err)
	}
	for _, bad := range []string{"", d.String()[:63], strings.ToUpper(d.String()), d.String()[:62] + "zz"} {
		if _, err := ParseDigest(bad); err == nil {
			t.Errorf("%q accepted", bad)
		}
	}
	if !ZeroChunk.IsZeroChunk() || d.IsZeroChunk() || Sum(make([]byte, 4096)).IsZeroChunk() {
		t.Fatal("zero-chunk marker")
	}
}

func TestBlobRoundTrip(t *testing.T) {
	text := bytes.Repeat([]byte("the quick brown fox jumps over the lazy dog\n"), 30000)
	cases := map[string][]byte{
		"compressible":   text,
		"incompressible": randomBytes(1<<20, 1),
		"one byte":       {7},
		"short odd":      randomBytes(4097, 2),
		"max size":       randomBytes(MaxChunkSize, 3),
	}
	for _, comp := range []string{"zstd", "zstd:2", "zstd:3", "zstd:4", "s2", "none"} {
		c, _ := ParseCompression(comp)
		codec, err := NewCodec(c)
		if err != nil {
			t.Fatal(err)
		}
		for name, plain := range cases {
			blob := codec.Encode(nil, plain, "chunks/x")
			got, err := codec.Decode(nil, blob, "chunks/x", Sum(plain))
			if err != nil || !bytes.Equal(got, plain) {
				t.Fatalf("%s/%s: %v", comp, name, err)
			}
			switch {
			case comp == "none" || name == "incompressible" || name == "max size":
				if blob[5] != codecRaw || len(blob) != HeaderSize+len(plain) {
					t.Errorf("%s/%s: want raw storage, got codec %d, %d bytes", comp, name, blob[5], len(blob))
				}
			case name == "compressible":
				if want := map[string]byte{"zstd": codecZstd, "zstd:2": codecZstd, "zstd:3": codecZstd, "zstd:4": codecZstd, "s2": codecS2}[comp]; blob[5] != want || len(blob) > len(plain)/10 {
					t.Errorf("%s/%s: want zstd, got codec %d, %d bytes", comp, name, blob[5], len(blob))
				}
			}
		}
	}
}

func TestBlobCorruption(t *testing.T) {
	codec, _ := NewCodec(Compression{Algorithm: "zstd"})
	plain := bytes.Repeat([]byte("nbdmover "), 100000)
	good := codec.Encode(nil, plain, "chunks/x")
	want := Sum(plain)
	mutate := func(f func(b []byte) []byte) []byte { return f(bytes.Clone(good)) }
	tests := []struct {
		name, check string
		blob        []byte
		digest      Digest
	}{
		{"empty", "length", nil, want},
		{"truncated header", "length", good[:10], want},
		{"truncated payload", "length", good[:len(good)-1], want},
		{"extra bytes", "length", append(bytes.Clone(good), 0), want},
		{"bad magic", "header", mutate(func(b []byte) []byte { b[0] = 'X'; return b }), want},
		{"future version", "header", mutate(func(b []byte) []byte { b[4] = 9; return b }), want},
		{"encrypted flag", "header", mutate(func(b []byte) []byte { b[6] = 1; return b }), want},
		{"unknown codec", "header", mutate(func(b []byte) []byte { b[5] = 7; return b }), want},
		{"flipped payload bit", "crc", mutate(func(b []byte) []byte { b[HeaderSize+5] ^= 0x10; return b }), want},
		{"wrong plaintext length", "length", mutate(func(b []byte) []byte {
			binary.LittleEndian.PutUint32(b[8:], uint32(len(plain)-1))
			return b
		}), want},
		{"wrong digest", "digest", good, Sum([]byte("other"))},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := codec.Decode(nil, tt.blob, "chunks/x", tt.digest)
			var ce *CorruptError
			if !errors.As(err, &ce) || !errors.Is(err, ErrCorrupt) || ce.Check != tt.check {
				t.Fatalf("got %v, want a %q CorruptError", err, tt.check)
			}
		})
	}
}

func TestS2Corruption(t *testing.T) {
	codec, _ := NewCodec(Compression{Algorithm: "s2"})
	plain := bytes.Repeat([]byte("nbdmover "), 100000)
	good := codec.Encode(nil, plain, "chunks/x")
	if good[5] != codecS2 {
		t.Fatalf("codec %d", good[5])
	}
	// A payload that passes the CRC but does not decode: re-sign garbage.
	bad := append(bytes.Clone(good[:HeaderSize]), 0xff, 0xff, 0xff, 0xff, 0x0f, 1, 2, 3)
	binary.LittleEndian.PutUint32(bad[12:], uint32(len(bad)-HeaderSize))
	binary.LittleEndian.PutUint32(bad[16:], crc32.Checksum(bad[HeaderSize:], castagnoli))
	var ce *CorruptError
	if _, err := codec.Decode(nil, bad, "chunks/x", Sum(plain)); !errors.As(err, &ce) || ce.Check != "decompress" {
		t.Fatalf("got %v, want a decompress CorruptError", err)
	}
}

func FuzzDecode(f *testing.F) {
	codec, _ := NewCodec(Compression{Algorithm: "zstd"})
	s2codec, _ := NewCodec(Compression{Algorithm: "s2"})
	for _, p := range [][]byte{[]byte("hello"), bytes.Repeat([]byte{1, 2, 3}, 5000), randomBytes(300, 9)} {
		f.Add(codec.Encode(nil, p, "chunks/x"), Sum(p).String())
		f.Add(s2codec.Encode(nil, p, "chunks/x"), Sum(p).String())
	}
	f.Fuzz(func(t *testing.T, blob []byte, digest string) {
		d, err := ParseDigest(digest)
		if err != nil {
			d = Sum(blob) // still exercise every check before the digest
		}
		out, err := codec.Decode(nil, blob, "chunks/x", d)
		if err != nil {
			if !errors.Is(err, ErrCorrupt) {
				t.Fatalf("error %v does not match ErrCorrupt", err)
			}
			return
		}
		if Sum(out) != d {
			t.Fatal("decoded plaintext does not hash to the digest")
		}
	})
}
