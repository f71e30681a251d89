package repo

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"github.com/nbdmover/nbdmover/repo/index"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nbdmover/nbdmover/chunker"
	"github.com/nbdmover/nbdmover/sink"
	"github.com/nbdmover/nbdmover/sink/sinktest"
)

// readsStore records the chunks read through it.
type readsStore struct {
	sink.Store
	mu    sync.Mutex
	reads map[string]int
}

func (s *readsStore) Get(ctx context.Context, key string, buf []byte, limit int64) ([]byte, error) {
	if strings.HasPrefix(key, "chunks/") {
		s.mu.Lock()
		s.reads[key]++
		s.mu.Unlock()
	}
	return s.Store.Get(ctx, key, buf, limit)
}

// corruptChunk flips a bit of chunk d as stored, and returns the blob
// before and after.
func corruptChunk(t *testing.T, s sink.Store, d chunker.Digest) (good, bad []byte) {
	t.Helper()
	good, err := s.Get(t.Context(), ChunkKey(d), nil, 1<<30)
	if err != nil {
		t.Fatal(err)
	}
	bad = bytes.Clone(good)
	bad[len(bad)-1] ^= 1
	if err := s.Put(t.Context(), ChunkKey(d), bad); err != nil {
		t.Fatal(err)
	}
	return good, bad
}

// commitDistinct stores n distinct chunks and a backup of them.
func commitDistinct(t *testing.T, r *Repo, n int) []chunker.Digest {
	t.Helper()
	ctx := t.Context()
	var ib index.Builder
	var ds []chunker.Digest
	plain := make([]byte, 256<<10)
	for i := range n {
		binary.LittleEndian.PutUint64(plain, uint64(i+1))
		d := r.Sum(plain)
		ib.Set(int64(i), d, chunker.Digest{})
		ds = append(ds, d)
		if err := r.Store().Put(ctx, ChunkKey(d), r.EncodeChunk(nil, d, plain)); err != nil {
			t.Fatal(err)
		}
	}
	ix := ib.Index(r.Config().ChunkSize, int64(n)*(256<<10))
	m := &Manifest{ID: NewBackupID(time.Now(), ""), Domain: "vm1", Mode: "full", Source: "nbd",
		Disks: []DiskManifest{{Name: "vda", Size: ix.Size}}}
	if err := r.Commit(ctx, m, map[string]DiskData{"vda": {Full: ix}}, nil); err != nil {
		t.Fatal(err)
	}
	return ds
}

// Ten verifies at 10% read every chunk at least once, each about a tenth
// of them: the state object, not luck, decides (each run has another
// seed). A chunk that verify found damaged is read by every run.
func TestSampledVerify(t *testing.T) {
	for _, tc := range []struct {
		name  string
		store func(t *testing.T) sink.Store
	}{
		{"local", localStore},
		{"s3", func(t *testing.T) sink.Store { return sinktest.NewS3(t, "repo/") }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ctx := t.Context()
			base := tc.store(t)
			r := initTestRepo(t, base)
			const n = 1200
			ds := commitDistinct(t, r, n)
			rs := &readsStore{Store: base, reads: map[string]int{}}
			rr, err := openStore(ctx, rs)
			if err != nil {
				t.Fatal(err)
			}
			for run := range 10 {
				before := len(rs.reads)
				rs.mu.Lock()
				total := 0
				for _, c := range rs.reads {
					total += c
				}
				rs.mu.Unlock()
				st, err := rr.Verify(ctx, VerifyOptions{ReadPercent: 10, Seed: uint64(run + 1)}, func(p Problem) { t.Error(p) })
				if err != nil {
					t.Fatal(err)
				}
				read := 0
				for _, c := range rs.reads {
					read += c
				}
				read -= total
				if st.Verified != read || read < n/20 || read > n/5 || st.ReadPercent != 10 {
					t.Errorf("run %d read %d chunks (%d new), stats %+v", run, read, len(rs.reads)-before, st)
				}
			}
			if len(rs.reads) != n {
				t.Fatalf("ten runs at 10%% read %d of %d chunks", len(rs.reads), n)
			}
			for k, c := range rs.reads {
				if c > 2 {
					t.Errorf("%s read %d times in ten runs", k, c)
				}
			}

			// A damaged chunk is read by every sampled run until it is
			// whole again, then its record is cleared (repaired).
			d := ds[7]
			blob, bad := corruptChunk(t, base, d)
			if st, _ := rr.Verify(ctx, VerifyOptions{ReadData: true}, func(Problem) {}); st.Corrupt != 1 || st.Quarantined != 1 {
				t.Fatalf("verify of a corrupt chunk: %+v", st)
			}
			for range 3 {
				rs.reads = map[string]int{}
				var problems []Problem
				rr.Verify(ctx, VerifyOptions{ReadPercent: 1}, func(p Problem) { problems = append(problems, p) })
				if rs.reads[ChunkKey(d)] == 0 || len(problems) != 1 || problems[0].Object != ChunkKey(d) {
					t.Fatalf("a sampled verify skipped the damaged chunk: %v", problems)
				}
			}
			dmg, err := r.DamagedChunks(ctx)
			if err != nil || !dmg[d] || len(dmg) != 1 {
				t.Fatalf("damaged chunks %v %v", dmg, err)
			}
			base.Put(ctx, ChunkKey(d), blob) // someone put it back
			st, err := rr.Verify(ctx, VerifyOptions{ReadPercent: 1}, func(p Problem) { t.Error(p) })
			if err != nil || st.Repaired != 1 || len(st.Damaged) != 0 {
				t.Fatalf("verify after the chunk was put back: %+v %v", st, err)
			}
			if dmg, err := r.DamagedChunks(ctx); err != nil || len(dmg) != 0 {
				t.Fatalf("damaged chunks after repair: %v %v", dmg, err)
			}
			// The quarantined copy stays until a gc past the grace period.
			if q, err := base.Get(ctx, QuarantineKey(d), nil, 1<<30); err != nil || !bytes.Equal(q, bad) {
				t.Fatalf("quarantined copy: %v", err)
			}
			time.Sleep(1100 * time.Millisecond) // S3's Last-Modified has whole seconds
			g, err := r.GC(ctx, GCOptions{Grace: time.Millisecond})
			if err != nil || g.Quarantine != 1 || g.Chunks.Deleted != 0 {
				t.Fatalf("gc: %+v %v", g, err)
			}
			if _, err := base.Stat(ctx, QuarantineKey(d)); !isNotFound(err) {
				t.Fatalf("quarantined copy after gc: %v", err)
			}
		})
	}
}

