package daemon

import (
	"crypto/tls"
	"errors"
	mrand "math/rand/v2"
	"net"
	"net/http"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nbdmover/nbdmover/internal/listen"
)

// invalidf is a refusal of bad configuration (ErrInvalid).
func invalidf(format string, args ...any) error { return refuse(ErrInvalid, format, args...) }

// TLSOptions configure TLS on a TCP listener.
type TLSOptions = listen.TLS

// listen opens the daemon's listener, accepting at most maxConns
// connections at once. A unix socket is private (mode 0600 from its
// creation, in a directory only root can change: package listen). TCP
// needs a token, and TLS unless the address is a loopback one.
func listenAPI(spec, token string, t TLSOptions, maxConns int) (net.Listener, error) {
	l, err := openListener(spec, token, t)
	if err != nil {
		return nil, err
	}
	return limitListener(l, maxConns), nil
}

func openListener(spec, token string, t TLSOptions) (net.Listener, error) {
	path, addr, err := listen.Split(spec)
	if err != nil {
		return nil, refuse(ErrInvalid, "%v", err)
	}
	if path != "" {
		if t.Enabled() {
			return nil, invalidf("--listen %s: TLS is for TCP; a unix socket is private by its mode (0600)", spec)
		}
		l, err := listen.Unix(path)
		if errors.Is(err, listen.ErrInvalid) {
			return nil, refuse(ErrInvalid, "--listen %s: %v", spec, err)
		}
		return l, err
	}
	if token == "" {
		return nil, invalidf("--listen %s: listening on TCP needs a bearer token (--token-file or NBDMOVER_TOKEN)", spec)
	}
	if !t.Enabled() {
		if !listen.Loopback(addr) {
			return nil, invalidf("--listen %s: plain TCP is allowed on loopback addresses only; "+
				"give --tls-cert and --tls-key (and --tls-client-ca for client certificates) to listen there", spec)
		}
		return net.Listen("tcp", addr)
	}
	cfg, err := t.Config()
	if err != nil {
		return nil, refuse(ErrInvalid, "%v", err)
	}
	l, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, err
	}
	return tls.NewListener(l, cfg), nil
}

// limitListener accepts at most n connections at once. Beyond that, a
// connection on which no request has passed authentication yet (an idle
// new one, or one a 401 is being answered on) is closed to make room:
// the one accepted longest ago if one was over a quarter of a second ago
// (slow lorises, clients that connect and wait: a client with the token
// sends its request at once), else one chosen at random (a flood of new
// connections then evicts a client with the token, not yet through its
// first request, only by chance, not by order: at 64 slots, each
// eviction has a 1 in 64 chance to hit it); only when all n have
// authenticated does Accept wait for one to close.
func limitListener(l net.Listener, n int) net.Listener {
	lim := &limited{Listener: l, max: max(n, 1), open: map[*limitedConn]bool{}}
	lim.freed = sync.NewCond(&lim.mu)
	return lim
}

type limited struct {
	net.Listener
	max   int
	mu    sync.Mutex
	freed *sync.Cond
	open  map[*limitedConn]bool
}

func (l *limited) Accept() (net.Conn, error) {
	l.mu.Lock()
	for len(l.open) >= l.max {
		if victim := l.unauthenticated(); victim != nil {
			l.mu.Unlock()
			if !victim.authed.Load() { // it may have authenticated since
				victim.Close()
			}
			l.mu.Lock()
			continue
		}
		l.freed.Wait()
	}
	c := &limitedConn{l: l, since: time.Now()}
	l.open[c] = true // reserved before Accept returns
	l.mu.Unlock()
	conn, err := l.Listener.Accept()
	if err != nil {
		c.release()
		return nil, err
	}
	c.Conn = conn
	return c, nil
}

// unauthenticated picks an open connection that has not authenticated:
// the one accepted first if one was accepted over graceNew ago, else one
// at random; nil when there is none. l.mu is held.
func (l *limited) unauthenticated() *limitedConn {
	var oldest *limitedConn
	var young []*limitedConn
	for c := range l.open {
		switch {
		case c.Conn == nil || c.authed.Load():
		case time.Since(c.since) > graceNew:
			if oldest == nil || c.since.Before(oldest.since) {
				oldest = c
			}
		default:
			young = append(young, c)
		}
	}
	if oldest != nil || len(young) == 0 {
		return oldest
	}
	return young[mrand.IntN(len(young))]
}

// graceNew is how long a new connection has to send its first request
// before it counts as idle (and is closed first to make room).
const graceNew = 250 * time.Millisecond

type limitedConn struct {
	net.Conn
	l      *limited
	since  time.Time // accepted
	authed atomic.Bool
	once   sync.Once
}

func (c *limitedConn) Close() error {
	err := c.Conn.Close()
	c.release()
	return err
}

func (c *limitedConn) release() {
	c.once.Do(func() {
		c.l.mu.Lock()
		delete(c.l.open, c)
		c.l.mu.Unlock()
		c.l.freed.Signal()
	})
}

// connKey finds a request's connection in its context (http.Server's
// ConnContext puts it there).
type connKey struct{}

// authenticated marks the connection of a request that passed
// authentication: it is no longer closed to make room for others.
func authenticated(r *http.Request) {
	if c, ok := r.Context().Value(connKey{}).(*limitedConn); ok {
		c.authed.Store(true)
	}
}
