package repo

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"github.com/nbdmover/nbdmover/repo/lock"
	"strings"
	"testing"
	"time"

	"github.com/nbdmover/nbdmover/chunker"
	"github.com/nbdmover/nbdmover/sink"
	"github.com/nbdmover/nbdmover/sink/sinktest"
)

// What a writer of the repository can plant, against the repository's
// own logic (the local store's path rules are tested in package sink, the
// commands in cmd/nbdmover): objects over their kind's bound, locks that
// cannot be read, key objects that are expensive or many.

var hostileStores = []struct {
	name string
	new  func(t *testing.T) sink.Store
}{{"local", localStore}, {"s3", func(t *testing.T) sink.Store { return sinktest.NewS3(t, "") }}}

// Every object kind is read through its bound: an object over it is
// damaged, named with its size, and never read into memory.
func TestObjectsOverTheirBound(t *testing.T) {
	for _, st := range hostileStores {
		t.Run(st.name, func(t *testing.T) {
			ctx := t.Context()
			s := st.new(t)
			r := initTestRepo(t, s)
			m := commitSample(t, r, "vm1")
			m2 := commitSample(t, r, "vm2")
			big := make([]byte, maxManifest+blobOverhead+1)
			// The newest manifest of vm1, oversized: skipped by listings,
			// refused by name, and reported by verify.
			bad := ManifestKey("vm1", NewBackupID(time.Now().Add(time.Hour), ""))
			if err := s.Put(ctx, bad, big); err != nil {
				t.Fatal(err)
			}
			ms, skipped, err := r.Backups(ctx, "")
			if err != nil || len(ms) != 2 || len(skipped) != 1 || !strings.Contains(skipped[0].Problem, fmt.Sprint(len(big), " bytes")) {
				t.Fatalf("list beside an oversized manifest: %d %v %v", len(ms), skipped, err)
			}
			if _, err := r.Backup(ctx, "vm1", "latest"); err == nil || !strings.Contains(err.Error(), bad[strings.LastIndex(bad, "-")+1:]) {
				t.Fatalf("latest with an oversized newest manifest: %v", err)
			}
			// An oversized chunk and index object: restore fails naming
			// them; verify reports them.
			ix, err := r.LoadIndex(ctx, m2, "vda")
			if err != nil {
				t.Fatal(err)
			}
			_, dg := ix.At(0)
			if err := s.Put(ctx, ChunkKey(dg), make([]byte, 3*r.Config().ChunkSize)); err != nil {
				t.Fatal(err)
			}
			if _, _, err := r.GetChunk(ctx, dg, nil, nil); !errors.Is(err, sink.ErrDamaged) || !strings.Contains(err.Error(), ChunkKey(dg)) {
				t.Fatalf("an oversized chunk: %v", err)
			}
			verify := func(want ...string) {
				t.Helper()
				var problems []string
				if _, err := r.Verify(ctx, VerifyOptions{ReadData: true}, func(p Problem) { problems = append(problems, p.Object+": "+p.Problem) }); err != nil {
					t.Fatal(err)
				}
				for _, w := range want {
					if !strings.Contains(strings.Join(problems, "\n"), w+": ") {
						t.Errorf("verify does not report %s: %v", w, problems)
					}
				}
			}
			verify(bad, ChunkKey(dg))
			obj := m.Disks[0].Index[0].Objects[0]
			if err := s.Put(ctx, obj, make([]byte, maxIndexObject+blobOverhead+1)); err != nil {
				t.Fatal(err)
			}
			if _, err := r.LoadIndex(ctx, m, "vda"); !errors.Is(err, sink.ErrDamaged) || !strings.Contains(err.Error(), obj) {
				t.Fatalf("an oversized index object: %v", err)
			}
			verify(obj)
			// An oversized lock is a damaged lock, not a failure of Locks.
			lk := lockKey(lock.Shared, randomHex(8))
			if err := s.Put(ctx, lk, make([]byte, maxSmallObject+blobOverhead+1)); err != nil {
				t.Fatal(err)
			}
			locks, err := r.Locks(ctx)
			if err != nil || len(locks) != 1 || locks[0].Damaged == "" || !strings.Contains(locks[0].Holder(), lk) {
				t.Fatalf("locks beside an oversized lock: %+v %v", locks, err)
			}
			// An oversized config: every open says so.
			if err := s.Put(ctx, configKey, make([]byte, maxSmallObject+1)); err != nil {
				t.Fatal(err)
			}
			if _, err := openStore(ctx, s); !errors.Is(err, sink.ErrDamaged) || !strings.Contains(err.Error(), "config") {
				t.Fatalf("open with an oversized config: %v", err)
			}
		})
	}
}

