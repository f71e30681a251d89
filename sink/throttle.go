package sink

import (
	"context"
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

// NewRate returns a Rate of bytesPerSec (nil when it is 0: no limit).
func NewRate(bytesPerSec int64) *Rate {
	if bytesPerSec <= 0 {
		return nil
	}
	return &Rate{perSec: float64(bytesPerSec)}
}

// BytesPerSecond is the rate (0 for none).
func (r *Rate) BytesPerSecond() int64 {
	if r == nil {
		return 0
	}
	return int64(r.perSec)
}

// Wait waits until n more bytes may go, or ctx ends.
func (r *Rate) Wait(ctx context.Context, n int) error {
	if r == nil || n <= 0 {
		return nil
	}
	r.mu.Lock()
	now := time.Now()
	if r.next.Before(now) {
		r.next = now // idle time is not saved up for a burst
	}
	r.next = r.next.Add(time.Duration(float64(n) / r.perSec * float64(time.Second)))
	until := r.next
	r.mu.Unlock()
	return sleepCtx(ctx, time.Until(until))
}

// Throttle returns s with what is stored (Put, Create) paced by up and
// what is read (Get) by down; either may be nil.
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

func (t *throttleStore) Put(ctx context.Context, key string, data []byte) error {
	if err := t.up.Wait(ctx, len(data)); err != nil {
		return err
	}
	return t.Store.Put(ctx, key, data)
}

func (t *throttleStore) Create(ctx context.Context, key string, data []byte) error {
	if err := t.up.Wait(ctx, len(data)); err != nil {
		return err
	}
	return t.Store.Create(ctx, key, data)
}

func (t *throttleStore) Get(ctx context.Context, key string, buf []byte, limit int64) ([]byte, error) {
	if t.down == nil {
		return t.Store.Get(ctx, key, buf, limit)
	}
	est := int(t.last.Load())
	if err := t.down.Wait(ctx, est); err != nil {
		return nil, err
	}
	b, err := t.Store.Get(ctx, key, buf, limit)
	if err == nil {
		t.last.Store(int64(len(b)))
		if len(b) > est {
			err = t.down.Wait(ctx, len(b)-est)
		}
	}
	return b, err
}
