package repo

import (
	"context"
	"crypto/sha256"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"github.com/nbdmover/nbdmover/repo/index"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/nbdmover/nbdmover/chunker"
	"github.com/nbdmover/nbdmover/sink"
	"github.com/nbdmover/nbdmover/sink/sinktest"
	"golang.org/x/sync/errgroup"
)

// synthChunks is a local store whose chunks/ listing is generated: n
// chunks named by digestN(0..n-1), none stored (a gc dry run reads only
// the listing). Ten million chunk files would not fit this machine's
// disk in a benchmark's time; the index objects and manifest are real.
type synthChunks struct {
	sink.Store
	n int
}

func digestN(i int) chunker.Digest {
	var b [8]byte
	binary.LittleEndian.PutUint64(b[:], uint64(i))
	return sha256.Sum256(b[:])
}

func (s *synthChunks) List(ctx context.Context, prefix string, fn func(sink.ObjectInfo) error) error {
	if prefix != "chunks/" {
		return s.Store.List(ctx, prefix, fn)
	}
	old := time.Now().Add(-48 * time.Hour)
	for i := range s.n {
		if err := fn(sink.ObjectInfo{Key: ChunkKey(digestN(i)), Size: 1 << 19, Modified: old}); err != nil {
			return err
		}
	}
	return nil
}

func vmHWM() int64 {
	b, _ := os.ReadFile("/proc/self/status")
	for _, l := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(l, "VmHWM:"); ok {
			var kb int64
			fmt.Sscan(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(v), "kB")), &kb)
			return kb << 10
		}
	}
	return 0
}

// BenchmarkGCTenMillionChunks runs a gc (dry run: the sweep reads its
// candidates but deletes nothing) over a repository whose one backup
// references NBDMOVER_BENCH_CHUNKS (default 10,000,000) chunks, 10 TiB at
// 1 MiB, with 10% more unreferenced ones listed, and reports the peak RSS
// of the process (VmHWM). Run it alone:
//
//	go test -run '^$' -bench GCTenMillion -benchtime 1x ./repo
func BenchmarkGCTenMillionChunks(b *testing.B) {
	n := 10_000_000
	if v := os.Getenv("NBDMOVER_BENCH_CHUNKS"); v != "" {
		fmt.Sscan(v, &n)
	}
	ctx := b.Context()
	dir := b.TempDir()
	local, err := sink.NewLocal(dir)
	if err != nil {
		b.Fatal(err)
	}
	r, err := initStore(ctx, local, InitOptions{})
	if err != nil {
		b.Fatal(err)
	}
	// The backup's full index, written part by part (never whole in memory).
	cs := r.Config().ChunkSize
	size := int64(n) * cs
	ref := IndexRef{Kind: "full", Entries: int64(n)}
	for start := 0; start < n; start += index.PartEntries {
		end := min(start+index.PartEntries, n)
		p := &index.Part{Kind: index.KindFull, ChunkSize: cs, Size: size, Trunc: size}
		for i := start; i < end; i++ {
			p.Add(int64(i), digestN(i), chunker.Digest{})
		}
		key, err := r.putObject(ctx, "indexes/", p.Marshal())
		if err != nil {
			b.Fatal(err)
		}
		ref.Objects = append(ref.Objects, key)
	}
	m := &Manifest{Version: formatVersion, ID: NewBackupID(time.Now(), ""), Domain: "big", Mode: "full", Source: "nbd",
		Consistency: "crash-consistent", ChunkSize: cs, Compression: "zstd",
		Disks: []DiskManifest{{Name: "vda", Size: size, Mode: "full", Index: []IndexRef{ref}, Chunks: int64(n)}}}
	js, _ := json.Marshal(m)
	if err := local.Create(ctx, m.Key(), r.encodeMeta(m.Key(), js)); err != nil {
		b.Fatal(err)
	}
	// The gc runs in a process of its own (TestGCHelper), so that its
	// peak RSS is its own, not this setup's.
	b.ResetTimer()
	for range b.N {
		cmd := exec.Command(os.Args[0], "-test.run=^TestGCHelper$")
		cmd.Env = append(os.Environ(), fmt.Sprintf("NBDMOVER_GC_HELPER=%s:%d", dir, n))
		cmd.Stderr = os.Stderr
		out, err := cmd.Output()
		var res struct {
			Seconds float64
			PeakRSS int64
		}
		if err != nil || json.Unmarshal(out[:strings.IndexByte(string(out), '\n')+1], &res) != nil {
			b.Fatalf("gc helper: %v: %s", err, out)
		}
		b.ReportMetric(res.Seconds, "s/gc")
		b.ReportMetric(float64(res.PeakRSS)/(1<<20), "peak-RSS-MiB")
	}
}

