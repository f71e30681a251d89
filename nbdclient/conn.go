package nbdclient

/*
#cgo pkg-config: libnbd
#cgo CFLAGS: -O2 -Wall
#include <stdlib.h>
#include "nbd.h"
*/
import "C"

import (
	"context"
	"fmt"
	"net/url"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
	"unsafe"
)

// Meta context names.
const (
	ContextAllocation = "base:allocation"
	bitmapPrefix      = "qemu:dirty-bitmap:"
)

// BitmapContext is the meta context name of a QEMU dirty bitmap.
func BitmapContext(bitmap string) string { return bitmapPrefix + bitmap }

// Defaults for Config fields left zero.
const (
	DefaultIOTimeout    = 60 * time.Second
	DefaultRequestSize  = 256 << 10 // see RequestSize
	DefaultMaxInFlight  = 16
	DefaultExtentWindow = 1 << 30
	// MaxExportSize is the largest export Dial accepts: a server claiming
	// more (up to 2^63 - 1) is misbehaving, and walking it would not end.
	MaxExportSize = 1 << 50
)

// Config says where an export is and how to talk to it.
type Config struct {
	// URI is an NBD URI: nbd://host[:port]/export, nbds://... (TLS),
	// nbd+unix:///export?socket=PATH. When empty, Socket and Export are used.
	URI    string
	Socket string // unix socket path
	Export string // export name on Socket

	// Bitmap, when set, asks for the meta context qemu:dirty-bitmap:Bitmap
	// in addition to base:allocation; Dial fails if the server lacks it.
	Bitmap string

	// IOTimeout bounds how long any call waits without the server making
	// progress (connect, read, block status).
	IOTimeout time.Duration
	// RequestSize is the largest single NBD read; ReadAt splits larger reads
	// (and never exceeds the server's maximum block size). The default,
	// 256 KiB (nbdcopy's too), is what QEMU serves fastest: it allocates a
	// buffer per request, and at 1 MiB from 8 connections its I/O threads
	// spent most of their time faulting those buffers in and unmapping
	// them (docs/performance.md, 2026-12-03).
	RequestSize int
	// MaxInFlight is how many read requests one ReadAt keeps in flight on
	// its connection.
	MaxInFlight int
	// ExtentWindow is how much of the export one block status request
	// describes at most.
	ExtentWindow int64
}

func (cfg Config) withDefaults() Config {
	if cfg.IOTimeout <= 0 {
		cfg.IOTimeout = DefaultIOTimeout
	}
	if cfg.RequestSize <= 0 {
		cfg.RequestSize = DefaultRequestSize
	}
	if cfg.MaxInFlight <= 0 {
		cfg.MaxInFlight = DefaultMaxInFlight
	}
	if cfg.ExtentWindow <= 0 {
		cfg.ExtentWindow = DefaultExtentWindow
	}
	cfg.ExtentWindow = min(cfg.ExtentWindow, maxWindow)
	return cfg
}

// target names the export in errors.
func (cfg Config) target() string {
	if cfg.URI != "" {
		return cfg.URI
	}
	return (&url.URL{Scheme: "nbd+unix", Path: "/" + cfg.Export, RawQuery: "socket=" + cfg.Socket}).String()
}

// Info is what the server told us about the export.
type Info struct {
	Size           int64
	MinBlock       int64 // 0 when the server did not say
	PreferredBlock int64
	MaxBlock       int64 // largest read the server accepts; 32 MiB if it did not say
	CanMultiConn   bool
	Contexts       []string // the meta contexts the server granted, of those asked for
}

// HasContext reports whether the server granted the meta context.
func (i Info) HasContext(name string) bool {
	for _, c := range i.Contexts {
		if c == name {
			return true
		}
	}
	return false
}

// Conn is one NBD connection. See the package documentation for the
// concurrency rules.
type Conn struct {
	cfg    Config
	info   Info
	efd    int // eventfd that interrupts the C poll loop
	closed atomic.Bool

	mu     sync.Mutex
	h      *C.struct_nbd_handle // nil once closed
	status *C.struct_nbdm_status
	cnames [2]*C.char
}

