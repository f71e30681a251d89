package repo

import (
	"context"
	crand "crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"github.com/nbdmover/nbdmover/internal/liveness"
	"github.com/nbdmover/nbdmover/repo/lock"
	"math/rand/v2"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/nbdmover/nbdmover/chunker"
	"github.com/nbdmover/nbdmover/sink"
	"github.com/nbdmover/nbdmover/sink/sinktest"
)

func intp(n int) *int { return &n }

// The policy's decisions against a hand-worked schedule with Proxmox's
// semantics: rules in order, a kept backup's period is not counted again,
// older backups of a period a rule kept one of are not seen by later rules.
func TestPolicyApply(t *testing.T) {
	at := func(s string) *Manifest {
		tm, err := time.Parse("2006-01-02T15:04", s)
		if err != nil {
			t.Fatal(err)
		}
		return &Manifest{ID: tm.UTC().Format(idLayout), Created: tm.UTC()}
	}
	ms := []*Manifest{
		at("2026-12-02T10:00"), at("2026-12-02T09:00"), at("2026-12-01T23:00"), at("2026-12-01T08:00"),
		at("2026-11-30T12:00"), at("2026-11-29T12:00"), at("2026-11-22T12:00"), at("2026-10-15T12:00"),
		at("2025-06-01T12:00"),
	}
	id := func(s string) string { return at(s).ID }
	for _, c := range []struct {
		name      string
		p         Policy
		protected []string
		want      map[string]string // id -> reason of the kept ones
	}{
		{"last 2", Policy{KeepLast: intp(2)}, nil,
			map[string]string{id("2026-12-02T10:00"): "last", id("2026-12-02T09:00"): "last"}},
		{"last 0", Policy{KeepLast: intp(0)}, nil, map[string]string{}},
		{"last 1 daily 3", Policy{KeepLast: intp(1), KeepDaily: intp(3)}, nil,
			// 12-02 is covered by the last-kept one; 09:00 of that day is
			// not counted again; the daily rule keeps the newest of 12-01, 11-30 and 11-29.
			map[string]string{id("2026-12-02T10:00"): "last", id("2026-12-01T23:00"): "daily",
				id("2026-11-30T12:00"): "daily", id("2026-11-29T12:00"): "daily"}},
		{"daily 1 weekly 3", Policy{KeepDaily: intp(1), KeepWeekly: intp(3)}, nil,
			// ISO week 49 of 2026 (11-30..12-06) is covered by 12-02 10:00;
			// weekly takes week 48 (11-29) and week 47 (11-22), then week 42.
			map[string]string{id("2026-12-02T10:00"): "daily", id("2026-11-29T12:00"): "weekly",
				id("2026-11-22T12:00"): "weekly", id("2026-10-15T12:00"): "weekly"}},
		{"monthly 2 yearly 5", Policy{KeepMonthly: intp(2), KeepYearly: intp(5)}, nil,
			map[string]string{id("2026-12-02T10:00"): "monthly", id("2026-11-30T12:00"): "monthly",
				id("2025-06-01T12:00"): "yearly"}},
		// Protected backups are kept but neither counted nor covering
		// their period (Proxmox's prune).
		{"protected is kept, not counted", Policy{KeepDaily: intp(2)}, []string{id("2026-12-02T10:00")},
			map[string]string{id("2026-12-02T10:00"): "protected", id("2026-12-02T09:00"): "daily",
				id("2026-12-01T23:00"): "daily"}},
		{"within 2 days", Policy{KeepWithin: Duration(48 * time.Hour)}, nil,
			map[string]string{id("2026-12-02T10:00"): "within", id("2026-12-02T09:00"): "within",
				id("2026-12-01T23:00"): "within", id("2026-12-01T08:00"): "within", id("2026-11-30T12:00"): "within"}},
	} {
		prot := map[string]bool{}
		for _, p := range c.protected {
			prot[p] = true
		}
		got := map[string]string{}
		ds := c.p.Apply(ms, prot)
		for i, d := range ds {
			if i > 0 && ds[i-1].ID <= d.ID {
				t.Errorf("%s: decisions not newest first", c.name)
			}
			if d.Keep {
				got[d.ID] = d.Reason
			}
		}
		if fmt.Sprint(got) != fmt.Sprint(c.want) {
			t.Errorf("%s: kept %v\nwant %v", c.name, got, c.want)
		}
	}
	if err := (Policy{}).Validate(); err == nil {
		t.Error("an empty policy is valid")
	}
	if err := (Policy{KeepLast: intp(-1)}).Validate(); err == nil {
		t.Error("keep-last -1 is valid")
	}
	var p Policy
	if err := json.Unmarshal([]byte(`{"keep_daily": 7, "keep_within": "36h"}`), &p); err != nil || *p.KeepDaily != 7 || p.KeepWithin != Duration(36*time.Hour) {
		t.Fatalf("policy JSON: %+v %v", p, err)
	}
}

