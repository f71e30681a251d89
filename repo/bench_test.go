package repo

import (
	"encoding/json"
	"fmt"
	"github.com/nbdmover/nbdmover/repo/index"
	"math/rand/v2"
	"os"
	"syscall"
	"testing"
	"time"

	"github.com/nbdmover/nbdmover/chunker"
	"github.com/nbdmover/nbdmover/sink"
	"github.com/nbdmover/nbdmover/sink/sinktest"
	"golang.org/x/sync/errgroup"
)

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
	r, err := initStore(b.Context(), s, InitOptions{})
	if err != nil {
		b.Fatal(err)
	}
	t0 := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	var ib index.Builder
	ib.Set(3, chunker.Sum([]byte("x")), chunker.Digest{})
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
	c := &sinktest.Counting{Store: s}
	rc, _ := openStore(b.Context(), c)
	for b.Loop() {
		c.Lists.Store(0)
		c.Gets.Store(0)
		t := time.Now()
		ms, skipped, err := rc.Backups(b.Context(), "")
		if err != nil || len(ms) != n || len(skipped) > 0 {
			b.Fatalf("list: %d backups, %d skipped, %v", len(ms), len(skipped), err)
		}
		js, _ := json.Marshal(map[string]any{"backups": ms}) // what GET /v1/backups sends
		list := time.Since(t)
		lists, gets := c.Lists.Load(), c.Gets.Load()
		c.Lists.Store(0)
		c.Gets.Store(0)
		t = time.Now()
		last, _, _, err := rc.Latest(b.Context(), "vm1")
		if err != nil || last.ID != ms[len(ms)-1].ID {
			b.Fatalf("latest: %v", err)
		}
		latest := time.Since(t)
		fmt.Printf("list of %d backups on MinIO: %v, %d list + %d get requests, %d bytes of JSON; latest: %v, %d list + %d get requests\n",
			n, list, lists, gets, len(js), latest, c.Lists.Load(), c.Gets.Load())
		b.ReportMetric(list.Seconds(), "list-s")
		b.ReportMetric(latest.Seconds()*1000, "latest-ms")
	}
}

// BenchmarkVerifyReadData stores NBDMOVER_BENCH_VERIFY_MIB (default 2048)
// MiB of incompressible 1 MiB chunks in one backup, on the local store
// and on MinIO, and times verify --read-data at 100% and at 10%: wall
// time and this process's CPU (user+sys) per GB of chunks read. With
// NBDMOVER_BENCH_DROP_CACHES=1 (root) the page cache is dropped before
// each run: the local store's figures are then of a cold cache.
//
//	go test -run '^$' -bench VerifyReadData -benchtime 1x ./repo   (needs make test's MinIO)
func BenchmarkVerifyReadData(b *testing.B) {
	mib := 2048
	if v := os.Getenv("NBDMOVER_BENCH_VERIFY_MIB"); v != "" {
		fmt.Sscan(v, &mib)
	}
	for _, st := range []struct {
		name  string
		store func() sink.Store
	}{
		{"local", func() sink.Store { s, _ := sink.NewLocal(b.TempDir()); return s }},
		{"minio", func() sink.Store { return sinktest.NewS3(b, "bench/") }},
	} {
		b.Run(st.name, func(b *testing.B) {
			s := st.store()
			r, err := initStore(b.Context(), s, InitOptions{})
			if err != nil {
				b.Fatal(err)
			}
			var ib index.Builder
			rng := rand.NewChaCha8([32]byte{1})
			g, ctx := errgroup.WithContext(b.Context())
			g.SetLimit(8)
			for i := range mib {
				plain := make([]byte, 1<<20)
				rng.Read(plain)
				d := r.Sum(plain)
				ib.Set(int64(i), d, chunker.Digest{})
				g.Go(func() error { return s.Put(ctx, ChunkKey(d), r.EncodeChunk(nil, d, plain)) })
			}
			if err := g.Wait(); err != nil {
				b.Fatal(err)
			}
			ix := ib.Index(r.Config().ChunkSize, int64(mib)<<20)
			m := &Manifest{ID: NewBackupID(time.Now(), ""), Domain: "vm1", Mode: "full", Source: "nbd",
				Disks: []DiskManifest{{Name: "vda", Size: ix.Size, Mode: "full"}}}
			if err := r.Commit(b.Context(), m, map[string]DiskData{"vda": {Full: ix}}, nil); err != nil {
				b.Fatal(err)
			}
			for b.Loop() {
				for _, p := range []int{100, 10} {
					if os.Getenv("NBDMOVER_BENCH_DROP_CACHES") == "1" {
						if err := os.WriteFile("/proc/sys/vm/drop_caches", []byte("3"), 0); err != nil {
							b.Fatal(err)
						}
					}
					cpu0, t0 := cpuSeconds(), time.Now()
					vs, err := r.Verify(b.Context(), VerifyOptions{ReadPercent: p}, func(p Problem) { b.Error(p) })
					if err != nil {
						b.Fatal(err)
					}
					wall, cpu := time.Since(t0).Seconds(), cpuSeconds()-cpu0
					gb := float64(vs.VerifiedBytes) / 1e9
					fmt.Printf("verify %s --read-data=%d%%: %d of %d chunks (%.2f GB) in %.2f s, %.2f CPU s: %.2f s/GB, %.2f CPU s/GB\n",
						st.name, p, vs.Verified, vs.Chunks, gb, wall, cpu, wall/gb, cpu/gb)
					b.ReportMetric(wall/gb, fmt.Sprintf("s/GB-%d%%", p))
					b.ReportMetric(cpu/gb, fmt.Sprintf("cpu-s/GB-%d%%", p))
				}
			}
		})
	}
}

// cpuSeconds is this process's user and system time.
func cpuSeconds() float64 {
	var ru syscall.Rusage
	syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano()).Seconds()
}