// A meta blob whose header states a plaintext larger than its kind's
// bound is refused before it is decompressed (a zstd bomb of a few KiB).
func TestMetaBlobBoundedPlaintext(t *testing.T) {
	r := initTestRepo(t, localStore(t))
	plain := bytes.Repeat([]byte{'{'}, maxSmallObject*4)
	key := lockKey(lock.Shared, randomHex(8))
	blob := r.meta.Encode(nil, plain, key)
	if len(blob) > maxSmallObject {
		t.Fatalf("the bomb is %d bytes", len(blob))
	}
	if _, err := r.decodeMeta(key, blob); !errors.Is(err, chunker.ErrCorrupt) || !strings.Contains(err.Error(), "exceeds the limit") {
		t.Fatalf("decode of a lock whose plaintext is over its bound: %v", err)
	}
}

// A lock that cannot be read holds the repository only briefly, even when
// its writer keeps touching it: a damaged exclusive lock is gone past
// (tombstoned) after lock.Timing.Damaged; a damaged shared lock makes gc
// fail at once, naming it, rather than wait with every backup queued
// behind it (or go past what may be a live backup's lock); unlock removes
// both. A heartbeat from the future counts from when it was first seen.
func TestDamagedLockCannotHoldRepository(t *testing.T) {
	shortLocks(t, 50*time.Millisecond, 2*time.Second, 10*time.Millisecond)
	lock.Timing.Damaged = 300 * time.Millisecond
	for _, st := range hostileStores {
		t.Run(st.name, func(t *testing.T) {
			ctx := t.Context()
			s := st.new(t)
			r := initTestRepo(t, s)
			garbage := func(kind string) (string, context.CancelFunc) {
				key := lockKey(kind, randomHex(8))
				tctx, cancel := context.WithCancel(ctx)
				t.Cleanup(cancel)
				go func() { // the attacker keeps it fresh
					for tctx.Err() == nil {
						s.Put(tctx, key, []byte("garbage"))
						time.Sleep(20 * time.Millisecond)
					}
				}()
				time.Sleep(50 * time.Millisecond)
				return key, cancel
			}
			key, stop := garbage(lock.Exclusive)
			start := time.Now()
			l, _, err := r.Lock(ctx, lock.Shared, "backup", nil)
			_, serr := s.Stat(ctx, "locks/broken-"+key[strings.LastIndex(key, "-")+1:]) // its tombstone
			if err != nil || time.Since(start) > 5*time.Second || serr != nil {
				t.Fatalf("a shared lock beside a garbage exclusive lock: %v after %v", err, time.Since(start))
			}
			l.Release()
			stop()
			r.Unlock(ctx, true)

			key, stop = garbage(lock.Shared)
			start = time.Now()
			_, _, err = r.Lock(ctx, lock.Exclusive, "gc", nil)
			if !errors.Is(err, lock.ErrLocked) || !strings.Contains(err.Error(), key) || !strings.Contains(err.Error(), "nbdmover unlock") || time.Since(start) > 5*time.Second {
				t.Fatalf("gc's lock beside a garbage shared lock: %v after %v", err, time.Since(start))
			}
			if _, err := r.GC(ctx, GCOptions{Grace: time.Nanosecond}); !errors.Is(err, lock.ErrLocked) || !strings.Contains(err.Error(), key) {
				t.Fatalf("gc beside a garbage shared lock: %v", err)
			}
			stop()
			if removed, _, err := r.Unlock(ctx, false); err != nil || len(removed) != 1 || removed[0].Key != key {
				t.Fatalf("unlock of a garbage lock: %v %v", removed, err)
			}

			// A readable lock whose heartbeat is years ahead.
			putLock(t, r, lock.Info{Kind: lock.Exclusive, Purpose: "gc from the future", Host: "other-host", PID: 1,
				Started: time.Now(), Heartbeat: time.Now().AddDate(10, 0, 0)})
			start = time.Now()
			l, _, err = r.Lock(ctx, lock.Shared, "backup", nil)
			if err != nil || time.Since(start) < lock.Timing.Stale || time.Since(start) > 10*time.Second {
				t.Fatalf("a shared lock beside a lock from the future: %v after %v", err, time.Since(start))
			}
			l.Release()
		})
	}
}

