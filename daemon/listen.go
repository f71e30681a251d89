package daemon

import (
	"crypto/tls"
	"crypto/x509"
	"fmt"
	mrand "math/rand/v2"
	"net"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

// invalidf is a refusal of bad configuration (ErrInvalid).
func invalidf(format string, args ...any) error { return refuse(ErrInvalid, format, args...) }

// TLSOptions configure TLS on a TCP listener.
type TLSOptions struct {
	Cert, Key string // PEM files of the server's certificate and key
	// ClientCA, when set, is a PEM file of the CAs client certificates must
	// chain to (mutual TLS).
	ClientCA string
}

func (t TLSOptions) enabled() bool { return t.Cert != "" || t.Key != "" || t.ClientCA != "" }

// config loads the certificates.
func (t TLSOptions) config() (*tls.Config, error) {
	if t.Cert == "" || t.Key == "" {
		return nil, invalidf("TLS needs both --tls-cert and --tls-key")
	}
	cert, err := tls.LoadX509KeyPair(t.Cert, t.Key)
	if err != nil {
		return nil, fmt.Errorf("--tls-cert %s / --tls-key %s: %w", t.Cert, t.Key, err)
	}
	cfg := &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12}
	if t.ClientCA != "" {
		pem, err := os.ReadFile(t.ClientCA)
		if err != nil {
			return nil, fmt.Errorf("--tls-client-ca: %w", err)
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("--tls-client-ca %s: no PEM certificate in it", t.ClientCA)
		}
		cfg.ClientCAs, cfg.ClientAuth = pool, tls.RequireAndVerifyClientCert
	}
	return cfg, nil
}

// listen opens the daemon's listener, accepting at most maxConns
// connections at once. A unix socket is created with mode 0600 (umask set
// around the bind, so it is never wider). TCP needs a token, and TLS
// unless the address is a loopback one.
func listen(spec, token string, t TLSOptions, maxConns int) (net.Listener, error) {
	l, err := openListener(spec, token, t)
	if err != nil {
		return nil, err
	}
	return limitListener(l, maxConns), nil
}

func openListener(spec, token string, t TLSOptions) (net.Listener, error) {
	if path, ok := strings.CutPrefix(spec, "unix://"); ok {
		if t.enabled() {
			return nil, invalidf("--listen %s: TLS is for TCP; a unix socket is private by its mode (0600)", spec)
		}
		return listenUnix(spec, path)
	}
	if strings.Contains(spec, "://") {
		return nil, invalidf("--listen %s: want unix:///path or host:port", spec)
	}
	if token == "" {
		return nil, invalidf("--listen %s: listening on TCP needs a bearer token (--token-file or NBDMOVER_TOKEN)", spec)
	}
	if !t.enabled() {
		if !loopback(spec) {
			return nil, invalidf("--listen %s: plain TCP is allowed on loopback addresses only; "+
				"give --tls-cert and --tls-key (and --tls-client-ca for client certificates) to listen there", spec)
		}
		return net.Listen("tcp", spec)
	}
	cfg, err := t.config()
	if err != nil {
		return nil, err
	}
	l, err := net.Listen("tcp", spec)
	if err != nil {
		return nil, err
	}
	return tls.NewListener(l, cfg), nil
}

func listenUnix(spec, path string) (net.Listener, error) {
	if !filepath.IsAbs(path) {
		return nil, invalidf("--listen %s: want unix:///absolute/path", spec)
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o711); err != nil {
		return nil, err
	}
	if c, err := net.Dial("unix", path); err == nil {
		c.Close()
		return nil, fmt.Errorf("--listen %s: another daemon is listening there", spec)
	}
	if st, err := os.Lstat(path); err == nil {
		if st.Mode()&os.ModeSocket == 0 {
			return nil, invalidf("--listen %s: %s exists and is not a socket; remove it or listen elsewhere", spec, path)
		}
		os.Remove(path) // a stale socket of a dead daemon
	}
	old := syscall.Umask(0o177)
	l, err := net.Listen("unix", path)
	syscall.Umask(old)
	if err != nil {
		return nil, err
	}
	return l, os.Chmod(path, 0o600)
}

// loopback reports whether host:port names a loopback address (or
// localhost).
func loopback(spec string) bool {
	host, _, err := net.SplitHostPort(spec)
	if err != nil {
		return false
	}
	if host == "localhost" {
		return true
	}
	a, err := netip.ParseAddr(host)
	return err == nil && a.IsLoopback()
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
