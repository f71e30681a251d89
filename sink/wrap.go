package sink

import (
	"context"
	"fmt"
	"math/rand/v2"
	"time"
)

// RetryPolicy says how Retry retries transient failures.
type RetryPolicy struct {
	Attempts int           // total attempts, at least 1
	Base     time.Duration // backoff before the second attempt
	Cap      time.Duration // longest backoff
	// Sleep waits d or until ctx is done; tests inject a fake clock.
	Sleep func(ctx context.Context, d time.Duration) error `json:"-"`
}

// DefaultRetry retries for about a minute in all.
var DefaultRetry = RetryPolicy{Attempts: 8, Base: 250 * time.Millisecond, Cap: 15 * time.Second}

func sleepCtx(ctx context.Context, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return nil
	case <-ctx.Done():
		return context.Cause(ctx)
	}
}

// Retry returns s with transient failures (IsTransient) retried after a
// capped, jittered exponential backoff. Permanent failures, ErrNotFound and
// cancellation return at once. A List is retried only until its callback
// has seen an object, so no object is reported twice.
func Retry(s Store, p RetryPolicy) Store {
	if p.Attempts < 1 {
		p.Attempts = 1
	}
	if p.Sleep == nil {
		p.Sleep = sleepCtx
	}
	return &retryStore{Store: s, p: p}
}

type retryStore struct {
	Store
	p RetryPolicy
}

func (r *retryStore) Unwrap() Store { return r.Store }

func (r *retryStore) do(ctx context.Context, f func() error) error {
	var err error
	for attempt := 1; ; attempt++ {
		if cerr := ctx.Err(); cerr != nil {
			if err != nil {
				return err
			}
			return context.Cause(ctx)
		}
		if err = f(); err == nil || !IsTransient(err) {
			return err
		}
		if attempt == r.p.Attempts {
			return fmt.Errorf("gave up after %d attempts: %w", attempt, err)
		}
		d := min(r.p.Cap, r.p.Base<<(attempt-1))
		d = d/2 + rand.N(d/2+1) // jitter in [d/2, d]
		if serr := r.p.Sleep(ctx, d); serr != nil {
			return err
		}
	}
}

func (r *retryStore) Put(ctx context.Context, key string, data []byte) error {
	return r.do(ctx, func() error { return r.Store.Put(ctx, key, data) })
}

func (r *retryStore) Create(ctx context.Context, key string, data []byte) error {
	return r.do(ctx, func() error { return r.Store.Create(ctx, key, data) })
}

func (r *retryStore) Get(ctx context.Context, key string, buf []byte, limit int64) (out []byte, err error) {
	err = r.do(ctx, func() error { out, err = r.Store.Get(ctx, key, buf, limit); return err })
	return out, err
}

func (r *retryStore) Stat(ctx context.Context, key string) (info ObjectInfo, err error) {
	err = r.do(ctx, func() error { info, err = r.Store.Stat(ctx, key); return err })
	return info, err
}

func (r *retryStore) List(ctx context.Context, prefix string, fn func(ObjectInfo) error) error {
	seen := false
	return r.do(ctx, func() error {
		err := r.Store.List(ctx, prefix, func(o ObjectInfo) error { seen = true; return fn(o) })
		if err != nil && seen && IsTransient(err) {
			return fmt.Errorf("listing interrupted after it began: %w", permanent(err))
		}
		return err
	})
}

func (r *retryStore) Delete(ctx context.Context, key string) error {
	return r.do(ctx, func() error { return r.Store.Delete(ctx, key) })
}

// permanent returns a copy of a store error marked not worth retrying.
func permanent(err error) error {
	if e, ok := err.(*Error); ok {
		c := *e
		c.Transient = false
		return &c
	}
	return err
}

// Limit returns s with at most n puts, creates, gets, stats and deletes in flight at
// once; callers beyond that wait (or give up when their context is done).
// Lists are not limited, so a List callback may use the store.
func Limit(s Store, n int) Store {
	return &limitStore{Store: s, sem: make(chan struct{}, max(n, 1))}
}

type limitStore struct {
	Store
	sem chan struct{}
}

func (l *limitStore) Unwrap() Store { return l.Store }

func (l *limitStore) acquire(ctx context.Context) error {
	select {
	case l.sem <- struct{}{}:
		return nil
	case <-ctx.Done():
		return context.Cause(ctx)
	}
}

func (l *limitStore) Put(ctx context.Context, key string, data []byte) error {
	if err := l.acquire(ctx); err != nil {
		return err
	}
	defer func() { <-l.sem }()
	return l.Store.Put(ctx, key, data)
}

func (l *limitStore) Create(ctx context.Context, key string, data []byte) error {
	if err := l.acquire(ctx); err != nil {
		return err
	}
	defer func() { <-l.sem }()
	return l.Store.Create(ctx, key, data)
}

func (l *limitStore) Get(ctx context.Context, key string, buf []byte, limit int64) ([]byte, error) {
	if err := l.acquire(ctx); err != nil {
		return nil, err
	}
	defer func() { <-l.sem }()
	return l.Store.Get(ctx, key, buf, limit)
}

func (l *limitStore) Stat(ctx context.Context, key string) (ObjectInfo, error) {
	if err := l.acquire(ctx); err != nil {
		return ObjectInfo{}, err
	}
	defer func() { <-l.sem }()
	return l.Store.Stat(ctx, key)
}

func (l *limitStore) Delete(ctx context.Context, key string) error {
	if err := l.acquire(ctx); err != nil {
		return err
	}
	defer func() { <-l.sem }()
	return l.Store.Delete(ctx, key)
}
