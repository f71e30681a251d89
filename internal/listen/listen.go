// Package listen opens the listeners of nbdmover's servers (the daemon's
// API and NBD exports): unix sockets that only their owner can connect to
// from the moment they exist, and TCP with TLS.
package listen

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/nbdmover/nbdmover/internal/safedir"
	"golang.org/x/sys/unix"
)

// ErrInvalid is matched by the errors for addresses and TLS options that
// can never work (bad usage).
var ErrInvalid = errors.New("invalid listen option")

type invalidError struct{ error }

func (invalidError) Is(target error) bool { return target == ErrInvalid }

func invalidf(format string, args ...any) error {
	return invalidError{fmt.Errorf(format, args...)}
}

// TLS configures TLS on a TCP listener.
type TLS struct {
	Cert, Key string // PEM files of the server's certificate and key
	// ClientCA, when set, is a PEM file of the CAs client certificates must
	// chain to (mutual TLS).
	ClientCA string
}

// Enabled says whether any TLS option was given.
func (t TLS) Enabled() bool { return t.Cert != "" || t.Key != "" || t.ClientCA != "" }

// Config loads the certificates.
func (t TLS) Config() (*tls.Config, error) {
	if t.Cert == "" || t.Key == "" {
		return nil, invalidf("TLS needs both --tls-cert and --tls-key")
	}
	cert, err := tls.LoadX509KeyPair(t.Cert, t.Key)
	if err != nil {
		return nil, invalidf("--tls-cert %s / --tls-key %s: %w", t.Cert, t.Key, err)
	}
	cfg := &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12}
	if t.ClientCA != "" {
		pem, err := os.ReadFile(t.ClientCA)
		if err != nil {
			return nil, invalidf("--tls-client-ca: %w", err)
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pem) {
			return nil, invalidf("--tls-client-ca %s: no PEM certificate in it", t.ClientCA)
		}
		cfg.ClientCAs, cfg.ClientAuth = pool, tls.RequireAndVerifyClientCert
	}
	return cfg, nil
}

// Split parses a listen address: unix:///absolute/path (path returned) or
// host:port (addr returned).
func Split(spec string) (path, addr string, err error) {
	if p, ok := strings.CutPrefix(spec, "unix://"); ok {
		if !filepath.IsAbs(p) || filepath.Clean(p) != p || strings.ContainsAny(p, "?#") {
			return "", "", invalidf("--listen %s: want unix:///absolute/path (clean, without ? or #)", spec)
		}
		return p, "", nil
	}
	if strings.Contains(spec, "://") {
		return "", "", invalidf("--listen %s: want unix:///path or host:port", spec)
	}
	if _, _, err := net.SplitHostPort(spec); err != nil {
		return "", "", invalidf("--listen %s: want unix:///path or host:port: %v", spec, err)
	}
	return "", spec, nil
}