// TestGCHelper is BenchmarkGCTenMillionChunks's gc process (it does
// nothing unless NBDMOVER_GC_HELPER names the repository and the chunks).
func TestGCHelper(t *testing.T) {
	spec := os.Getenv("NBDMOVER_GC_HELPER")
	if spec == "" {
		t.Skip("a helper of BenchmarkGCTenMillionChunks and BenchmarkGCRepository")
	}
	if loc, ok := strings.CutPrefix(spec, "real:"); ok {
		gcReal(t, loc)
		return
	}
	dir, count, _ := strings.Cut(spec, ":")
	var n int
	fmt.Sscan(count, &n)
	local, err := sink.NewLocal(dir)
	if err != nil {
		t.Fatal(err)
	}
	r, err := openStore(t.Context(), &synthChunks{Store: local, n: n + n/10})
	if err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	res, err := r.GC(t.Context(), GCOptions{DryRun: true, TempDir: dir})
	if err != nil {
		t.Fatal(err)
	}
	if res.Chunks.Kept != int64(n) || res.Chunks.Deleted != int64(n/10) {
		t.Fatalf("kept %d, would delete %d; want %d and %d", res.Chunks.Kept, res.Chunks.Deleted, n, n/10)
	}
	b, _ := json.Marshal(map[string]any{"seconds": time.Since(start).Seconds(), "peakrss": vmHWM()})
	fmt.Println(string(b))
}

// hideBatch hides a store's multi-object delete from sink.DeleteMany.
type hideBatch struct{ sink.Store }

// BenchmarkGCDelete times a gc that deletes NBDMOVER_BENCH_GARBAGE
// (default 20,000) unreferenced small chunks, on the local store and on
// MinIO (multi-object deletes), side by side.
//
//	go test -run '^$' -bench GCDelete -benchtime 1x ./repo   (MinIO: make test's)
func BenchmarkGCDelete(b *testing.B) {
	n := 20000
	if v := os.Getenv("NBDMOVER_BENCH_GARBAGE"); v != "" {
		fmt.Sscan(v, &n)
	}
	for _, where := range []string{"local", "s3", "s3-per-key"} {
		b.Run(where, func(b *testing.B) {
			for range b.N {
				b.StopTimer()
				var s sink.Store
				if where == "local" {
					l, err := sink.NewLocal(b.TempDir())
					if err != nil {
						b.Fatal(err)
					}
					s = l
				} else {
					s = sinktest.NewS3(b, "")
				}
				s = sink.Retry(sink.Limit(s, 32), sink.DefaultRetry)
				if where == "s3-per-key" {
					s = hideBatch{s} // one DELETE request per key, 8 in flight
				}
				r, err := initStore(b.Context(), s, InitOptions{})
				if err != nil {
					b.Fatal(err)
				}
				g, ctx := errgroup.WithContext(b.Context())
				g.SetLimit(32)
				for i := range n {
					g.Go(func() error {
						d := digestN(i)
						return s.Put(ctx, ChunkKey(d), []byte("x"))
					})
				}
				if err := g.Wait(); err != nil {
					b.Fatal(err)
				}
				time.Sleep(1100 * time.Millisecond)
				b.StartTimer()
				start := time.Now()
				res, err := r.GC(b.Context(), GCOptions{Grace: time.Millisecond})
				if err != nil || res.Chunks.Deleted != int64(n) {
					b.Fatalf("%+v %v", res, err)
				}
				b.ReportMetric(float64(n)/time.Since(start).Seconds(), "chunks-deleted/s")
			}
		})
	}
}

