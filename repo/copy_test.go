package repo

import (
	"bytes"
	"errors"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/nbdmover/nbdmover/chunker"
	"github.com/nbdmover/nbdmover/repo/lock"
	"github.com/nbdmover/nbdmover/sink"
	"github.com/nbdmover/nbdmover/sink/sinktest"
)

// Copies between local repositories, plain and encrypted: every copied
// backup restores to the source's bytes, a rerun copies nothing, an
// incremental copies only its new chunks with its indexes a delta on
// the backup before it, encrypted targets get their own chunk names, and
// a copy whose store fails part-way leaves no manifest and is finished by
// a rerun that finds the chunks already stored.
func TestCopy(t *testing.T) {
	ctx := t.Context()
	src := initTestRepo(t, localStore(t))
	ds := putChunks(t, src, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15)
	at := time.Date(2026, 12, 1, 0, 0, 0, 0, time.UTC)
	b1 := slices.Clone(ds[:12])
	b2 := append(slices.Clone(b1), ds[13]) // grown
	b2[1] = ds[12]
	b3 := slices.Clone(b2[:12]) // shrunk
	b4 := slices.Clone(b3)
	b4[5] = ds[14]
	var ms []*Manifest
	for k, set := range [][]chunker.Digest{b1, b2, b3} {
		ms = append(ms, commitChunks(t, src, "vm", at.Add(time.Duration(k)*time.Hour), set))
	}
	hashes := map[string]string{}
	for _, m := range ms {
		hashes[m.ID] = restoreSHA256(t, src, m, "vda")
	}
	check := func(t *testing.T, r *Repo, n int) {
		t.Helper()
		got, _, err := r.Backups(ctx, "vm")
		if err != nil || len(got) != n {
			t.Fatalf("%d backups, %v; want %d", len(got), err, n)
		}
		for _, m := range got {
			if h := restoreSHA256(t, r, m, "vda"); h != hashes[m.ID] {
				t.Fatalf("%s restores to other bytes", m.ID)
			}
			if f, err := r.ReadFile(ctx, m, "domain.xml"); err != nil || !strings.Contains(string(f), m.ID) {
				t.Fatalf("%s domain.xml: %q %v", m.ID, f, err)
			}
		}
	}

	dst := initTestRepo(t, localStore(t))
	res, err := Copy(ctx, src, dst, CopyOptions{DryRun: true})
	if err != nil || len(res.Backups) != 3 || res.Chunks != 0 || res.Backups[2].Base != ms[1].ID {
		t.Fatalf("dry run: %+v %v", res, err)
	}
	check(t, dst, 0)
	res, err = Copy(ctx, src, dst, CopyOptions{})
	if err != nil || len(res.Backups) != 3 || res.Chunks != 14 || res.Reencoded {
		t.Fatalf("copy: %+v %v", res, err)
	}
	check(t, dst, 3)
	if res, err := Copy(ctx, src, dst, CopyOptions{}); err != nil || len(res.Backups) != 0 || res.Present != 3 {
		t.Fatalf("rerun: %+v %v", res, err)
	}

	// An incremental: one new chunk, its indexes a delta on the last copy.
	ms = append(ms, commitChunks(t, src, "vm", at.Add(3*time.Hour), b4))
	hashes[ms[3].ID] = restoreSHA256(t, src, ms[3], "vda")
	res, err = Copy(ctx, src, dst, CopyOptions{})
	if err != nil || len(res.Backups) != 1 || res.Chunks != 1 || res.Backups[0].Base != ms[2].ID || res.BytesRead == 0 {
		t.Fatalf("incremental copy: %+v %v", res, err)
	}
	check(t, dst, 4)
	m4, _ := dst.Backup(ctx, "vm", ms[3].ID)
	if refs := m4.Disks[0].Index; len(refs) < 2 || refs[len(refs)-1].Kind != "delta" || refs[len(refs)-1].Entries != 1 {
		t.Fatalf("the copied incremental's chain: %+v", refs)
	}

	// Encrypted targets: chunks decoded and encoded under the target's
	// names; and back to a plain one.
	enc := initEncrypted(t, localStore(t), "secret")
	if res, err := Copy(ctx, src, enc, CopyOptions{}); err != nil || len(res.Backups) != 4 || !res.Reencoded || res.Chunks != 15 {
		t.Fatalf("to an encrypted repository: %+v %v", res, err)
	}
	check(t, enc, 4)
	for k := range chunkKeys(t, enc.Store()) {
		if chunkKeys(t, src.Store())[k] {
			t.Fatalf("the encrypted copy names a chunk %s as the plain source does", k)
		}
	}
	// Shared keys (init --copy-keys-from): the ciphertext moves as it is.
	shared, err := initStore(ctx, localStore(t), InitOptions{ChunkSize: 256 << 10, Keys: passwordKeys(t, "other"), KeysFrom: enc})
	if err != nil {
		t.Fatal(err)
	}
	if res, err := Copy(ctx, enc, shared, CopyOptions{}); err != nil || len(res.Backups) != 4 || res.Reencoded || res.Chunks != 15 {
		t.Fatalf("between repositories that share keys: %+v %v", res, err)
	}
	check(t, shared, 4)
	for k := range chunkKeys(t, enc.Store()) {
		a, _ := enc.Store().Get(ctx, k, nil, 1<<30)
		b, err := shared.Store().Get(ctx, k, nil, 1<<30)
		if err != nil || !bytes.Equal(a, b) {
			t.Fatalf("chunk %s differs between repositories that share keys: %v", k, err)
		}
	}
	if _, err := openWith(t, shared.Store(), passwordKeys(t, "secret")); !errors.Is(err, ErrWrongPassword) {
		t.Fatalf("the repository that shares keys opened with the other's password: %v", err)
	}
	if _, err := initStore(ctx, localStore(t), InitOptions{Keys: passwordKeys(t, "x"), KeysFrom: src}); err == nil {
		t.Fatal("keys taken from a repository that has none")
	}

	back := initTestRepo(t, localStore(t))
	if res, err := Copy(ctx, enc, back, CopyOptions{Domain: "vm", Backup: ms[1].ID}); err != nil || len(res.Backups) != 1 {
		t.Fatalf("one backup from the encrypted repository: %+v %v", res, err)
	}
	check(t, back, 1)

	// A store that fails after a few puts: nothing committed, then a rerun.
	faulty := &sinktest.Faulty{Store: localStore(t)}
	flaky := initTestRepo(t, faulty)
	puts := 0
	faulty.Fail = func(op, key string, _ int) error {
		if op == "put" && strings.HasPrefix(key, "chunks/") {
			if puts++; puts > 3 {
				return sinktest.Permanent(op, key)
			}
		}
		return nil
	}
	if _, err := Copy(ctx, src, flaky, CopyOptions{Parallel: 1}); err == nil {
		t.Fatal("a copy whose puts fail succeeded")
	}
	if got, _, _ := flaky.Backups(ctx, "vm"); len(got) != 0 {
		t.Fatalf("a failed copy left %d backups", len(got))
	}
	faulty.Fail = nil
	res, err = Copy(ctx, src, flaky, CopyOptions{})
	if err != nil || len(res.Backups) != 4 || res.ChunksHeld < 3 || res.Chunks != 15-res.ChunksHeld {
		t.Fatalf("the rerun: %+v %v", res, err)
	}
	check(t, flaky, 4)

	// Repositories a copy cannot go between.
	big, _ := initStore(ctx, localStore(t), InitOptions{ChunkSize: 1 << 20})
	for _, pair := range [][2]*Repo{{src, src}, {src, big}} {
		if _, err := Copy(ctx, pair[0], pair[1], CopyOptions{}); !errors.Is(err, ErrCopyMismatch) {
			t.Fatalf("%s to %s: %v", pair[0].Location(), pair[1].Location(), err)
		}
	}
	if _, err := Copy(ctx, src, dst, CopyOptions{Domain: "vm", Backup: "20260101T000000.000Z"}); !errors.Is(err, ErrNoBackup) {
		t.Fatalf("an unknown backup: %v", err)
	}
	var _ sink.Store = faulty
}

