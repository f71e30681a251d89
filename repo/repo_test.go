package repo

import (
	"bytes"
	"context"
	"errors"
	"fmt"
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
	r, err := Init(t.Context(), store, InitOptions{ChunkSize: 256 << 10})
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
	if _, err := Open(ctx, s); !errors.Is(err, ErrNoRepository) || !strings.Contains(err.Error(), "nbdmover init") {
		t.Fatalf("open of an empty store: %v", err)
	}
	r := initTestRepo(t, s)
	if _, err := Init(ctx, s, InitOptions{}); !errors.Is(err, ErrExists) {
		t.Fatalf("second init: %v", err)
	}
	r2, err := Open(ctx, s)
	if err != nil || r2.Config() != r.Config() || r2.Config().ChunkSize != 256<<10 {
		t.Fatalf("reopen: %v %+v", err, r2)
	}
	if _, err := Init(ctx, localStore(t), InitOptions{ChunkSize: 100 << 10}); err == nil {
		t.Fatal("bad chunk size accepted")
	}
	s.Put(ctx, "config", []byte(`{"version": 2}`))
	if _, err := Open(ctx, s); err == nil || !strings.Contains(err.Error(), "format 2") {
		t.Fatalf("future format: %v", err)
	}
	s.Put(ctx, "config", []byte(`{"version": 1, "chunk_`))
	if _, err := Open(ctx, s); err == nil || !strings.Contains(err.Error(), "damaged") {
		t.Fatalf("truncated config: %v", err)
	}
}

func sampleIndex() *Index {
	ix := NewIndex(256<<10, 5*(256<<10)+4096)
	ix.Digests[1] = chunker.Sum([]byte("one"))
	ix.Digests[5] = chunker.Sum([]byte("last"))
	return ix
}

func TestIndex(t *testing.T) {
	ix := sampleIndex()
	b := ix.Marshal()
	got, err := UnmarshalIndex(b)
	if err != nil || got.Size != ix.Size || got.ChunkSize != ix.ChunkSize || len(got.Digests) != 6 || got.Digests[5] != ix.Digests[5] {
		t.Fatalf("round trip: %v %+v", err, got)
	}
	for name, bad := range map[string][]byte{
		"truncated":    b[:len(b)-1],
		"header only":  b[:indexHeaderSize],
		"flipped bit":  func() []byte { c := bytes.Clone(b); c[indexHeaderSize+40] ^= 1; return c }(),
		"wrong count":  func() []byte { c := bytes.Clone(b); c[20]++; return c }(),
		"bad magic":    func() []byte { c := bytes.Clone(b); c[0] = 'X'; return c }(),
		"extra digest": append(bytes.Clone(b[:len(b)-32]), b[len(b)-64:]...),
	} {
		if _, err := UnmarshalIndex(bad); !errors.Is(err, ErrBadIndex) {
			t.Errorf("%s: %v", name, err)
		}
	}
}

func TestResized(t *testing.T) {
	ix := sampleIndex() // 6 chunks, the last 4096 bytes
	grown, stale := ix.Resized(8 * (256 << 10))
	if len(grown.Digests) != 8 || grown.Digests[1] != ix.Digests[1] || !grown.Digests[5].IsZeroChunk() || len(stale) != 1 || stale[0] != 5 {
		t.Fatalf("grown: %d chunks, stale %v", len(grown.Digests), stale)
	}
	shrunk, stale := ix.Resized(2*(256<<10) - 512)
	if len(shrunk.Digests) != 2 || shrunk.Digests[1] != (chunker.Digest{}) || len(stale) != 1 || stale[0] != 1 {
		t.Fatalf("shrunk: %v stale %v", shrunk.Digests, stale)
	}
}

