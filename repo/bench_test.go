package repo

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nbdmover/nbdmover/chunker"
	"github.com/nbdmover/nbdmover/sink"
	"github.com/nbdmover/nbdmover/sink/sinktest"
	"golang.org/x/sync/errgroup"
)

// countingRequests counts the requests a store gets, by kind. It
// unwraps, so that sink.DeleteMany still finds the store's multi-object
// delete (deletes are not counted).
type countingRequests struct {
	sink.Store
	lists, gets, puts, stats atomic.Int64
}

func (c *countingRequests) Unwrap() sink.Store { return c.Store }

func (c *countingRequests) Stat(ctx context.Context, key string) (sink.ObjectInfo, error) {
	c.stats.Add(1)
	return c.Store.Stat(ctx, key)
}

func (c *countingRequests) List(ctx context.Context, prefix string, fn func(sink.ObjectInfo) error) error {
	c.lists.Add(1)
	n := 0
	return c.Store.List(ctx, prefix, func(o sink.ObjectInfo) error {
		if n++; n%1000 == 0 {
			c.lists.Add(1) // S3 returns up to 1000 keys a request
		}
		return fn(o)
	})
}

func (c *countingRequests) Get(ctx context.Context, key string, buf []byte) ([]byte, error) {
	c.gets.Add(1)
	return c.Store.Get(ctx, key, buf)
}

func (c *countingRequests) Put(ctx context.Context, key string, data []byte) error {
	c.puts.Add(1)
	return c.Store.Put(ctx, key, data)
}

// BenchmarkList10k commits NBDMOVER_BENCH_BACKUPS (default 10,000) small
// backups of one domain to MinIO (as backups do: a catalog now and then)
// and times what listing them and finding the latest cost, in wall time
// and store requests.
//
//	go test -run '^$' -bench List10k -benchtime 1x ./repo   (needs make test's MinIO)
func BenchmarkList10k(b *testing.B) {
	n := 10000
	if v := os.Getenv("NBDMOVER_BENCH_BACKUPS"); v != "" {
		fmt.Sscan(v, &n)
	}
	s := sinktest.NewS3(b, "bench/")
	r, err := Init(b.Context(), s, InitOptions{})
	if err != nil {
		b.Fatal(err)
	}
	t0 := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	var ib Builder
	ib.Set(3, chunker.Sum([]byte("x")))
	ix := ib.Index(r.Config().ChunkSize, 16<<30)
	start := time.Now()
	for lo := 0; lo < n; lo += catalogEvery {
		g, ctx := errgroup.WithContext(b.Context())
		g.SetLimit(16)
		for i := lo; i < min(lo+catalogEvery, n); i++ {
			g.Go(func() error {
				m := &Manifest{ID: NewBackupID(t0.Add(time.Duration(i)*time.Hour), ""), Domain: "vm1", Mode: "full",
					Source: "libvirt", Consistency: "crash-consistent", Disks: []DiskManifest{{Name: "vda", Size: ix.Size, Mode: "full"}}}
				return r.Commit(ctx, m, map[string]DiskData{"vda": {Full: ix}}, map[string][]byte{"domain.xml": []byte("<domain/>")})
			})
		}
		if err := g.Wait(); err != nil {
			b.Fatal(err)
		}
		if err := r.UpdateCatalog(b.Context(), "vm1"); err != nil {
			b.Fatal(err)
		}
	}
	b.Logf("committed %d backups in %v", n, time.Since(start))
	c := &countingRequests{Store: s}
	rc, _ := Open(b.Context(), c)
	for b.Loop() {
		c.lists.Store(0)
		c.gets.Store(0)
		t := time.Now()
		ms, skipped, err := rc.Backups(b.Context(), "")
		if err != nil || len(ms) != n || len(skipped) > 0 {
			b.Fatalf("list: %d backups, %d skipped, %v", len(ms), len(skipped), err)
		}
		js, _ := json.Marshal(map[string]any{"backups": ms}) // what GET /v1/backups sends
		list := time.Since(t)
		lists, gets := c.lists.Load(), c.gets.Load()
		c.lists.Store(0)
		c.gets.Store(0)
		t = time.Now()
		last, _, _, err := rc.Latest(b.Context(), "vm1")
		if err != nil || last.ID != ms[len(ms)-1].ID {
			b.Fatalf("latest: %v", err)
		}
		latest := time.Since(t)
		fmt.Printf("list of %d backups on MinIO: %v, %d list + %d get requests, %d bytes of JSON; latest: %v, %d list + %d get requests\n",
			n, list, lists, gets, len(js), latest, c.lists.Load(), c.gets.Load())
		b.ReportMetric(list.Seconds(), "list-s")
		b.ReportMetric(latest.Seconds()*1000, "latest-ms")
	}
}
