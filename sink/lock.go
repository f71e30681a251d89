package sink

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"strings"
	"time"

	"github.com/minio/minio-go/v7"
)

// S3 Object Lock (docs/format.md "Object Lock"): in a bucket with Object
// Lock (and so versioning), every immutable object (Immutable) is put
// with a retain-until date in the same request, so that nobody holding
// the host's credentials can delete or overwrite its version before that
// date. Mutable objects (locks, state) are put without a lock. Deletes
// leave delete markers (the versions stay): gc removes the versions and
// markers of mutable objects, and those of immutable objects once their
// locks end.

// ObjectLock is a repository's lock policy.
type ObjectLock struct {
	Mode   string        // "governance" or "compliance"
	Period time.Duration // what a backup is protected for
}

// Renew is how much longer than the period nbdmover locks what it
// writes or extends: a backup within Renew of the last extension
// extends nothing (docs/design.md "Object Lock").
func (l ObjectLock) Renew() time.Duration { return l.Period / 4 }

func (l ObjectLock) mode() minio.RetentionMode {
	if l.Mode == "compliance" {
		return minio.Compliance
	}
	return minio.Governance
}

// MaxClockSkew is how far the host's clock may be from the S3 server's
// for a repository with Object Lock: retain-until dates are the
// server's, and a host far off it would lock too short or decide on
// the wrong side of a date.
const MaxClockSkew = 2 * time.Minute

// ErrLocked is matched by the error of a delete or overwrite the store
// refused because the object version is locked.
var ErrLocked = errors.New("the object version is locked (S3 Object Lock)")

// Immutable reports whether nbdmover never changes the object at key
// once it is written (it may delete it): the config, key objects,
// chunks, patches, index and file objects, manifests and catalogs. Locks,
// protection markers, holds and state are mutable.
func Immutable(key string) bool {
	if key == "config" {
		return true
	}
	for _, p := range []string{"keys/", "chunks/", "patches/", "indexes/", "files/", "manifests/", "catalog/"} {
		if strings.HasPrefix(key, p) {
			return true
		}
	}
	return false
}

// Versioned returns the S3 store beneath s (looking through wrappers),
// for the operations on object versions and locks; ok false for a store
// that has none, and for an AsOf view (which writes nothing).
func Versioned(s Store) (*S3, bool) {
	if IsAsOf(s) {
		return nil, false
	}
	return underlying[*S3](s)
}

// Bucket returns the S3 store beneath s, also beneath an AsOf view (for
// reading what the bucket says of itself).
func Bucket(s Store) (*S3, bool) { return underlying[*S3](s) }

// IsAsOf reports whether s is (or wraps) an AsOf view.
func IsAsOf(s Store) bool {
	_, ok := underlying[*asOf](s)
	return ok
}

// Retried runs f, an operation on the S3 store beneath s, with s's retry
// policy (when s has the Retry wrapper): transient failures are tried
// again.
func Retried(ctx context.Context, s Store, f func() error) error {
	if r, ok := underlying[*retryStore](s); ok {
		return r.do(ctx, f)
	}
	return f()
}

// BucketLock is what a bucket says of Object Lock.
type BucketLock struct {
	Enabled    bool   // Object Lock is enabled
	Versioning string // "Enabled", "Suspended" or ""
	// Default is the bucket's default retention ("GOVERNANCE 30 DAYS"),
	// "" when it has none.
	Default string
}

// BucketLock reads the bucket's Object Lock and versioning settings.
func (s *S3) BucketLock(ctx context.Context) (BucketLock, error) {
	var b BucketLock
	enabled, mode, validity, unit, err := s.client.GetObjectLockConfig(ctx, s.bucket)
	code := minio.ToErrorResponse(err).Code
	switch {
	case err == nil:
		b.Enabled = enabled == "Enabled"
		if mode != nil && validity != nil && unit != nil {
			b.Default = fmt.Sprintf("%s %d %s", *mode, *validity, *unit)
		}
	case code == "ObjectLockConfigurationNotFoundError" || code == "ObjectLockConfigurationNotFound":
	default:
		return b, s.fail(ctx, "get object lock configuration", "", err)
	}
	v, err := s.client.GetBucketVersioning(ctx, s.bucket)
	if err != nil {
		return b, s.fail(ctx, "get versioning", "", err)
	}
	b.Versioning = v.Status
	return b, nil
}