// The set never misses a member; with 8-byte prefixes it (almost) never
// says yes to a stranger.
func TestDigestSet(t *testing.T) {
	var s digestSet
	rng := rand.New(rand.NewPCG(1, 2))
	var in []chunker.Digest
	for range 3*digestSetBuffer + 17 {
		var d chunker.Digest
		for i := range 4 {
			v := rng.Uint64()
			for j := range 8 {
				d[i*8+j] = byte(v >> (8 * j))
			}
		}
		in = append(in, d)
		s.add(prefix64(d))
		if rng.IntN(4) == 0 {
			s.add(prefix64(in[rng.IntN(len(in))])) // duplicates
		}
	}
	s.flush()
	if s.len() != len(in) {
		t.Fatalf("%d members, want %d", s.len(), len(in))
	}
	for _, d := range in {
		if !s.has(d) {
			t.Fatalf("%x is missing", d)
		}
	}
	strangers := 0
	for range 10000 {
		var d chunker.Digest
		d[0], d[9] = byte(rng.Uint32()), 1
		if s.has(chunker.Sum(d[:])) {
			strangers++
		}
	}
	if strangers > 0 {
		t.Fatalf("%d strangers found", strangers)
	}
}

// putChunks stores chunks of the given seeds and returns their digests.
func putChunks(t *testing.T, r *Repo, seeds ...uint64) []chunker.Digest {
	t.Helper()
	var ds []chunker.Digest
	for _, seed := range seeds {
		plain := make([]byte, r.Config().ChunkSize)
		rng := rand.New(rand.NewPCG(seed, seed))
		for i := range plain {
			plain[i] = byte(rng.Uint32())
		}
		d := r.Sum(plain)
		if err := r.Store().Put(t.Context(), ChunkKey(d), r.EncodeChunk(nil, d, plain)); err != nil {
			t.Fatal(err)
		}
		ds = append(ds, d)
	}
	return ds
}

// commitChunks commits a backup of domain whose disk holds the chunks.
func commitChunks(t testing.TB, r *Repo, domain string, at time.Time, ds []chunker.Digest) *Manifest {
	t.Helper()
	cs := r.Config().ChunkSize
	digests := map[int64]chunker.Digest{}
	for i, d := range ds {
		digests[int64(i)] = d
	}
	ix := indexOf(cs, int64(len(ds))*cs, digests)
	m := &Manifest{ID: NewBackupID(at, ""), Domain: domain, Created: at.UTC(), Mode: "full", Source: "nbd",
		Consistency: "crash-consistent", Disks: []DiskManifest{{Name: "vda", Size: ix.Size, Mode: "full"}}}
	if err := r.Commit(t.Context(), m, map[string]DiskData{"vda": {Full: ix}}, map[string][]byte{"domain.xml": []byte("<domain>" + m.ID + "</domain>")}); err != nil {
		t.Fatal(err)
	}
	return m
}

func chunkKeys(t *testing.T, s sink.Store) map[string]bool {
	out := map[string]bool{}
	for _, k := range keysUnder(t, s, "chunks/") {
		out[k] = true
	}
	return out
}

