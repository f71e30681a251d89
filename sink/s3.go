package sink

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"strings"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/minio/minio-go/v7"
	"github.com/minio/minio-go/v7/pkg/credentials"
)

// S3Options configure an S3 store.
type S3Options struct {
	Endpoint string // http(s)://host[:port]
	Bucket   string
	Prefix   string // key prefix inside the bucket, "" or ending in "/"
	Region   string // "" lets the client discover it
	// PathStyle forces path-style requests (http://host/bucket/key); by
	// default the client picks (path style for non-AWS endpoints).
	PathStyle bool
	// AccessKey and SecretKey; when both are empty they come from
	// AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (and AWS_SESSION_TOKEN).
	AccessKey, SecretKey string
	// MaxConns is the largest number of connections kept to the endpoint.
	MaxConns int
}

// S3 is a store in a bucket of an S3-compatible service. Puts are single
// requests of exactly the object's size (never multipart, never a size of
// -1), so a put is atomic: an object is either absent or whole.
type S3 struct {
	client   *minio.Client
	http     *http.Client // for the server's clock (ServerTime)
	bucket   string
	prefix   string
	location string
	lock     *ObjectLock // SetLock's; nil: no Object Lock
	clock    atomic.Pointer[serverClock]
}

// serverClock is a response's Date header (the middle of its whole
// second), and when the host received it.
type serverClock struct{ server, local time.Time }

// dateTransport notes the Date header of a response, at most once a
// second (ServerTime and Now read it, sparing a request of their own).
type dateTransport struct {
	http.RoundTripper
	s *S3
}

func (d dateTransport) RoundTrip(req *http.Request) (*http.Response, error) {
	resp, err := d.RoundTripper.RoundTrip(req)
	if err == nil {
		now := time.Now()
		if c := d.s.clock.Load(); c == nil || now.Sub(c.local) >= time.Second {
			if t, perr := http.ParseTime(resp.Header.Get("Date")); perr == nil {
				d.s.clock.Store(&serverClock{server: t.Add(500 * time.Millisecond), local: now})
			}
		}
	}
	return resp, err
}

var _ Store = (*S3)(nil)

// NewS3 returns the store. It does not contact the endpoint.
func NewS3(o S3Options) (*S3, error) {
	u, err := url.Parse(o.Endpoint)
	if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
		return nil, fmt.Errorf("S3 endpoint %q: want http(s)://host[:port]", redactURL(o.Endpoint))
	}
	if u.User != nil {
		return nil, fmt.Errorf("S3 endpoint %s: credentials belong in AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, not the URL", redactURL(o.Endpoint))
	}
	if o.Bucket == "" {
		return nil, errors.New("S3 location: no bucket given")
	}
	if o.Prefix != "" {
		if err := ValidKey(strings.TrimSuffix(o.Prefix, "/")); err != nil || !strings.HasSuffix(o.Prefix, "/") {
			return nil, fmt.Errorf("S3 prefix %q: invalid", o.Prefix)
		}
	}
	location := fmt.Sprintf("s3://%s/%s at %s", o.Bucket, o.Prefix, u.Scheme+"://"+u.Host)

	secure := u.Scheme == "https"
	tr, err := minio.DefaultTransport(secure)
	if err != nil {
		return nil, err
	}
	maxConns := o.MaxConns
	if maxConns <= 0 {
		maxConns = 128
	}
	tr.MaxIdleConns = maxConns
	tr.MaxIdleConnsPerHost = maxConns
	tr.MaxConnsPerHost = maxConns
	tr.DialContext = (&net.Dialer{Timeout: 10 * time.Second, KeepAlive: 30 * time.Second}).DialContext
	tr.ResponseHeaderTimeout = 2 * time.Minute
	tr.WriteBufferSize = 256 << 10
	tr.ReadBufferSize = 256 << 10

	var creds *credentials.Credentials
	if o.AccessKey == "" && o.SecretKey == "" {
		creds = credentials.NewEnvAWS()
	} else {
		creds = credentials.NewStaticV4(o.AccessKey, o.SecretKey, "")
	}
	lookup := minio.BucketLookupAuto
	if o.PathStyle {
		lookup = minio.BucketLookupPath
	}
	s := &S3{bucket: o.Bucket, prefix: o.Prefix, location: location}
	s.http = &http.Client{Transport: dateTransport{tr, s}, Timeout: time.Minute}
	client, err := minio.New(u.Host, &minio.Options{
		Creds:        creds,
		Secure:       secure,
		Transport:    dateTransport{tr, s},
		Region:       o.Region,
		BucketLookup: lookup,
		MaxRetries:   1, // Retry wraps the store: one policy, not two
	})
	if err != nil {
		return nil, fmt.Errorf("S3 %s: %w", location, err)
	}
	s.client = client
	return s, nil
}