// ServerTime returns the S3 server's clock (a response's Date header,
// which has whole seconds: the middle of that second) and the host's
// clock when it was read: from a response of the last minute, or else
// from a HEAD of the bucket.
func (s *S3) ServerTime(ctx context.Context) (server, local time.Time, err error) {
	if c := s.clock.Load(); c != nil && time.Since(c.local) < time.Minute {
		return c.server, c.local, nil
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodHead, s.client.EndpointURL().String()+"/"+s.bucket, nil)
	if err != nil {
		return server, local, err
	}
	resp, err := s.http.Do(req) // noted by the transport
	if err != nil {
		return server, local, s.fail(ctx, "read the server's clock", "", err)
	}
	resp.Body.Close()
	c := s.clock.Load()
	if c == nil || time.Since(c.local) >= time.Minute {
		return server, local, fmt.Errorf("%s: the server's answer has no Date header (%q)", s.location, resp.Header.Get("Date"))
	}
	return c.server, c.local, nil
}

// SetLock makes puts of immutable objects lock them (see Lock) and
// deletes keep versions as the package comment says. Call it before the
// store is used.
func (s *S3) SetLock(l ObjectLock) { s.lock = &l }

// Lock returns the store's lock policy (nil: none).
func (s *S3) Lock() *ObjectLock { return s.lock }

// Now is the server's clock: the host's, corrected by how far the latest
// Date header noted was from it (the host's, before any).
func (s *S3) Now() time.Time {
	if c := s.clock.Load(); c != nil {
		return time.Now().Add(c.server.Sub(c.local))
	}
	return time.Now()
}

// LockTarget is the retain-until date of what is put or extended now:
// the server's time plus the period and Renew.
func (s *S3) LockTarget() time.Time {
	return s.Now().Add(s.lock.Period + s.lock.Renew()).Truncate(time.Second).Add(time.Second)
}

// Extend makes a version of key (the current one when versionID is "":
// another when the current one is a delete marker, since what it hides
// is still a backup's) locked until at least until. A version locked
// longer already is left as it is (a retention is never shortened: S3
// refuses that without a governance bypass).
func (s *S3) Extend(ctx context.Context, key, versionID string, until time.Time) error {
	k, err := s.key("extend", key)
	if err != nil {
		return err
	}
	mode := s.lock.mode()
	err = s.client.PutObjectRetention(ctx, s.bucket, k, minio.PutObjectRetentionOptions{Mode: &mode, RetainUntilDate: &until, VersionID: versionID})
	if err == nil {
		return nil
	}
	if e := s.fail(ctx, "extend", key, err); !errors.Is(e, ErrLocked) && !errors.Is(e, ErrDenied) {
		return e
	}
	_, have, rerr := s.Retention(ctx, key, versionID)
	if rerr != nil {
		return rerr
	}
	if !have.Before(until) {
		return nil
	}
	return s.fail(ctx, "extend", key, err)
}

// Retention returns a version's lock (the current version's when
// versionID is ""): its mode and retain-until date, zero when it has
// none.
func (s *S3) Retention(ctx context.Context, key, versionID string) (string, time.Time, error) {
	k, err := s.key("get retention", key)
	if err != nil {
		return "", time.Time{}, err
	}
	mode, until, err := s.client.GetObjectRetention(ctx, s.bucket, k, versionID)
	if err != nil {
		if c := minio.ToErrorResponse(err).Code; c == "NoSuchObjectLockConfiguration" || c == "ObjectLockConfigurationNotFoundError" {
			return "", time.Time{}, nil
		}
		return "", time.Time{}, s.fail(ctx, "get retention", key, err)
	}
	var m string
	if mode != nil {
		m = strings.ToLower(string(*mode))
	}
	if until == nil {
		return m, time.Time{}, nil
	}
	return m, *until, nil
}

// Version is one version of an object, or a delete marker.
type Version struct {
	Key      string
	ID       string
	Size     int64
	Modified time.Time // the server's clock
	Latest   bool      // the current version (or marker)
	Marker   bool      // a delete marker
	ETag     string
}

