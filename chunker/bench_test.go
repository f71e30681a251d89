package chunker

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// vmData returns the chunks of a realistic VM disk: an ext4 filesystem
// made with mkfs.ext4 -d from a system directory (binaries, libraries,
// text, metadata, partly filled blocks), as a backup reads it. Set
// NBDMOVER_BENCH_IMAGE to use another raw disk image instead.
func vmData(b *testing.B) []byte {
	img := os.Getenv("NBDMOVER_BENCH_IMAGE")
	if img == "" {
		img = filepath.Join(b.TempDir(), "fs.img")
		out, err := exec.Command("mkfs.ext4", "-q", "-F", "-b", "4096", "-d", "/usr/share", img, "1200M").CombinedOutput()
		if err != nil {
			b.Fatalf("mkfs.ext4: %v: %s", err, out)
		}
	}
	data, err := os.ReadFile(img)
	if err != nil {
		b.Fatal(err)
	}
	return data
}

// BenchmarkPipeline is the per-chunk CPU work of a backup on one core:
// zero check, digest and blob encoding of a realistic disk image in 1 MiB
// (the default) and 4 MiB chunks; "+aes" is an encrypted repository's
// (HMAC-SHA256 names, AES-256-GCM). MB/s (of disk bytes) is per core;
// "ratio" is stored/disk bytes.
//
//	go test -run '^$' -bench Pipeline ./chunker
func BenchmarkPipeline(b *testing.B) {
	data := vmData(b)
	secret := testSecret(b)
	for _, comp := range []string{"none", "none+aes", "s2", "s2+aes", "zstd", "zstd+aes", "zstd:2"} {
		for _, size := range []int{1 << 20, 4 << 20} {
			b.Run(fmt.Sprintf("%s/chunk=%dMiB", comp, size>>20), func(b *testing.B) {
				name, aes := strings.CutSuffix(comp, "+aes")
				c, _ := ParseCompression(name)
				codec, _ := NewCodec(c)
				if aes {
					codec = codec.Encrypted(secret)
				}
				var stored int64
				buf := make([]byte, 0, MaxBlobLen(MaxChunkSize))
				b.SetBytes(int64(len(data)))
				for b.Loop() {
					stored = 0
					for off := 0; off < len(data); off += size {
						chunk := data[off:min(off+size, len(data))]
						if IsZero(chunk) {
							continue
						}
						_ = codec.Sum(chunk)
						buf = codec.Encode(buf, chunk, "chunks/x")
						stored += int64(len(buf))
					}
				}
				b.ReportMetric(float64(stored)/float64(len(data)), "ratio")
			})
		}
	}
}

// BenchmarkDecode is the per-chunk CPU work of a restore on one core.
func BenchmarkDecode(b *testing.B) {
	data := vmData(b)
	codec, _ := NewCodec(Compression{Algorithm: "zstd"})
	var blobs [][]byte
	var sums []Digest
	for off := 0; off < len(data); off += DefaultChunkSize {
		chunk := data[off:min(off+DefaultChunkSize, len(data))]
		if IsZero(chunk) {
			continue
		}
		blobs = append(blobs, codec.Encode(nil, chunk, "chunks/x"))
		sums = append(sums, Sum(chunk))
	}
	out := make([]byte, 0, MaxChunkSize)
	var size int64
	for i := range blobs {
		size += int64(len(blobs[i]))
	}
	b.SetBytes(int64(len(data)))
	for b.Loop() {
		for i, blob := range blobs {
			var err error
			if out, err = codec.Decode(out, blob, "chunks/x", sums[i]); err != nil {
				b.Fatal(err)
			}
		}
	}
}

// BenchmarkPrimitives is each cryptographic step alone on 1 MiB, per
// core: SHA-256 (a plain repository's chunk names), HMAC-SHA256 (an
// encrypted one's) and AES-256-GCM sealing and opening.
//
//	go test -run '^$' -bench Primitives ./chunker
func BenchmarkPrimitives(b *testing.B) {
	p := randomBytes(1<<20, 5)
	s := testSecret(b)
	nonce := make([]byte, nonceSize)
	sealed := s.aead.Seal(nil, nonce, p, nil)
	out := make([]byte, 0, len(sealed))
	for _, bench := range []struct {
		name string
		f    func()
	}{
		{"sha256", func() { Sum(p) }},
		{"hmac-sha256", func() { s.Sum(p) }},
		{"aes-256-gcm-seal", func() { out = s.aead.Seal(out[:0], nonce, p, nil) }},
		{"aes-256-gcm-open", func() {
			var err error
			if out, err = s.aead.Open(out[:0], nonce, sealed, nil); err != nil {
				b.Fatal(err)
			}
		}},
	} {
		b.Run(bench.name, func(b *testing.B) {
			b.SetBytes(int64(len(p)))
			for b.Loop() {
				bench.f()
			}
		})
	}
}