// Dial connects to the export and negotiates the meta contexts.
func Dial(ctx context.Context, cfg Config) (*Conn, error) {
	cfg = cfg.withDefaults()
	fail := func(msg string, err error) error {
		return &Error{Op: "connect", Target: cfg.target(), Msg: msg, Err: err}
	}
	if cfg.URI == "" && cfg.Socket == "" {
		return nil, fail("no NBD URI or socket given", nil)
	}
	if err := ctx.Err(); err != nil {
		return nil, fail(err.Error(), err)
	}
	h := C.nbd_create()
	if h == nil {
		return nil, fail(C.GoString(C.nbd_get_error()), syscall.Errno(C.nbd_get_errno()))
	}
	efd := int(C.nbdm_eventfd())
	if efd < 0 {
		C.nbd_close(h)
		return nil, fail("eventfd failed", nil)
	}
	c := &Conn{cfg: cfg, h: h, efd: efd}
	c.status = (*C.struct_nbdm_status)(C.calloc(1, C.size_t(unsafe.Sizeof(C.struct_nbdm_status{}))))
	wanted := []string{ContextAllocation}
	if cfg.Bitmap != "" {
		wanted = append(wanted, BitmapContext(cfg.Bitmap))
	}
	for i, name := range wanted {
		c.cnames[i] = C.CString(name)
		c.status.ctx[i].name = c.cnames[i]
		C.nbd_add_meta_context(h, c.cnames[i])
	}
	C.nbd_set_pread_initialize(h, false)

	var uri, sock, export *C.char
	if cfg.URI != "" {
		uri = C.CString(cfg.URI)
		defer C.free(unsafe.Pointer(uri))
	} else {
		sock = C.CString(cfg.Socket)
		export = C.CString(cfg.Export)
		defer C.free(unsafe.Pointer(sock))
		defer C.free(unsafe.Pointer(export))
	}
	err := c.call(ctx, "connect", 0, 0, func(e *C.struct_nbdm_err, timeoutMs C.int) C.int {
		return C.nbdm_connect(c.h, uri, sock, export, C.int(c.efd), timeoutMs, e)
	})
	if err == nil {
		err = c.readInfo(wanted)
	}
	if err != nil {
		c.Close()
		return nil, err
	}
	return c, nil
}

func (c *Conn) readInfo(wanted []string) error {
	var e C.struct_nbdm_err
	var ci C.struct_nbdm_info
	if C.nbdm_info(c.h, &ci, &e) != C.NBDM_OK {
		return c.errorFrom("connect", 0, 0, &e, C.NBDM_ERR, nil)
	}
	if ci.size < 0 || int64(ci.size) > MaxExportSize {
		return &Error{Op: "connect", Target: c.cfg.target(), Errno: syscall.EFBIG,
			Msg: fmt.Sprintf("the export claims %d bytes, more than the %d (1 PiB) nbdmover reads: a misbehaving server? (no disk is that large)", int64(ci.size), MaxExportSize)}
	}
	c.info = Info{
		Size:           int64(ci.size),
		MinBlock:       int64(ci.min_block),
		PreferredBlock: int64(ci.preferred_block),
		MaxBlock:       int64(ci.max_block),
		CanMultiConn:   ci.multi_conn != 0,
	}
	if c.info.MaxBlock <= 0 {
		c.info.MaxBlock = 32 << 20 // the NBD protocol's default limit
	}
	for i, name := range wanted {
		if C.nbd_can_meta_context(c.h, c.cnames[i]) == 1 {
			c.info.Contexts = append(c.info.Contexts, name)
		} else {
			c.status.ctx[i].name = nil
		}
	}
	if c.cfg.Bitmap != "" && !c.info.HasContext(BitmapContext(c.cfg.Bitmap)) {
		return &Error{Op: "connect", Target: c.cfg.target(), Err: ErrNoContext,
			Msg: fmt.Sprintf("the server does not offer dirty bitmap %q (meta context %s); "+
				"export it (qemu-nbd -B %s, or a libvirt incremental backup) or take a full backup",
				c.cfg.Bitmap, BitmapContext(c.cfg.Bitmap), c.cfg.Bitmap)}
	}
	return nil
}

// Info returns what the server said about the export at connect time.
func (c *Conn) Info() Info { return c.info }

