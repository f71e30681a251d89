package sink_test

import (
	"bytes"
	"context"
	"errors"
	"testing"
	"time"

	"github.com/nbdmover/nbdmover/sink"
	"github.com/nbdmover/nbdmover/sink/sinktest"
)

// Against MinIO with Object Lock: immutable objects are put locked (in
// the same request), mutable ones are not; deleting an object leaves a
// delete marker over its versions, and an immutable one's nobody can
// delete before its date; extending never shortens a lock.
func TestObjectLockStore(t *testing.T) {
	ctx := context.Background()
	s := sinktest.NewS3Lock(t, "r/")
	b, err := s.BucketLock(ctx)
	if err != nil || !b.Enabled || b.Versioning != "Enabled" || b.Default != "" {
		t.Fatalf("bucket lock %+v, %v", b, err)
	}
	plain := sinktest.NewS3(t, "")
	if b, err := plain.BucketLock(ctx); err != nil || b.Enabled || b.Versioning == "Enabled" {
		t.Fatalf("plain bucket: %+v, %v", b, err)
	}
	server, local, err := s.ServerTime(ctx)
	if err != nil || server.Sub(local).Abs() > 2*time.Second {
		t.Fatalf("server time %v, local %v: %v", server, local, err)
	}
	s.SetLock(sink.ObjectLock{Mode: "governance", Period: 8 * time.Second})

	chunk := "chunks/ab/ab00"
	if err := s.Create(ctx, chunk, []byte("chunk")); err != nil {
		t.Fatal(err)
	}
	if err := s.Put(ctx, "locks/shared-1", []byte("lock")); err != nil {
		t.Fatal(err)
	}
	mode, until, err := s.Retention(ctx, chunk, "")
	if err != nil || mode != "governance" || until.Before(time.Now().Add(9*time.Second)) || until.After(time.Now().Add(12*time.Second)) {
		t.Fatalf("chunk retention %q %v (now %v): %v", mode, until, time.Now(), err)
	}
	if mode, until, err := s.Retention(ctx, "locks/shared-1", ""); err != nil || mode != "" || !until.IsZero() {
		t.Fatalf("a lock object has retention %q %v: %v", mode, until, err)
	}
	// A put over a locked object is a new version; the old one stays.
	if err := s.Put(ctx, chunk, []byte("other")); err != nil {
		t.Fatal(err)
	}
	if err := s.Delete(ctx, chunk); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Get(ctx, chunk, nil, 100); !errors.Is(err, sink.ErrNotFound) {
		t.Fatalf("deleted chunk reads: %v", err)
	}
	var vs []sink.Version
	s.Versions(ctx, "chunks/", func(v sink.Version) error { vs = append(vs, v); return nil })
	if len(vs) != 3 || !vs[0].Marker || !vs[0].Latest || vs[1].Marker || vs[2].Marker {
		t.Fatalf("versions after delete: %+v", vs)
	}
	if got, err := s.GetVersion(ctx, chunk, vs[2].ID, nil, 100); err != nil || string(got) != "chunk" {
		t.Fatalf("first version: %q, %v", got, err)
	}
	if n, failed, refused, err := s.DeleteVersions(ctx, vs[1:], false); n != 0 || refused != 2 || len(failed) != 2 || failed[0].Key != chunk || !errors.Is(err, sink.ErrLocked) {
		t.Fatalf("deleting locked versions: %d deleted, %v failed, %d refused, %v", n, failed, refused, err)
	}
	if err := s.Delete(ctx, "locks/shared-1"); err != nil {
		t.Fatal(err)
	}
	var left []sink.Version
	s.Versions(ctx, "locks/", func(v sink.Version) error { left = append(left, v); return nil })
	if len(left) != 2 || !left[0].Marker {
		t.Fatalf("a deleted lock's versions: %+v", left)
	}
	if n, _, _, err := s.DeleteVersions(ctx, left, false); n != 2 || err != nil {
		t.Fatalf("deleting an unlocked version and its marker: %d, %v", n, err)
	}

	// Extend: longer takes; shorter leaves the longer lock.
	if err := s.Put(ctx, "indexes/cd/cd00", []byte("ix")); err != nil {
		t.Fatal(err)
	}
	long := time.Now().Add(time.Minute).Truncate(time.Second)
	if err := s.Extend(ctx, "indexes/cd/cd00", "", long); err != nil {
		t.Fatal(err)
	}
	if err := s.Extend(ctx, "indexes/cd/cd00", "", time.Now().Add(20*time.Second)); err != nil {
		t.Fatalf("a shorter extension: %v", err)
	}
	if _, until, _ := s.Retention(ctx, "indexes/cd/cd00", ""); !until.Equal(long) {
		t.Fatalf("retention %v, want %v", until, long)
	}
	if err := s.Extend(ctx, "indexes/ee/none", "", long); !errors.Is(err, sink.ErrNotFound) {
		t.Fatalf("extending a missing object: %v", err)
	}

	// Once the lock has ended, the versions can go.
	time.Sleep(time.Until(until.Add(time.Second)))
	if n, _, _, err := s.DeleteVersions(ctx, vs, false); n != 3 || err != nil {
		t.Fatalf("deleting expired versions: %d, %v", n, err)
	}
}