// Every wait for a lock ends: a shared locker behind a live exclusive lock,
// and an exclusive locker behind a live shared lock, fail with lock.ErrLocked
// naming the holder once lock.Timing.Wait has passed.
func TestLockWaitsHaveDeadlines(t *testing.T) {
	shortLocks(t, 50*time.Millisecond, time.Hour, 10*time.Millisecond)
	lock.Timing.Wait = 400 * time.Millisecond
	ctx := t.Context()
	r := initTestRepo(t, localStore(t))
	for _, c := range []struct{ held, want string }{{lock.Exclusive, lock.Shared}, {lock.Shared, lock.Exclusive}} {
		putLock(t, r, lock.Info{Kind: c.held, Purpose: "work elsewhere", Host: "other-host", PID: 1, Started: time.Now(), Heartbeat: time.Now()})
		_, _, err := r.Lock(ctx, c.want, "test", nil)
		if !errors.Is(err, lock.ErrLocked) || !strings.Contains(err.Error(), "work elsewhere") || !strings.Contains(err.Error(), "other-host") {
			t.Fatalf("%s lock behind a live %s lock: %v", c.want, c.held, err)
		}
		r.Unlock(ctx, true)
	}
}

// plantKey stores a password key object for the repository with the given
// Argon2id cost, wrapping nothing that opens.
func plantKey(t *testing.T, r *Repo, cost Cost, created time.Time) string {
	t.Helper()
	o := &keyObject{Version: formatVersion, ID: newKeyID(), Repository: r.cfg.ID, Kind: "password", Created: created,
		KDF:   KDF{Name: kdfArgon2id, Time: cost.Time, MemoryKiB: cost.MemoryKiB, Threads: cost.Threads, Salt: make([]byte, 16)},
		Check: make([]byte, 16), Nonce: make([]byte, 12), Wrapped: make([]byte, masterLen+16)}
	if err := putKeyObject(t.Context(), r.store, o); err != nil {
		t.Fatal(err)
	}
	return o.ID
}

// Planted key objects cannot make an open slow: those asking more than
// twice the repository's recorded cost are never tried (and verify names
// them), and of many, an open tries the few that cost least; --key-id
// names the one to try.
func TestPlantedKeyObjects(t *testing.T) {
	fastKDF(t)
	for _, st := range hostileStores {
		t.Run(st.name, func(t *testing.T) {
			ctx := t.Context()
			s := st.new(t)
			r := initEncrypted(t, s, "right")
			recorded := *r.cfg.Encryption.PasswordCost
			if recorded != (Cost{argonCost.Time, argonCost.MemoryKiB, argonCost.Threads}) {
				t.Fatalf("the config records cost %+v", recorded)
			}
			var costly []string
			for _, c := range []Cost{{100, 8 << 10, 1}, {1, 1 << 20, 1}, {1, 8 << 10, 255}} { // the format's extremes
				costly = append(costly, plantKey(t, r, c, time.Unix(0, 0)))
			}
			huge := keyObjectKey(newKeyID()) // and one over its kind's bound
			if err := s.Put(ctx, huge, make([]byte, maxSmallObject+1)); err != nil {
				t.Fatal(err)
			}
			costly = append(costly, huge[len(keyPrefix):])
			start := time.Now()
			if _, err := openWith(t, s, passwordKeys(t, "right")); err != nil {
				t.Fatal(err)
			}
			if d := time.Since(start); d > 3*time.Second {
				t.Fatalf("open took %v beside key objects of extreme cost", d)
			}
			var problems []string
			r2, _ := openWith(t, s, passwordKeys(t, "right"))
			r2.Verify(ctx, VerifyOptions{}, func(p Problem) { problems = append(problems, p.Object+": "+p.Problem) })
			for i, id := range costly {
				want := keyObjectKey(id) + ": its Argon2id cost"
				if i == len(costly)-1 {
					want = keyObjectKey(id) + ": get " + keyObjectKey(id)
				}
				if !strings.Contains(strings.Join(problems, "\n"), want) {
					t.Errorf("verify does not report %s: %v", want, problems)
				}
			}
			// Forty planted keys at the cap, older than the real one: an
			// open with a wrong password tries the cheapest eight, with
			// the right one the real key (which costs least) first.
			cap := passwordCap(r.cfg)
			for range 40 {
				plantKey(t, r, Cost{cap.Time, cap.MemoryKiB, 1}, time.Unix(0, 0))
			}
			_, err := openWith(t, s, passwordKeys(t, "wrong"))
			if !errors.Is(err, ErrWrongPassword) || !strings.Contains(err.Error(), "tried the 8 password keys that cost least of 41") {
				t.Fatalf("open with a wrong password beside 40 planted keys: %v", err)
			}
			if _, err := openWith(t, s, passwordKeys(t, "right")); err != nil {
				t.Fatal(err)
			}
			// Planted keys as cheap as the real one, older: the real one is
			// not among the eight, and --key-id names it.
			for range 10 {
				plantKey(t, r, recorded, time.Unix(0, 0))
			}
			if _, err := openWith(t, s, passwordKeys(t, "right")); !errors.Is(err, ErrWrongPassword) || !strings.Contains(err.Error(), "--key-id") {
				t.Fatalf("open beside 10 planted keys as cheap as the real one: %v", err)
			}
			k := passwordKeys(t, "right")
			if err := k.OnlyKey(r.keys.keyID); err != nil {
				t.Fatal(err)
			}
			if _, err := openWith(t, s, k); err != nil {
				t.Fatalf("open with --key-id: %v", err)
			}
			k = passwordKeys(t, "right")
			k.OnlyKey(costly[0])
			if _, err := openWith(t, s, k); err == nil || !strings.Contains(err.Error(), "its Argon2id cost") {
				t.Fatalf("open with --key-id of a costly key: %v", err)
			}
		})
	}
}

