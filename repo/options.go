package repo

import (
	"context"
	"time"

	"github.com/nbdmover/nbdmover/sink"
)

// Options say where a repository is and how to reach it.
type Options struct {
	// Location is a path, file:///path, s3://BUCKET[/PREFIX] or null:.
	Location    string
	S3Endpoint  string
	S3Region    string
	S3PathStyle bool
	// Retry is the store's retry policy (zero: sink.DefaultRetry).
	Retry sink.RetryPolicy
	// Upload and Download pace what is stored and read (nil: no limit).
	Upload, Download *sink.Rate
	// Keys open an encrypted repository (nil: it must not be encrypted).
	// One Keys derives once: every Open after the first reuses the key.
	Keys *Keys
	// Opened, when set, is the store to use instead of opening Location
	// (a store wrapped for a test or a benchmark).
	Opened sink.Store
	// AsOf, when set, reads the repository as it was then (an S3 bucket
	// with versioning: sink.AsOf), and writes nothing to it but locks
	// and state.
	AsOf time.Time
}

// Store opens the store the repository lives in (without contacting it).
func (o Options) Store() (sink.Store, error) {
	if o.Opened != nil {
		return o.Opened, nil
	}
	s, err := sink.Open(o.Location, sink.Options{S3Endpoint: o.S3Endpoint, S3Region: o.S3Region,
		S3PathStyle: o.S3PathStyle, Retry: o.Retry, Upload: o.Upload, Download: o.Download})
	if err != nil || o.AsOf.IsZero() {
		return s, err
	}
	return sink.AsOf(s, o.AsOf)
}

// Open opens the repository; ErrNoRepository when there is none.
func (o Options) Open(ctx context.Context) (*Repo, error) {
	s, err := o.Store()
	if err != nil {
		return nil, err
	}
	return openKeys(ctx, s, o.Keys)
}

// Init creates the repository; it refuses to overwrite one.
func (o Options) Init(ctx context.Context, io InitOptions) (*Repo, error) {
	s, err := o.Store()
	if err != nil {
		return nil, err
	}
	if io.Keys == nil {
		io.Keys = o.Keys
	}
	return initStore(ctx, s, io)
}

// OpenOrInit opens the repository, creating it with io on first use, and
// says whether it created it.
func (o Options) OpenOrInit(ctx context.Context, io InitOptions) (*Repo, bool, error) {
	s, err := o.Store()
	if err != nil {
		return nil, false, err
	}
	io.Keys = o.Keys
	return openOrInitStore(ctx, s, io)
}
