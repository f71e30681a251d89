package chunker

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
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
// zero check, SHA-256 and blob encoding of a realistic disk image in 1 MiB
// (the default) and 4 MiB chunks. MB/s (of disk bytes) is per core;
// "ratio" is stored/disk bytes.
//
//	go test -run '^$' -bench Pipeline ./chunker
func BenchmarkPipeline(b *testing.B) {
	data := vmData(b)
	for _, comp := range []string{"none", "s2", "zstd", "zstd:2"} {
		for _, size := range []int{1 << 20, 4 << 20} {
			b.Run(fmt.Sprintf("%s/chunk=%dMiB", comp, size>>20), func(b *testing.B) {
				c, _ := ParseCompression(comp)
				codec, _ := NewCodec(c)
				var stored int64
				buf := make([]byte, 0, MaxChunkSize+HeaderSize)
				b.SetBytes(int64(len(data)))
				for b.Loop() {
					stored = 0
					for off := 0; off < len(data); off += size {
						chunk := data[off:min(off+size, len(data))]
						if IsZero(chunk) {
							continue
						}
						_ = Sum(chunk)
						buf = codec.Encode(buf, chunk)
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
		blobs = append(blobs, codec.Encode(nil, chunk))
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
			if out, err = codec.Decode(out, blob, sums[i]); err != nil {
				b.Fatal(err)
			}
		}
	}
}
