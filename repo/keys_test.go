package repo

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"errors"
	"github.com/nbdmover/nbdmover/repo/lock"
	"hash/crc32"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/nbdmover/nbdmover/chunker"
	"github.com/nbdmover/nbdmover/sink"
	"github.com/nbdmover/nbdmover/sink/sinktest"
)

// fastKDF makes password keys cheap to derive in this package's tests.
func fastKDF(t *testing.T) {
	old := argonCost
	argonCost = KDF{Name: kdfArgon2id, Time: 1, MemoryKiB: 8 << 10, Threads: 1}
	t.Cleanup(func() { argonCost = old })
}

func passwordKeys(t *testing.T, pw string) *Keys {
	t.Helper()
	k, err := PasswordKeys([]byte(pw))
	if err != nil {
		t.Fatal(err)
	}
	return k
}

func initEncrypted(t *testing.T, s sink.Store, pw string) *Repo {
	t.Helper()
	r, err := initStore(t.Context(), s, InitOptions{ChunkSize: 256 << 10, Keys: passwordKeys(t, pw)})
	if err != nil {
		t.Fatal(err)
	}
	return r
}

func openWith(t *testing.T, s sink.Store, k *Keys) (*Repo, error) {
	t.Helper()
	return openKeys(t.Context(), s, k)
}

var storeKinds = []struct {
	name string
	new  func(t *testing.T) sink.Store
}{{"local", localStore}, {"s3", func(t *testing.T) sink.Store { return sinktest.NewS3(t, "enc/") }}}

// An encrypted repository round-trips, hides its plaintext and its
// chunks' plain digests, and opens only with its password.
func TestEncryptedRepository(t *testing.T) {
	fastKDF(t)
	for _, st := range storeKinds {
		t.Run(st.name, func(t *testing.T) {
			ctx := t.Context()
			s := st.new(t)
			r := initEncrypted(t, s, "correct horse")
			if !r.Encrypted() || r.Config().Encryption == nil || r.Config().Digest != "hmac-sha256" {
				t.Fatalf("config: %+v", r.Config())
			}
			m := commitSample(t, r, "vm1")
			plain := bytes.Repeat([]byte("data"), 64<<10)
			want := restoreSHA256(t, r, m, "vda")

			// Nothing stored holds the plaintext, and no chunk is named by
			// its SHA-256.
			var all []string
			s.List(ctx, "", func(o sink.ObjectInfo) error { all = append(all, o.Key); return nil })
			for _, k := range all {
				b, err := s.Get(ctx, k, nil, 1<<30)
				if err != nil {
					t.Fatal(err)
				}
				for _, secret := range [][]byte{plain[:64], []byte("<domain/>"), []byte("vm1\"")} {
					if bytes.Contains(b, secret) {
						t.Fatalf("%s holds %q in the clear", k, secret)
					}
				}
			}
			if _, err := s.Stat(ctx, ChunkKey(chunker.Sum(plain))); !errors.Is(err, sink.ErrNotFound) {
				t.Fatalf("a chunk is stored under its plain SHA-256: %v", err)
			}

			for _, c := range []struct {
				name string
				keys *Keys
				want error
			}{
				{"no password", nil, ErrKeyNeeded},
				{"wrong password", passwordKeys(t, "wrong horse"), ErrWrongPassword},
			} {
				if _, err := openWith(t, s, c.keys); !errors.Is(err, c.want) {
					t.Fatalf("%s: %v, want %v", c.name, err, c.want)
				}
			}
			r2, err := openWith(t, s, passwordKeys(t, "correct horse"))
			if err != nil {
				t.Fatal(err)
			}
			ms, _, err := r2.Backups(ctx, "vm1")
			if err != nil || len(ms) != 1 || restoreSHA256(t, r2, ms[0], "vda") != want {
				t.Fatalf("reopened: %v %v", ms, err)
			}
			if x, err := r2.ReadFile(ctx, ms[0], "domain.xml"); err != nil || string(x) != "<domain/>" {
				t.Fatalf("file: %q %v", x, err)
			}
			if rep, err := r2.Verify(ctx, VerifyOptions{ReadData: true}, func(p Problem) { t.Errorf("problem: %+v", p) }); err != nil || rep.Backups != 1 {
				t.Fatalf("verify: %+v %v", rep, err)
			}
			// Locks are encrypted like everything else.
			l, _, err := r2.Lock(ctx, lock.Shared, "verify", nil)
			if err != nil {
				t.Fatal(err)
			}
			locks, err := r2.Locks(ctx)
			if err != nil || len(locks) != 1 || locks[0].Damaged != "" || locks[0].Purpose != "verify" {
				t.Fatalf("locks: %+v %v", locks, err)
			}
			b, _ := s.Get(ctx, locks[0].Key, nil, 1<<30)
			if host, _ := os.Hostname(); bytes.Contains(b, []byte(host)) {
				t.Fatalf("a lock shows its host in the clear")
			}
			l.Release()

			// An unencrypted repository refuses a password.
			plainRepo := initTestRepo(t, localStore(t))
			if _, err := openWith(t, plainRepo.Store(), passwordKeys(t, "x")); !errors.Is(err, ErrNotEncrypted) {
				t.Fatalf("plain repository opened with a password: %v", err)
			}
			// OpenOrInit with keys never creates a repository.
			if _, _, err := openOrInitStore(ctx, localStore(t), InitOptions{Keys: passwordKeys(t, "x")}); !errors.Is(err, ErrNoRepository) {
				t.Fatalf("OpenOrInit with keys on an empty store: %v", err)
			}
		})
	}
}

