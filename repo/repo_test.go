package repo

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"github.com/nbdmover/nbdmover/repo/index"
	"maps"
	"math/rand/v2"
	"os"
	"path"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nbdmover/nbdmover/chunker"
	"github.com/nbdmover/nbdmover/sink"
	"github.com/nbdmover/nbdmover/sink/sinktest"
)

func initTestRepo(t *testing.T, store sink.Store) *Repo {
	t.Helper()
	r, err := initStore(t.Context(), store, InitOptions{ChunkSize: 256 << 10})
	if err != nil {
		t.Fatal(err)
	}
	return r
}

func localStore(t *testing.T) sink.Store {
	s, err := sink.NewLocal(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func TestValidName(t *testing.T) {
	for _, ok := range []string{"vm1", "web-01.example", "a", "VDA", "x_y", strings.Repeat("a", 128)} {
		if err := ValidName("domain", ok); err != nil {
			t.Errorf("%q: %v", ok, err)
		}
	}
	for _, bad := range []string{"", "..", ".hidden", "-x", "a/b", "a b", "a..b/", "é", strings.Repeat("a", 129), "a\x00"} {
		if err := ValidName("domain", bad); err == nil {
			t.Errorf("%q accepted", bad)
		}
	}
}

func TestBackupIDs(t *testing.T) {
	t0 := time.Date(2026, 11, 28, 4, 0, 0, 0, time.UTC)
	a := NewBackupID(t0, "")
	b := NewBackupID(t0, a) // same millisecond: must still sort after
	c := NewBackupID(t0.Add(-time.Hour), b)
	if !(a < b && b < c) || ValidBackupID(a) != nil || ValidBackupID(c) != nil {
		t.Fatalf("ids %s %s %s", a, b, c)
	}
	for _, bad := range []string{"", "latest", "../x", "20261128T040000Z"} {
		if ValidBackupID(bad) == nil {
			t.Errorf("%q accepted", bad)
		}
	}
}

func TestInitAndOpen(t *testing.T) {
	s := localStore(t)
	ctx := t.Context()
	if _, err := openStore(ctx, s); !errors.Is(err, ErrNoRepository) || !strings.Contains(err.Error(), "nbdmover init") {
		t.Fatalf("open of an empty store: %v", err)
	}
	r := initTestRepo(t, s)
	if _, err := initStore(ctx, s, InitOptions{}); !errors.Is(err, ErrExists) {
		t.Fatalf("second init: %v", err)
	}
	r2, err := openStore(ctx, s)
	if err != nil || r2.Config() != r.Config() || r2.Config().ChunkSize != 256<<10 {
		t.Fatalf("reopen: %v %+v", err, r2)
	}
	if _, err := initStore(ctx, localStore(t), InitOptions{ChunkSize: 100 << 10}); err == nil {
		t.Fatal("bad chunk size accepted")
	}
	if r.Config().Version != patchedVersion || !r.Patches() {
		t.Fatalf("a new repository is of version %d", r.Config().Version)
	}
	s.Put(ctx, "config", []byte(`{"version": 4}`))
	if _, err := openStore(ctx, s); err == nil || !strings.Contains(err.Error(), "format 4") {
		t.Fatalf("future format: %v", err)
	}
	s.Put(ctx, "config", []byte(`{"version": 1, "chunk_size": 262144, "digest": "sha256", "compression": "zstd"}`))
	if _, err := openStore(ctx, s); !errors.Is(err, errFormat1) || !strings.Contains(err.Error(), "nbdmover migrate") {
		t.Fatalf("format 1: %v", err)
	}
	s.Put(ctx, "config", []byte(`{"version": 2, "chunk_`))
	if _, err := openStore(ctx, s); err == nil || !strings.Contains(err.Error(), "damaged") {
		t.Fatalf("truncated config: %v", err)
	}
}

// indexOf builds an index of a disk of size bytes from its digests by
// chunk (zero digests are zero chunks).
func indexOf(chunkSize, size int64, digests map[int64]chunker.Digest) *index.Index {
	var b index.Builder
	for i, d := range digests {
		b.Set(i, d, chunker.Digest{})
	}
	return b.Index(chunkSize, size)
}

func commitSample(t *testing.T, r *Repo, domain string) *Manifest {
	t.Helper()
	ctx := t.Context()
	plain := bytes.Repeat([]byte("data"), 64<<10) // one full 256 KiB chunk
	d := r.Sum(plain)
	if err := r.Store().Put(ctx, ChunkKey(d), r.EncodeChunk(nil, d, plain)); err != nil {
		t.Fatal(err)
	}
	ix := indexOf(r.Config().ChunkSize, 3*(256<<10), map[int64]chunker.Digest{0: d, 2: d})
	m := &Manifest{ID: NewBackupID(time.Now(), ""), Domain: domain, Mode: "full", Source: "nbd",
		Consistency: "crash-consistent", Disks: []DiskManifest{{Name: "vda", Size: ix.Size, Mode: "full"}}}
	if err := r.Commit(ctx, m, map[string]DiskData{"vda": {Full: ix}}, map[string][]byte{"domain.xml": []byte("<domain/>")}); err != nil {
		t.Fatal(err)
	}
	return m
}

func TestCommitAndRead(t *testing.T) {
	r := initTestRepo(t, localStore(t))
	ctx := t.Context()
	m := commitSample(t, r, "vm1")
	ms, _, err := r.Backups(ctx, "")
	if err != nil || len(ms) != 1 || ms[0].ID != m.ID || ms[0].Disks[0].Chunks != 3 || ms[0].Disks[0].ZeroChunks != 1 {
		t.Fatalf("backups: %v %+v", err, ms)
	}
	if x, err := r.ReadFile(ctx, ms[0], "domain.xml"); err != nil || string(x) != "<domain/>" {
		t.Fatalf("file: %q %v", x, err)
	}
	if _, err := r.Backup(ctx, "vm2", "latest"); !errors.Is(err, ErrNoBackup) {
		t.Fatalf("missing domain: %v", err)
	}
	// A backup id is committed once.
	if err := r.Commit(ctx, m, map[string]DiskData{"vda": {Full: index.New(r.Config().ChunkSize, m.Disks[0].Size)}}, nil); !errors.Is(err, sink.ErrExists) {
		t.Fatalf("second commit of %s: %v", m.ID, err)
	}
	// An index object swapped for another valid one no longer matches its
	// name.
	other := &index.Part{Kind: index.KindFull, ChunkSize: r.Config().ChunkSize, Size: 3 * (256 << 10), Trunc: 3 * (256 << 10)}
	obj := ms[0].Disks[0].Index[0].Objects[0]
	r.Store().Put(ctx, obj, r.encodeMeta(obj, other.Marshal()))
	var oe *ObjectError
	if _, err := r.LoadIndex(ctx, ms[0], "vda"); !errors.As(err, &oe) || oe.Key != obj {
		t.Fatalf("swapped index: %v", err)
	}
}

// A crash before the manifest leaves no backup: never a partial one.
func TestCommitIsAtomic(t *testing.T) {
	s := localStore(t)
	r := initTestRepo(t, s)
	f := &sinktest.Faulty{Store: s, Fail: func(op, key string, n int) error {
		if op == "create" && strings.HasPrefix(key, "manifests/") {
			return sinktest.Permanent(op, key)
		}
		return nil
	}}
	rf, _ := openStore(t.Context(), f)
	ctx := t.Context()
	ix := index.New(r.Config().ChunkSize, 256<<10)
	m := &Manifest{ID: NewBackupID(time.Now(), ""), Domain: "vm1", Mode: "full", Source: "nbd",
		Disks: []DiskManifest{{Name: "vda", Size: ix.Size}}}
	if err := rf.Commit(ctx, m, map[string]DiskData{"vda": {Full: ix}}, nil); err == nil {
		t.Fatal("commit succeeded")
	}
	if ms, _, err := r.Backups(ctx, "vm1"); err != nil || len(ms) != 0 {
		t.Fatalf("a failed commit is listed: %v %v", ms, err)
	}
}

// Commit makes the store's deferred puts (the pipeline's chunks, the
// indexes) durable before the manifest: when that fails, nothing commits.
// The fault is a real one: the directory of a chunk put deferred is gone.
func TestCommitSyncsDeferredPuts(t *testing.T) {
	s := localStore(t)
	r := initTestRepo(t, s)
	ctx := t.Context()
	plain := bytes.Repeat([]byte("late"), 64<<10)
	d := r.Sum(plain)
	if err := sink.PutDeferred(ctx, s, ChunkKey(d), r.EncodeChunk(nil, d, plain)); err != nil {
		t.Fatal(err)
	}
	key := ChunkKey(d)
	if err := os.RemoveAll(filepath.Join(s.Location(), filepath.Dir(key))); err != nil {
		t.Fatal(err)
	}
	ix := indexOf(r.Config().ChunkSize, 256<<10, map[int64]chunker.Digest{0: d})
	m := &Manifest{ID: NewBackupID(time.Now(), ""), Domain: "vm1", Mode: "full", Source: "nbd",
		Disks: []DiskManifest{{Name: "vda", Size: ix.Size}}}
	err := r.Commit(ctx, m, map[string]DiskData{"vda": {Full: ix}}, nil)
	if err == nil || !strings.Contains(err.Error(), "durable") || !strings.Contains(err.Error(), path.Dir(key)+"/") {
		t.Fatalf("commit with a deferred put that cannot be synced: %v", err)
	}
	if ms, _, err := r.Backups(ctx, "vm1"); err != nil || len(ms) != 0 {
		t.Fatalf("a commit that could not sync is listed: %v %v", ms, err)
	}
}

func TestVerifyAndRestoreFaults(t *testing.T) {
	s := localStore(t)
	r := initTestRepo(t, s)
	m := commitSample(t, r, "vm1")
	ctx := t.Context()
	ix, _ := r.LoadIndex(ctx, m, "vda")
	_, d0 := ix.At(0)
	key := ChunkKey(d0)

	// A short read from the store: restore refuses with the chunk's name.
	f := &sinktest.Faulty{Store: s, Truncate: func(k string) int {
		if k == key {
			return 10
		}
		return 0
	}}
	rf, _ := openStore(ctx, f)
	err := readDisk(ctx, rf, m, "vda", discard{})
	var ce *ChunkError
	if !errors.As(err, &ce) || ce.Key != key || !errors.Is(err, chunker.ErrCorrupt) {
		t.Fatalf("restore over a short read: %v", err)
	}
	var problems []Problem
	if _, err := rf.Verify(ctx, VerifyOptions{ReadData: true}, func(p Problem) { problems = append(problems, p) }); err != nil {
		t.Fatal(err)
	}
	if len(problems) != 1 || problems[0].Object != key || !strings.Contains(problems[0].Problem, "length") {
		t.Fatalf("verify: %+v", problems)
	}

	// A store that fails: verify stops with the store's error instead of
	// reporting every chunk as bad.
	broken := &sinktest.Faulty{Store: s, Fail: func(op, k string, n int) error {
		if op == "get" && k == key {
			return sinktest.Permanent(op, k)
		}
		return nil
	}}
	rb, _ := openStore(ctx, broken)
	if _, err := rb.Verify(ctx, VerifyOptions{ReadData: true}, func(Problem) {}); err == nil {
		t.Fatal("verify hid a store failure")
	}
}

type discard struct{}

func (discard) WriteAt(context.Context, []byte, int64) error { return nil }

func FuzzUnmarshalManifest(f *testing.F) {
	obj := "indexes/ab/ab" + strings.Repeat("0", 62)
	f.Add([]byte(`{"version":2,"id":"20261128T040000.000Z","domain":"vm1","mode":"full","disks":[{"name":"vda","size":1,"index":[{"kind":"full","entries":1,"objects":["` + obj + `"]}]}]}`))
	f.Add([]byte(`{"version":2}`))
	f.Add([]byte(`{"version":1,"id":"x"}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		m, err := unmarshalManifest(b)
		if err != nil {
			return
		}
		if ValidName("domain", m.Domain) != nil || ValidBackupID(m.ID) != nil {
			t.Fatal("accepted a manifest with an invalid name or id")
		}
		for _, d := range m.Disks {
			if ValidName("disk", d.Name) != nil || checkChain(d.Index) != nil {
				t.Fatalf("accepted disk %+v", d)
			}
		}
		for name, key := range m.Files {
			if ValidName("file", name) != nil || !isObjectKey("files/", key) {
				t.Fatalf("accepted file %q at %q", name, key)
			}
		}
	})
}

// Two hosts creating one repository at once end with one config: one
// init succeeds, the other is told the repository exists, and both (and
// every backup that creates the repository on first use) see the same
// config.
func TestConcurrentInit(t *testing.T) {
	for name, newStore := range map[string]func(t *testing.T) func() sink.Store{
		"local": func(t *testing.T) func() sink.Store {
			dir := t.TempDir()
			return func() sink.Store { s, _ := sink.NewLocal(dir); return s }
		},
		"s3": func(t *testing.T) func() sink.Store {
			s := sinktest.NewS3(t, "repo/")
			return func() sink.Store { return s }
		},
	} {
		t.Run(name, func(t *testing.T) {
			for _, openOrInit := range []bool{false, true} {
				store := newStore(t) // a fresh place for each round
				ids := make([]string, 12)
				errs := make([]error, 12)
				var wg sync.WaitGroup
				for i := range ids {
					wg.Add(1)
					go func() {
						defer wg.Done()
						var r *Repo
						var err error
						o := InitOptions{ChunkSize: int64(256<<10) * int64(1+i%3)}
						if openOrInit {
							r, _, err = openOrInitStore(t.Context(), store(), o)
						} else {
							r, err = initStore(t.Context(), store(), o)
						}
						if err == nil {
							ids[i] = r.Config().ID + fmt.Sprint(r.Config().ChunkSize)
						}
						errs[i] = err
					}()
				}
				wg.Wait()
				r, err := openStore(t.Context(), store())
				if err != nil {
					t.Fatal(err)
				}
				want := r.Config().ID + fmt.Sprint(r.Config().ChunkSize)
				won := 0
				for i, err := range errs {
					switch {
					case err == nil && ids[i] == want:
						won++
					case err == nil:
						t.Errorf("caller %d works with config %s, the store holds %s", i, ids[i], want)
					case !openOrInit && errors.Is(err, ErrExists):
					default:
						t.Errorf("caller %d: %v", i, err)
					}
				}
				if !openOrInit && won != 1 || openOrInit && won != len(ids) {
					t.Fatalf("openOrInit %v: %d callers succeeded", openOrInit, won)
				}
			}
		})
	}
}

// countingStore counts the gets in flight and remembers the most.
type countingStore struct {
	sink.Store
	mu       sync.Mutex
	now, top int
}

func (c *countingStore) Get(ctx context.Context, key string, buf []byte, limit int64) ([]byte, error) {
	c.mu.Lock()
	c.now++
	c.top = max(c.top, c.now)
	c.mu.Unlock()
	time.Sleep(2 * time.Millisecond)
	defer func() { c.mu.Lock(); c.now--; c.mu.Unlock() }()
	return c.Store.Get(ctx, key, buf, limit)
}

// Verify fetches at most Parallel chunks at once (16 by default).
func TestVerifyParallel(t *testing.T) {
	s := localStore(t)
	r := initTestRepo(t, s)
	ctx := t.Context()
	var ib index.Builder
	for i := range 40 {
		plain := bytes.Repeat([]byte{byte(i + 1)}, 256<<10)
		ib.Set(int64(i), chunker.Sum(plain), chunker.Digest{})
		s.Put(ctx, ChunkKey(chunker.Sum(plain)), r.EncodeChunk(nil, chunker.Sum(plain), plain))
	}
	ix := ib.Index(r.Config().ChunkSize, 40*(256<<10))
	m := &Manifest{ID: NewBackupID(time.Now(), ""), Domain: "vm1", Mode: "full", Source: "nbd",
		Disks: []DiskManifest{{Name: "vda", Size: ix.Size}}}
	if err := r.Commit(ctx, m, map[string]DiskData{"vda": {Full: ix}}, nil); err != nil {
		t.Fatal(err)
	}
	for _, tt := range []struct{ parallel, want int }{{2, 2}, {0, 16}} {
		c := &countingStore{Store: s}
		rc, _ := openStore(ctx, c)
		if _, err := rc.Verify(ctx, VerifyOptions{ReadData: true, Parallel: tt.parallel}, func(p Problem) { t.Error(p) }); err != nil {
			t.Fatal(err)
		}
		if c.top > tt.want || c.top < 2 {
			t.Errorf("parallel %d: %d gets at once, want at most %d", tt.parallel, c.top, tt.want)
		}
	}
}

// memTarget collects a restored disk in memory.
type memTarget struct {
	mu  sync.Mutex
	buf []byte
}

func (m *memTarget) WriteAt(_ context.Context, p []byte, off int64) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	copy(m.buf[off:], p)
	return nil
}

// readDisk reads a disk of a backup chunk by chunk into t (as diskview
// does, which repo cannot import).
func readDisk(ctx context.Context, r *Repo, m *Manifest, disk string, t interface {
	WriteAt(context.Context, []byte, int64) error
}) error {
	ix, err := r.LoadIndex(ctx, m, disk)
	if err != nil {
		return err
	}
	g := ix.Grid()
	for i, d := range ix.All() {
		plain, _, err := r.GetChunk(ctx, d, nil, nil)
		if err != nil {
			return err
		}
		off, _ := g.Chunk(i)
		if err := t.WriteAt(ctx, plain, off); err != nil {
			return err
		}
	}
	return nil
}

// restoreSHA256 restores a disk of a backup into memory and hashes it.
func restoreSHA256(t *testing.T, r *Repo, m *Manifest, disk string) string {
	t.Helper()
	d, _ := m.Disk(disk)
	mt := &memTarget{buf: make([]byte, d.Size)}
	if err := readDisk(t.Context(), r, m, disk, mt); err != nil {
		t.Fatal(err)
	}
	sum := sha256.Sum256(mt.buf)
	return hex.EncodeToString(sum[:])
}

// A format-1 repository (testdata/v1-repo) migrates to format 2 and every
// backup restores to the bytes it was taken of; a migration interrupted
// at any store operation leaves a repository that a rerun finishes.
func TestMigrateFormat1(t *testing.T) {
	want := strings.Fields(readFile(t, "testdata/v1-repo.sha256"))
	for failAt := 1; ; failAt++ {
		dir := t.TempDir()
		if err := os.CopyFS(dir, os.DirFS("testdata/v1-repo")); err != nil {
			t.Fatal(err)
		}
		s, _ := sink.NewLocal(dir)
		if _, err := openStore(t.Context(), s); !errors.Is(err, errFormat1) {
			t.Fatalf("open of format 1: %v", err)
		}
		ops := 0
		f := &sinktest.Faulty{Store: s, Fail: func(op, key string, n int) error {
			if op == "put" || op == "create" || op == "delete" {
				ops++
				if ops == failAt {
					return sinktest.Permanent(op, key)
				}
			}
			return nil
		}}
		res, err := Migrate(t.Context(), f, nil)
		interrupted := err != nil
		if interrupted {
			if res, err = Migrate(t.Context(), s, nil); err != nil {
				t.Fatalf("rerun after a failure at write %d: %v", failAt, err)
			}
		}
		r, err := openStore(t.Context(), s)
		if err != nil {
			t.Fatal(err)
		}
		ms, skipped, err := r.Backups(t.Context(), "old-vm")
		if err != nil || len(ms) != 3 || len(skipped) > 0 {
			t.Fatalf("after migrating (failure at write %d): %d backups, skipped %v, %v", failAt, len(ms), skipped, err)
		}
		for i, m := range ms {
			if got := restoreSHA256(t, r, m, "vda"); got != want[2*i] {
				t.Fatalf("backup %d restores to %s, want %s", i, got, want[2*i])
			}
		}
		if left := keysUnder(t, s, "backups/"); len(left) > 0 {
			t.Fatalf("format-1 objects left: %v", left)
		}
		if !interrupted {
			t.Logf("migrated %d backups, removed %d objects; interrupted at each of %d writes and finished by a rerun", res.Backups, res.Removed, failAt-1)
			if again, err := Migrate(t.Context(), s, nil); err != nil || !again.AlreadyV2 {
				t.Fatalf("migrating a migrated repository: %+v %v", again, err)
			}
			return
		}
	}
}

func keysUnder(t *testing.T, s sink.Store, prefix string) []string {
	var keys []string
	if err := s.List(t.Context(), prefix, func(o sink.ObjectInfo) error { keys = append(keys, o.Key); return nil }); err != nil {
		t.Fatal(err)
	}
	return keys
}

func readFile(t *testing.T, p string) string {
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// Many incrementals in a row: each index is a chain of a full index and
// at most maxDeltas deltas, and every backup's index is what was set.
func TestChainManyIncrementals(t *testing.T) {
	r := initTestRepo(t, localStore(t))
	ctx := t.Context()
	const cs = 256 << 10
	rng := rand.New(rand.NewPCG(1, 2))
	state := map[int64]chunker.Digest{}
	size := int64(1000 * cs)
	for i := range 200 {
		state[int64(i)] = chunker.Sum([]byte{byte(i), 1})
	}
	ix := indexOf(cs, size, state)
	m := &Manifest{ID: NewBackupID(time.Now(), ""), Domain: "vm1", Mode: "full", Source: "nbd", Disks: []DiskManifest{{Name: "vda", Size: size}}}
	if err := r.Commit(ctx, m, map[string]DiskData{"vda": {Full: ix}}, nil); err != nil {
		t.Fatal(err)
	}
	type point struct {
		m     *Manifest
		state map[int64]chunker.Digest
	}
	points := []point{{m, maps.Clone(state)}}
	for n := 1; n <= 100; n++ {
		parent, err := r.LoadChain(ctx, points[len(points)-1].m, "vda")
		if err != nil {
			t.Fatal(err)
		}
		var b index.Builder
		for range 1 + rng.IntN(6) { // a few changes, some to zero, one resize now and then
			i := rng.Int64N(size / cs)
			d := chunker.Sum([]byte(fmt.Sprint(n, i)))
			if rng.IntN(5) == 0 {
				d = chunker.ZeroChunk
			}
			if _, seen := state[i]; !seen && d.IsZeroChunk() {
				continue
			}
			b.Set(i, d, chunker.Digest{})
			state[i] = d
		}
		newSize := size
		if n%37 == 0 {
			newSize = size - 3*cs/2 // shrink by a chunk and a half; the cut chunk is rebuilt
			for i := range state {
				if i >= (newSize+cs-1)/cs {
					delete(state, i)
				}
			}
			last := (newSize - 1) / cs
			b.Set(last, chunker.Sum([]byte(fmt.Sprint("cut", n))), chunker.Digest{})
			state[last] = chunker.Sum([]byte(fmt.Sprint("cut", n)))
		}
		size = newSize
		mm := &Manifest{ID: NewBackupID(time.Now(), points[len(points)-1].m.ID), Domain: "vm1", Mode: "incremental",
			Source: "nbd", Disks: []DiskManifest{{Name: "vda", Size: size}}}
		if err := r.Commit(ctx, mm, map[string]DiskData{"vda": {Parent: parent, Delta: b.Delta(parent.Index, size)}}, nil); err != nil {
			t.Fatal(err)
		}
		if refs := mm.Disks[0].Index; len(refs) > 1+maxDeltas || refs[0].Kind != "full" {
			t.Fatalf("backup %d: chain of %d links", n, len(refs))
		}
		points = append(points, point{mm, maps.Clone(state)})
	}
	for _, k := range []int{0, 1, 50, 99, 100} {
		p := points[k]
		got, err := r.LoadIndex(ctx, p.m, "vda")
		if err != nil {
			t.Fatal(err)
		}
		if want := indexOf(cs, p.m.Disks[0].Size, p.state); !sameIndex(got, want) {
			t.Fatalf("backup %d: index differs (%d chunks, want %d)", k, got.Len(), want.Len())
		}
		t.Logf("backup %d: %d links", k, len(p.m.Disks[0].Index))
	}
}

// Catalogs: written every catalogEvery backups, one kept; listing takes
// manifests from the newest and reads the rest; a deleted (forgotten)
// manifest is not listed from a catalog, a damaged catalog is passed over.
func TestCatalog(t *testing.T) {
	s := localStore(t)
	r := initTestRepo(t, s)
	ctx := t.Context()
	t0 := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	ix := index.New(r.Config().ChunkSize, 1<<20)
	const n = 2*catalogEvery + 5
	for i := range n {
		m := &Manifest{ID: NewBackupID(t0.Add(time.Duration(i)*time.Minute), ""), Domain: "vm1", Mode: "full", Source: "nbd",
			Disks: []DiskManifest{{Name: "vda", Size: ix.Size}}}
		if err := r.Commit(ctx, m, map[string]DiskData{"vda": {Full: ix}}, nil); err != nil {
			t.Fatal(err)
		}
		if err := r.UpdateCatalog(ctx, "vm1"); err != nil {
			t.Fatal(err)
		}
	}
	cats := keysUnder(t, s, "catalog/")
	if len(cats) != 1 {
		t.Fatalf("catalogs: %v", cats)
	}
	list := func() []*Manifest {
		ms, skipped, err := r.Backups(ctx, "vm1")
		if err != nil || len(skipped) > 0 {
			t.Fatalf("list: %v %v", skipped, err)
		}
		return ms
	}
	if ms := list(); len(ms) != n || ms[0].ID != NewBackupID(t0, "") {
		t.Fatalf("listed %d of %d", len(ms), n)
	}
	forgotten := ManifestKey("vm1", NewBackupID(t0.Add(3*time.Minute), ""))
	s.Delete(ctx, forgotten)
	if ms := list(); len(ms) != n-1 {
		t.Fatalf("after deleting a manifest the catalog lists: %d", len(ms))
	}
	// A cataloged manifest damaged since is read (its size changed), and
	// verify, which reads every manifest, reports it.
	damaged := ManifestKey("vm1", NewBackupID(t0.Add(5*time.Minute), ""))
	s.Put(ctx, damaged, []byte("NBMC damaged"))
	if ms, skipped, err := r.Backups(ctx, "vm1"); err != nil || len(ms) != n-2 || len(skipped) != 1 || skipped[0].Object != damaged {
		t.Fatalf("with a damaged manifest: %d listed, skipped %v, %v", len(ms), skipped, err)
	}
	var problems []Problem
	if _, err := r.Verify(ctx, VerifyOptions{}, func(p Problem) { problems = append(problems, p) }); err != nil || len(problems) != 1 || problems[0].Object != damaged {
		t.Fatalf("verify: %+v %v", problems, err)
	}
	s.Delete(ctx, damaged)
	s.Put(ctx, cats[0], []byte("damaged"))
	if ms := list(); len(ms) != n-2 {
		t.Fatalf("with a damaged catalog: %d", len(ms))
	}
}

// landThenFail creates objects and then reports a transient failure: the
// answer of a create that landed was lost.
type landThenFail struct{ sink.Store }

func (l landThenFail) Create(ctx context.Context, key string, data []byte) error {
	if err := l.Store.Create(ctx, key, data); err != nil {
		return err
	}
	if strings.HasPrefix(key, "manifests/") {
		return &sink.Error{Op: "create", Key: key, Location: "test", Transient: true, Err: errors.New("connection reset")}
	}
	return nil
}

// A commit whose manifest create landed but whose answer was lost (the
// retry then finds it there) is a commit, not a failure.
func TestCommitRetriedCreate(t *testing.T) {
	s := localStore(t)
	initTestRepo(t, s)
	r, _ := openStore(t.Context(), sink.Retry(landThenFail{s}, sink.RetryPolicy{Attempts: 3, Base: time.Millisecond, Cap: time.Millisecond}))
	ix := index.New(r.Config().ChunkSize, 1<<20)
	m := &Manifest{ID: NewBackupID(time.Now(), ""), Domain: "vm1", Mode: "full", Source: "nbd", Disks: []DiskManifest{{Name: "vda", Size: ix.Size}}}
	if err := r.Commit(t.Context(), m, map[string]DiskData{"vda": {Full: ix}}, nil); err != nil {
		t.Fatalf("commit: %v", err)
	}
	// Another backup's manifest at the same key is still a conflict.
	m2 := *m
	m2.Mode = "incremental"
	if err := r.Commit(t.Context(), &m2, map[string]DiskData{"vda": {Full: ix}}, nil); !errors.Is(err, sink.ErrExists) {
		t.Fatalf("a different manifest at the same id: %v", err)
	}
}

// A format-1 backup that an old nbdmover commits after the switch is
// converted by the next run; one that cannot be read is reported, left in
// place, and never removed by a rerun.
func TestMigrateLateAndDamaged(t *testing.T) {
	want := strings.Fields(readFile(t, "testdata/v1-repo.sha256"))
	dir := t.TempDir()
	if err := os.CopyFS(dir, os.DirFS("testdata/v1-repo")); err != nil {
		t.Fatal(err)
	}
	s, _ := sink.NewLocal(dir)
	keys := keysUnder(t, s, "backups/")
	if _, err := Migrate(t.Context(), s, nil); err != nil {
		t.Fatal(err)
	}
	// The old nbdmover's late backup: the newest one again, under a later id.
	newest := keys[len(keys)-1][:strings.LastIndex(keys[len(keys)-1], "/")]
	late, damaged := "20261202T090000.000Z", "20261202T090001.000Z"
	for _, id := range []string{late, damaged} {
		src := filepath.Join("testdata/v1-repo", filepath.FromSlash(newest))
		dst := filepath.Join(dir, "backups", "old-vm", id)
		os.MkdirAll(dst, 0o700)
		idx, _ := os.ReadFile(filepath.Join(src, "vda.index"))
		os.WriteFile(filepath.Join(dst, "vda.index"), idx, 0o600)
		m, _ := os.ReadFile(filepath.Join(src, "manifest.json"))
		m = []byte(strings.Replace(string(m), `"id": "`+filepath.Base(newest)+`"`, `"id": "`+id+`"`, 1))
		if id == damaged {
			m = m[:len(m)/2]
		}
		os.WriteFile(filepath.Join(dst, "manifest.json"), m, 0o600)
	}
	var lines []string
	for range 2 {
		res, err := Migrate(t.Context(), s, func(l string) { lines = append(lines, l) })
		if err != nil || res.Skipped != 1 || res.Left != 2 {
			t.Fatalf("migrate again: %+v %v", res, err)
		}
	}
	if !strings.Contains(strings.Join(lines, "\n"), "cannot migrate") {
		t.Errorf("the damaged backup was not reported: %q", lines)
	}
	r, _ := openStore(t.Context(), s)
	m, err := r.Backup(t.Context(), "old-vm", late)
	if err != nil || restoreSHA256(t, r, m, "vda") != want[4] {
		t.Fatalf("the late backup: %v", err)
	}
	if left := keysUnder(t, s, "backups/"); len(left) != 2 || !strings.Contains(left[0], damaged) {
		t.Fatalf("left: %v", left)
	}
}

func sameIndex(a, b *index.Index) bool {
	if a.Size != b.Size || a.ChunkSize != b.ChunkSize || a.Len() != b.Len() {
		return false
	}
	for k := range a.Len() {
		i, d := a.At(k)
		j, e := b.At(k)
		if i != j || d != e {
			return false
		}
	}
	return true
}