// gc deletes exactly what no kept backup references, keeps what the
// grace period protects, and leaves every kept backup whole; on the local
// store and on MinIO.
func TestGCAfterForget(t *testing.T) {
	for _, st := range []struct {
		name string
		new  func(t *testing.T) sink.Store
	}{{"local", localStore}, {"s3", func(t *testing.T) sink.Store { return sinktest.NewS3(t, "repo/") }}} {
		t.Run(st.name, func(t *testing.T) {
			ctx := t.Context()
			r := initTestRepo(t, st.new(t))
			shared := putChunks(t, r, 1, 2)
			only1 := putChunks(t, r, 3)
			only2 := putChunks(t, r, 4)
			day := time.Date(2026, 11, 1, 12, 0, 0, 0, time.UTC)
			m1 := commitChunks(t, r, "vm1", day, append(shared, only1...))
			m2 := commitChunks(t, r, "vm1", day.Add(24*time.Hour), append(shared, only2...))
			other := commitChunks(t, r, "vm2", day.Add(time.Hour), only1[:1]) // another domain shares a chunk
			orphan := putChunks(t, r, 5)                                      // a failed backup's chunk
			res, err := r.Forget(ctx, "vm1", Policy{KeepLast: intp(1)}, false)
			if err != nil || len(res) != 1 || res[0].Kept != 1 || res[0].Forgotten != 1 || res[0].Decisions[1].ID != m1.ID {
				t.Fatalf("forget: %+v %v", res, err)
			}
			// A grace period longer than the objects' age keeps them all.
			g, err := r.GC(ctx, GCOptions{Grace: time.Hour})
			if err != nil || g.Chunks.Deleted != 0 || g.Chunks.Young != 1 || g.Chunks.Kept != 4 {
				t.Fatalf("gc with a long grace: %+v %v", g, err)
			}
			time.Sleep(1100 * time.Millisecond) // S3's Last-Modified has whole seconds
			dry, err := r.GC(ctx, GCOptions{Grace: time.Millisecond, DryRun: true})
			if err != nil || dry.Chunks.Deleted != 1 || dry.Metadata.Deleted != 2 || !chunkKeys(t, r.Store())[ChunkKey(orphan[0])] {
				t.Fatalf("dry run: %+v %v", dry, err)
			}
			g, err = r.GC(ctx, GCOptions{Grace: time.Millisecond})
			// Deleted: the orphan; m1's index and domain.xml. Kept: shared, only1 (vm2), only2.
			if err != nil || g.Chunks.Deleted != 1 || g.Chunks.Kept != 4 || g.Metadata.Deleted != 2 || g.Backups != 2 {
				t.Fatalf("gc: %+v %v", g, err)
			}
			keys := chunkKeys(t, r.Store())
			if keys[ChunkKey(orphan[0])] || len(keys) != 4 {
				t.Fatalf("chunks after gc: %v", keys)
			}
			var problems []Problem
			if _, err := r.Verify(ctx, VerifyOptions{ReadData: true}, func(p Problem) { problems = append(problems, p) }); err != nil || len(problems) > 0 {
				t.Fatalf("verify after gc: %v %v", problems, err)
			}
			for _, m := range []*Manifest{m2, other} {
				if _, err := r.LoadIndex(ctx, m, "vda"); err != nil {
					t.Fatal(err)
				}
			}
			// Forgetting everything, then gc, leaves nothing but the config and
			// the verification state (when each part was last read).
			if _, err := r.Forget(ctx, "", Policy{KeepLast: intp(0)}, false); err != nil {
				t.Fatal(err)
			}
			if g, err = r.GC(ctx, GCOptions{Grace: time.Millisecond}); err != nil || g.Chunks.Deleted != 4 {
				t.Fatalf("gc of an emptied repository: %+v %v", g, err)
			}
			if left := keysUnder(t, r.Store(), ""); len(left) != 2 || left[0] != "config" || left[1] != "state/verified" {
				t.Fatalf("left after forgetting everything: %v", left)
			}
		})
	}
}

// gc stops, deleting nothing, when it cannot tell what a backup
// references: an unreadable manifest, or a missing index object.
func TestGCRefusesWhatItCannotRead(t *testing.T) {
	ctx := t.Context()
	r := initTestRepo(t, localStore(t))
	ds := putChunks(t, r, 1)
	m := commitChunks(t, r, "vm1", time.Now(), ds)
	putChunks(t, r, 2) // garbage
	r.Store().Put(ctx, ManifestKey("vm1", "20990101T000000.000Z"), []byte("not a manifest"))
	time.Sleep(10 * time.Millisecond)
	if _, err := r.GC(ctx, GCOptions{Grace: time.Millisecond}); err == nil || !strings.Contains(err.Error(), "vm1/20990101T000000.000Z") {
		t.Fatalf("gc next to a damaged manifest: %v", err)
	}
	r.Store().Delete(ctx, ManifestKey("vm1", "20990101T000000.000Z"))
	r.Store().Delete(ctx, m.Disks[0].Index[0].Objects[0])
	if _, err := r.GC(ctx, GCOptions{Grace: time.Millisecond}); err == nil || !strings.Contains(err.Error(), m.Disks[0].Index[0].Objects[0]) {
		t.Fatalf("gc with a missing index object: %v", err)
	}
	if n := len(chunkKeys(t, r.Store())); n != 2 {
		t.Fatalf("a refusing gc deleted chunks: %d left", n)
	}
}

