package sink

import (
	"context"
	"fmt"
	"net/url"
	"strings"
	"time"
)

// Options for Open.
type Options struct {
	S3Endpoint  string // required for s3:// locations
	S3Region    string
	S3PathStyle bool
	// MaxConcurrent bounds operations in flight (default 64).
	MaxConcurrent int
	// Retry is the retry policy (default DefaultRetry).
	Retry RetryPolicy
	// Upload and Download, when set, pace what is stored and read
	// (Throttle); one Rate may be shared by several stores.
	Upload, Download *Rate
}

// Open returns the store at location, wrapped with Limit and Retry:
//
//	/path or file:///path     a directory on the local filesystem
//	s3://BUCKET[/PREFIX]      a bucket (and key prefix) at o.S3Endpoint
//	null:                     the benchmark store that discards chunks
func Open(location string, o Options) (Store, error) {
	var base Store
	var err error
	switch {
	case location == "null:":
		base = NewNull()
	case strings.HasPrefix(location, "s3://"):
		base, err = openS3(location, o)
	case strings.HasPrefix(location, "file://"):
		u, perr := url.Parse(location)
		if perr != nil || (u.Host != "" && u.Host != "localhost") || u.Path == "" {
			return nil, fmt.Errorf("repository %q: want file:///absolute/path", location)
		}
		base, err = NewLocal(u.Path)
	case strings.Contains(location, "://") || location == "":
		return nil, fmt.Errorf("repository %q: want a path, file:///path or s3://bucket[/prefix]", location)
	default:
		base, err = NewLocal(location)
	}
	if err != nil {
		return nil, err
	}
	if o.MaxConcurrent <= 0 {
		o.MaxConcurrent = 64
	}
	if o.Retry.Attempts == 0 {
		o.Retry = DefaultRetry
	}
	// Paced outside the limit on operations in flight: a transfer waiting
	// for its turn holds no slot that a listing or a stat could use.
	return Retry(Throttle(Limit(base, o.MaxConcurrent), o.Upload, o.Download), o.Retry), nil
}

func openS3(location string, o Options) (*S3, error) {
	rest := strings.TrimPrefix(location, "s3://")
	bucket, prefix, _ := strings.Cut(rest, "/")
	if bucket == "" {
		return nil, fmt.Errorf("repository %q: no bucket", location)
	}
	if prefix = strings.Trim(prefix, "/"); prefix != "" {
		prefix += "/"
	}
	if o.S3Endpoint == "" {
		return nil, fmt.Errorf("repository %s: no S3 endpoint (--s3-endpoint or NBDMOVER_S3_ENDPOINT)", location)
	}
	return NewS3(S3Options{Endpoint: o.S3Endpoint, Bucket: bucket, Prefix: prefix, Region: o.S3Region,
		PathStyle: o.S3PathStyle, MaxConns: max(o.MaxConcurrent, 32)})
}

// CreateBucket creates the bucket of an S3 store (looking through
// wrappers) when it is missing; for other stores it does nothing.
func CreateBucket(ctx context.Context, s Store, objectLock bool) error {
	if x, ok := underlying[*S3](s); ok {
		return x.CreateBucket(ctx, objectLock)
	}
	return nil
}

// RemoveTemp removes the temporary files older than age that crashed
// writes left in the store (looking through wrappers), and returns how
// many it removed. Stores without temporary files (S3, which never sees a
// partial object) have nothing to remove.
func RemoveTemp(ctx context.Context, s Store, age time.Duration) (int, error) {
	type tempRemover interface {
		RemoveTemp(context.Context, time.Duration) (int, error)
	}
	if x, ok := underlying[tempRemover](s); ok {
		return x.RemoveTemp(ctx, age)
	}
	return 0, nil
}

// Strays calls fn with the key of everything in the store whose key
// starts with prefix that nbdmover never writes and its reads refuse: in a local store, the symbolic links,
// FIFOs, devices and sockets below the root, with what each is. Other
// stores hold only objects.
func Strays(ctx context.Context, s Store, prefix string, fn func(key, what string) error) error {
	if l, ok := underlying[*Local](s); ok {
		return l.Strays(ctx, prefix, fn)
	}
	return nil
}

// deferredPutter is a store whose puts can leave making an object's name
// durable to a later Sync (the local store).
type deferredPutter interface {
	PutDeferred(ctx context.Context, key string, data []byte) error
	SyncLater(key string)
	Sync(ctx context.Context) error
}

// PutDeferred stores data under key like Put, except that the object may
// become durable only when Sync returns: for objects committed together,
// as a backup's chunks and indexes are by its manifest. The object is
// whole whenever it can be seen, also after a crash. On the local store
// only the directory entry waits (Sync fsyncs each directory once, not
// once per object); on other stores it is Put. The local store's calls
// bypass the Limit and Retry wrappers: its failures are not transient and
// the callers bound their own concurrency.
func PutDeferred(ctx context.Context, s Store, key string, data []byte) error {
	if d, ok := underlying[deferredPutter](s); ok {
		return d.PutDeferred(ctx, key, data)
	}
	return s.Put(ctx, key, data)
}

// SyncLater has the next Sync on s make the name of the object at key
// durable, when s is a store whose names can wait (the local store): for an
// object a caller relies on without having put it, which another writer
// may have put deferred (a chunk found stored). On other stores it does
// nothing.
func SyncLater(s Store, key string) {
	if d, ok := underlying[deferredPutter](s); ok {
		d.SyncLater(key)
	}
}

// Sync makes every PutDeferred and SyncLater on s so far durable. Calls
// from several goroutines run one at a time.
func Sync(ctx context.Context, s Store) error {
	if d, ok := underlying[deferredPutter](s); ok {
		return d.Sync(ctx)
	}
	return nil
}

// Remote reports whether s's requests are network round trips (S3): worth
// keeping many in flight, and sparing where one can do.
func Remote(s Store) bool {
	_, ok := underlying[*S3](s)
	return ok
}

// underlying returns the first store that is a T: s, or one the wrappers
// around it (Limit, Retry) wrap.
func underlying[T any](s Store) (T, bool) {
	for {
		if x, ok := s.(T); ok {
			return x, true
		}
		w, ok := s.(interface{ Unwrap() Store })
		if !ok {
			var zero T
			return zero, false
		}
		s = w.Unwrap()
	}
}
