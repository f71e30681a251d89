// Package sinktest holds what tests of stores and of their users share: the
// conformance suite every sink.Store passes, and Faulty, a store wrapper
// that injects failures no real peer produces on demand.
package sinktest

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nbdmover/nbdmover/sink"
	"golang.org/x/sync/errgroup"
)

// RequirePeers reports whether a test whose real peer (MinIO, libvirtd) is
// missing must fail rather than skip: make test sets it.
func RequirePeers() bool { return os.Getenv("NBDMOVER_TEST_REQUIRE_PEERS") != "" }

// S3Endpoint returns the test MinIO endpoint, skipping (or failing, under
// RequirePeers) when there is none.
func S3Endpoint(t testing.TB) string {
	t.Helper()
	ep := os.Getenv("NBDMOVER_TEST_S3_ENDPOINT")
	if ep == "" {
		if RequirePeers() {
			t.Fatal("NBDMOVER_TEST_S3_ENDPOINT is not set: run the tests with make test")
		}
		t.Skip("no MinIO: NBDMOVER_TEST_S3_ENDPOINT is not set (make test starts one)")
	}
	return ep
}

// NewS3 returns a store in a new, empty bucket of the test MinIO.
func NewS3(t testing.TB, prefix string) *sink.S3 {
	t.Helper()
	return newS3(t, prefix, false)
}

// NewS3Lock is NewS3 with a bucket made with Object Lock (and so
// versioning) enabled.
func NewS3Lock(t testing.TB, prefix string) *sink.S3 {
	t.Helper()
	return newS3(t, prefix, true)
}

func newS3(t testing.TB, prefix string, objectLock bool) *sink.S3 {
	t.Helper()
	ep := S3Endpoint(t)
	bucket := fmt.Sprintf("test-%d-%08x", time.Now().UnixNano()%1e9, rand.Uint32())
	s, err := sink.NewS3(sink.S3Options{Endpoint: ep, Bucket: bucket, Prefix: prefix})
	if err != nil {
		t.Fatal(err)
	}
	if err := s.CreateBucket(t.Context(), objectLock); err != nil {
		t.Fatal(err)
	}
	return s
}

func fill(n int, seed uint64) []byte {
	r := rand.New(rand.NewPCG(seed, 1))
	p := make([]byte, n)
	for i := range p {
		p[i] = byte(r.Uint32())
	}
	return p
}

func listKeys(t *testing.T, s sink.Store, prefix string) []string {
	t.Helper()
	var keys []string
	if err := s.List(t.Context(), prefix, func(o sink.ObjectInfo) error {
		keys = append(keys, o.Key)
		return nil
	}); err != nil {
		t.Fatalf("list %q: %v", prefix, err)
	}
	sort.Strings(keys)
	return keys
}