// A config that records a higher cost, written by someone else, does not
// raise the cap (the config is read before the keys authenticate it), and
// fails the keys' check of the config. A key file's key object must be an
// HKDF one: one that asks for Argon2id is damaged, never derived.
func TestConfigCostAndKeyFileKDF(t *testing.T) {
	fastKDF(t)
	ctx := t.Context()
	s := localStore(t)
	r := initEncrypted(t, s, "right")
	costly := plantKey(t, r, Cost{100, 8 << 10, 1}, time.Unix(0, 0))
	cfg := r.cfg
	cfg.Encryption = &Encryption{Cipher: cipherName, Names: namesHMAC, PasswordCost: &Cost{100, 1 << 20, 255}}
	b, _ := json.MarshalIndent(cfg, "", "  ")
	if err := s.Put(ctx, configKey, append(b, '\n')); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	if _, err := openWith(t, s, passwordKeys(t, "right")); err == nil || !strings.Contains(err.Error(), "config is not the one") {
		t.Fatalf("open with a changed config: %v", err)
	}
	if _, err := openWith(t, s, passwordKeys(t, "wrong")); !errors.Is(err, ErrWrongPassword) || time.Since(start) > 3*time.Second {
		t.Fatalf("the raised config let key %s (100 passes) be derived: %v after %v", costly, err, time.Since(start))
	}

	s2 := localStore(t)
	r2 := initEncrypted(t, s2, "right")
	info, file2, err := r2.AddKeyFile(ctx, "host2")
	if err != nil {
		t.Fatal(err)
	}
	var o keyObject
	raw, _ := s2.Get(ctx, keyObjectKey(info.ID), nil, maxSmallObject)
	json.Unmarshal(raw, &o)
	o.KDF = KDF{Name: kdfArgon2id, Time: 100, MemoryKiB: 64 << 10, Threads: 1, Salt: o.KDF.Salt}
	raw, _ = json.Marshal(o)
	s2.Put(ctx, keyObjectKey(info.ID), raw)
	kf, err := KeyFileKeys(file2)
	if err != nil {
		t.Fatal(err)
	}
	start = time.Now()
	if _, err := openWith(t, s2, kf); err == nil || !strings.Contains(err.Error(), "damaged") || time.Since(start) > time.Second {
		t.Fatalf("a key file's key object asking for Argon2id: %v after %v", err, time.Since(start))
	}
}
