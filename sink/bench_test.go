package sink_test

import (
	"fmt"
	"math/rand/v2"
	"runtime/metrics"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nbdmover/nbdmover/sink"
	"github.com/nbdmover/nbdmover/sink/sinktest"
	"golang.org/x/sync/errgroup"
)

// BenchmarkStore puts and gets 64 incompressible 4 MiB objects with 1 to 32
// concurrent operations, like the backup's uploaders and the restore's
// fetchers, on the local store and on MinIO, and reports the heap growth
// at its peak (peak-heap-MiB): the goal is uploads x 4 MiB plus a small
// constant, since each uploader puts from its own buffer.
//
//	go test -run '^$' -bench Store -benchtime 3x ./sink
func BenchmarkStore(b *testing.B) {
	b.Run("local", func(b *testing.B) {
		s, _ := sink.NewLocal(b.TempDir())
		benchStore(b, s)
	})
	b.Run("minio", func(b *testing.B) { benchStore(b, sinktest.NewS3(b, "")) })
}

func benchStore(b *testing.B, s sink.Store) {
	const size, objects = 4 << 20, 64
	r := rand.New(rand.NewPCG(1, 2))
	bufs := make([][]byte, 32) // one buffer per worker, as the pipeline's pools
	for i := range bufs {
		bufs[i] = make([]byte, size)
		for j := range bufs[i] {
			bufs[i][j] = byte(r.Uint32())
		}
	}
	for _, conc := range []int{1, 2, 4, 8, 16, 32} {
		for _, op := range []string{"put", "get"} {
			b.Run(fmt.Sprintf("%s/conc=%d", op, conc), func(b *testing.B) {
				b.SetBytes(objects * size)
				peak := trackHeap(b)
				for b.Loop() {
					var next atomic.Int64
					g, ctx := errgroup.WithContext(b.Context())
					for w := range conc {
						g.Go(func() error {
							buf := bufs[w]
							for {
								i := next.Add(1) - 1
								if i >= objects {
									return nil
								}
								key := fmt.Sprintf("chunks/%02x/obj-%d", i%256, i)
								var err error
								if op == "put" {
									err = s.Put(ctx, key, buf)
								} else {
									buf, err = s.Get(ctx, key, buf, 1<<30)
								}
								if err != nil {
									return err
								}
							}
						})
					}
					if err := g.Wait(); err != nil {
						b.Fatal(err)
					}
				}
				b.ReportMetric(peak()/(1<<20), "peak-heap-MiB")
			})
		}
	}
}

// trackHeap samples the live heap until the benchmark ends and returns a
// function giving its peak growth over the start, in bytes.
func trackHeap(b *testing.B) func() float64 {
	sample := []metrics.Sample{{Name: "/memory/classes/heap/objects:bytes"}}
	read := func() float64 { metrics.Read(sample); return float64(sample[0].Value.Uint64()) }
	base := read()
	var peak atomic.Uint64
	done := make(chan struct{})
	stopped := make(chan struct{})
	go func() {
		defer close(stopped)
		t := time.NewTicker(2 * time.Millisecond)
		defer t.Stop()
		for {
			select {
			case <-done:
				return
			case <-t.C:
				if v := uint64(max(0, read()-base)); v > peak.Load() {
					peak.Store(v)
				}
			}
		}
	}()
	b.Cleanup(func() { close(done); <-stopped })
	return func() float64 { return float64(peak.Load()) }
}
