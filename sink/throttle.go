package sink

import (
	"context"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// Rate paces transfers to a number of bytes per second, shared by
// everything that uses it (every goroutine of a command, every job of the
// daemon). A transfer of n bytes takes the next n/rate of the rate's
// time line and waits for the end of its slot before it goes, so by any
// moment no more has gone than the rate allows since the first transfer,
// less nothing saved up while idle: over any window, at most one
// transfer (an object, a chunk of 1 MiB by default) more than rate x
// window.
type Rate struct {
	perSec float64
	mu     sync.Mutex
	next   time.Time // where the time line's free part starts
}

// NewRate returns a Rate of bytesPerSec (nil when it is 0: no limit;
// at least 1 KiB/s).
func NewRate(bytesPerSec int64) *Rate {
	if bytesPerSec <= 0 {
		return nil
	}
	return &Rate{perSec: float64(max(bytesPerSec, 1<<10))}
}

// BytesPerSecond is the rate (0 for none).
func (r *Rate) BytesPerSecond() int64 {
	if r == nil {
		return 0
	}
	return int64(r.perSec)
}

// Wait waits until n more bytes may go, or ctx ends (then the time it
// took on the line is given back).
func (r *Rate) Wait(ctx context.Context, n int) error {
	until, d := r.reserve(n)
	if d == 0 {
		return nil
	}
	if err := sleepCtx(ctx, time.Until(until)); err != nil {
		r.giveBack(until, d)
		return err
	}
	return nil
}

// reserve takes the next n bytes' time on the line: it returns the end
// of the slot and its length (0: nothing to wait for).
func (r *Rate) reserve(n int) (time.Time, time.Duration) {
	if r == nil || n <= 0 {
		return time.Time{}, 0
	}
	d := time.Duration(min(float64(n)/r.perSec, 24*3600) * float64(time.Second))
	r.mu.Lock()
	defer r.mu.Unlock()
	now := time.Now()
	if r.next.Before(now) {
		r.next = now // idle time is not saved up for a burst
	}
	r.next = r.next.Add(d)
	return r.next, d
}

// giveBack returns a slot that was not used (a cancelled wait, a read
// that found nothing) when no later one was taken after it; otherwise
// the later ones keep their places, and the line is that much behind.
func (r *Rate) giveBack(until time.Time, d time.Duration) {
	if r == nil || d == 0 {
		return
	}
	r.mu.Lock()
	if r.next.Equal(until) {
		r.next = r.next.Add(-d)
	}
	r.mu.Unlock()
}

// Throttle returns s with what is stored (Put, Create, PutDeferred) paced
// by up and what is read (Get) by down; either may be nil. Lock objects
// ("locks/...") are never paced: a heartbeat must not queue behind the
// chunks, or a slow limit would cost the lock.
func Throttle(s Store, up, down *Rate) Store {
	if up == nil && down == nil {
		return s
	}
	return &throttleStore{Store: s, up: up, down: down}
}

type throttleStore struct {
	Store
	up, down *Rate
	// last is the size of the last object read: a read reserves that
	// much before it goes (its size is unknown until it is read) and the
	// rest, if larger, after.
	last atomic.Int64
}

func (t *throttleStore) Unwrap() Store { return t.Store }

// paced says whether an object's transfer waits for the rate.
func paced(key string) bool { return !strings.HasPrefix(key, "locks/") }

func (t *throttleStore) Put(ctx context.Context, key string, data []byte) error {
	if paced(key) {
		if err := t.up.Wait(ctx, len(data)); err != nil {
			return err
		}
	}
	return t.Store.Put(ctx, key, data)
}

func (t *throttleStore) Create(ctx context.Context, key string, data []byte) error {
	if paced(key) {
		if err := t.up.Wait(ctx, len(data)); err != nil {
			return err
		}
	}
	return t.Store.Create(ctx, key, data)
}

// PutDeferred, SyncLater and Sync: the local store's chunks and indexes
// are put deferred (sink.PutDeferred), and paced as any put.
func (t *throttleStore) PutDeferred(ctx context.Context, key string, data []byte) error {
	if err := t.up.Wait(ctx, len(data)); err != nil {
		return err
	}
	return PutDeferred(ctx, t.Store, key, data)
}

func (t *throttleStore) SyncLater(key string) { SyncLater(t.Store, key) }

func (t *throttleStore) Sync(ctx context.Context) error { return Sync(ctx, t.Store) }

func (t *throttleStore) Get(ctx context.Context, key string, buf []byte, limit int64) ([]byte, error) {
	if t.down == nil || !paced(key) {
		return t.Store.Get(ctx, key, buf, limit)
	}
	est := int(t.last.Load())
	until, d := t.down.reserve(est)
	if err := sleepCtx(ctx, time.Until(until)); err != nil {
		t.down.giveBack(until, d)
		return nil, err
	}
	b, err := t.Store.Get(ctx, key, buf, limit)
	if err != nil {
		t.down.giveBack(until, d) // nothing came: not found, damaged, failed
		return b, err
	}
	t.last.Store(int64(len(b)))
	if len(b) > est {
		err = t.down.Wait(ctx, len(b)-est)
	}
	return b, err
}