// redactURL drops user information from a URL for messages.
func redactURL(s string) string {
	u, err := url.Parse(s)
	if err != nil {
		return "(unparseable URL)"
	}
	u.User = nil
	return u.String()
}

func (s *S3) Location() string { return s.location }

// CreateBucket creates the bucket when it does not exist; with
// objectLock, with Object Lock enabled (and so versioning).
func (s *S3) CreateBucket(ctx context.Context, objectLock bool) error {
	ok, err := s.client.BucketExists(ctx, s.bucket)
	if err == nil && !ok {
		err = s.client.MakeBucket(ctx, s.bucket, minio.MakeBucketOptions{ObjectLocking: objectLock})
		if minio.ToErrorResponse(err).Code == "BucketAlreadyOwnedByYou" {
			err = nil
		}
	}
	if err != nil {
		return s.fail(ctx, "create bucket", "", err)
	}
	return nil
}

// fail classifies a client error: missing objects match ErrNotFound;
// throttling, server errors, timeouts and broken connections are transient;
// denied access, bad credentials and a missing bucket are permanent and say
// what to check.
func (s *S3) fail(ctx context.Context, op, key string, err error) error {
	e := &Error{Op: op, Key: key, Location: s.location, Err: err}
	if ctx.Err() != nil {
		return e // the caller gave up: nothing to retry
	}
	resp := minio.ToErrorResponse(err)
	if lockedError(resp) {
		e.Err = fmt.Errorf("%w: %s", ErrLocked, resp.Message)
		return e
	}
	switch resp.Code {
	case "NoSuchKey", "NotFound", "NoSuchVersion":
		e.Err = ErrNotFound
		return e
	case "MethodNotAllowed":
		// What S3 answers a retention request, or a read of a version,
		// that meets a delete marker: the object is deleted.
		if op == "extend" || op == "get retention" || op == "get" || op == "stat" {
			e.Err = ErrNotFound
			return e
		}
	case "PreconditionFailed":
		e.Err = ErrExists
		return e
	case "NoSuchBucket":
		e.Err = fmt.Errorf("%w: %q (nbdmover init creates it)", ErrNoBucket, s.bucket)
		return e
	case "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken":
		e.Err = fmt.Errorf("%w: %s: %s (check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, and what they may do)", ErrDenied, resp.Code, resp.Message)
		return e
	case "SlowDown", "RequestTimeout", "InternalError", "ServiceUnavailable", "RequestTimeTooSkewed", "XMinioServerNotInitialized":
		e.Transient = true
		return e
	case "ConditionalRequestConflict":
		// Two conditional writes of one key overlapped (S3 answers the
		// loser 409 and says to retry): the retry gets 412, ErrExists.
		e.Transient = true
		return e
	}
	if resp.StatusCode >= 500 || resp.StatusCode == http.StatusTooManyRequests {
		e.Transient = true
		return e
	}
	if resp.StatusCode == http.StatusNotFound && op != "list" {
		e.Err = ErrNotFound
		return e
	}
	var ne net.Error
	if errors.As(err, &ne) || errors.Is(err, io.ErrUnexpectedEOF) || errors.Is(err, io.EOF) ||
		errors.Is(err, syscall.ECONNRESET) || errors.Is(err, syscall.ECONNREFUSED) || errors.Is(err, syscall.EPIPE) {
		e.Transient = true
	}
	return e
}

func (s *S3) key(op, key string) (string, error) {
	if err := ValidKey(key); err != nil {
		return "", &Error{Op: op, Key: key, Location: s.location, Err: err}
	}
	return s.prefix + key, nil
}

func (s *S3) Put(ctx context.Context, key string, data []byte) error {
	return s.put(ctx, "put", key, data, false)
}

// Create puts the object with If-None-Match: *, which S3 (since 2024) and
// MinIO refuse with 412 Precondition Failed when the key exists. A service
// that ignores the header overwrites instead; callers read back what they
// created.
func (s *S3) Create(ctx context.Context, key string, data []byte) error {
	return s.put(ctx, "create", key, data, true)
}