func commitSample(t *testing.T, r *Repo, domain string) *Manifest {
	t.Helper()
	ctx := t.Context()
	plain := bytes.Repeat([]byte("data"), 64<<10) // one full 256 KiB chunk
	d := chunker.Sum(plain)
	if err := r.Store().Put(ctx, ChunkKey(d), r.Encode(nil, plain)); err != nil {
		t.Fatal(err)
	}
	ix := NewIndex(r.Config().ChunkSize, 3*(256<<10))
	ix.Digests[0], ix.Digests[2] = d, d
	m := &Manifest{ID: NewBackupID(time.Now(), ""), Domain: domain, Mode: "full", Source: "nbd",
		Consistency: "crash-consistent", Disks: []DiskManifest{{Name: "vda", Size: ix.Size, Mode: "full"}}}
	if err := r.Commit(ctx, m, map[string]*Index{"vda": ix}, map[string][]byte{"domain.xml": []byte("<domain/>")}); err != nil {
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
	// An index swapped for another valid one is caught by the manifest's checksum.
	other := NewIndex(r.Config().ChunkSize, 3*(256<<10))
	r.Store().Put(ctx, m.Key("vda.index"), other.Marshal())
	if _, err := r.LoadIndex(ctx, ms[0], "vda"); !errors.Is(err, ErrBadIndex) || !strings.Contains(err.Error(), "vda.index") {
		t.Fatalf("swapped index: %v", err)
	}
}

// A crash before the manifest leaves no backup: never a partial one.
func TestCommitIsAtomic(t *testing.T) {
	s := localStore(t)
	r := initTestRepo(t, s)
	f := &sinktest.Faulty{Store: s, Fail: func(op, key string, n int) error {
		if op == "put" && strings.HasSuffix(key, "manifest.json") {
			return sinktest.Permanent(op, key)
		}
		return nil
	}}
	rf, _ := Open(t.Context(), f)
	ctx := t.Context()
	ix := NewIndex(r.Config().ChunkSize, 256<<10)
	m := &Manifest{ID: NewBackupID(time.Now(), ""), Domain: "vm1", Mode: "full", Source: "nbd",
		Disks: []DiskManifest{{Name: "vda", Size: ix.Size}}}
	if err := rf.Commit(ctx, m, map[string]*Index{"vda": ix}, nil); err == nil {
		t.Fatal("commit succeeded")
	}
	if ms, _, err := r.Backups(ctx, "vm1"); err != nil || len(ms) != 0 {
		t.Fatalf("a failed commit is listed: %v %v", ms, err)
	}
}

func TestVerifyAndRestoreFaults(t *testing.T) {
	s := localStore(t)
	r := initTestRepo(t, s)
	m := commitSample(t, r, "vm1")
	ctx := t.Context()
	ix, _ := r.LoadIndex(ctx, m, "vda")
	key := ChunkKey(ix.Digests[0])

	// A short read from the store: restore refuses with the chunk's name.
	f := &sinktest.Faulty{Store: s, Truncate: func(k string) int {
		if k == key {
			return 10
		}
		return 0
	}}
	rf, _ := Open(ctx, f)
	err := rf.RestoreDisk(ctx, m, "vda", discard{}, 2)
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
	rb, _ := Open(ctx, broken)
	if _, err := rb.Verify(ctx, VerifyOptions{ReadData: true}, func(Problem) {}); err == nil {
		t.Fatal("verify hid a store failure")
	}
}

type discard struct{}

func (discard) WriteAt(context.Context, []byte, int64) error { return nil }

func FuzzUnmarshalIndex(f *testing.F) {
	f.Add(sampleIndex().Marshal())
	f.Add(NewIndex(4<<20, 0).Marshal())
	f.Fuzz(func(t *testing.T, b []byte) {
		ix, err := UnmarshalIndex(b)
		if err != nil {
			if !errors.Is(err, ErrBadIndex) {
				t.Fatalf("error %v does not match ErrBadIndex", err)
			}
			return
		}
		if !bytes.Equal(ix.Marshal(), b) {
			t.Fatal("a decoded index does not encode to the same bytes")
		}
	})
}

func FuzzUnmarshalManifest(f *testing.F) {
	f.Add([]byte(`{"version":1,"id":"20261128T040000.000Z","domain":"vm1","mode":"full","disks":[{"name":"vda","size":1,"index":"vda.index"}]}`))
	f.Add([]byte(`{"version":1}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		m, err := UnmarshalManifest(b)
		if err != nil {
			return
		}
		if ValidName("domain", m.Domain) != nil || ValidBackupID(m.ID) != nil {
			t.Fatal("accepted a manifest with an invalid name or id")
		}
		for _, d := range m.Disks {
			if ValidName("disk", d.Name) != nil || d.Index != d.Name+".index" {
				t.Fatalf("accepted disk %+v", d)
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
							r, err = OpenOrInit(t.Context(), store(), o)
						} else {
							r, err = Init(t.Context(), store(), o)
						}
						if err == nil {
							ids[i] = r.Config().ID + fmt.Sprint(r.Config().ChunkSize)
						}
						errs[i] = err
					}()
				}
				wg.Wait()
				r, err := Open(t.Context(), store())
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

func (c *countingStore) Get(ctx context.Context, key string, buf []byte) ([]byte, error) {
	c.mu.Lock()
	c.now++
	c.top = max(c.top, c.now)
	c.mu.Unlock()
	time.Sleep(2 * time.Millisecond)
	defer func() { c.mu.Lock(); c.now--; c.mu.Unlock() }()
	return c.Store.Get(ctx, key, buf)
}

// Verify fetches at most Parallel chunks at once (16 by default).
func TestVerifyParallel(t *testing.T) {
	s := localStore(t)
	r := initTestRepo(t, s)
	ctx := t.Context()
	ix := NewIndex(r.Config().ChunkSize, 40*(256<<10))
	for i := range ix.Digests {
		plain := bytes.Repeat([]byte{byte(i + 1)}, 256<<10)
		ix.Digests[i] = chunker.Sum(plain)
		s.Put(ctx, ChunkKey(ix.Digests[i]), r.Encode(nil, plain))
	}
	m := &Manifest{ID: NewBackupID(time.Now(), ""), Domain: "vm1", Mode: "full", Source: "nbd",
		Disks: []DiskManifest{{Name: "vda", Size: ix.Size}}}
	if err := r.Commit(ctx, m, map[string]*Index{"vda": ix}, nil); err != nil {
		t.Fatal(err)
	}
	for _, tt := range []struct{ parallel, want int }{{2, 2}, {0, 16}} {
		c := &countingStore{Store: s}
		rc, _ := Open(ctx, c)
		if _, err := rc.Verify(ctx, VerifyOptions{ReadData: true, Parallel: tt.parallel}, func(p Problem) { t.Error(p) }); err != nil {
			t.Fatal(err)
		}
		if c.top > tt.want || c.top < 2 {
			t.Errorf("parallel %d: %d gets at once, want at most %d", tt.parallel, c.top, tt.want)
		}
	}
}