// What a copy meets in repositories that are not whole: a chunk the
// target holds damaged (verify recorded it) is stored again from the
// source, also where the base would have given it, and its record
// cleared; a target manifest that cannot be read keeps the source's of
// that name out, and the rest is copied; a damaged chunk in one domain of
// the source fails that backup only.
func TestCopyDamage(t *testing.T) {
	ctx := t.Context()
	src := initTestRepo(t, localStore(t))
	ds := putChunks(t, src, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31, 32)
	at := time.Date(2026, 12, 2, 0, 0, 0, 0, time.UTC)
	m1 := commitChunks(t, src, "vm", at, ds[:10])
	dst := initTestRepo(t, localStore(t))
	if _, err := Copy(ctx, src, dst, CopyOptions{}); err != nil {
		t.Fatal(err)
	}
	// Damage chunk 3 in the target, and let verify record it.
	key := ChunkKey(ds[3])
	blob, _ := dst.Store().Get(ctx, key, nil, 1<<30)
	blob[len(blob)-1] ^= 0xff
	dst.Store().Put(ctx, key, blob)
	if st, _ := dst.Verify(ctx, VerifyOptions{ReadData: true}, func(Problem) {}); st.Corrupt != 1 {
		t.Fatalf("verify found %d corrupt chunks", st.Corrupt)
	}
	// A second backup with chunk 3 unchanged since the first (its base).
	set := slices.Clone(ds[:10])
	set[9] = ds[10]
	m2 := commitChunks(t, src, "vm", at.Add(time.Hour), set)
	res, err := Copy(ctx, src, dst, CopyOptions{})
	if err != nil || len(res.Backups) != 1 || res.Healed != 1 {
		t.Fatalf("a copy over a damaged chunk: %+v %v", res, err)
	}
	for _, m := range []*Manifest{m1, m2} {
		dm, err := dst.Backup(ctx, "vm", m.ID)
		if err != nil {
			t.Fatal(err)
		}
		if got, want := restoreSHA256(t, dst, dm, "vda"), restoreSHA256(t, src, m, "vda"); got != want {
			t.Fatalf("%s restores to other bytes after the heal", m.ID)
		}
	}
	if damaged, _ := dst.DamagedChunks(ctx); len(damaged) != 0 {
		t.Fatalf("damage records left: %v", damaged)
	}

	// An unreadable manifest in the target, and a damaged chunk in one
	// domain of the source.
	other := commitChunks(t, src, "other", at.Add(2*time.Hour), ds[11:12])
	commitChunks(t, src, "bad", at.Add(3*time.Hour), ds[10:11])
	m3 := commitChunks(t, src, "vm", at.Add(4*time.Hour), ds[:10])
	dst.Store().Put(ctx, m3.Key(), []byte("garbage"))
	sblob, _ := src.Store().Get(ctx, ChunkKey(ds[11]), nil, 1<<30)
	sblob[len(sblob)-1] ^= 0xff
	src.Store().Put(ctx, ChunkKey(ds[11]), sblob) // "other"'s only chunk
	res, err = Copy(ctx, src, dst, CopyOptions{})
	if err == nil || len(res.Failed) != 1 || res.Failed[0].Domain != "other" || len(res.Backups) != 1 || res.Backups[0].Domain != "bad" {
		t.Fatalf("a copy past a damaged source chunk and an unreadable target manifest: %+v %v", res, err)
	}
	if _, err := dst.Backup(ctx, "other", other.ID); err == nil {
		t.Fatal("a backup with a damaged chunk was copied")
	}
}