// Loopback reports whether host:port names a loopback address (or
// localhost).
func Loopback(spec string) bool {
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

// Unix listens on a unix socket at path that only this process's user
// (and root) can connect to: mode 0600 from the moment it has its name.
// The socket's directory is made (mode 0711) if missing and must be one
// no other user can change (reached through such directories), so the
// name stays ours; a stale socket there (no one listening) is replaced,
// anything else is an error. Closing the listener removes the socket.
func Unix(path string) (net.Listener, error) { return UnixFor(path, nil) }

// Owner is a user given a socket (QEMU's, which runs as its own user).
type Owner struct{ UID, GID int }

// UnixFor is Unix with the socket given to owner (when not nil): mode 0600
// owned by that user, so only it and root can connect.
func UnixFor(path string, owner *Owner) (net.Listener, error) {
	dirPath, name := filepath.Split(path)
	dir, err := safedir.Open(dirPath, safedir.Options{Create: true, Perm: 0o711, Chain: true})
	if err != nil {
		return nil, invalidf("the socket's directory %s: %w; give a socket in a directory only root can change", dirPath, err)
	}
	defer dir.Close()
	if err := safedir.Private(dir); err != nil {
		return nil, invalidf("the socket's directory: %w", err)
	}
	dfd := int(dir.Fd())
	// Whoever holds .<name>.lock owns the name: two processes starting on
	// one path cannot both take a stale socket's place, nor remove each
	// other's socket.
	lock, err := lockName(dfd, name)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	ok := false
	defer func() {
		if !ok {
			unix.Unlinkat(dfd, "."+name+".lock", 0)
			lock.Close()
		}
	}()
	var st unix.Stat_t
	if err := unix.Fstatat(dfd, name, &st, unix.AT_SYMLINK_NOFOLLOW); err == nil {
		if st.Mode&unix.S_IFMT != unix.S_IFSOCK {
			return nil, invalidf("%s exists and is not a socket; remove it or listen elsewhere", path)
		}
		c, err := net.Dial("unix", path)
		if err == nil {
			c.Close()
		}
		if !errors.Is(err, unix.ECONNREFUSED) { // listening (perhaps with a full backlog: EAGAIN)
			return nil, fmt.Errorf("%s: another process is listening there (or may be: %v); stop it or listen elsewhere", path, err)
		}
		// A stale socket of a process that died: the directory is ours
		// alone and the lock is held, so the name cannot change under us.
		if err := unix.Unlinkat(dfd, name, 0); err != nil && !errors.Is(err, unix.ENOENT) {
			return nil, fmt.Errorf("remove the stale socket %s: %w", path, err)
		}
	}
	// Bound in a private directory, made 0600, then renamed to its name:
	// never connectable by others, whatever the umask.
	tmp, err := os.MkdirTemp(dirPath, ".l") // short: a socket's path is at most 107 bytes
	if err != nil {
		return nil, err
	}
	defer os.Remove(tmp)
	tmpSock := filepath.Join(tmp, "s")
	l, err := net.Listen("unix", tmpSock)
	if err != nil {
		return nil, fmt.Errorf("listen on %s: %w", path, err)
	}
	ul := l.(*net.UnixListener)
	ul.SetUnlinkOnClose(false)
	err = os.Chmod(tmpSock, 0o600)
	if err == nil && owner != nil {
		err = os.Lchown(tmpSock, owner.UID, owner.GID)
	}
	if err != nil {
		l.Close()
		os.Remove(tmpSock)
		return nil, err
	}
	err = unix.Renameat2(unix.AT_FDCWD, tmpSock, dfd, name, unix.RENAME_NOREPLACE)
	if errors.Is(err, unix.EINVAL) { // a filesystem without RENAME_NOREPLACE: a link never replaces either
		if err = unix.Linkat(unix.AT_FDCWD, tmpSock, dfd, name, 0); err == nil {
			os.Remove(tmpSock)
		}
	}
	if err != nil {
		l.Close()
		os.Remove(tmpSock)
		if errors.Is(err, unix.EEXIST) {
			return nil, fmt.Errorf("%s appeared while nbdmover was listening; remove it or listen elsewhere", path)
		}
		return nil, fmt.Errorf("listen on %s: %w", path, err)
	}
	var mine unix.Stat_t
	if err := unix.Fstatat(dfd, name, &mine, unix.AT_SYMLINK_NOFOLLOW); err != nil {
		l.Close()
		return nil, err
	}
	ok = true
	return &unixListener{UnixListener: ul, path: path, dev: mine.Dev, ino: mine.Ino, lock: lock}, nil
}

// lockName takes the lock of a socket's name: an exclusive flock of
// .<name>.lock in the directory dfd, without waiting.
func lockName(dfd int, name string) (*os.File, error) {
	fd, err := unix.Openat(dfd, "."+name+".lock", unix.O_RDWR|unix.O_CREAT|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0o600)
	if err != nil {
		return nil, err
	}
	f := os.NewFile(uintptr(fd), "."+name+".lock")
	if err := unix.Flock(fd, unix.LOCK_EX|unix.LOCK_NB); err != nil {
		f.Close()
		if errors.Is(err, unix.EWOULDBLOCK) {
			return nil, errors.New("another process is listening there, or starting to; stop it or listen elsewhere")
		}
		return nil, err
	}
	return f, nil
}

// unixListener removes its socket when closed (its name, not the temporary
// one it was bound to, which net would remove), if the name is still its
// socket and not another process's since.
type unixListener struct {
	*net.UnixListener
	path     string
	dev, ino uint64
	lock     *os.File // the name's lock, held for the listener's life
	once     sync.Once
}

func (l *unixListener) Close() error {
	err := l.UnixListener.Close()
	l.once.Do(func() {
		var st unix.Stat_t
		if unix.Lstat(l.path, &st) == nil && st.Dev == l.dev && st.Ino == l.ino {
			os.Remove(l.path)
		}
		// The lock file goes with it (a process that opened it meanwhile
		// locks a file no longer named: it then finds the name free,
		// which it is).
		os.Remove(filepath.Join(filepath.Dir(l.path), "."+filepath.Base(l.path)+".lock"))
		l.lock.Close()
	})
	return err
}

// Addr is the socket's name.
func (l *unixListener) Addr() net.Addr { return &net.UnixAddr{Name: l.path, Net: "unix"} }

// Sweep removes from dir what listeners that died left there: sockets
// whose name's lock no one holds (with their lock files), and temporary
// directories of binds that never finished. It touches nothing in a
// directory another user could change, and nothing a live listener
// holds. It returns how many entries it removed.
func Sweep(dirPath string) (int, error) {
	dir, err := safedir.Open(dirPath, safedir.Options{Chain: true})
	if errors.Is(err, unix.ENOENT) {
		return 0, nil
	}
	if err != nil {
		return 0, err
	}
	defer dir.Close()
	if err := safedir.Private(dir); err != nil {
		return 0, err
	}
	names, err := dir.Readdirnames(-1)
	if err != nil {
		return 0, err
	}
	dfd, n := int(dir.Fd()), 0
	for _, name := range names {
		var st unix.Stat_t
		if unix.Fstatat(dfd, name, &st, unix.AT_SYMLINK_NOFOLLOW) != nil {
			continue
		}
		switch {
		case st.Mode&unix.S_IFMT == unix.S_IFDIR && strings.HasPrefix(name, ".l") &&
			time.Since(time.Unix(st.Mtim.Unix())) > time.Minute: // not a bind in progress
			unix.Unlinkat(dfd, name+"/s", 0) // its socket, if bound
			if unix.Unlinkat(dfd, name, unix.AT_REMOVEDIR) == nil {
				n++
			}
		case st.Mode&unix.S_IFMT == unix.S_IFSOCK:
			lock, err := lockName(dfd, name)
			if err != nil {
				continue // a live listener's
			}
			if unix.Unlinkat(dfd, name, 0) == nil {
				n++
			}
			unix.Unlinkat(dfd, "."+name+".lock", 0)
			lock.Close()
		}
	}
	return n, nil
}
