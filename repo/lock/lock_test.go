package lock

import (
	"context"
	"encoding/json"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/nbdmover/nbdmover/chunker"
	"github.com/nbdmover/nbdmover/sink"
)

// testLocks are locks in a local store in a temporary directory, sealed
// with the repository's meta codec (unencrypted).
func testLocks(t testing.TB) (*Locks, sink.Store) {
	st := sink.NewNull()
	meta := chunker.NewMetaCodec()
	return New(Config{Store: st, Location: "test", Version: 2, MaxObject: 64<<10 + chunker.HeaderSize + 12 + 16 + 1024,
		Fits: func(key string, n int) error {
			if n > 64<<10 {
				return errors.New("too big")
			}
			return nil
		},
		Encode: func(key string, plain []byte) []byte { return meta.Encode(nil, plain, key) },
		Decode: func(key string, blob []byte) ([]byte, error) { return meta.DecodeMeta(nil, blob, key, 64<<10) },
	}), st
}

// Any bytes at a lock's key are a lock of that key's kind and id, damaged
// when they cannot be read: never an error, never another lock.
func FuzzLock(f *testing.F) {
	good, _ := json.Marshal(Info{Version: 2, Kind: Shared, ID: "0123456789abcdef", Host: "h", PID: 1, Heartbeat: time.Now()})
	f.Add(good, true)
	f.Add([]byte("garbage"), false)
	f.Fuzz(func(t *testing.T, b []byte, asBlob bool) {
		s, st := testLocks(t)
		k := key(Shared, "0123456789abcdef")
		if asBlob {
			b = s.c.Encode(k, b)
		}
		st.Put(context.Background(), k, b)
		l, err := s.readLock(context.Background(), sink.ObjectInfo{Key: k, Modified: time.Now()})
		if err != nil {
			t.Fatal(err) // an unreadable lock is a damaged lock, never an error
		}
		if l.Kind != Shared || l.ID != "0123456789abcdef" {
			t.Fatalf("accepted %+v", l)
		}
	})
}

// A lock whose holder's words are huge (anyone may write a lock) can
// still be broken: its tombstone holds them shortened.
func TestBreakHugeHolder(t *testing.T) {
	s, st := testLocks(t)
	ctx := t.Context()
	huge := Info{Version: 2, Kind: Shared, ID: "0123456789abcdef", Purpose: strings.Repeat("<", 60000), Host: "elsewhere", PID: 1,
		Started: time.Now().Add(-time.Hour), Heartbeat: time.Now().Add(-time.Hour)}
	b, _ := json.Marshal(huge)
	st.Put(ctx, key(Shared, huge.ID), s.c.Encode(key(Shared, huge.ID), b))
	saved := Timing
	Timing.Stale = time.Minute
	defer func() { Timing = saved }()
	removed, _, err := s.Unlock(ctx, false)
	if err != nil || len(removed) != 1 {
		t.Fatalf("unlock of a stale lock with a huge purpose: %v %v", removed, err)
	}
	if _, err := st.Stat(ctx, tombstoneKey(huge.ID)); err != nil {
		t.Fatalf("its tombstone: %v", err)
	}
}

// A lock taken, listed, checked and released; a second exclusive locker
// is refused while the first holds it.
func TestTakeListRelease(t *testing.T) {
	s, _ := testLocks(t)
	ctx := t.Context()
	l, lctx, err := s.Take(ctx, Exclusive, "gc", nil)
	if err != nil {
		t.Fatal(err)
	}
	if ls, err := s.List(ctx); err != nil || len(ls) != 1 || ls[0].Purpose != "gc" || ls[0].Key != l.Info().Key || ls[0].Stale(time.Now()) != "" {
		t.Fatalf("list: %+v %v", ls, err)
	}
	if _, err := l.Check(lctx); err != nil {
		t.Fatal(err)
	}
	saved := Timing
	Timing.Poll = time.Millisecond
	defer func() { Timing = saved }()
	if _, _, err := s.Take(ctx, Exclusive, "another gc", nil); !errors.Is(err, ErrLocked) || !strings.Contains(err.Error(), "by another gc") {
		t.Fatalf("a second exclusive lock: %v", err)
	}
	l.Release()
	if ls, err := s.List(ctx); err != nil || len(ls) != 0 {
		t.Fatalf("after release: %+v %v", ls, err)
	}
}