// TestStore runs the conformance suite on an empty store from newStore.
func TestStore(t *testing.T, newStore func(t *testing.T) sink.Store) {
	t.Run("PutGetStat", func(t *testing.T) {
		s := newStore(t)
		ctx := t.Context()
		for _, n := range []int{0, 1, 4097, 4 << 20, 16<<20 + 20} {
			key := fmt.Sprintf("chunks/ab/obj-%d", n)
			data := fill(n, uint64(n))
			if err := s.Put(ctx, key, data); err != nil {
				t.Fatal(err)
			}
			buf := make([]byte, 10, 100)
			got, err := s.Get(ctx, key, buf, 1<<30)
			if err != nil || !bytes.Equal(got, data) {
				t.Fatalf("get %s: %v (%d bytes, want %d)", key, err, len(got), n)
			}
			info, err := s.Stat(ctx, key)
			if err != nil || info.Size != int64(n) || info.Key != key {
				t.Fatalf("stat %s: %+v %v", key, info, err)
			}
		}
	})
	t.Run("Overwrite", func(t *testing.T) {
		s := newStore(t)
		ctx := t.Context()
		for _, v := range []string{"first, longer version", "second"} {
			if err := s.Put(ctx, "backups/vm/manifest.json", []byte(v)); err != nil {
				t.Fatal(err)
			}
			got, err := s.Get(ctx, "backups/vm/manifest.json", nil, 1<<30)
			if err != nil || string(got) != v {
				t.Fatalf("got %q %v, want %q", got, err, v)
			}
		}
	})
	t.Run("Missing", func(t *testing.T) {
		s := newStore(t)
		ctx := t.Context()
		if _, err := s.Get(ctx, "nope/x", nil, 1<<30); !errors.Is(err, sink.ErrNotFound) {
			t.Errorf("get missing: %v", err)
		}
		if _, err := s.Stat(ctx, "nope/x"); !errors.Is(err, sink.ErrNotFound) {
			t.Errorf("stat missing: %v", err)
		}
		if err := s.Delete(ctx, "nope/x"); err != nil {
			t.Errorf("delete missing: %v", err)
		}
		s.Put(ctx, "a/b", []byte("x"))
		if err := s.Delete(ctx, "a/b"); err != nil {
			t.Fatal(err)
		}
		if _, err := s.Get(ctx, "a/b", nil, 1<<30); !errors.Is(err, sink.ErrNotFound) {
			t.Errorf("get deleted: %v", err)
		}
		if _, err := s.Stat(ctx, "a"); !errors.Is(err, sink.ErrNotFound) {
			t.Errorf("stat of a key prefix: %v", err)
		}
	})
	t.Run("Limit", func(t *testing.T) {
		// An object larger than the reader's limit is a damaged object,
		// reported with its size and never read into memory.
		s := newStore(t)
		ctx := t.Context()
		data := fill(4097, 7)
		if err := s.Put(ctx, "locks/big", data); err != nil {
			t.Fatal(err)
		}
		if got, err := s.Get(ctx, "locks/big", nil, 4097); err != nil || !bytes.Equal(got, data) {
			t.Fatalf("get at the limit: %v", err)
		}
		_, err := s.Get(ctx, "locks/big", nil, 4096)
		if !errors.Is(err, sink.ErrDamaged) || errors.Is(err, sink.ErrNotFound) || sink.IsTransient(err) ||
			!strings.Contains(err.Error(), "4097 bytes") || !strings.Contains(err.Error(), "locks/big") {
			t.Fatalf("get over the limit: %v", err)
		}
	})
	t.Run("List", func(t *testing.T) {
		s := newStore(t)
		ctx := t.Context()
		keys := []string{"config", "backups/vm1/1/manifest.json", "backups/vm1/1/vda.index",
			"backups/vm10/1/manifest.json", "chunks/00/aa", "chunks/ff/bb"}
		for _, k := range keys {
			if err := s.Put(ctx, k, []byte(k)); err != nil {
				t.Fatal(err)
			}
		}
		for prefix, want := range map[string][]string{
			"":             keys,
			"backups/vm1/": {"backups/vm1/1/manifest.json", "backups/vm1/1/vda.index"},
			"backups/vm1":  {"backups/vm1/1/manifest.json", "backups/vm1/1/vda.index", "backups/vm10/1/manifest.json"},
			"chunks/":      {"chunks/00/aa", "chunks/ff/bb"},
			"chunks/f":     {"chunks/ff/bb"},
			"nothing/":     nil,
		} {
			want = append([]string(nil), want...)
			sort.Strings(want)
			if got := listKeys(t, s, prefix); strings.Join(got, " ") != strings.Join(want, " ") {
				t.Errorf("list %q: got %v, want %v", prefix, got, want)
			}
		}
		stop := errors.New("stop")
		n := 0
		err := s.List(ctx, "", func(sink.ObjectInfo) error { n++; return stop })
		if err != stop || n != 1 {
			t.Errorf("a callback error must stop the listing and come back unchanged: %v after %d", err, n)
		}
	})
	t.Run("InvalidKeys", func(t *testing.T) {
		s := newStore(t)
		for _, k := range []string{"", "/abs", "../up", "a/../b", "a//b", "a/./b", "a/", ".tmp-x", "a b", "a\\b", "é"} {
			if err := s.Put(t.Context(), k, []byte("x")); err == nil {
				t.Errorf("put %q accepted", k)
			}
			if _, err := s.Get(t.Context(), k, nil, 1<<30); err == nil || errors.Is(err, sink.ErrNotFound) {
				t.Errorf("get %q: %v, want a validation error", k, err)
			}
		}
	})
	t.Run("Concurrent", func(t *testing.T) {
		s := newStore(t)
		g, ctx := errgroup.WithContext(t.Context())
		for i := range 64 {
			g.Go(func() error {
				key := fmt.Sprintf("chunks/%02x/obj-%d", i%4, i)
				if err := s.Put(ctx, key, fill(64<<10, uint64(i))); err != nil {
					return err
				}
				got, err := s.Get(ctx, key, nil, 1<<30)
				if err == nil && !bytes.Equal(got, fill(64<<10, uint64(i))) {
					err = fmt.Errorf("%s: wrong bytes", key)
				}
				return err
			})
		}
		if err := g.Wait(); err != nil {
			t.Fatal(err)
		}
		if n := len(listKeys(t, s, "chunks/")); n != 64 {
			t.Fatalf("listed %d objects, want 64", n)
		}
	})
	t.Run("Create", func(t *testing.T) {
		s := newStore(t)
		ctx := t.Context()
		if err := s.Create(ctx, "locks/a", []byte("first")); err != nil {
			t.Fatal(err)
		}
		if err := s.Create(ctx, "locks/a", []byte("second")); !errors.Is(err, sink.ErrExists) {
			t.Fatalf("create over an object: %v", err)
		}
		if got, err := s.Get(ctx, "locks/a", nil, 1<<30); err != nil || string(got) != "first" {
			t.Fatalf("after a refused create: %q %v", got, err)
		}
		// Of concurrent creates of one key, exactly one wins, and its
		// data is what is stored.
		var wins sync.Map
		g, gctx := errgroup.WithContext(ctx)
		for i := range 16 {
			g.Go(func() error {
				err := s.Create(gctx, "config", []byte(fmt.Sprint("host-", i)))
				if err == nil {
					wins.Store(i, true)
				} else if !errors.Is(err, sink.ErrExists) {
					return err
				}
				return nil
			})
		}
		if err := g.Wait(); err != nil {
			t.Fatal(err)
		}
		var winner []int
		wins.Range(func(k, _ any) bool { winner = append(winner, k.(int)); return true })
		got, _ := s.Get(ctx, "config", nil, 1<<30)
		if len(winner) != 1 || string(got) != fmt.Sprint("host-", winner[0]) {
			t.Fatalf("winners %v, stored %q", winner, got)
		}
		if keys := listKeys(t, s, ""); len(keys) != 2 {
			t.Fatalf("objects after the creates: %v", keys)
		}
	})
	t.Run("DeleteManyAndModified", func(t *testing.T) {
		s := newStore(t)
		ctx := t.Context()
		before := time.Now().Add(-time.Minute) // S3's clock is the server's
		var keys []string
		for i := range 2100 { // more than one S3 batch of 1000
			keys = append(keys, fmt.Sprintf("chunks/%02x/k%04d", i%7, i))
		}
		keep := "chunks/00/keep"
		for _, k := range append(keys[:300:300], keep) {
			if err := s.Put(ctx, k, []byte(k)); err != nil {
				t.Fatal(err)
			}
		}
		var listed int
		s.List(ctx, "chunks/", func(o sink.ObjectInfo) error {
			if listed++; o.Modified.Before(before) || o.Modified.After(time.Now().Add(time.Minute)) {
				t.Errorf("%s: modified %v", o.Key, o.Modified)
			}
			return nil
		})
		if info, err := s.Stat(ctx, keep); err != nil || info.Modified.Before(before) {
			t.Fatalf("stat: %+v %v", info, err)
		}
		var done atomic.Int64
		// 300 of the keys exist, the others are missing: not an error.
		if err := sink.DeleteMany(ctx, s, keys, 4, func(n int) { done.Add(int64(n)) }); err != nil {
			t.Fatal(err)
		}
		if got := listKeys(t, s, "chunks/"); len(got) != 1 || got[0] != keep || done.Load() != int64(len(keys)) {
			t.Fatalf("after DeleteMany: %v, %d reported done", got, done.Load())
		}
		if err := sink.DeleteMany(ctx, s, []string{"../x"}, 1, nil); err == nil {
			t.Fatal("DeleteMany took a bad key")
		}
	})
	t.Run("Cancelled", func(t *testing.T) {
		s := newStore(t)
		ctx, cancel := context.WithCancel(t.Context())
		cancel()
		if err := s.Put(ctx, "x", []byte("x")); err == nil {
			t.Error("put with a cancelled context succeeded")
		}
		if _, err := s.Get(ctx, "x", nil, 1<<30); err == nil {
			t.Error("get with a cancelled context succeeded")
		}
	})
}

