package diskview_test

import (
	"bytes"
	"context"
	"errors"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nbdmover/nbdmover/diskview"
	"github.com/nbdmover/nbdmover/internal/backuptest"
	"github.com/nbdmover/nbdmover/internal/qemutest"
	"github.com/nbdmover/nbdmover/mover"
	"github.com/nbdmover/nbdmover/mover/nbd"
	"github.com/nbdmover/nbdmover/repo"
	"github.com/nbdmover/nbdmover/sink"
	"github.com/nbdmover/nbdmover/sink/sinktest"
)

const MiB = backuptest.MiB

// backup takes a full backup of a test image (holes, zero runs, data, a
// short last chunk) served by qemu-nbd, into 256 KiB chunks, and returns
// the repository, the manifest and a raw copy of the image.
func backup(t *testing.T, ro repo.Options) (*repo.Repo, *repo.Manifest, []byte) {
	t.Helper()
	qemutest.Need(t, "qemu-nbd", "qemu-img", "qemu-io")
	img := backuptest.Image(t, 25*MiB+3*512)
	srv := qemutest.Serve(t, img, "-r")
	defer srv.Kill()
	res, err := mover.Backup(t.Context(), nbd.New(nbd.Options{URI: srv.URI, Name: "vm", Disk: "vda"}),
		mover.Options{Repo: ro, Init: true, Mode: "full", ChunkSize: 256 << 10, RunDir: t.TempDir(), Log: backuptest.Log(t)})
	if err != nil {
		t.Fatal(err)
	}
	r, err := ro.Open(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	m, err := r.Backup(t.Context(), "vm", res.ID)
	if err != nil {
		t.Fatal(err)
	}
	raw, err := os.ReadFile(qemutest.RawCopy(t, img))
	if err != nil {
		t.Fatal(err)
	}
	return r, m, raw
}

// Reads at any offset and length, from many goroutines at once, return the
// source's bytes, local and on MinIO, with a cache far smaller than the
// disk.
func TestViewReadsWhatWasBackedUp(t *testing.T) {
	for _, where := range []string{"local", "s3"} {
		t.Run(where, func(t *testing.T) {
			ro := repo.Options{Location: filepath.Join(t.TempDir(), "repo")}
			if where == "s3" {
				s := sinktest.NewS3(t, "v/")
				ro = repo.Options{Location: "s3://" + strings.TrimPrefix(strings.Fields(s.Location())[0], "s3://"), S3Endpoint: sinktest.S3Endpoint(t)}
			}
			r, m, raw := backup(t, ro)
			v, err := diskview.Open(t.Context(), r, m, "vda", diskview.Options{CacheBytes: 1 * MiB, ReadAhead: 4})
			if err != nil {
				t.Fatal(err)
			}
			defer v.Close()
			if v.Size() != int64(len(raw)) {
				t.Fatalf("size %d, want %d", v.Size(), len(raw))
			}
			var wg sync.WaitGroup
			for g := range 8 {
				wg.Add(1)
				go func() {
					defer wg.Done()
					rnd := rand.New(rand.NewPCG(uint64(g), 9))
					for range 200 {
						n := 1 + rnd.IntN(3*MiB)
						off := rnd.Int64N(int64(len(raw) - n + 1))
						if g%2 == 0 { // sequential readers
							off = int64(g) * MiB
							for off+int64(n) <= int64(len(raw)) {
								if !readsBack(t, v, raw, off, n) {
									return
								}
								off += int64(n)
							}
							return
						}
						if !readsBack(t, v, raw, off, n) {
							return
						}
					}
				}()
			}
			wg.Wait()
			// The whole disk in one read, and the last byte.
			readsBack(t, v, raw, 0, len(raw))
			readsBack(t, v, raw, int64(len(raw)-1), 1)
			if err := v.ReadAt(t.Context(), make([]byte, 2), int64(len(raw)-1)); !errors.Is(err, diskview.ErrRange) {
				t.Fatalf("a read past the end: %v", err)
			}
		})
	}
}

func readsBack(t *testing.T, v *diskview.View, raw []byte, off int64, n int) bool {
	t.Helper()
	p := make([]byte, n)
	if err := v.ReadAt(context.Background(), p, off); err != nil {
		t.Errorf("read %d at %d: %v", n, off, err)
		return false
	}
	if !bytes.Equal(p, raw[off:off+int64(n)]) {
		t.Errorf("read %d at %d: wrong bytes", n, off)
		return false
	}
	return true
}

// getCounter counts the gets of each chunk.
type getCounter struct {
	sink.Store
	mu   sync.Mutex
	gets map[string]int
	all  atomic.Int64
}

func (c *getCounter) Unwrap() sink.Store { return c.Store }

func (c *getCounter) Get(ctx context.Context, key string, buf []byte, limit int64) ([]byte, error) {
	if strings.HasPrefix(key, "chunks/") {
		c.mu.Lock()
		c.gets[key]++
		c.mu.Unlock()
		c.all.Add(1)
	}
	return c.Store.Get(ctx, key, buf, limit)
}

// Readers of one chunk at once fetch it once; a cached chunk is not
// fetched again; a sequential reader gets the next chunks fetched ahead;
// a damaged chunk is an error naming it, never wrong bytes.
func TestViewFetchesOnceAndAhead(t *testing.T) {
	ro := repo.Options{Location: filepath.Join(t.TempDir(), "repo")}
	_, m, raw := backup(t, ro)
	store, _ := ro.Store()
	c := &getCounter{Store: store, gets: map[string]int{}}
	r, err := repo.Options{Opened: c}.Open(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	v, err := diskview.Open(t.Context(), r, m, "vda", diskview.Options{ReadAhead: 4})
	if err != nil {
		t.Fatal(err)
	}
	defer v.Close()
	first := v.DataChunk(0)
	var wg sync.WaitGroup
	for range 16 {
		wg.Add(1)
		go func() { defer wg.Done(); v.Chunk(t.Context(), first) }()
	}
	wg.Wait()
	if c.all.Load() != 1 {
		t.Fatalf("16 readers of one chunk: %d fetches", c.all.Load())
	}
	v.Chunk(t.Context(), first)
	if c.all.Load() != 1 {
		t.Fatalf("a cached chunk was fetched again")
	}
	// Two sequential reads: the next 4 data chunks are fetched ahead.
	grid := v.Grid()
	for k := 1; k <= 2; k++ {
		off, n := grid.Chunk(v.DataChunk(k))
		readsBack(t, v, raw, off, int(n))
	}
	for deadline := time.Now().Add(20 * time.Second); c.all.Load() < 3+4 && time.Now().Before(deadline); time.Sleep(10 * time.Millisecond) {
	}
	v.Close()
	if got := c.all.Load(); got != 3+4 {
		t.Fatalf("after two sequential reads: %d fetches, want 3 and 4 ahead", got)
	}
	for key, n := range c.gets {
		if n != 1 {
			t.Errorf("%s fetched %d times", key, n)
		}
	}

	// A chunk damaged in the store: the read fails naming it.
	i := v.DataChunk(5)
	off, n := grid.Chunk(i)
	ix, _ := r.LoadIndex(t.Context(), m, "vda")
	key := repo.ChunkKey(ix.Digest(i))
	b, _ := store.Get(t.Context(), key, nil, 1<<30)
	b[len(b)-1] ^= 1
	store.Put(t.Context(), key, b)
	v2, _ := diskview.Open(t.Context(), r, m, "vda", diskview.Options{})
	defer v2.Close()
	p := make([]byte, n)
	var ce *repo.ChunkError
	if err := v2.ReadAt(t.Context(), p, off); !errors.As(err, &ce) || ce.Key != key {
		t.Fatalf("a read of a damaged chunk: %v", err)
	}
}

// Allocation describes any range as runs that alternate between zero and
// data chunks exactly as the index has them, at most max of them; Pieces
// gives the range's bytes without copies, zero chunks as nil pieces.
func TestAllocationAndPieces(t *testing.T) {
	ro := repo.Options{Location: filepath.Join(t.TempDir(), "repo")}
	r, m, raw := backup(t, ro)
	v, err := diskview.Open(t.Context(), r, m, "vda", diskview.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer v.Close()
	g := v.Grid()
	data := map[int64]bool{}
	for k := range v.DataChunks() {
		data[v.DataChunk(k)] = true
	}
	rnd := rand.New(rand.NewPCG(4, 4))
	for range 2000 {
		off := rnd.Int64N(v.Size())
		n := 1 + rnd.Int64N(v.Size()-off)
		max := 1 + rnd.IntN(4)
		runs := v.Allocation(off, n, max)
		if len(runs) == 0 || len(runs) > max {
			t.Fatalf("Allocation(%d, %d, %d): %d runs", off, n, max, len(runs))
		}
		pos := off
		for j, run := range runs {
			if run.Length <= 0 || j > 0 && run.Zero == runs[j-1].Zero {
				t.Fatalf("Allocation(%d, %d, %d): %+v", off, n, max, runs)
			}
			for i := pos / g.ChunkSize; i*g.ChunkSize < pos+run.Length; i++ {
				if data[i] == run.Zero {
					t.Fatalf("Allocation(%d, %d, %d): run %+v at %d, chunk %d has data: %v", off, n, max, run, pos, i, data[i])
				}
			}
			pos += run.Length
		}
		if pos > off+n || len(runs) < max && pos != off+n {
			t.Fatalf("Allocation(%d, %d, %d): runs end at %d", off, n, max, pos)
		}
	}
	for range 200 {
		off := rnd.Int64N(v.Size())
		n := 1 + rnd.Int64N(min(v.Size()-off, 3*MiB))
		pos := off
		err := v.Pieces(t.Context(), off, n, func(at int64, p []byte, l int64) error {
			if at != pos || p != nil && int64(len(p)) != l {
				t.Fatalf("piece at %d of %d (%d bytes), want at %d", at, l, len(p), pos)
			}
			if p == nil && !isZero(raw[at:at+l]) || p != nil && !bytes.Equal(p, raw[at:at+l]) {
				t.Fatalf("piece at %d of %d: wrong bytes", at, l)
			}
			pos += l
			return nil
		})
		if err != nil || pos != off+n {
			t.Fatalf("Pieces(%d, %d): %v, ended at %d", off, n, err, pos)
		}
	}
}

func isZero(b []byte) bool {
	for _, c := range b {
		if c != 0 {
			return false
		}
	}
	return true
}

// slowStore delays every chunk's get.
type slowStore struct {
	sink.Store
	delay time.Duration
}

func (s *slowStore) Unwrap() sink.Store { return s.Store }

func (s *slowStore) Get(ctx context.Context, key string, buf []byte, limit int64) ([]byte, error) {
	if strings.HasPrefix(key, "chunks/") {
		select {
		case <-time.After(s.delay):
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
	return s.Store.Get(ctx, key, buf, limit)
}

// A fetch serves every reader waiting for it: the reader that started it
// giving up fails no other. Fetches ahead, however many are asked for (a
// flood of NBD_CMD_CACHE), never make a reader wait behind all of them.
func TestFetchesOutliveTheirReaderAndPrefetchesYield(t *testing.T) {
	ro := repo.Options{Location: filepath.Join(t.TempDir(), "repo")}
	_, m, raw := backup(t, ro)
	store, _ := ro.Store()
	const delay = 300 * time.Millisecond
	r, err := repo.Options{Opened: &slowStore{Store: store, delay: delay}}.Open(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	v, err := diskview.Open(t.Context(), r, m, "vda", diskview.Options{ReadAhead: 1, Fetchers: 2})
	if err != nil {
		t.Fatal(err)
	}
	defer v.Close()
	g := v.Grid()
	i := v.DataChunk(2)
	off, n := g.Chunk(i)
	ctx, cancel := context.WithCancel(t.Context())
	errA := make(chan error, 1)
	go func() { _, err := v.Chunk(ctx, i); errA <- err }()
	time.Sleep(20 * time.Millisecond)
	errB := make(chan error, 1)
	go func() { errB <- v.ReadAt(t.Context(), make([]byte, n), off) }()
	time.Sleep(20 * time.Millisecond)
	cancel()
	if err := <-errA; !errors.Is(err, context.Canceled) {
		t.Fatalf("the cancelled reader: %v", err)
	}
	if err := <-errB; err != nil {
		t.Fatalf("another reader of the chunk, after the first gave up: %v", err)
	}

	for range 50 {
		v.PrefetchRange(0, v.Size())
	}
	j := v.DataChunk(v.DataChunks() - 1) // not among the first fetched ahead
	off, n = g.Chunk(j)
	start := time.Now()
	if !readsBack(t, v, raw, off, int(n)) {
		return
	}
	if d := time.Since(start); d > 6*delay { // behind all of them: 50 x 2 fetches, at 2 at a time
		t.Fatalf("a read took %s behind fetches ahead (a fetch takes %s)", d, delay)
	}
}