// BenchmarkGCRepository runs gc over a synthetic repository in a process
// of its own and reports wall time, requests and peak RSS: on the local
// store NBDMOVER_BENCH_LOCAL_CHUNKS (default 1,000,000) chunks and 1,000
// backups; on MinIO NBDMOVER_BENCH_S3_CHUNKS (default 100,000) chunks and
// 100 backups. Every backup references its own 90% share of chunks/N;
// the other 10% are garbage older than the grace period.
//
//	go test -run '^$' -bench GCRepository -benchtime 1x -timeout 1h ./repo   (MinIO: make test's)
func BenchmarkGCRepository(b *testing.B) {
	for _, c := range []struct {
		where   string
		env     string
		chunks  int
		backups int
	}{{"local", "NBDMOVER_BENCH_LOCAL_CHUNKS", 1_000_000, 1000}, {"s3", "NBDMOVER_BENCH_S3_CHUNKS", 100_000, 100}} {
		b.Run(c.where, func(b *testing.B) {
			if v := os.Getenv(c.env); v != "" {
				fmt.Sscan(v, &c.chunks)
			}
			ctx := b.Context()
			var s sink.Store
			location := ""
			if c.where == "local" {
				location = b.TempDir()
				l, _ := sink.NewLocal(location)
				s = l
			} else {
				s3 := sinktest.NewS3(b, "")
				s = s3
				location = "s3://" + strings.SplitN(strings.TrimPrefix(s3.Location(), "s3://"), "/", 2)[0]
			}
			r, err := initStore(ctx, sink.Retry(sink.Limit(s, 32), sink.DefaultRetry), InitOptions{ChunkSize: 256 << 10})
			if err != nil {
				b.Fatal(err)
			}
			// Chunks: small objects (gc never reads a chunk), written
			// directly on the local store (no fsync: this is set-up).
			old := time.Now().Add(-48 * time.Hour)
			g, gctx := errgroup.WithContext(ctx)
			g.SetLimit(32)
			for i := range c.chunks {
				g.Go(func() error {
					key := ChunkKey(digestN(i))
					if c.where == "local" {
						p := location + "/" + key
						if err := os.MkdirAll(p[:strings.LastIndexByte(p, '/')], 0o700); err != nil {
							return err
						}
						if err := os.WriteFile(p, []byte("x"), 0o600); err != nil {
							return err
						}
						return os.Chtimes(p, old, old)
					}
					return r.store.Put(gctx, key, []byte("x"))
				})
			}
			if err := g.Wait(); err != nil {
				b.Fatal(err)
			}
			per := c.chunks / c.backups
			for k := range c.backups {
				var ds []chunker.Digest
				for i := k * per; i < k*per+per*9/10; i++ {
					ds = append(ds, digestN(i))
				}
				commitChunks(b, r, fmt.Sprintf("vm%d", k%10), time.Unix(int64(1.7e9)+int64(k)*60, 0), ds)
			}
			if c.where == "s3" {
				time.Sleep(1100 * time.Millisecond)
			}
			b.ResetTimer()
			for range b.N {
				cmd := exec.Command(os.Args[0], "-test.run=^TestGCHelper$")
				cmd.Env = append(os.Environ(), "NBDMOVER_GC_HELPER=real:"+location)
				cmd.Stderr = os.Stderr
				out, err := cmd.Output()
				var res struct {
					Seconds                  float64
					PeakRSS                  int64
					Lists, Gets, Puts, Stats int64
					Deleted, DeletedMetadata int64
				}
				if err != nil || json.Unmarshal(out[:strings.IndexByte(string(out), '\n')+1], &res) != nil {
					b.Fatalf("gc helper: %v: %s", err, out)
				}
				if want := int64(c.chunks - c.backups*(per*9/10)); res.Deleted != want {
					b.Fatalf("deleted %d chunks, want %d", res.Deleted, want)
				}
				b.ReportMetric(res.Seconds, "s/gc")
				b.ReportMetric(float64(res.PeakRSS)/(1<<20), "peak-RSS-MiB")
				b.ReportMetric(float64(res.Lists), "lists")
				b.ReportMetric(float64(res.Gets), "gets")
				b.ReportMetric(float64(res.Puts+res.Stats), "puts+stats")
				if c.where == "s3" {
					b.ReportMetric(float64((res.Deleted+999)/1000+(res.DeletedMetadata+999)/1000), "multi-deletes")
				}
			}
		})
	}
}

// gcReal is BenchmarkGCRepository's gc process.
func gcReal(t *testing.T, location string) {
	store, err := Options{Location: location, S3Endpoint: os.Getenv("NBDMOVER_TEST_S3_ENDPOINT")}.Store()
	if err != nil {
		t.Fatal(err)
	}
	c := &sinktest.Counting{Store: store}
	r, err := openStore(t.Context(), c)
	if err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	res, err := r.GC(t.Context(), GCOptions{Grace: time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	b, _ := json.Marshal(map[string]any{"seconds": time.Since(start).Seconds(), "peakrss": vmHWM(),
		"lists": c.Lists.Load(), "gets": c.Gets.Load(), "puts": c.Puts.Load(), "stats": c.Stats.Load(),
		"deleted": res.Chunks.Deleted, "deletedmetadata": res.Metadata.Deleted})
	fmt.Println(string(b))
}
