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
// daemon). It keeps a line of bytes and a clock that runs along it at the
// rate: a transfer of n bytes takes the next n bytes of the line and waits
// until the clock reaches the end of its slot, so by any moment no more
// has gone than the rate allows since the first transfer, less nothing
// saved up while idle (the line's free part never starts behind the
// clock): over any window, at most one transfer (an object, a chunk of 1
// MiB by default) more than rate x window.
//
// Its speed may change while it is used (Set: a timetable's limits): the
// clock then runs at the new rate, and every waiter's wait is worked out
// again, so a change holds at once, not after the slots already taken
// (32 uploads of 1 MiB each at 3 MiB/s are 10 s of them). 0 lets
// everything go at once.
type Rate struct {
	mu      sync.Mutex
	perSec  float64       // 0: no limit now
	at      time.Time     // when the clock last changed speed
	clock   float64       // where it was on the line then
	next    float64       // where the line's free part starts
	changed chan struct{} // closed by Set
}

// NewRate returns a Rate of bytesPerSec (nil when it is 0: no limit;
// at least 1 KiB/s).
func NewRate(bytesPerSec int64) *Rate {
	if bytesPerSec <= 0 {
		return nil
	}
	return NewVariableRate(bytesPerSec)
}

// NewVariableRate returns a Rate of bytesPerSec (0: none for now) that is
// never nil, so that a store or pipeline given it can be limited later by
// Set.
func NewVariableRate(bytesPerSec int64) *Rate {
	r := &Rate{at: time.Now(), changed: make(chan struct{})}
	r.Set(bytesPerSec)
	return r
}

// MaxRate is the largest rate: 1 TiB/s (as good as none; a float64 holds
// it exactly, so BytesPerSecond gives back what was set).
const MaxRate = 1 << 40

// Set changes the rate (0: no limit; else from 1 KiB/s to MaxRate), for
// the transfers waiting as for the next ones.
func (r *Rate) Set(bytesPerSec int64) {
	r.mu.Lock()
	defer r.mu.Unlock()
	now := time.Now()
	if r.perSec > 0 {
		r.clock = r.clockAt(now)
	} else {
		r.clock = r.next // without a limit every slot taken is free to go
	}
	r.at = now
	r.perSec = 0
	if bytesPerSec > 0 {
		r.perSec = float64(min(max(bytesPerSec, 1<<10), MaxRate))
	}
	close(r.changed)
	r.changed = make(chan struct{})
}

// BytesPerSecond is the rate (0 for none).
func (r *Rate) BytesPerSecond() int64 {
	if r == nil {
		return 0
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	return int64(r.perSec)
}

// clockAt is where the clock is at now (under mu, with a rate).
func (r *Rate) clockAt(now time.Time) float64 {
	return r.clock + r.perSec*max(now.Sub(r.at).Seconds(), 0)
}

// slot is a transfer's part of the line: it may go when the clock reaches
// end.
type slot struct{ end, n float64 }

// Wait waits until n more bytes may go, or ctx ends (then the slot is
// given back).
func (r *Rate) Wait(ctx context.Context, n int) error {
	s := r.take(n)
	if err := r.await(ctx, s); err != nil {
		r.giveBack(s)
		return err
	}
	return nil
}

// take takes the next n bytes of the line (an empty slot: no limit).
func (r *Rate) take(n int) slot {
	if r == nil || n <= 0 {
		return slot{}
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.perSec == 0 {
		return slot{}
	}
	r.next = max(r.next, r.clockAt(time.Now())) + float64(n)
	return slot{end: r.next, n: float64(n)}
}

// await waits until the clock reaches the slot's end, working the wait
// out again whenever the rate changes.
func (r *Rate) await(ctx context.Context, s slot) error {
	if s.n == 0 {
		return nil
	}
	for {
		r.mu.Lock()
		if r.perSec == 0 {
			r.mu.Unlock()
			return nil
		}
		wait := time.Duration(min((s.end-r.clockAt(time.Now()))/r.perSec, 24*3600) * float64(time.Second))
		changed := r.changed
		r.mu.Unlock()
		if wait <= 0 {
			return nil
		}
		t := time.NewTimer(wait)
		select {
		case <-ctx.Done():
			t.Stop()
			return context.Cause(ctx)
		case <-changed:
			t.Stop()
		case <-t.C:
			return nil
		}
	}
}

// giveBack returns a slot that was not used (a cancelled wait, a read
// that found nothing) when no later one was taken after it; otherwise
// the later ones keep their places, and the line is that much behind.
func (r *Rate) giveBack(s slot) {
	if r == nil || s.n == 0 {
		return
	}
	r.mu.Lock()
	if r.next == s.end {
		r.next -= s.n
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
	s := t.down.take(est)
	if err := t.down.await(ctx, s); err != nil {
		t.down.giveBack(s)
		return nil, err
	}
	b, err := t.Store.Get(ctx, key, buf, limit)
	if err != nil {
		t.down.giveBack(s) // nothing came: not found, damaged, failed
		return b, err
	}
	t.last.Store(int64(len(b)))
	if len(b) > est {
		err = t.down.Wait(ctx, len(b)-est)
	}
	return b, err
}