func TestProtect(t *testing.T) {
	ctx := t.Context()
	r := initTestRepo(t, localStore(t))
	ds := putChunks(t, r, 1)
	old := commitChunks(t, r, "vm1", time.Now().Add(-time.Hour), ds)
	commitChunks(t, r, "vm1", time.Now(), ds)
	if err := r.Protect(ctx, "vm1", "20990101T000000.000Z", true); !errors.Is(err, ErrNoBackup) {
		t.Fatalf("protecting a missing backup: %v", err)
	}
	if err := r.Protect(ctx, "vm1", old.ID, true); err != nil {
		t.Fatal(err)
	}
	res, err := r.Forget(ctx, "vm1", Policy{KeepLast: intp(0)}, false)
	if err != nil || res[0].Kept != 1 || res[0].Forgotten != 1 {
		t.Fatalf("forget with a protected backup: %+v %v", res, err)
	}
	if _, err := r.Backup(ctx, "vm1", old.ID); err != nil {
		t.Fatalf("the protected backup was forgotten: %v", err)
	}
	if err := r.Protect(ctx, "vm1", old.ID, false); err != nil {
		t.Fatal(err)
	}
	if res, err := r.Forget(ctx, "vm1", Policy{KeepLast: intp(0)}, false); err != nil || res[0].Forgotten != 1 {
		t.Fatalf("forget after unprotect: %+v %v", res, err)
	}
}

// Holds keep a backup from every policy while any holder has one: two
// holders, each releasing only its own, and an operator's protection
// neither touches.
func TestHolds(t *testing.T) {
	ctx := t.Context()
	r := initTestRepo(t, localStore(t))
	ds := putChunks(t, r, 1)
	old := commitChunks(t, r, "vm1", time.Now().Add(-time.Hour), ds)
	commitChunks(t, r, "vm1", time.Now(), ds)
	forget := func() ForgetResult {
		t.Helper()
		res, err := r.Forget(ctx, "vm1", Policy{KeepLast: intp(1)}, false)
		if err != nil {
			t.Fatal(err)
		}
		return res[0]
	}
	for _, bad := range []string{"", "../x", "a/b"} {
		if err := r.Hold(ctx, "vm1", old.ID, bad, true); err == nil {
			t.Errorf("holder %q was taken", bad)
		}
	}
	if err := r.Hold(ctx, "vm1", "20990101T000000.000Z", "a", true); !errors.Is(err, ErrNoBackup) {
		t.Fatalf("holding a missing backup: %v", err)
	}
	for _, h := range []string{"restore-a", "restore-b"} {
		if err := r.Hold(ctx, "vm1", old.ID, h, true); err != nil {
			t.Fatal(err)
		}
	}
	if p, err := r.Protected(ctx, "vm1"); err != nil || !p["vm1/"+old.ID] || len(p) != 1 {
		t.Fatalf("Protected with two holds: %v %v", p, err)
	}
	if res := forget(); res.Forgotten != 0 {
		t.Fatalf("a held backup was forgotten: %+v", res)
	}
	if err := r.Hold(ctx, "vm1", old.ID, "restore-a", false); err != nil {
		t.Fatal(err)
	}
	if res := forget(); res.Forgotten != 0 {
		t.Fatalf("a backup still held by restore-b was forgotten: %+v", res)
	}
	if err := r.Protect(ctx, "vm1", old.ID, true); err != nil {
		t.Fatal(err)
	}
	if err := r.Hold(ctx, "vm1", old.ID, "restore-b", false); err != nil {
		t.Fatal(err)
	}
	if err := r.Hold(ctx, "vm1", old.ID, "restore-b", false); err != nil {
		t.Fatalf("releasing a released hold: %v", err)
	}
	if res := forget(); res.Forgotten != 0 {
		t.Fatalf("releasing the holds dropped the operator's protection: %+v", res)
	}
	if err := r.Protect(ctx, "vm1", old.ID, false); err != nil {
		t.Fatal(err)
	}
	if res := forget(); res.Forgotten != 1 {
		t.Fatalf("forget with no hold and no protection: %+v", res)
	}
}

