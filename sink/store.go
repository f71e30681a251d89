package sink

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"strings"
	"syscall"
	"time"
)

// Store is an object store. Every method may be called concurrently from
// any number of goroutines.
type Store interface {
	// Put stores data under key. When Put returns nil the object is whole
	// and durable; readers never see a partial object, even after a crash.
	// Put replaces an existing object and is idempotent. data is not
	// retained after Put returns.
	Put(ctx context.Context, key string, data []byte) error
	// Create stores data under key unless an object exists there, in which
	// case it fails with an error matching ErrExists and changes nothing.
	// Of concurrent Creates of one key, at most one succeeds. Like Put,
	// the object is whole and durable when Create returns nil. After a
	// retried attempt, ErrExists may mean that an earlier attempt of the
	// same call created the object: callers that care read it back.
	Create(ctx context.Context, key string, data []byte) error
	// Get appends the whole object to buf[:0] and returns it. A missing
	// object is an error matching ErrNotFound. An object of more than
	// limit bytes is not read: its error matches ErrDamaged and gives its
	// size (the store learns the size before it allocates: a planted huge
	// object costs nothing). The local store reads only regular files: a
	// symbolic link, FIFO, device or socket where an object belongs
	// matches ErrDamaged too, and is never opened for reading.
	Get(ctx context.Context, key string, buf []byte, limit int64) ([]byte, error)
	// Stat returns the object's size; ErrNotFound when it is missing,
	// ErrDamaged when something other than an object is there.
	Stat(ctx context.Context, key string) (ObjectInfo, error)
	// List calls fn for every object whose key starts with prefix, in
	// lexical key order; an error from fn stops the listing and is returned.
	List(ctx context.Context, prefix string, fn func(ObjectInfo) error) error
	// Delete removes the object. Deleting a missing object is not an error.
	Delete(ctx context.Context, key string) error
	// Location names the store in messages (a path, or s3://bucket/prefix
	// at an endpoint). It never contains credentials.
	Location() string
}

// ObjectInfo describes a stored object.
type ObjectInfo struct {
	Key  string
	Size int64
	// Modified is when the object was last written (the file's mtime, or
	// S3's Last-Modified: the server's clock). Lists and Stat fill it in.
	Modified time.Time
}

// ErrNotFound is matched by the error for a missing object.
var ErrNotFound = errors.New("object not found")

// ErrNoBucket is matched by the error of an S3 operation on a bucket that
// does not exist.
var ErrNoBucket = errors.New("bucket does not exist")

// ErrExists is matched by the error of a Create whose key is taken.
var ErrExists = errors.New("object exists")

// ErrDenied is matched by the error of an operation the store refused
// for want of permission (S3's AccessDenied and its kin). IsDenied also
// takes a local store's EACCES, EPERM and EROFS.
var ErrDenied = errors.New("access denied")

// IsDenied reports whether err is a store refusing for want of permission
// (or a read-only file system): nothing can be written there.
func IsDenied(err error) bool {
	return errors.Is(err, ErrDenied) || errors.Is(err, fs.ErrPermission) || errors.Is(err, syscall.EROFS)
}

// ErrDamaged is matched by the error of a read of something nbdmover
// never writes where an object belongs: an object larger than its kind
// allows, or (locally) a symbolic link, FIFO, device, socket or directory,
// or a path beneath one. It is a damaged or planted object, not a failure
// of the store: readers report it and go on as for a corrupt object.
var ErrDamaged = errors.New("damaged object")

// DamagedError says what is wrong; it matches ErrDamaged.
type DamagedError struct{ Why string }

func (e *DamagedError) Error() string {
	return e.Why + " (nbdmover never makes that: it was planted or damaged; nbdmover verify lists such entries)"
}

func (e *DamagedError) Is(target error) bool { return target == ErrDamaged }

// tooLarge is the error of an object of size bytes read with a smaller
// limit.
func tooLarge(size, limit int64) error {
	return &DamagedError{Why: fmt.Sprintf("%d bytes, more than the %d an object of its kind may have", size, limit)}
}

// Error is a failed store operation.
type Error struct {
	Op        string // "put", "create", "get", "stat", "list", "delete", "open"
	Key       string
	Location  string
	Transient bool // worth retrying
	Err       error
}

func (e *Error) Error() string {
	s := e.Op
	if e.Key != "" {
		s += " " + e.Key
	}
	return fmt.Sprintf("%s in %s: %v", s, e.Location, e.Err)
}

func (e *Error) Unwrap() error { return e.Err }

// IsTransient reports whether err is a store failure worth retrying.
func IsTransient(err error) bool {
	var e *Error
	return errors.As(err, &e) && e.Transient
}

// ValidKey says why key may not name an object, or returns nil: keys are
// non-empty, relative, use only [A-Za-z0-9._-] between single slashes, and
// have no "." or ".." segment and no segment starting with ".tmp-" (the
// local store's temporary files).
func ValidKey(key string) error {
	if key == "" {
		return errors.New("empty object key")
	}
	for _, seg := range strings.Split(key, "/") {
		if seg == "" || seg == "." || seg == ".." || strings.HasPrefix(seg, ".tmp-") {
			return fmt.Errorf("object key %q: bad segment %q", key, seg)
		}
		for _, r := range seg {
			if !(r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || r == '.' || r == '_' || r == '-') {
				return fmt.Errorf("object key %q: character %q is not allowed", key, r)
			}
		}
	}
	return nil
}

// validPrefix accepts "" and prefixes of valid keys (which may end in "/").
func validPrefix(prefix string) error {
	p := strings.TrimSuffix(prefix, "/")
	if p == "" {
		if prefix != "" {
			return fmt.Errorf("list prefix %q: bad", prefix)
		}
		return nil
	}
	return ValidKey(p)
}
