package nbdclient

import (
	"errors"
	"fmt"
	"syscall"
)

var (
	// ErrTimeout: the server made no progress for Config.IOTimeout.
	ErrTimeout = errors.New("NBD server stopped responding")
	// ErrClosed: the connection was closed, by Close or after a call had to
	// abandon it (timeout, cancellation, dead server).
	ErrClosed = errors.New("NBD connection is closed")
	// ErrNoContext: the server did not grant a meta context that was asked for.
	ErrNoContext = errors.New("meta context not offered by the NBD server")
)

// Error is a failed NBD operation. It carries libnbd's message and errno and
// the range of the export it concerned.
type Error struct {
	Op     string // "connect", "read", "write", "flush", "block status"
	Target string // the URI, or socket and export name
	Offset int64  // offset of the failed request (reads and block status)
	Length int64
	Errno  syscall.Errno // as reported by libnbd; 0 if none
	Msg    string        // libnbd's message
	Err    error         // ErrTimeout, ErrClosed, a context error, or nil
}

func (e *Error) Error() string {
	s := "nbd " + e.Op
	if e.Op == "read" || e.Op == "write" || e.Op == "block status" {
		s += fmt.Sprintf(" %d+%d", e.Offset, e.Length)
	}
	s += " on " + e.Target + ": " + e.Msg
	if e.Errno != 0 {
		s += fmt.Sprintf(" (%s)", e.Errno)
	}
	return s
}

// Unwrap lets errors.Is match ErrTimeout, ErrClosed, context errors and the
// errno (syscall.Errno also matches os.ErrNotExist and friends).
func (e *Error) Unwrap() []error {
	var errs []error
	if e.Err != nil {
		errs = append(errs, e.Err)
	}
	if e.Errno != 0 {
		errs = append(errs, e.Errno)
	}
	return errs
}