func lockKey(kind, id string) string { return "locks/" + kind + "-" + id }

func randomHex(n int) string {
	b := make([]byte, n)
	crand.Read(b)
	return hex.EncodeToString(b)
}

// shortLocks shortens the lock timing for a test.
func shortLocks(t *testing.T, refresh, stale, margin time.Duration) {
	saved := lock.Timing
	lock.Timing.Refresh, lock.Timing.Stale, lock.Timing.Margin, lock.Timing.Poll = refresh, stale, margin, 20*time.Millisecond
	t.Cleanup(func() { lock.Timing = saved })
}

// putLock writes a lock object as another process would.
func putLock(t *testing.T, r *Repo, l lock.Info) (id string) {
	t.Helper()
	l.Version = formatVersion
	if l.ID == "" {
		l.ID = randomHex(8)
	}
	b, _ := json.Marshal(l)
	if err := r.Store().Put(t.Context(), lockKey(l.Kind, l.ID), r.encodeMeta(lockKey(l.Kind, l.ID), b)); err != nil {
		t.Fatal(err)
	}
	return l.ID
}

// Who blocks whom, and when a lock is stale: a live lock of another host
// blocks until its heartbeat is old; a lock of a dead process on this
// host is stale at once; a shared lock gc went past cannot commit.
func TestLockStaleness(t *testing.T) {
	shortLocks(t, 50*time.Millisecond, 400*time.Millisecond, 100*time.Millisecond)
	ctx := t.Context()
	r := initTestRepo(t, localStore(t))
	host, _ := os.Hostname()

	dead := exec.Command("true")
	dead.Run()
	putLock(t, r, lock.Info{Kind: lock.Shared, Purpose: "backup crashed", Host: host, Machine: liveness.MachineID(), PID: dead.Process.Pid,
		Started: time.Now(), Heartbeat: time.Now()})
	l, _, err := r.Lock(ctx, lock.Exclusive, "gc", nil)
	if err != nil {
		t.Fatalf("a dead process's lock blocks: %v", err)
	}
	l.Release()

	elsewhere := putLock(t, r, lock.Info{Kind: lock.Shared, Purpose: "backup elsewhere", Host: "other-host", PID: 1,
		Started: time.Now(), Heartbeat: time.Now()})
	tctx, cancel := context.WithTimeout(ctx, 150*time.Millisecond)
	if _, _, err := r.Lock(tctx, lock.Exclusive, "gc", nil); err == nil {
		t.Fatal("gc went past a live lock of another host")
	}
	cancel()
	// Once its heartbeat is old it is stale, and gc records it as broken.
	start := time.Now()
	l, _, err = r.Lock(ctx, lock.Exclusive, "gc", nil)
	_, serr := r.store.Stat(ctx, "locks/broken-"+elsewhere)
	if err != nil || time.Since(start) < 100*time.Millisecond || serr != nil {
		t.Fatalf("gc past a stale lock: %v after %v; its tombstone: %v", err, time.Since(start), serr)
	}
	// A shared locker waits while the exclusive lock is held.
	got := make(chan error, 1)
	go func() {
		s, _, err := r.Lock(ctx, lock.Shared, "backup", nil)
		if err == nil {
			s.Release()
		}
		got <- err
	}()
	select {
	case err := <-got:
		t.Fatalf("a shared lock was taken beside the exclusive one: %v", err)
	case <-time.After(200 * time.Millisecond):
	}
	l.Release()
	if err := <-got; err != nil {
		t.Fatal(err)
	}
	r.Unlock(ctx, true)

	// A holder that a gc took for stale finds out before committing.
	s, _, err := r.Lock(ctx, lock.Shared, "backup", nil)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Release()
	if _, err := s.Check(ctx); err != nil {
		t.Fatal(err)
	}
	// ... also once that gc is gone.
	if err := r.putMeta(ctx, "locks/broken-"+s.Info().ID, map[string]string{"why": "test", "by": "a gc elsewhere"}); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Check(ctx); !errors.Is(err, lock.ErrLost) {
		t.Fatalf("check of a broken lock: %v", err)
	}
}

