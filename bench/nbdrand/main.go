// Command nbdrand reads an NBD export at random offsets and reports the
// rate and latency of the reads: bench/export.sh's random-read figures.
//
//	nbdrand -uri URI [-size 4096] [-depth 16] [-seconds 10] [-span BYTES] [-warm]
//
// depth connections each keep one read in flight (queue depth depth in
// all); offsets are multiples of size within the first span bytes of the
// export (all of it by default). With -warm, the span is read once before
// timing (so that a span smaller than the server's cache is measured from
// its cache). Prints one JSON object.
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"math/rand/v2"
	"os"
	"slices"
	"sync"
	"time"

	"github.com/nbdmover/nbdmover/nbdclient"
)

func main() {
	uri := flag.String("uri", "", "NBD URI of the export")
	size := flag.Int("size", 4096, "bytes per read")
	depth := flag.Int("depth", 16, "reads in flight (one per connection)")
	seconds := flag.Float64("seconds", 10, "how long to read")
	span := flag.Int64("span", 0, "read within the first SPAN bytes (default: the whole export)")
	warm := flag.Bool("warm", false, "read the span once before timing")
	flag.Parse()
	if *uri == "" || *size <= 0 || *depth <= 0 {
		fmt.Fprintln(os.Stderr, "usage: nbdrand -uri URI [-size 4096] [-depth 16] [-seconds 10] [-span BYTES] [-warm]")
		os.Exit(2)
	}
	ctx := context.Background()
	conns := make([]*nbdclient.Conn, *depth)
	for i := range conns {
		c, err := nbdclient.Dial(ctx, nbdclient.Config{URI: *uri, RequestSize: max(*size, 4096)})
		if err != nil {
			fmt.Fprintln(os.Stderr, "nbdrand:", err)
			os.Exit(1)
		}
		defer c.Close()
		conns[i] = c
	}
	exportSize := conns[0].Info().Size
	if *span <= 0 || *span > exportSize {
		*span = exportSize
	}
	blocks := *span / int64(*size)
	if *warm {
		buf := make([]byte, 1<<20)
		for off := int64(0); off < *span; off += int64(len(buf)) {
			n := min(int64(len(buf)), *span-off)
			if err := conns[0].ReadAt(ctx, buf[:n], off); err != nil {
				fmt.Fprintln(os.Stderr, "nbdrand: warm:", err)
				os.Exit(1)
			}
		}
	}
	deadline := time.Now().Add(time.Duration(*seconds * float64(time.Second)))
	lat := make([][]time.Duration, *depth)
	var wg sync.WaitGroup
	var failed error
	var mu sync.Mutex
	start := time.Now()
	for i, c := range conns {
		wg.Add(1)
		go func() {
			defer wg.Done()
			r := rand.New(rand.NewPCG(uint64(i), 7))
			buf := make([]byte, *size)
			for time.Now().Before(deadline) {
				off := r.Int64N(blocks) * int64(*size)
				t := time.Now()
				if err := c.ReadAt(ctx, buf, off); err != nil {
					mu.Lock()
					failed = err
					mu.Unlock()
					return
				}
				lat[i] = append(lat[i], time.Since(t))
			}
		}()
	}
	wg.Wait()
	elapsed := time.Since(start)
	if failed != nil {
		fmt.Fprintln(os.Stderr, "nbdrand:", failed)
		os.Exit(1)
	}
	var all []time.Duration
	for _, l := range lat {
		all = append(all, l...)
	}
	slices.Sort(all)
	pct := func(p float64) float64 { return float64(all[int(p*float64(len(all)-1))].Microseconds()) }
	json.NewEncoder(os.Stdout).Encode(map[string]any{"reads": len(all), "size": *size, "depth": *depth, "span": *span,
		"iops": float64(len(all)) / elapsed.Seconds(), "p50_us": pct(0.50), "p99_us": pct(0.99), "max_us": pct(1)})
}