// Keys can be added, used, changed and removed; the last one and the one
// in use cannot be removed.
func TestKeyManagement(t *testing.T) {
	fastKDF(t)
	ctx := t.Context()
	s := localStore(t)
	r := initEncrypted(t, s, "first")
	m := commitSample(t, r, "vm1")
	want := restoreSHA256(t, r, m, "vda")
	if _, err := r.AddPasswordKey(ctx, "second", []byte("second")); err != nil {
		t.Fatal(err)
	}
	fileInfo, file, err := r.AddKeyFile(ctx, "host2")
	if err != nil {
		t.Fatal(err)
	}
	keys, err := r.Keys(ctx)
	byLabel := map[string]KeyInfo{}
	for _, k := range keys {
		byLabel[k.Label] = k
	}
	if err != nil || len(keys) != 3 || !byLabel[""].Current || byLabel["second"].Current || byLabel["host2"].Kind != "key-file" {
		t.Fatalf("keys: %+v %v", keys, err)
	}
	if bytes.Contains(file, []byte(`"secret": ""`)) || !bytes.Contains(file, []byte(fileInfo.ID)) {
		t.Fatalf("key file: %s", file)
	}
	opens := func(k *Keys) error {
		t.Helper()
		r, err := openWith(t, s, k)
		if err != nil {
			return err
		}
		m, err := r.Backup(ctx, "vm1", "latest")
		if err != nil || restoreSHA256(t, r, m, "vda") != want {
			t.Fatalf("restore with %s: %v", k.Kind(), err)
		}
		return nil
	}
	kf := func() *Keys {
		k, err := KeyFileKeys(file)
		if err != nil {
			t.Fatal(err)
		}
		return k
	}
	for _, k := range []*Keys{passwordKeys(t, "first"), passwordKeys(t, "second"), kf()} {
		if err := opens(k); err != nil {
			t.Fatalf("%s: %v", k.Kind(), err)
		}
	}
	if _, err := KeyFileKeys([]byte(`{"nbdmover_key_file":1}`)); err == nil {
		t.Fatal("a key file without a secret was accepted")
	}

	// passwd: the old password stops working, the new one works.
	r1, _ := openWith(t, s, passwordKeys(t, "first"))
	if _, err := r1.ChangePassword(ctx, []byte("first, changed")); err != nil {
		t.Fatal(err)
	}
	if err := opens(passwordKeys(t, "first")); !errors.Is(err, ErrWrongPassword) {
		t.Fatalf("old password after passwd: %v", err)
	}
	if err := opens(passwordKeys(t, "first, changed")); err != nil {
		t.Fatal(err)
	}
	// A key file has no password to change.
	rk, _ := openWith(t, s, kf())
	if _, err := rk.ChangePassword(ctx, []byte("x")); err == nil {
		t.Fatal("passwd through a key file")
	}

	// remove: not the key in use, not an unknown one; a removed key
	// stops opening the repository.
	r2, _ := openWith(t, s, passwordKeys(t, "second"))
	keys, _ = r2.Keys(ctx)
	var current, other string
	for _, k := range keys {
		if k.Current {
			current = k.ID
		} else if k.Kind == "password" {
			other = k.ID
		}
	}
	if err := r2.RemoveKey(ctx, current); err == nil || !strings.Contains(err.Error(), "another key") {
		t.Fatalf("removed the key in use: %v", err)
	}
	if err := r2.RemoveKey(ctx, "0123456789abcdef"); err == nil {
		t.Fatal("removed an unknown key")
	}
	if err := r2.RemoveKey(ctx, "../config"); err == nil {
		t.Fatal("a bad key id was accepted")
	}
	if err := r2.RemoveKey(ctx, other); err != nil {
		t.Fatal(err)
	}
	if err := opens(passwordKeys(t, "first, changed")); !errors.Is(err, ErrWrongPassword) {
		t.Fatalf("a removed key opened the repository: %v", err)
	}
	if err := r2.RemoveKey(ctx, fileInfo.ID); err != nil {
		t.Fatal(err)
	}
	if err := opens(kf()); err == nil || !strings.Contains(err.Error(), "removed") {
		t.Fatalf("a removed key file: %v", err)
	}
	// The last key is the one in use: it cannot be removed.
	keys, _ = r2.Keys(ctx)
	if len(keys) != 1 || r2.RemoveKey(ctx, keys[0].ID) == nil {
		t.Fatalf("the last key: %+v", keys)
	}
}