// A holder whose lock is removed (nbdmover unlock) loses it: its context
// ends, and the lock is not written back.
func TestLockRemovedIsLost(t *testing.T) {
	shortLocks(t, 20*time.Millisecond, time.Second, 200*time.Millisecond)
	ctx := t.Context()
	r := initTestRepo(t, localStore(t))
	l, lctx, err := r.Lock(ctx, lock.Shared, "backup", nil)
	if err != nil {
		t.Fatal(err)
	}
	removed, live, err := r.Unlock(ctx, false)
	if err != nil || len(removed) != 0 || len(live) != 1 {
		t.Fatalf("unlock of a live lock: %v %v %v", removed, live, err)
	}
	r.Unlock(ctx, true)
	select {
	case <-lctx.Done():
	case <-time.After(5 * time.Second):
		t.Fatal("the lock's context did not end")
	}
	if !errors.Is(context.Cause(lctx), lock.ErrLost) {
		t.Fatalf("cause: %v", context.Cause(lctx))
	}
	l.Release()
	if locks, _ := r.Locks(ctx); len(locks) != 0 {
		t.Fatalf("the removed lock came back: %v", locks)
	}
	// A damaged lock object is stale by its modification time.
	r.Store().Put(ctx, lockKey(lock.Exclusive, randomHex(8)), []byte("garbage"))
	locks, err := r.Locks(ctx)
	if err != nil || len(locks) != 1 || locks[0].Damaged == "" || locks[0].Stale(time.Now()) != "" ||
		locks[0].Stale(time.Now().Add(2*time.Second)) == "" {
		t.Fatalf("damaged lock: %+v %v", locks, err)
	}
}

// protectDuringForget protects the backup whose manifest it deletes, right
// after the deletion: the interleaving a protect racing a forget can
// produce, which no real peer produces on demand.
type protectDuringForget struct {
	sink.Store
	mark func(domain, id string) string // the key of the marker to write
}

func (p protectDuringForget) Delete(ctx context.Context, key string) error {
	err := p.Store.Delete(ctx, key)
	if d, id, ok := parseManifestKey(key); ok {
		p.Store.Put(ctx, p.mark(d, id), []byte("marker"))
	}
	return err
}

// A backup protected or held while forget deletes it is put back, whole.
func TestForgetRacingProtect(t *testing.T) {
	for name, mark := range map[string]func(d, id string) string{
		"protect": protectKey,
		"hold":    func(d, id string) string { return holdPrefix(d, id) + "restore-a" },
	} {
		t.Run(name, func(t *testing.T) {
			ctx := t.Context()
			r := initTestRepo(t, localStore(t))
			m := commitChunks(t, r, "vm1", time.Now(), putChunks(t, r, 1))
			v := *r
			v.store = protectDuringForget{Store: r.store, mark: mark}
			res, err := v.Forget(ctx, "vm1", Policy{KeepLast: intp(0)}, false)
			if err != nil || res[0].Forgotten != 0 || res[0].Kept != 1 || res[0].Decisions[0].Reason != "protected" {
				t.Fatalf("forget racing %s: %+v %v", name, res, err)
			}
			if _, err := r.LoadIndex(ctx, m, "vda"); err != nil {
				t.Fatal(err)
			}
			if got, err := r.Backup(ctx, "vm1", m.ID); err != nil || got.ID != m.ID {
				t.Fatalf("the protected backup: %v %v", got, err)
			}
		})
	}
}