// An AsOf view reads each immutable key's version of its time, skips
// later versions and delete markers, writes nothing immutable, and
// passes mutable keys to the current store.
func TestAsOf(t *testing.T) {
	ctx := context.Background()
	s := sinktest.NewS3Lock(t, "")
	put := func(key, v string) {
		t.Helper()
		if err := s.Put(ctx, key, []byte(v)); err != nil {
			t.Fatal(err)
		}
	}
	put("manifests/d/1", "m1 old")
	put("chunks/aa/aa1", "c1")
	time.Sleep(50 * time.Millisecond)
	then := time.Now()
	time.Sleep(50 * time.Millisecond)
	put("manifests/d/1", "m1 overwritten")
	s.Delete(ctx, "chunks/aa/aa1")
	put("chunks/aa/aa2", "planted later")
	put("state/verified", "now")

	a, err := sink.AsOf(sink.Retry(s, sink.DefaultRetry), then)
	if err != nil {
		t.Fatal(err)
	}
	var keys []string
	if err := a.List(ctx, "", func(o sink.ObjectInfo) error { keys = append(keys, o.Key); return nil }); err != nil {
		t.Fatal(err)
	}
	if want := []string{"chunks/aa/aa1", "manifests/d/1", "state/verified"}; !equal(keys, want) {
		t.Fatalf("as-of listing %v, want %v", keys, want)
	}
	for key, want := range map[string]string{"manifests/d/1": "m1 old", "chunks/aa/aa1": "c1", "state/verified": "now"} {
		if got, err := a.Get(ctx, key, nil, 100); err != nil || string(got) != want {
			t.Fatalf("as-of get %s: %q, %v", key, got, err)
		}
	}
	if _, err := a.Get(ctx, "chunks/aa/aa2", nil, 100); !errors.Is(err, sink.ErrNotFound) {
		t.Fatalf("a key made later: %v", err)
	}
	for _, k := range []string{"chunks/aa/aa1", "state/verified", "state/damage/chunks/aa/aa1"} {
		if err := a.Put(ctx, k, []byte("x")); !errors.Is(err, sink.ErrAsOf) {
			t.Fatalf("put %s through as-of: %v", k, err)
		}
	}
	if err := a.Create(ctx, "locks/shared-0123456789abcdef", []byte("x")); err != nil {
		t.Fatalf("a reader's lock through as-of: %v", err)
	}
	if err := sink.DeleteMany(ctx, a, []string{"manifests/d/1"}, 1, nil); !errors.Is(err, sink.ErrAsOf) {
		t.Fatalf("DeleteMany through as-of: %v", err)
	}
	if got, _ := s.Get(ctx, "manifests/d/1", nil, 100); !bytes.Equal(got, []byte("m1 overwritten")) {
		t.Fatalf("current manifest %q", got)
	}
	if _, ok := sink.Versioned(a); ok {
		t.Fatal("an as-of view offers versioned writes")
	}
	if _, err := sink.AsOf(mustLocal(t), then); err == nil {
		t.Fatal("as-of on a local store")
	}
}

func equal(a, b []string) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}

func mustLocal(t *testing.T) sink.Store {
	l, err := sink.NewLocal(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	return l
}