// Versions calls fn for every version and delete marker whose key
// starts with prefix: in key order, and each key's newest first (as S3
// lists them; nothing is buffered).
func (s *S3) Versions(ctx context.Context, prefix string, fn func(Version) error) error {
	if err := validPrefix(prefix); err != nil {
		return &Error{Op: "list versions", Key: prefix, Location: s.location, Err: err}
	}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	for obj := range s.client.ListObjects(ctx, s.bucket, minio.ListObjectsOptions{Prefix: s.prefix + prefix, Recursive: true, WithVersions: true}) {
		if obj.Err != nil {
			return s.fail(ctx, "list versions", prefix, obj.Err)
		}
		err := fn(Version{Key: strings.TrimPrefix(obj.Key, s.prefix), ID: obj.VersionID, Size: obj.Size,
			Modified: obj.LastModified, Latest: obj.IsLatest, Marker: obj.IsDeleteMarker, ETag: obj.ETag})
		if err != nil {
			return err
		}
	}
	if err := ctx.Err(); err != nil {
		return s.fail(ctx, "list versions", prefix, err)
	}
	return nil
}

// KeyVersions returns the versions of exactly key, newest first.
func (s *S3) KeyVersions(ctx context.Context, key string) ([]Version, error) {
	var vs []Version
	err := s.Versions(ctx, key, func(v Version) error {
		if v.Key == key {
			vs = append(vs, v)
		}
		return nil
	})
	return vs, err
}

// DeleteVersions deletes the versions (and delete markers) given, in
// batches of 1000; bypass sends the governance bypass (which needs the
// s3:BypassGovernanceRetention permission). Deleting goes on past a
// version that fails: failed are those, refused how many of them the
// store refused (locked, held, denied), first the first failure of any
// kind (also one that stopped it: then failed may not list everything
// left).
func (s *S3) DeleteVersions(ctx context.Context, vs []Version, bypass bool) (deleted int, failed []Version, refused int, first error) {
	for len(vs) > 0 {
		batch := vs[:min(len(vs), 1000)]
		vs = vs[len(batch):]
		ch := make(chan minio.ObjectInfo, len(batch))
		byID := map[string]Version{}
		for _, v := range batch {
			k, err := s.key("delete version", v.Key)
			if err != nil {
				return deleted, failed, refused, err
			}
			ch <- minio.ObjectInfo{Key: k, VersionID: v.ID}
			byID[v.ID] = v
		}
		close(ch)
		n := 0
		for e := range s.client.RemoveObjects(ctx, s.bucket, ch, minio.RemoveObjectsOptions{GovernanceBypass: bypass}) {
			if c := minio.ToErrorResponse(e.Err).Code; c == "NoSuchVersion" || c == "NoSuchKey" {
				continue
			}
			n++
			v, ok := byID[e.VersionID]
			if !ok {
				v = Version{Key: strings.TrimPrefix(e.ObjectName, s.prefix), ID: e.VersionID}
			}
			failed = append(failed, v)
			err := s.fail(ctx, "delete version "+e.VersionID+" of", v.Key, e.Err)
			if errors.Is(err, ErrLocked) || errors.Is(err, ErrDenied) {
				refused++
			}
			if first == nil {
				first = err
			}
		}
		deleted += len(batch) - n
		if ctx.Err() != nil {
			if first == nil {
				first = ctx.Err()
			}
			return deleted, failed, refused, first
		}
	}
	return deleted, failed, refused, first
}

// GetVersion is Get of one version of key.
func (s *S3) GetVersion(ctx context.Context, key, versionID string, buf []byte, limit int64) ([]byte, error) {
	return s.get(ctx, key, versionID, buf, limit)
}

// Restore makes a copy of a version of key its current version (a
// server-side copy; locked anew when key is immutable).
func (s *S3) Restore(ctx context.Context, key, versionID string) error {
	k, err := s.key("restore", key)
	if err != nil {
		return err
	}
	dst := minio.CopyDestOptions{Bucket: s.bucket, Object: k}
	if s.lock != nil && Immutable(key) {
		dst.Mode, dst.RetainUntilDate = s.lock.mode(), s.LockTarget()
	}
	if _, err := s.client.CopyObject(ctx, dst, minio.CopySrcOptions{Bucket: s.bucket, Object: k, VersionID: versionID}); err != nil {
		return s.fail(ctx, "restore "+versionID+" of", key, err)
	}
	return nil
}

// lockedError says whether a client error is a refusal for a locked
// version: S3 says AccessDenied, MinIO InvalidRequest, both naming the
// lock in the message.
func lockedError(resp minio.ErrorResponse) bool {
	m := strings.ToLower(resp.Message)
	return (resp.Code == "AccessDenied" || resp.Code == "InvalidRequest") &&
		(strings.Contains(m, "worm") || strings.Contains(m, "object lock"))
}