// ReadAt reads len(p) bytes at off into p, splitting the read into requests
// of at most Config.RequestSize (and the server's maximum) with up to
// Config.MaxInFlight in flight. The data lands directly in p. A short export
// is an error: off+len(p) must not pass the export size.
func (c *Conn) ReadAt(ctx context.Context, p []byte, off int64) error {
	return c.rw(ctx, "read", 0, p, []Segment{{Offset: off, Length: int64(len(p))}})
}

// Segment is one range of a scattered read: Length bytes of the export at
// Offset, into p[BufOffset:].
type Segment struct {
	BufOffset, Offset, Length int64
}

// ReadSegments reads every segment into p, with the requests of all of
// them in flight together (up to Config.MaxInFlight): one round trip's
// latency for many small ranges, as a chunk's data extents are.
func (c *Conn) ReadSegments(ctx context.Context, p []byte, segs []Segment) error {
	return c.rw(ctx, "read", 0, p, segs)
}

// WriteAt writes p at off, split like ReadAt. The export must be writable;
// call Flush before relying on the data being stable.
func (c *Conn) WriteAt(ctx context.Context, p []byte, off int64) error {
	return c.rw(ctx, "write", 1, p, []Segment{{Offset: off, Length: int64(len(p))}})
}

func (c *Conn) rw(ctx context.Context, op string, write C.int, p []byte, segs []Segment) error {
	cs := make([]C.struct_nbdm_seg, 0, len(segs))
	var first, total int64 = -1, 0
	for _, sg := range segs {
		if sg.Length == 0 {
			continue
		}
		if sg.Offset < 0 || sg.Length < 0 || sg.Offset+sg.Length > c.info.Size ||
			sg.BufOffset < 0 || sg.BufOffset+sg.Length > int64(len(p)) {
			return &Error{Op: op, Target: c.cfg.target(), Offset: sg.Offset, Length: sg.Length, Errno: syscall.EINVAL,
				Msg: fmt.Sprintf("range is outside the export (size %d) or the buffer (%d bytes)", c.info.Size, len(p))}
		}
		if first < 0 {
			first = sg.Offset
		}
		total += sg.Length
		cs = append(cs, C.struct_nbdm_seg{buf_off: C.uint64_t(sg.BufOffset), disk_off: C.uint64_t(sg.Offset), len: C.uint64_t(sg.Length)})
	}
	if len(cs) == 0 {
		return nil
	}
	piece := min(int64(c.cfg.RequestSize), c.info.MaxBlock)
	buf := unsafe.Pointer(unsafe.SliceData(p))
	return c.call(ctx, op, first, total, func(e *C.struct_nbdm_err, timeoutMs C.int) C.int {
		return C.nbdm_rw(&c.h, write, buf, unsafe.SliceData(cs), C.int(len(cs)), C.uint64_t(piece),
			C.int(c.cfg.MaxInFlight), C.int(c.efd), timeoutMs, e)
	})
}

// Flush asks the server to make every completed write stable.
func (c *Conn) Flush(ctx context.Context) error {
	return c.call(ctx, "flush", 0, 0, func(e *C.struct_nbdm_err, timeoutMs C.int) C.int {
		return C.nbdm_flush(&c.h, C.int(c.efd), timeoutMs, e)
	})
}

// blockStatus asks for one window [off, off+n) and returns the raw extents of
// the allocation and dirty contexts (nil for a context not granted).
func (c *Conn) blockStatus(ctx context.Context, off, n int64) (alloc, dirty []span, err error) {
	var spanErr error
	err = c.call(ctx, "block status", off, n, func(e *C.struct_nbdm_err, timeoutMs C.int) C.int {
		r := C.nbdm_block_status(&c.h, C.uint64_t(n), C.uint64_t(off), c.status, C.int(c.efd), timeoutMs, e)
		if r == C.NBDM_OK {
			alloc, spanErr = c.spans(0, off)
			if spanErr == nil {
				dirty, spanErr = c.spans(1, off)
			}
		}
		return r
	})
	if err == nil {
		err = spanErr
	}
	return alloc, dirty, err
}

