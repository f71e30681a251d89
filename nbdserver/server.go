// Package nbdserver is a read-only NBD server (the NBD project's
// doc/proto.md: fixed newstyle handshake, structured replies, the
// base:allocation meta context, STARTTLS), written for exports of
// backups: an Export gives the bytes of a disk, piece by piece, and says
// where it holds zeroes, and the server turns that into replies, holes
// where the disk is zero.
//
// Every length read from a client is bounded before it sizes anything:
// options are at most 64 KiB, strings 4096 bytes, reads 32 MiB (the
// maximum block size advertised); the bytes that replies in flight hold
// are bounded for the whole server (Options.MaxInFlight). Every read and
// write of a connection has a deadline, so a client that stops reading
// its replies, or never finishes its handshake, loses its connection and
// holds up no other client.
package nbdserver

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"slices"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sync/semaphore"
)

// Export is a read-only disk the server serves. Its methods are called
// from many goroutines at once.
type Export interface {
	// Size is the disk's size in bytes.
	Size() int64
	// Read calls fn with the bytes of [off, off+n), in order, piece by
	// piece: a piece with data nil is n bytes of zeroes. data belongs to
	// the export (it must not be changed) and stays valid after fn
	// returns. An error names what could not be read.
	Read(ctx context.Context, off, n int64, fn func(off int64, data []byte, n int64) error) error
	// Allocation describes [off, off+n) in at most max runs, in order:
	// the last run may end before off+n.
	Allocation(off, n int64, max int) []Run
	// Prefetch asks for [off, off+n) to be fetched ahead (NBD_CMD_CACHE).
	Prefetch(off, n int64)
}

// Run is a stretch of an export: zeroes (never fetched), or data.
type Run struct {
	Length int64
	Zero   bool
}

// Options configure a Server.
type Options struct {
	// Exports by name. A client asking for the export "" gets the only
	// export when there is one.
	Exports map[string]Export
	// TLS, when set, is offered with NBD_OPT_STARTTLS; with RequireTLS
	// it must be used before anything else is negotiated.
	TLS        *tls.Config
	RequireTLS bool
	// MaxBlock is the largest read (default and at most 32 MiB).
	MaxBlock int
	// MaxInFlight bounds the bytes of read replies being prepared or sent
	// by all connections together (default 128 MiB), and one connection's
	// to a quarter of that (at least MaxBlock).
	MaxInFlight int64
	// Timeout bounds a whole handshake and each reply's write (default
	// 60 s); Idle, how long a connection may send nothing between
	// requests (default none: clients may sit idle).
	Timeout, Idle time.Duration
	// MaxConns bounds the connections open at once (default 128): one
	// more is closed at once.
	MaxConns int
	// OnRead, if set, is told of the bytes every read served.
	OnRead func(export string, n int64)
	Log    *slog.Logger
}

// Server serves NBD exports on listeners.
type Server struct {
	o     Options
	names []string // export names, sorted
	mem   *semaphore.Weighted

	mu     sync.Mutex
	conns  map[*conn]bool
	closed bool
	wg     sync.WaitGroup
	// active counts the connections past their handshake (Active);
	// served is set when the first got there.
	active int
	served bool
	idle   chan struct{} // closed when no connection is left after one was served
}

// New returns a server of o's exports.
func New(o Options) *Server {
	if o.MaxBlock <= 0 || o.MaxBlock > 32<<20 {
		o.MaxBlock = 32 << 20
	}
	if o.MaxInFlight <= 0 {
		o.MaxInFlight = 128 << 20
	}
	o.MaxInFlight = max(o.MaxInFlight, int64(o.MaxBlock))
	if o.Timeout <= 0 {
		o.Timeout = time.Minute
	}
	if o.MaxConns <= 0 {
		o.MaxConns = 128
	}
	if o.Log == nil {
		o.Log = slog.New(slog.DiscardHandler)
	}
	s := &Server{o: o, mem: semaphore.NewWeighted(o.MaxInFlight), conns: map[*conn]bool{}, idle: make(chan struct{})}
	for name := range o.Exports {
		s.names = append(s.names, name)
	}
	slices.Sort(s.names)
	return s
}

// Serve accepts connections on l and serves each until it ends, until
// ctx is done or Close is called; it then closes l and every connection.
func (s *Server) Serve(ctx context.Context, l net.Listener) error {
	stop := context.AfterFunc(ctx, func() { l.Close(); s.Close() })
	defer stop()
	backoff := time.Duration(0)
	for {
		nc, err := l.Accept()
		if err != nil {
			s.mu.Lock()
			closed := s.closed
			s.mu.Unlock()
			if closed || ctx.Err() != nil {
				return nil
			}
			if !temporary(err) {
				return err
			}
			// Out of descriptors or memory for a moment (a flood of
			// connections): wait and go on, as net/http does.
			backoff = min(max(2*backoff, 5*time.Millisecond), time.Second)
			s.o.Log.Warn("NBD accept failed: retrying", "error", err, "in", backoff)
			time.Sleep(backoff)
			continue
		}
		backoff = 0
		c := &conn{s: s, raw: nc, nc: nc, log: s.o.Log.With("client", nc.RemoteAddr().String()),
			mem: semaphore.NewWeighted(max(int64(s.o.MaxBlock), s.o.MaxInFlight/4))}
		s.mu.Lock()
		if s.closed {
			s.mu.Unlock()
			nc.Close()
			return nil
		}
		if len(s.conns) >= s.o.MaxConns {
			s.mu.Unlock()
			s.o.Log.Warn("NBD connection refused: too many open", "max", s.o.MaxConns)
			nc.Close()
			continue
		}
		s.conns[c] = true
		s.wg.Add(1)
		s.mu.Unlock()
		go func() {
			defer s.wg.Done()
			c.serve(ctx)
			s.mu.Lock()
			delete(s.conns, c)
			if len(s.conns) == 0 && s.served {
				select {
				case <-s.idle:
				default:
					close(s.idle)
				}
			}
			s.mu.Unlock()
		}()
	}
}

// temporary says whether an Accept error passes: a timeout, no
// descriptor or memory left for now, a connection aborted before it was
// accepted.
func temporary(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout() || errors.Is(err, syscall.EMFILE) || errors.Is(err, syscall.ENFILE) ||
		errors.Is(err, syscall.ENOBUFS) || errors.Is(err, syscall.ENOMEM) || errors.Is(err, syscall.ECONNABORTED)
}

// Close ends every connection and waits for them.
func (s *Server) Close() {
	s.mu.Lock()
	s.closed = true
	for c := range s.conns {
		c.raw.Close()
	}
	s.mu.Unlock()
	s.wg.Wait()
}

// Active is how many clients are connected to an export.
func (s *Server) Active() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.active
}

// Idle is closed once a client has reached an export and no connection
// is left since (export --once).
func (s *Server) Idle() <-chan struct{} { return s.idle }

func (s *Server) enter() {
	s.mu.Lock()
	s.active++
	s.served = true
	s.mu.Unlock()
}

func (s *Server) leave() {
	s.mu.Lock()
	s.active--
	s.mu.Unlock()
}

// export finds an export by name ("" is the only one, when there is one).
func (s *Server) export(name string) (Export, string, bool) {
	if name == "" && len(s.names) == 1 {
		name = s.names[0]
	}
	e, ok := s.o.Exports[name]
	return e, name, ok
}

// protocolError is a client's breach of the protocol: the connection is
// dropped (a hard disconnect).
type protocolError struct{ msg string }

func (e *protocolError) Error() string { return e.msg }

func breach(format string, args ...any) error {
	return &protocolError{fmt.Sprintf(format, args...)}
}