// Faulty wraps a store and injects failures. Its fields may be set before
// use; it is safe for concurrent use.
type Faulty struct {
	sink.Store
	// Fail, when set, is asked before each operation (op is "put",
	// "create", "get", "stat", "list", "delete"; n counts calls for that
	// op and key from 1)
	// and injects the error it returns.
	Fail func(op, key string, n int) error
	// Truncate, when set, says how many bytes to cut from the end of what a
	// Get returns, without an error: a short read.
	Truncate func(key string) int
	// Delay is added to every operation.
	Delay time.Duration

	mu    sync.Mutex
	calls map[string]int
}

func (f *Faulty) before(ctx context.Context, op, key string) error {
	f.mu.Lock()
	if f.calls == nil {
		f.calls = map[string]int{}
	}
	f.calls[op+" "+key]++
	n := f.calls[op+" "+key]
	f.mu.Unlock()
	if f.Delay > 0 {
		select {
		case <-time.After(f.Delay):
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	if f.Fail != nil {
		return f.Fail(op, key, n)
	}
	return nil
}

// Calls returns how often op was called on key.
func (f *Faulty) Calls(op, key string) int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.calls[op+" "+key]
}

func (f *Faulty) Put(ctx context.Context, key string, data []byte) error {
	if err := f.before(ctx, "put", key); err != nil {
		return err
	}
	return f.Store.Put(ctx, key, data)
}

func (f *Faulty) Create(ctx context.Context, key string, data []byte) error {
	if err := f.before(ctx, "create", key); err != nil {
		return err
	}
	return f.Store.Create(ctx, key, data)
}

func (f *Faulty) Get(ctx context.Context, key string, buf []byte, limit int64) ([]byte, error) {
	if err := f.before(ctx, "get", key); err != nil {
		return nil, err
	}
	out, err := f.Store.Get(ctx, key, buf, limit)
	if err == nil && f.Truncate != nil {
		out = out[:max(0, len(out)-f.Truncate(key))]
	}
	return out, err
}

func (f *Faulty) Stat(ctx context.Context, key string) (sink.ObjectInfo, error) {
	if err := f.before(ctx, "stat", key); err != nil {
		return sink.ObjectInfo{}, err
	}
	return f.Store.Stat(ctx, key)
}

func (f *Faulty) List(ctx context.Context, prefix string, fn func(sink.ObjectInfo) error) error {
	if err := f.before(ctx, "list", prefix); err != nil {
		return err
	}
	return f.Store.List(ctx, prefix, fn)
}

func (f *Faulty) Delete(ctx context.Context, key string) error {
	if err := f.before(ctx, "delete", key); err != nil {
		return err
	}
	return f.Store.Delete(ctx, key)
}

// Transient returns an injected transient store error.
func Transient(op, key string) error {
	return &sink.Error{Op: op, Key: key, Location: "faulty", Transient: true, Err: errors.New("injected transient failure")}
}

// Permanent returns an injected permanent store error.
func Permanent(op, key string) error {
	return &sink.Error{Op: op, Key: key, Location: "faulty", Err: errors.New("injected permanent failure")}
}

// Counting counts the requests a store gets, by kind (deletes are not
// counted; a List counts one request per 1000 keys it returns, as S3
// pages them). It unwraps, so that the store beneath stays visible to
// sink.Remote and to sink.DeleteMany's multi-object delete; calls that
// look through wrappers that way (DeleteMany, PutDeferred on a local
// store) are not counted.
type Counting struct {
	sink.Store
	Lists, Gets, Puts, Creates, Stats atomic.Int64
}

func (c *Counting) Unwrap() sink.Store { return c.Store }

func (c *Counting) Stat(ctx context.Context, key string) (sink.ObjectInfo, error) {
	c.Stats.Add(1)
	return c.Store.Stat(ctx, key)
}

func (c *Counting) List(ctx context.Context, prefix string, fn func(sink.ObjectInfo) error) error {
	c.Lists.Add(1)
	n := 0
	return c.Store.List(ctx, prefix, func(o sink.ObjectInfo) error {
		if n++; n%1000 == 0 {
			c.Lists.Add(1)
		}
		return fn(o)
	})
}

func (c *Counting) Get(ctx context.Context, key string, buf []byte, limit int64) ([]byte, error) {
	c.Gets.Add(1)
	return c.Store.Get(ctx, key, buf, limit)
}

func (c *Counting) Put(ctx context.Context, key string, data []byte) error {
	c.Puts.Add(1)
	return c.Store.Put(ctx, key, data)
}

func (c *Counting) Create(ctx context.Context, key string, data []byte) error {
	c.Creates.Add(1)
	return c.Store.Create(ctx, key, data)
}