// A copy whose target is locked by a gc lets the source's lock go while
// it waits (so the source's gc is not held by it), and copies once the
// target is free.
func TestCopyWaitsWithoutHolding(t *testing.T) {
	ctx := t.Context()
	was := lockWait
	lockWait = 300 * time.Millisecond
	t.Cleanup(func() { lockWait = was })
	src := initTestRepo(t, localStore(t))
	commitChunks(t, src, "vm", time.Date(2026, 12, 3, 0, 0, 0, 0, time.UTC), putChunks(t, src, 41, 42))
	dst := initTestRepo(t, localStore(t))
	gc, _, err := dst.Lock(ctx, lock.Exclusive, "gc", nil)
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { _, err := Copy(ctx, src, dst, CopyOptions{}); done <- err }()
	// The copy takes the source's lock, then lets it go while it waits.
	for _, want := range []int{1, 0} {
		n := -1
		for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline) && n != want; time.Sleep(10 * time.Millisecond) {
			locks, _ := src.Locks(ctx)
			n = len(locks)
		}
		if n != want {
			t.Fatalf("the source has %d locks, want %d: the copy held the source's lock while it waited for the target's", n, want)
		}
	}
	gc.Release()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if got, _, _ := dst.Backups(ctx, "vm"); len(got) != 1 {
		t.Fatalf("%d backups copied", len(got))
	}
}
