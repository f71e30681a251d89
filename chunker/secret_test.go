package chunker

import (
	"bytes"
	"crypto/rand"
	"encoding/binary"
	"errors"
	"hash/crc32"
	"testing"
)

func testSecret(t testing.TB) *Secret {
	id, data := make([]byte, SecretKeySize), make([]byte, SecretKeySize)
	rand.Read(id)
	rand.Read(data)
	s, err := NewSecret(id, data)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func TestEncryptedBlobRoundTrip(t *testing.T) {
	s := testSecret(t)
	for _, comp := range []string{"zstd", "s2", "none"} {
		c, _ := ParseCompression(comp)
		plain, _ := NewCodec(c)
		codec := plain.Encrypted(s)
		for name, p := range map[string][]byte{
			"compressible":   bytes.Repeat([]byte("nbdmover "), 100000),
			"incompressible": randomBytes(1<<20, 1),
			"one byte":       {7},
			"max size":       randomBytes(MaxChunkSize, 3),
		} {
			d := codec.Sum(p)
			if d == Sum(p) {
				t.Fatalf("%s/%s: an encrypted codec names chunks by their plain SHA-256", comp, name)
			}
			key := "chunks/" + d.String()[:2] + "/" + d.String()
			blob := codec.Encode(nil, p, key)
			if bytes.Contains(blob, p[:min(len(p), 64)]) && len(p) >= 64 {
				t.Fatalf("%s/%s: the blob holds its plaintext", comp, name)
			}
			if len(blob) > MaxBlobLen(len(p)) {
				t.Fatalf("%s/%s: %d bytes exceed MaxBlobLen %d", comp, name, len(blob), MaxBlobLen(len(p)))
			}
			got, err := codec.Decode(nil, bytes.Clone(blob), key, d)
			if err != nil || !bytes.Equal(got, p) {
				t.Fatalf("%s/%s: %v", comp, name, err)
			}
			if again := codec.Encode(nil, p, key); bytes.Equal(again, blob) {
				t.Fatalf("%s/%s: two encodings are equal (nonce reused)", comp, name)
			}
		}
	}
}

// TestEncryptedBlobTampering: every change to an encrypted blob, and a
// blob read under another name or with another key, fails a named check.
func TestEncryptedBlobTampering(t *testing.T) {
	s := testSecret(t)
	base, _ := NewCodec(Compression{Algorithm: "zstd"})
	codec := base.Encrypted(s)
	plain := bytes.Repeat([]byte("nbdmover "), 100000)
	d := codec.Sum(plain)
	good := codec.Encode(nil, plain, "chunks/a")
	resign := func(b []byte) []byte { // fix the CRC, as an attacker would
		binary.LittleEndian.PutUint32(b[16:], crc32.Checksum(b[HeaderSize:], castagnoli))
		return b
	}
	mutate := func(f func(b []byte) []byte) []byte { return f(bytes.Clone(good)) }
	tests := []struct {
		name, key, check string
		blob             []byte
		codec            *Codec
	}{
		{"flipped ciphertext bit", "chunks/a", "crc", mutate(func(b []byte) []byte { b[HeaderSize+40] ^= 1; return b }), codec},
		{"flipped bit, CRC fixed", "chunks/a", "auth", mutate(func(b []byte) []byte { b[HeaderSize+40] ^= 1; return resign(b) }), codec},
		{"flipped nonce, CRC fixed", "chunks/a", "auth", mutate(func(b []byte) []byte { b[HeaderSize] ^= 1; return resign(b) }), codec},
		{"flipped tag, CRC fixed", "chunks/a", "auth", mutate(func(b []byte) []byte { b[len(b)-1] ^= 1; return resign(b) }), codec},
		{"codec changed", "chunks/a", "auth", mutate(func(b []byte) []byte { b[5] = codecS2; return b }), codec},
		{"plaintext length changed", "chunks/a", "auth", mutate(func(b []byte) []byte {
			binary.LittleEndian.PutUint32(b[8:], uint32(len(plain)-1))
			return b
		}), codec},
		{"read under another name", "chunks/b", "auth", good, codec},
		{"another repository's key", "chunks/a", "auth", good, base.Encrypted(testSecret(t))},
		{"encryption flag cleared", "chunks/a", "header", mutate(func(b []byte) []byte { b[6] = 0; return b }), codec},
		{"plain blob in an encrypted repository", "chunks/a", "header", base.Encode(nil, plain, "chunks/a"), codec},
		{"encrypted blob in a plain repository", "chunks/a", "header", good, base},
		{"truncated to the nonce", "chunks/a", "length", mutate(func(b []byte) []byte {
			b = b[:HeaderSize+nonceSize]
			binary.LittleEndian.PutUint32(b[12:], nonceSize)
			return resign(b)
		}), codec},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := tt.codec.Decode(nil, bytes.Clone(tt.blob), tt.key, d)
			var ce *CorruptError
			if !errors.As(err, &ce) || !errors.Is(err, ErrCorrupt) || ce.Check != tt.check {
				t.Fatalf("got %v, want a %q CorruptError", err, tt.check)
			}
		})
	}
	// The digest check still runs after decryption.
	if _, err := codec.Decode(nil, bytes.Clone(good), "chunks/a", Sum(plain)); err == nil {
		t.Fatal("an encrypted chunk decoded against its plain SHA-256")
	}
}

func TestSecretSum(t *testing.T) {
	a, b := testSecret(t), testSecret(t)
	p := []byte("the same plaintext")
	if a.Sum(p) != a.Sum(p) {
		t.Fatal("a keyed digest is not deterministic")
	}
	if a.Sum(p) == b.Sum(p) || a.Sum(p) == Sum(p) {
		t.Fatal("keyed digests under different keys agree")
	}
	if _, err := NewSecret(make([]byte, 16), make([]byte, 32)); err == nil {
		t.Fatal("a 16-byte naming key was accepted")
	}
}