// Two hosts with different keys of one repository deduplicate into it.
func TestEncryptedDedupAcrossKeys(t *testing.T) {
	fastKDF(t)
	ctx := t.Context()
	s := localStore(t)
	r := initEncrypted(t, s, "host1")
	_, file, err := r.AddKeyFile(ctx, "host2")
	if err != nil {
		t.Fatal(err)
	}
	ds := putChunks(t, r, 1, 2, 3)
	commitChunks(t, r, "vm1", testTime(0), ds)
	before := chunkKeys(t, s)
	k2, _ := KeyFileKeys(file)
	r2, err := openWith(t, s, k2)
	if err != nil {
		t.Fatal(err)
	}
	ds2 := putChunks(t, r2, 1, 2, 3)
	if ds2[0] != ds[0] || ds2[2] != ds[2] {
		t.Fatal("two keys of one repository name equal chunks differently")
	}
	commitChunks(t, r2, "vm2", testTime(1), ds2)
	if after := chunkKeys(t, s); len(after) != len(before) || len(after) != 3 {
		t.Fatalf("chunks: %d before, %d after", len(before), len(after))
	}
	// Another repository's key names the same data differently.
	other := initEncrypted(t, localStore(t), "host1")
	if putChunks(t, other, 1)[0] == ds[0] {
		t.Fatal("two repositories share chunk names")
	}
}

// resign fixes a blob's CRC after a change, as an attacker would.
func resign(b []byte) {
	binary.LittleEndian.PutUint32(b[16:], crc32.Checksum(b[chunker.HeaderSize:], crc32.MakeTable(crc32.Castagnoli)))
}

