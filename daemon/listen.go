package daemon

import (
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
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

// limitListener accepts at most n connections at once; Accept waits for
// one to close beyond that.
func limitListener(l net.Listener, n int) net.Listener {
	return &limited{Listener: l, sem: make(chan struct{}, max(n, 1))}
}

type limited struct {
	net.Listener
	sem chan struct{}
}

func (l *limited) Accept() (net.Conn, error) {
	l.sem <- struct{}{}
	c, err := l.Listener.Accept()
	if err != nil {
		<-l.sem
		return nil, err
	}
	return &limitedConn{Conn: c, release: func() { <-l.sem }}, nil
}

type limitedConn struct {
	net.Conn
	once    sync.Once
	release func()
}

func (c *limitedConn) Close() error {
	err := c.Conn.Close()
	c.once.Do(c.release)
	return err
}