// spans copies context i's reply out of C memory. Called with c.mu held.
func (c *Conn) spans(i int, off int64) ([]span, error) {
	x := &c.status.ctx[i]
	if x.name == nil {
		return nil, nil
	}
	name := C.GoString(x.name)
	if x.seen == 0 {
		return nil, &Error{Op: "block status", Target: c.cfg.target(), Offset: off, Errno: syscall.EPROTO,
			Msg: "the server sent no extents for " + name}
	}
	if int64(x.offset) != off {
		return nil, &Error{Op: "block status", Target: c.cfg.target(), Offset: off, Errno: syscall.EPROTO,
			Msg: fmt.Sprintf("the server described %s from offset %d, not the requested one", name, x.offset)}
	}
	raw := unsafe.Slice(x.pairs, x.n)
	out := make([]span, len(raw)/2)
	for j := range out {
		out[j] = span{Length: int64(raw[2*j]), Flags: uint32(raw[2*j+1])}
	}
	return out, nil
}

// call runs one C operation with cancellation and error translation.
func (c *Conn) call(ctx context.Context, op string, off, n int64,
	f func(e *C.struct_nbdm_err, timeoutMs C.int) C.int) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	// Checked before any descriptor is touched: after Close, c.efd's
	// number may belong to a file someone else opened since.
	if c.closed.Load() || c.h == nil {
		return &Error{Op: op, Target: c.cfg.target(), Offset: off, Length: n, Msg: ErrClosed.Error(), Err: ErrClosed}
	}
	c.drainCancel()
	if err := ctx.Err(); err != nil {
		return &Error{Op: op, Target: c.cfg.target(), Offset: off, Length: n, Msg: err.Error(), Err: context.Cause(ctx)}
	}
	if ctx.Done() != nil {
		done := make(chan struct{})
		stop := context.AfterFunc(ctx, func() {
			c.signalCancel()
			close(done)
		})
		defer func() {
			if !stop() {
				<-done // the signal is written: drainCancel at the next call sees it
			}
		}()
	}
	var e C.struct_nbdm_err
	r := f(&e, C.int(c.cfg.IOTimeout.Milliseconds()))
	if r == C.NBDM_OK {
		return nil
	}
	var cause error
	switch {
	case r == C.NBDM_TIMEOUT:
		cause = ErrTimeout
	case c.closed.Load():
		cause = ErrClosed
	case r == C.NBDM_CANCELLED:
		cause = context.Cause(ctx)
	case e.closed != 0:
		cause = ErrClosed
	}
	return c.errorFrom(op, off, n, &e, r, cause)
}

func (c *Conn) errorFrom(op string, off, n int64, e *C.struct_nbdm_err, r C.int, cause error) error {
	err := &Error{Op: op, Target: c.cfg.target(), Offset: off, Length: n,
		Errno: syscall.Errno(e.errnum), Msg: C.GoString(&e.msg[0]), Err: cause}
	if (op == "read" || op == "write") && int64(e.offset) > off {
		err.Msg += fmt.Sprintf(" (request at offset %d)", e.offset)
	}
	if r == C.NBDM_CANCELLED && cause != nil {
		err.Msg = "cancelled: " + cause.Error()
	}
	return err
}

func (c *Conn) signalCancel() {
	one := [8]byte{1}
	syscall.Write(c.efd, one[:])
}

func (c *Conn) drainCancel() {
	var b [8]byte
	syscall.Read(c.efd, b[:])
}

// Close ends the connection. It is idempotent and may be called from any
// goroutine; a call in progress on c returns an error wrapping ErrClosed.
func (c *Conn) Close() error {
	if c.closed.Swap(true) {
		return nil
	}
	c.signalCancel()
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.h != nil {
		C.nbd_close(c.h)
		c.h = nil
	}
	C.nbdm_status_free(c.status)
	C.free(unsafe.Pointer(c.status))
	for _, s := range c.cnames {
		C.free(unsafe.Pointer(s))
	}
	syscall.Close(c.efd)
	c.efd = -1
	return nil
}

// LibraryVersion is the version of the libnbd library in use.
func LibraryVersion() string {
	h := C.nbd_create()
	if h == nil {
		return "unknown"
	}
	defer C.nbd_close(h)
	return C.GoString(C.nbd_get_version(h))
}
