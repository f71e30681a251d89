package repo

import (
	"context"
	"encoding/json"
	"testing"

	"github.com/nbdmover/nbdmover/sink"
)

// Fuzz targets for every reader of a repository object that a writer of
// the repository controls (the blob codec, index objects and manifests
// have theirs in chunker, repo/index and repo_test.go): each stores the fuzzer's
// bytes where the object belongs, in an in-memory store, and reads it the
// way nbdmover does. None may panic, hang or accept what it must not.

// fuzzRepo is a repository in memory whose config is sound.
func fuzzRepo(t *testing.T) *Repo {
	r, err := initStore(context.Background(), sink.NewNull(), InitOptions{ChunkSize: 256 << 10})
	if err != nil {
		t.Fatal(err)
	}
	return r
}

func FuzzConfig(f *testing.F) {
	good, _ := json.Marshal(Config{Version: formatVersion, ID: "0123456789abcdef0123456789abcdef", ChunkSize: 1 << 20, Digest: "sha256", Compression: "zstd"})
	f.Add(good)
	f.Add([]byte(`{"version":2,"chunk_size":1048576,"digest":"hmac-sha256","compression":"zstd","encryption":{"cipher":"aes-256-gcm","names":"hmac-sha256","password_cost":{"time":1,"memory_kib":8192,"threads":1}}}`))
	f.Add([]byte(`{"version":1}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		s := sink.NewNull()
		s.Put(context.Background(), configKey, b)
		r, err := openStore(context.Background(), s)
		if err != nil {
			return
		}
		if c := r.Config(); c.Version != formatVersion || c.ChunkSize < 256<<10 || c.ChunkSize > 16<<20 || c.Encryption != nil {
			t.Fatalf("opened %+v", c)
		}
	})
}

func FuzzKeyObject(f *testing.F) {
	o := keyObject{Version: formatVersion, ID: "0123456789abcdef", Kind: "password", KDF: KDF{Name: kdfArgon2id, Time: 1, MemoryKiB: 8 << 10, Threads: 1, Salt: make([]byte, 16)}}
	good, _ := json.Marshal(o)
	f.Add(good)
	f.Add([]byte(`{"version":2,"id":"0123456789abcdef","kind":"key-file","kdf":{"name":"hkdf-sha256","salt":"AAAAAAAAAAAAAAAAAAAAAA=="}}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		s := sink.NewNull()
		key := keyObjectKey("0123456789abcdef")
		s.Put(context.Background(), key, b)
		o, err := readKeyObject(context.Background(), s, key)
		if err != nil {
			return
		}
		if o.ID != "0123456789abcdef" || o.Kind != "password" && o.Kind != "key-file" {
			t.Fatalf("accepted %+v", o)
		}
		// Deriving from it is bounded: the cap refuses what costs more.
		if aboveCap(o, passwordCap(Config{})) == "" && (o.KDF.Time > 20 || o.KDF.MemoryKiB > 256<<10) {
			t.Fatalf("a key object of cost %+v passes the cap", o.KDF)
		}
	})
}

func FuzzCatalog(f *testing.F) {
	f.Add([]byte(`{"version":2,"domain":"vm1","manifests":{},"sizes":{}}`))
	f.Add([]byte(`{"version":2,"domain":"vm1","manifests":{"manifests/vm1/x":null},"sizes":{}}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		r := fuzzRepo(t)
		key := catalogKey("vm1", "20261128T040000.000Z")
		r.store.Put(context.Background(), key, r.encodeMeta(key, b))
		c, err := r.loadCatalog(context.Background(), key, "vm1")
		if err != nil {
			return
		}
		for k, m := range c.Manifests {
			if m == nil || m.Key() != k || m.Domain != "vm1" || m.check() != nil {
				t.Fatalf("accepted entry %s: %+v", k, m)
			}
		}
	})
}

func FuzzDamageRecord(f *testing.F) {
	f.Add([]byte(`{"version":2,"object":"chunks/ab/ab","problem":"missing","backups":["vm1/20261128T040000.000Z"],"backup_count":1}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		r := fuzzRepo(t)
		key := damageKey("chunks/ab/ab" + "0123456789abcdef0123456789abcdef0123456789abcdef0123456789ab")
		r.store.Put(context.Background(), key, r.encodeMeta(key, b))
		r.readRecord(context.Background(), key)
		if _, _, err := r.Damage(context.Background()); err != nil {
			t.Fatalf("an unreadable damage record failed the listing: %v", err)
		}
	})
}

func FuzzVerifiedState(f *testing.F) {
	good, _ := json.Marshal(verifiedState{Version: formatVersion, Parts: sampleParts, Read: make([]int64, sampleParts)})
	f.Add(good)
	f.Add([]byte(`{"version":2,"parts":4096,"read":[1,2]}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		r := fuzzRepo(t)
		r.store.Put(context.Background(), verifiedKey, r.encodeMeta(verifiedKey, b))
		st, err := r.loadVerified(context.Background(), nil)
		if err != nil {
			t.Fatal(err)
		}
		if st.Parts != sampleParts || len(st.Read) != sampleParts {
			t.Fatalf("accepted %d parts, %d times", st.Parts, len(st.Read))
		}
	})
}

func FuzzV1Manifest(f *testing.F) {
	f.Add([]byte(`{"version":1,"id":"20261128T040000.000Z","domain":"vm1","chunk_size":1048576,"disks":[{"name":"vda","size":1,"index":"vda.index"}]}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		s := sink.NewNull()
		key := "backups/vm1/20261128T040000.000Z/manifest.json"
		s.Put(context.Background(), key, b)
		m, err := v1Load(context.Background(), s, key)
		if err != nil {
			return
		}
		for _, d := range m.Disks {
			if ValidName("disk", d.Name) != nil || d.Index != d.Name+".index" {
				t.Fatalf("accepted disk %+v", d)
			}
			// The index's bound follows from the disk: never a panic.
			v1LoadIndex(context.Background(), s, m, d)
		}
	})
}

func FuzzV1Index(f *testing.F) {
	f.Add(make([]byte, v1IndexHeaderSize+64))
	f.Fuzz(func(t *testing.T, b []byte) {
		ix, err := v1UnmarshalIndex(b)
		if err != nil {
			return
		}
		count, prev := ix.Count(), int64(-1)
		for k := range ix.Len() {
			i, _ := ix.At(k)
			if i < 0 || i >= count || i <= prev {
				t.Fatalf("accepted entry %d: chunk %d of %d", k, i, count)
			}
			prev = i
		}
	})
}
