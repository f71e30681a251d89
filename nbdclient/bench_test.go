package nbdclient

import (
	"fmt"
	"os"
	"os/exec"
	"sort"
	"strconv"
	"testing"

	"golang.org/x/sync/errgroup"
)

// BenchmarkRead reads a fully allocated export (2 GiB by default;
// NBDMOVER_BENCH_SIZE in MiB overrides) from qemu-nbd with 1, 2 and 4
// connections and several request sizes, next to `nbdcopy URI null:` in the
// same run, and logs each setting's rate as a ratio of nbdcopy's:
//
//	go test -run '^$' -bench BenchmarkRead -benchtime 3x ./nbdclient
func BenchmarkRead(b *testing.B) {
	need(b, "nbdcopy")
	size := int64(2048) * MiB
	if s, err := strconv.Atoi(os.Getenv("NBDMOVER_BENCH_SIZE")); err == nil && s > 0 {
		size = int64(s) * MiB
	}
	img := newImage(b, b.TempDir(), size)
	var fill []string
	for off := int64(0); off < size; off += 256 * MiB {
		fill = append(fill, fmt.Sprintf("write -P 0x%02x %d %d", 0x10+off/(256*MiB), off, min(256*MiB, size-off)))
	}
	qemuIO(b, img, fill...)
	srv := serve(b, img)

	rates := map[string]float64{} // MB/s by sub-benchmark
	record := func(b *testing.B, name string) {
		rates[name] = float64(size) * float64(b.N) / b.Elapsed().Seconds() / 1e6
	}

	b.Run("nbdcopy", func(b *testing.B) {
		b.SetBytes(size)
		for b.Loop() {
			if out, err := exec.Command("nbdcopy", srv.URI, "null:").CombinedOutput(); err != nil {
				b.Fatalf("nbdcopy: %v: %s", err, out)
			}
		}
		record(b, "nbdcopy")
	})

	const chunk = 4 * MiB // the repository's default chunk: one ReadAt each
	for _, conns := range []int{1, 2, 4} {
		for _, req := range []int{256 * KiB, 1 * MiB, 4 * MiB} {
			name := fmt.Sprintf("conns=%d/req=%dKiB", conns, req/KiB)
			b.Run(name, func(b *testing.B) {
				p, err := DialPool(b.Context(), Config{URI: srv.URI, RequestSize: req}, conns)
				if err != nil {
					b.Fatal(err)
				}
				defer p.Close()
				bufs := make([][]byte, conns)
				for i := range bufs {
					bufs[i] = make([]byte, chunk)
				}
				b.SetBytes(size)
				for b.Loop() {
					g, ctx := errgroup.WithContext(b.Context())
					for i := range conns {
						g.Go(func() error {
							for off := int64(i) * chunk; off < size; off += int64(conns) * chunk {
								n := min(chunk, size-off)
								if err := p.ReadAt(ctx, bufs[i][:n], off); err != nil {
									return err
								}
							}
							return nil
						})
					}
					if err := g.Wait(); err != nil {
						b.Fatal(err)
					}
				}
				record(b, name)
			})
		}
	}

	if base := rates["nbdcopy"]; base > 0 {
		names := make([]string, 0, len(rates))
		for n := range rates {
			names = append(names, n)
		}
		sort.Strings(names)
		for _, n := range names {
			fmt.Printf("ratio: %-22s %8.0f MB/s  %.2fx nbdcopy\n", n, rates[n], rates[n]/base)
		}
	}
}