// A flipped bit in a chunk, an index, a manifest or a key object, a blob
// copied over another's name, and a changed config are each detected and
// named.
func TestEncryptedTampering(t *testing.T) {
	fastKDF(t)
	for _, st := range storeKinds {
		t.Run(st.name, func(t *testing.T) {
			ctx := t.Context()
			s := st.new(t)
			r := initEncrypted(t, s, "pw")
			ds := putChunks(t, r, 1, 2)
			m := commitChunks(t, r, "vm1", testTime(0), ds)
			tamper := func(key string, f func(b []byte)) (restore func()) {
				t.Helper()
				orig, err := s.Get(ctx, key, nil, 1<<30)
				if err != nil {
					t.Fatal(err)
				}
				b := bytes.Clone(orig)
				f(b)
				if err := s.Put(ctx, key, b); err != nil {
					t.Fatal(err)
				}
				return func() { s.Put(ctx, key, orig) }
			}
			flip := func(b []byte) { b[len(b)-20] ^= 4; resign(b) }
			problems := func() []Problem {
				t.Helper()
				var ps []Problem
				if _, err := r.Verify(ctx, VerifyOptions{ReadData: true}, func(p Problem) { ps = append(ps, p) }); err != nil {
					t.Fatal(err)
				}
				return ps
			}
			expect := func(what, key, check string) {
				t.Helper()
				ps := problems()
				for _, p := range ps {
					if p.Object == key && strings.Contains(p.Problem, check) {
						return
					}
				}
				t.Fatalf("%s: verify reported %+v, want %s with %q", what, ps, key, check)
			}
			if ps := problems(); len(ps) != 0 {
				t.Fatalf("clean repository: %+v", ps)
			}

			undo := tamper(ChunkKey(ds[0]), flip)
			expect("flipped chunk bit", ChunkKey(ds[0]), "auth")
			if err := readDisk(ctx, r, m, "vda", discard{}); err == nil || !strings.Contains(err.Error(), ChunkKey(ds[0])) {
				t.Fatalf("restore of a tampered chunk: %v", err)
			}
			undo()

			// Chunk 1's blob stored under chunk 0's name.
			blob1, _ := s.Get(ctx, ChunkKey(ds[1]), nil, 1<<30)
			orig0, _ := s.Get(ctx, ChunkKey(ds[0]), nil, 1<<30)
			s.Put(ctx, ChunkKey(ds[0]), blob1)
			expect("swapped chunk", ChunkKey(ds[0]), "another name")
			s.Put(ctx, ChunkKey(ds[0]), orig0)

			ix := m.Disks[0].Index[0].Objects[0]
			undo = tamper(ix, flip)
			expect("flipped index bit", ix, "auth")
			undo()

			undo = tamper(m.Key(), flip)
			expect("flipped manifest bit", m.Key(), "auth")
			undo()

			// A manifest copied to another domain's name.
			mb, _ := s.Get(ctx, m.Key(), nil, 1<<30)
			fake := ManifestKey("vm2", m.ID)
			s.Put(ctx, fake, mb)
			expect("copied manifest", fake, "auth")
			s.Delete(ctx, fake)
			if ps := problems(); len(ps) != 0 {
				t.Fatalf("restored repository: %+v", ps)
			}

			// A key object: the password matches, the wrapped key does not.
			keys, _ := r.Keys(ctx)
			kkey := keyObjectKey(keys[0].ID)
			undo = tamper(kkey, func(b []byte) {
				var o keyObject
				json.Unmarshal(b, &o)
				o.Wrapped[3] ^= 1
				nb, _ := json.Marshal(o)
				copy(b, make([]byte, len(b)))
				copy(b, nb)
				for i := len(nb); i < len(b); i++ {
					b[i] = ' '
				}
			})
			if _, err := openWith(t, s, passwordKeys(t, "pw")); err == nil || !strings.Contains(err.Error(), kkey) || errors.Is(err, ErrWrongPassword) {
				t.Fatalf("flipped key object bit: %v", err)
			}
			undo()
			// Another key object that no longer parses: verify names it.
			other, err := r.AddPasswordKey(ctx, "other", []byte("other"))
			if err != nil {
				t.Fatal(err)
			}
			undo = tamper(keyObjectKey(other.ID), func(b []byte) { b[0] = '[' })
			expect("damaged key object", keyObjectKey(other.ID), "damaged")
			undo()

			// The config: another chunk size, or encryption turned off.
			undo = tamper(configKey, func(b []byte) { copy(b[bytes.Index(b, []byte(`"chunk_size": 262144`)):], `"chunk_size": 524288`) })
			if _, err := openWith(t, s, passwordKeys(t, "pw")); err == nil || !strings.Contains(err.Error(), "config") {
				t.Fatalf("changed config: %v", err)
			}
			undo()
			if _, err := openWith(t, s, passwordKeys(t, "pw")); err != nil {
				t.Fatal(err)
			}
		})
	}
}

// The key objects are plain JSON that an independent reader can follow
// from docs/format.md; init writes the key before the config.
func TestKeyObjectFormat(t *testing.T) {
	fastKDF(t)
	dir := t.TempDir()
	s, _ := sink.NewLocal(dir)
	initEncrypted(t, s, "pw")
	matches, _ := filepath.Glob(filepath.Join(dir, "keys", "*"))
	if len(matches) != 1 {
		t.Fatalf("keys: %v", matches)
	}
	b, _ := os.ReadFile(matches[0])
	var o keyObject
	if err := strictUnmarshal(b, &o); err != nil || o.KDF.Name != "argon2id" || len(o.KDF.Salt) != 16 || len(o.Nonce) != 12 || len(o.Wrapped) != masterLen+16 {
		t.Fatalf("key object: %v %s", err, b)
	}
}

// testTime is day n of a fixed month.
func testTime(n int) time.Time { return time.Date(2026, 11, 1+n, 12, 0, 0, 0, time.UTC) }