// gc keeps the damage record of a chunk that still exists, even when no
// backup references it (else a later backup would deduplicate against the
// damaged copy), and deletes it with the chunk.
func TestGCDamageRecords(t *testing.T) {
	ctx := t.Context()
	s := localStore(t)
	r := initTestRepo(t, s)
	ds := commitDistinct(t, r, 3)
	s.Delete(ctx, ChunkKey(ds[0]))
	corruptChunk(t, s, ds[1])
	if st, _ := r.Verify(ctx, VerifyOptions{ReadData: true}, func(Problem) {}); st.Corrupt != 1 || st.Missing != 1 || len(st.Damaged) != 1 {
		t.Fatalf("verify: %+v", st)
	}
	// Referenced: gc keeps the records.
	g, err := r.GC(ctx, GCOptions{Grace: time.Millisecond})
	if err != nil || g.Damage != 0 {
		t.Fatalf("gc: %+v %v", g, err)
	}
	if dmg, _ := r.DamagedChunks(ctx); len(dmg) != 2 {
		t.Fatalf("records after gc: %v", dmg)
	}
	keep := 0
	if _, err := r.Forget(ctx, "vm1", Policy{KeepLast: &keep}, false); err != nil {
		t.Fatal(err)
	}
	// Unreferenced, the missing chunk's record goes; the corrupt chunk
	// is young: it and its record stay.
	g, err = r.GC(ctx, GCOptions{Grace: time.Hour})
	if err != nil || g.Damage != 1 || g.Chunks.Deleted != 0 {
		t.Fatalf("gc: %+v %v", g, err)
	}
	if dmg, _ := r.DamagedChunks(ctx); len(dmg) != 1 || !dmg[ds[1]] {
		t.Fatalf("records after gc: %v", dmg)
	}
	g, err = r.GC(ctx, GCOptions{Grace: time.Millisecond})
	if err != nil || g.Damage != 1 || g.Chunks.Deleted != 2 || g.Quarantine != 1 {
		t.Fatalf("gc: %+v %v", g, err)
	}
	if left := keysUnder(t, s, "state/"); len(left) != 1 || left[0] != "state/verified" {
		t.Fatalf("state left: %v", left)
	}
}

// A verify the store fails in the middle of its reads still reports, and
// records, the damage it found before. (The fault is injected: no real
// store fails on demand between two reads.)
func TestVerifyFailsLate(t *testing.T) {
	ctx := t.Context()
	s := localStore(t)
	r := initTestRepo(t, s)
	ds := commitDistinct(t, r, 40)
	s.Delete(ctx, ChunkKey(ds[0]))
	f := &sinktest.Faulty{Store: s, Fail: func(op, key string, n int) error {
		if op == "get" && key == ChunkKey(ds[30]) {
			return &sink.Error{Op: "get", Key: key, Err: errors.New("injected: connection reset")}
		}
		return nil
	}}
	rf, err := openStore(ctx, f)
	if err != nil {
		t.Fatal(err)
	}
	var problems []Problem
	_, err = rf.Verify(ctx, VerifyOptions{ReadData: true, Parallel: 1}, func(p Problem) { problems = append(problems, p) })
	if err == nil || !strings.Contains(err.Error(), "connection reset") {
		t.Fatalf("verify over a failing store: %v", err)
	}
	if len(problems) != 1 || problems[0].Object != ChunkKey(ds[0]) || !strings.Contains(problems[0].Problem, "missing") {
		t.Fatalf("problems reported: %+v", problems)
	}
	if dmg, err := r.DamagedChunks(ctx); err != nil || len(dmg) != 1 || !dmg[ds[0]] {
		t.Fatalf("recorded: %v %v", dmg, err)
	}
}

// A damage record for the zero digest (no chunk is named so: planted)
// is not a damaged chunk: it would make every whole entry's zero base
// look damaged (no dedup, no patches). One for a patch key is recorded
// and names the patch's chunk.
func TestDamageRecordKeys(t *testing.T) {
	ctx := t.Context()
	r := initTestRepo(t, localStore(t))
	d, b := chunker.Sum([]byte("d")), chunker.Sum([]byte("b"))
	for _, key := range []string{ChunkKey(chunker.ZeroChunk), PatchKey(d, b)} {
		if err := r.RecordDamage(ctx, key, "planted", []string{"vm1/x"}); err != nil {
			t.Fatal(err)
		}
	}
	dmg, err := r.DamagedChunks(ctx)
	if err != nil || len(dmg) != 1 || !dmg[d] {
		t.Fatalf("damaged chunks: %v %v", dmg, err)
	}
	if err := r.RecordDamage(ctx, "patches/xx", "planted", nil); err == nil {
		t.Fatal("a damage record for a key that is not a chunk's or patch's")
	}
}