// refApply is a second, plainer statement of the policy, to check Apply
// against: per rule, take the backups no earlier rule decided and whose
// period no kept (unprotected) backup stands for; of their N newest
// distinct periods, keep the newest backup of each and decide the others
// (no later rule sees them).
func refApply(p Policy, ms []*Manifest, protected map[string]bool) map[string]string {
	type b struct{ id, period string }
	kept := map[string]string{}
	decided := map[string]bool{}
	ids := []string{}
	created := map[string]time.Time{}
	for _, m := range ms {
		ids = append(ids, m.ID)
		created[m.ID] = m.Created.UTC()
		if protected[m.ID] {
			kept[m.ID], decided[m.ID] = "protected", true
		}
	}
	// newest first
	for i := range ids {
		for j := i + 1; j < len(ids); j++ {
			if ids[j] > ids[i] {
				ids[i], ids[j] = ids[j], ids[i]
			}
		}
	}
	for _, r := range p.rules() {
		if r.keep == nil || *r.keep == 0 {
			continue
		}
		covered := map[string]bool{}
		for id, why := range kept {
			if why != "protected" {
				covered[r.period(Decision{ID: id, Created: created[id]})] = true
			}
		}
		var periods []string // distinct, newest first
		members := map[string][]string{}
		for _, id := range ids {
			per := r.period(Decision{ID: id, Created: created[id]})
			if decided[id] || covered[per] {
				continue
			}
			if len(members[per]) == 0 {
				periods = append(periods, per)
			}
			members[per] = append(members[per], id)
		}
		if len(periods) > *r.keep {
			periods = periods[:*r.keep]
		}
		for _, per := range periods {
			kept[members[per][0]] = r.name
			for _, id := range members[per] {
				decided[id] = true
			}
		}
	}
	if p.KeepWithin > 0 && len(ids) > 0 {
		for _, id := range ids {
			if _, ok := kept[id]; !ok && created[ids[0]].Sub(created[id]) < time.Duration(p.KeepWithin) {
				kept[id] = "within"
			}
		}
	}
	return kept
}

// Apply against the reference on random schedules around year ends, ISO
// week 53 (2020, 2026), DST changes (which UTC periods ignore) and
// backups minutes apart, for random policies.
func TestPolicyAgainstReference(t *testing.T) {
	rng := rand.New(rand.NewPCG(7, 7))
	starts := []time.Time{
		time.Date(2020, 12, 20, 0, 0, 0, 0, time.UTC), // week 53 of 2020, then 2021
		time.Date(2026, 12, 24, 0, 0, 0, 0, time.UTC), // week 53 of 2026
		time.Date(2026, 3, 27, 0, 0, 0, 0, time.UTC),  // DST in Europe on the 29th
		time.Date(2025, 10, 24, 0, 0, 0, 0, time.UTC), // DST ends on the 26th
	}
	opt := func() *int {
		if rng.IntN(3) == 0 {
			return nil
		}
		return intp(rng.IntN(6))
	}
	weekly := Policy{}.rules()[3].period
	for day, want := range map[string]string{"2026-12-31": "2026-W53", "2027-01-03": "2026-W53", "2027-01-04": "2027-W01",
		"2021-01-03": "2020-W53", "2024-12-30": "2025-W01"} {
		tm, _ := time.Parse("2006-01-02", day)
		if got := weekly(Decision{Created: tm}); got != want {
			t.Errorf("%s is in week %s, want %s", day, got, want)
		}
	}
	for iter := range 3000 {
		start := starts[iter%len(starts)]
		var ms []*Manifest
		tm := start
		for range 1 + rng.IntN(60) {
			tm = tm.Add(time.Duration(1+rng.IntN(36*60)) * time.Minute)
			if rng.IntN(10) == 0 {
				tm = tm.Add(time.Duration(rng.IntN(400)) * 24 * time.Hour)
			}
			ms = append(ms, &Manifest{ID: tm.Format(idLayout), Created: tm})
		}
		p := Policy{KeepLast: opt(), KeepHourly: opt(), KeepDaily: opt(), KeepWeekly: opt(), KeepMonthly: opt(), KeepYearly: opt()}
		if rng.IntN(4) == 0 {
			p.KeepWithin = Duration(time.Duration(rng.IntN(72)) * time.Hour)
		}
		prot := map[string]bool{}
		for _, m := range ms {
			if rng.IntN(12) == 0 {
				prot[m.ID] = true
			}
		}
		want := refApply(p, ms, prot)
		got := map[string]string{}
		for _, d := range p.Apply(ms, prot) {
			if d.Keep {
				got[d.ID] = d.Reason
			}
		}
		if fmt.Sprint(got) != fmt.Sprint(want) {
			t.Fatalf("policy %s, protected %v, backups from %v:\ngot  %v\nwant %v", p, prot, start, got, want)
		}
	}
}
