package mover

import (
	"context"

	"github.com/nbdmover/nbdmover/chunker"
	"github.com/nbdmover/nbdmover/repo"
	"github.com/nbdmover/nbdmover/sink"
)

// RepoOptions locate a repository.
type RepoOptions struct {
	// Location is a path, file:///path, s3://BUCKET[/PREFIX] or null:.
	Location    string
	S3Endpoint  string
	S3Region    string
	S3PathStyle bool
	// Retry is the store's retry policy (zero: sink.DefaultRetry).
	Retry sink.RetryPolicy
}

func (o RepoOptions) store() (sink.Store, error) {
	return sink.Open(o.Location, sink.Options{S3Endpoint: o.S3Endpoint, S3Region: o.S3Region,
		S3PathStyle: o.S3PathStyle, Retry: o.Retry})
}

func (o RepoOptions) open(ctx context.Context) (*repo.Repo, error) {
	s, err := o.store()
	if err != nil {
		return nil, err
	}
	return repo.Open(ctx, s)
}

// InitOptions are the parameters of a new repository.
type InitOptions struct {
	Repo        RepoOptions
	ChunkSize   int64
	Compression string // "" = zstd
}

func (o InitOptions) repoInit() (repo.InitOptions, error) {
	ri := repo.InitOptions{ChunkSize: o.ChunkSize}
	if o.Compression != "" {
		c, err := chunker.ParseCompression(o.Compression)
		if err != nil {
			return ri, err
		}
		ri.Compression = c
	}
	return ri, nil
}

// Init creates a repository; it refuses to overwrite one.
func Init(ctx context.Context, o InitOptions) (repo.Config, error) {
	ri, err := o.repoInit()
	if err != nil {
		return repo.Config{}, err
	}
	s, err := o.Repo.store()
	if err != nil {
		return repo.Config{}, err
	}
	r, err := repo.Init(ctx, s, ri)
	if err != nil {
		return repo.Config{}, err
	}
	return r.Config(), nil
}

// List returns the committed backups of domain ("" = all), oldest first.
func List(ctx context.Context, o RepoOptions, domain string) ([]*repo.Manifest, error) {
	r, err := o.open(ctx)
	if err != nil {
		return nil, err
	}
	return r.Backups(ctx, domain)
}

// VerifyOptions select what Verify checks.
type VerifyOptions struct {
	Repo RepoOptions
	repo.VerifyOptions
}

// Verify checks backups and reports every problem it finds.
func Verify(ctx context.Context, o VerifyOptions, report func(repo.Problem)) (repo.VerifyStats, error) {
	r, err := o.Repo.open(ctx)
	if err != nil {
		return repo.VerifyStats{}, err
	}
	return r.Verify(ctx, o.VerifyOptions, report)
}