func (s *S3) put(ctx context.Context, op, key string, data []byte, ifAbsent bool) error {
	k, err := s.key(op, key)
	if err != nil {
		return err
	}
	opts := minio.PutObjectOptions{
		ContentType:          "application/octet-stream",
		DisableMultipart:     true,
		DisableContentSha256: true, // the blob carries its own CRC32C; the client adds a CRC32C checksum
	}
	if ifAbsent {
		opts.SetMatchETagExcept("*")
	}
	if s.lock != nil && Immutable(key) {
		opts.Mode, opts.RetainUntilDate = s.lock.mode(), s.LockTarget()
	}
	// The body is a copy: net/http may go on reading a request's body
	// after the round trip returned (a 412 to a create answers before the
	// body is sent), and callers reuse data as soon as Put returns (the
	// race detector caught verify's next Get into the buffer of its
	// quarantine Put).
	_, err = s.client.PutObject(ctx, s.bucket, k, bytes.NewReader(bytes.Clone(data)), int64(len(data)), opts)
	if err != nil {
		return s.fail(ctx, op, key, err)
	}
	return nil
}

func (s *S3) Get(ctx context.Context, key string, buf []byte, limit int64) ([]byte, error) {
	return s.get(ctx, key, "", buf, limit)
}

// get reads a version of key ("": the current one).
func (s *S3) get(ctx context.Context, key, versionID string, buf []byte, limit int64) ([]byte, error) {
	k, err := s.key("get", key)
	if err != nil {
		return nil, err
	}
	// One GET, whose headers give the size (the lazy minio.Object would
	// send a HEAD for it first: a round trip more); the body is read only
	// when the size is within limit.
	body, st, _, err := minio.Core{Client: s.client}.GetObject(ctx, s.bucket, k, minio.GetObjectOptions{VersionID: versionID})
	if err != nil {
		return nil, s.fail(ctx, "get", key, err)
	}
	defer body.Close()
	if st.Size < 0 { // no Content-Length (a chunked answer): read to the bound
		b, err := io.ReadAll(io.LimitReader(body, limit+1))
		if err != nil {
			return nil, s.fail(ctx, "get", key, err)
		}
		if int64(len(b)) > limit {
			return nil, &Error{Op: "get", Key: key, Location: s.location, Err: tooLarge(int64(len(b)), limit)}
		}
		return append(buf[:0], b...), nil
	}
	if st.Size > limit {
		return nil, &Error{Op: "get", Key: key, Location: s.location, Err: tooLarge(st.Size, limit)}
	}
	buf = append(buf[:0], make([]byte, st.Size)...)
	if _, err := io.ReadFull(body, buf); err != nil {
		return nil, s.fail(ctx, "get", key, err)
	}
	return buf, nil
}

func (s *S3) Stat(ctx context.Context, key string) (ObjectInfo, error) {
	return s.stat(ctx, key, "")
}

// stat is Stat of a version of key ("": the current one).
func (s *S3) stat(ctx context.Context, key, versionID string) (ObjectInfo, error) {
	k, err := s.key("stat", key)
	if err != nil {
		return ObjectInfo{}, err
	}
	st, err := s.client.StatObject(ctx, s.bucket, k, minio.StatObjectOptions{VersionID: versionID})
	if err != nil {
		return ObjectInfo{}, s.fail(ctx, "stat", key, err)
	}
	return ObjectInfo{Key: key, Size: st.Size, Modified: st.LastModified}, nil
}

func (s *S3) List(ctx context.Context, prefix string, fn func(ObjectInfo) error) error {
	if err := validPrefix(prefix); err != nil {
		return &Error{Op: "list", Key: prefix, Location: s.location, Err: err}
	}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel() // stops the listing goroutine when fn fails
	for obj := range s.client.ListObjects(ctx, s.bucket, minio.ListObjectsOptions{Prefix: s.prefix + prefix, Recursive: true}) {
		if obj.Err != nil {
			return s.fail(ctx, "list", prefix, obj.Err)
		}
		if err := fn(ObjectInfo{Key: strings.TrimPrefix(obj.Key, s.prefix), Size: obj.Size, Modified: obj.LastModified}); err != nil {
			return err
		}
	}
	if err := ctx.Err(); err != nil {
		return s.fail(ctx, "list", prefix, err)
	}
	return nil
}

// Delete removes the object. In a versioned bucket (Object Lock) it
// leaves a delete marker above the object's versions, which gc removes
// (repo's purge: at once for a mutable object, once its locks end for an
// immutable one): one request, as without versioning.
func (s *S3) Delete(ctx context.Context, key string) error {
	k, err := s.key("delete", key)
	if err != nil {
		return err
	}
	if err := s.client.RemoveObject(ctx, s.bucket, k, minio.RemoveObjectOptions{}); err != nil {
		return s.fail(ctx, "delete", key, err)
	}
	return nil
}
