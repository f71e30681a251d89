package sink

import (
	"context"
	"errors"
	"io/fs"
	"strings"

	"github.com/minio/minio-go/v7"
	"golang.org/x/sync/errgroup"
	"golang.org/x/sys/unix"
)

// batchDeleter is a store that deletes many objects in one operation.
type batchDeleter interface {
	// deleteBatch deletes at most maxBatch keys; missing ones are not an
	// error.
	deleteBatch(ctx context.Context, keys []string) error
	maxBatch() int
}

// DeleteMany deletes keys (missing objects are not an error), parallel
// batches at once, and calls done, if not nil, with the number of keys of
// each batch that was deleted. S3 stores take multi-object delete requests
// of up to 1000 keys; the local store unlinks a batch and syncs each of its
// directories once; other stores delete key by key. Transient failures are
// retried as the store's Retry wrapper says. parallel bounds the batches
// in flight (the store's own concurrency limit is not applied).
func DeleteMany(ctx context.Context, s Store, keys []string, parallel int, done func(int)) error {
	size := 1
	del := func(ctx context.Context, keys []string) error { return s.Delete(ctx, keys[0]) }
	if b, ok := underlying[batchDeleter](s); ok {
		size, del = b.maxBatch(), b.deleteBatch
		if r, ok := underlying[*retryStore](s); ok {
			inner := del
			del = func(ctx context.Context, keys []string) error {
				return r.do(ctx, func() error { return inner(ctx, keys) })
			}
		}
	}
	for _, k := range keys {
		if err := ValidKey(k); err != nil {
			return &Error{Op: "delete", Key: k, Location: s.Location(), Err: err}
		}
	}
	g, gctx := errgroup.WithContext(ctx)
	g.SetLimit(max(parallel, 1))
	for len(keys) > 0 {
		batch := keys[:min(size, len(keys))]
		keys = keys[len(batch):]
		g.Go(func() error {
			if err := del(gctx, batch); err != nil {
				return err
			}
			if done != nil {
				done(len(batch))
			}
			return nil
		})
	}
	return g.Wait()
}

func (l *Local) maxBatch() int { return 256 }

// deleteBatch unlinks the keys, each relative to its directory's
// descriptor (beneath.go), and syncs each directory once.
func (l *Local) deleteBatch(ctx context.Context, keys []string) error {
	byDir := map[string][]string{}
	for _, key := range keys {
		if err := l.check("delete", key); err != nil {
			return err
		}
		byDir[dirOf(key)] = append(byDir[dirOf(key)], key)
	}
	root, err := l.openRoot(false)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return l.fail("delete", keys[0], err)
	}
	defer unix.Close(root)
	for dir, keys := range byDir {
		if err := l.deleteIn(ctx, root, dir, keys); err != nil {
			return err
		}
	}
	return nil
}

// deleteIn unlinks keys, all in the directory dir, and syncs it. A
// missing directory holds nothing to delete; a symbolic link in its place
// is not followed (a *DamagedError).
func (l *Local) deleteIn(ctx context.Context, root int, dir string, keys []string) error {
	dfd, err := l.openDir(root, dir, false)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return l.fail("delete", keys[0], err)
	}
	defer unix.Close(dfd)
	for _, key := range keys {
		if err := ctx.Err(); err != nil {
			return l.fail("delete", key, err)
		}
		if err := unix.Unlinkat(dfd, key[strings.LastIndexByte(key, '/')+1:], 0); err != nil && !errors.Is(err, unix.ENOENT) {
			return l.fail("delete", key, err)
		}
	}
	if err := unix.Fsync(dfd); err != nil {
		return l.fail("delete", dir+"/", err)
	}
	return nil
}

func (s *S3) maxBatch() int { return 1000 }

// deleteBatch sends one multi-object delete request (S3's limit is 1000
// keys).
func (s *S3) deleteBatch(ctx context.Context, keys []string) error {
	ch := make(chan minio.ObjectInfo, len(keys))
	for _, key := range keys {
		k, err := s.key("delete", key)
		if err != nil {
			return err
		}
		ch <- minio.ObjectInfo{Key: k}
	}
	close(ch)
	var first error
	for e := range s.client.RemoveObjects(ctx, s.bucket, ch, minio.RemoveObjectsOptions{}) {
		if first == nil && minio.ToErrorResponse(e.Err).Code != "NoSuchKey" {
			first = s.fail(ctx, "delete", strings.TrimPrefix(e.ObjectName, s.prefix), e.Err)
		}
	}
	return first
}
