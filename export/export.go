// Package export serves the disks of a backup as read-only NBD exports
// (package nbdserver), each disk read through a diskview.View: any backup,
// compressed or encrypted, from a local or S3 repository, at any size,
// without restoring it first. It needs nothing of libvirt.
package export

import (
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"github.com/nbdmover/nbdmover/repo/lock"
	"log/slog"
	"net"
	"net/url"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nbdmover/nbdmover/diskview"
	"github.com/nbdmover/nbdmover/internal/listen"
	"github.com/nbdmover/nbdmover/nbdserver"
	"github.com/nbdmover/nbdmover/repo"
)

// Options say what to export where.
type Options struct {
	Repo   repo.Options
	Domain string
	Backup string   // id, or "" / "latest"
	Disks  []string // the disks to export (default: all)
	// Listen is unix:///absolute/path (a 0600 socket) or host:port. TCP
	// off loopback needs TLS.
	Listen string
	// SocketOwner, when set, is given the unix socket (QEMU's user, for
	// a domain whose disks are backed by the export).
	SocketOwner *listen.Owner
	TLS         listen.TLS
	// CacheBytes bounds the decoded chunks kept, for all disks together
	// (default 512 MiB).
	CacheBytes int64
	// NoLock reads without the repository's shared lock (a read-only
	// repository): a gc running elsewhere may then delete what is served.
	NoLock bool
	// Repository is an open repository to use instead of opening Repo
	// (the daemon's).
	Repository *repo.Repo
	Log        *slog.Logger
}

// DefaultCacheBytes is the cache of an export when none is given.
const DefaultCacheBytes = 512 << 20

// ErrInvalid is matched by the errors for options that can never work.
var ErrInvalid = errors.New("invalid export option")

type invalidError struct{ error }

func (invalidError) Is(target error) bool { return target == ErrInvalid }

func invalidf(format string, args ...any) error { return invalidError{fmt.Errorf(format, args...)} }

// Disk is one disk being served.
type Disk struct {
	Name string `json:"name"` // also the NBD export's name
	Size int64  `json:"size"`
	URI  string `json:"uri"` // for nbdinfo, nbdcopy, qemu-img, QEMU
}

// Stats count what an export did.
type Stats struct {
	Clients     int64 `json:"clients"`      // connected now
	Reads       int64 `json:"reads"`        // read requests answered
	BytesServed int64 `json:"bytes_served"` // bytes those reads returned
	ReadErrors  int64 `json:"read_errors"`  // reads answered with EIO
	CacheHits   int64 `json:"cache_hits"`   // chunks read from the cache
	Fetches     int64 `json:"fetches"`      // chunks fetched from the repository
	// FetchSeconds is the time all fetches took (FetchSeconds/Fetches is
	// the mean fetch latency).
	FetchSeconds float64 `json:"fetch_seconds"`
}

// Export is a backup being served.
type Export struct {
	Domain, Backup string
	Disks          []Disk
	Address        string // the socket's path, or host:port
	Started        time.Time

	log    *slog.Logger
	r      *repo.Repo
	views  []*diskview.View
	srv    *nbdserver.Server
	l      net.Listener
	lock   *lock.Lock
	cancel context.CancelCauseFunc
	once   sync.Once
	done   chan struct{}
	err    error // why it ended (nil: Close)

	reads, bytes, readErrors atomic.Int64
	damaged                  sync.Map // chunk keys recorded damaged by this export
}

// Start checks o, opens the repository, takes a shared lock, loads the
// disks' indexes and listens; the export serves from then until Close,
// ctx's end, or the loss of its lock (a gc took it for stale). Nothing
// proportional to a disk's size happens but loading its index.
func Start(ctx context.Context, o Options) (*Export, error) {
	if o.Log == nil {
		o.Log = slog.New(slog.DiscardHandler)
	}
	if err := repo.ValidName("domain", o.Domain); err != nil {
		return nil, invalidError{err}
	}
	for _, d := range o.Disks {
		if err := repo.ValidName("disk", d); err != nil {
			return nil, invalidError{err}
		}
	}
	if o.CacheBytes == 0 {
		o.CacheBytes = DefaultCacheBytes
	}
	if o.CacheBytes < 16<<20 {
		return nil, invalidf("--cache-size %d: at least 16 MiB", o.CacheBytes)
	}
	path, addr, err := listen.Split(o.Listen)
	if err != nil {
		return nil, invalidError{err}
	}
	var tlsConfig *tls.Config
	switch {
	case path != "" && o.TLS.Enabled():
		return nil, invalidf("--listen %s: TLS is for TCP; a unix socket is private by its mode (0600)", o.Listen)
	case path == "" && !listen.Loopback(addr) && (!o.TLS.Enabled() || o.TLS.ClientCA == ""):
		// Whoever reaches the port reads the disks: off loopback, only
		// clients with a certificate may.
		return nil, invalidf("--listen %s: off loopback, an export needs TLS with client certificates: "+
			"give --tls-cert, --tls-key and --tls-client-ca (or listen on a unix socket or a loopback address)", o.Listen)
	case o.TLS.Enabled():
		if tlsConfig, err = o.TLS.Config(); err != nil {
			return nil, invalidError{err}
		}
	}

	r := o.Repository
	if r == nil {
		r, err = o.Repo.Open(ctx)
	} else {
		err = r.Recheck(ctx) // kept open: still the repository it was?
	}
	if err != nil {
		return nil, err
	}
	e := &Export{Domain: o.Domain, log: o.Log, r: r, done: make(chan struct{}), Started: time.Now()}
	// The export outlives ctx (a daemon's request), which only bounds
	// its start: the lock's wait, the manifest and the indexes.
	caller := ctx
	ctx, e.cancel = context.WithCancelCause(context.WithoutCancel(ctx))
	stopSetup := context.AfterFunc(caller, func() { e.cancel(context.Cause(caller)) })
	ok := false
	defer func() {
		stopSetup()
		if !ok {
			e.stop(nil)
		}
	}()
	m, err := r.Backup(ctx, o.Domain, o.Backup)
	if err != nil {
		return nil, err
	}
	e.Backup = m.ID
	// The shared lock keeps a gc from deleting what is served (should the
	// backup be forgotten meanwhile); its loss ends the export.
	if !o.NoLock {
		held, lctx, err := r.Lock(ctx, lock.Shared, lock.ExportPurpose(m.Domain, m.ID), o.Log)
		if err != nil {
			return nil, lock.NoLockHint(err)
		}
		e.lock = held
		ctx = lctx
	}
	disks := m.Disks
	if len(o.Disks) > 0 {
		disks = nil
		for _, name := range o.Disks {
			d, err := m.Disk(name)
			if err != nil {
				return nil, err
			}
			disks = append(disks, *d)
		}
	}
	exports := map[string]nbdserver.Export{}
	for _, d := range disks {
		if _, dup := exports[d.Name]; dup {
			return nil, invalidf("--disk %s given twice", d.Name)
		}
		v, err := diskview.Open(ctx, r, m, d.Name, diskview.Options{CacheBytes: o.CacheBytes / int64(len(disks))})
		if err != nil {
			return nil, err
		}
		e.views = append(e.views, v)
		exports[d.Name] = &disk{e: e, v: v, name: d.Name, backup: m.Domain + "/" + m.ID}
		e.Disks = append(e.Disks, Disk{Name: d.Name, Size: d.Size})
	}

	e.srv = nbdserver.New(nbdserver.Options{Exports: exports, TLS: tlsConfig, RequireTLS: tlsConfig != nil,
		OnRead: e.onRead, Log: o.Log.With("export", m.Domain+"/"+m.ID)})
	if path != "" {
		e.l, err = listen.UnixFor(path, o.SocketOwner)
	} else {
		e.l, err = net.Listen("tcp", addr)
	}
	if errors.Is(err, listen.ErrInvalid) {
		return nil, invalidError{err}
	}
	if err != nil {
		return nil, err
	}
	e.Address = e.l.Addr().String()
	for i := range e.Disks {
		e.Disks[i].URI = uri(path, e.Address, tlsConfig != nil, e.Disks[i].Name)
	}
	go func() {
		err := e.srv.Serve(ctx, e.l)
		if err == nil && ctx.Err() != nil {
			err = context.Cause(ctx) // the lock lost, or Close (context.Canceled: no error)
		}
		e.stop(err)
	}()
	if e.lock != nil { // lost: a gc may delete what is served
		context.AfterFunc(ctx, func() { e.stop(context.Cause(ctx)) })
	}
	ok = true
	return e, nil
}

// uri is the NBD URI of an export (the NBD project's doc/uri.md).
func uri(path, addr string, tls bool, name string) string {
	if path != "" {
		return "nbd+unix:///" + url.PathEscape(name) + "?socket=" + escapeQuery(path)
	}
	scheme := "nbd"
	if tls {
		scheme = "nbds"
	}
	return scheme + "://" + addr + "/" + url.PathEscape(name)
}

// escapeQuery escapes a query's value, keeping the slashes of a path
// (what people type, and every URI parser takes).
func escapeQuery(s string) string {
	var b strings.Builder
	for _, c := range []byte(s) {
		if 'a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || '0' <= c && c <= '9' || strings.IndexByte("-._~/", c) >= 0 {
			b.WriteByte(c)
		} else {
			fmt.Fprintf(&b, "%%%02X", c)
		}
	}
	return b.String()
}

// stop ends the export (once): the server, the views, the lock. err is
// why (nil or context.Canceled: it was asked to).
func (e *Export) stop(err error) {
	e.once.Do(func() {
		e.cancel(err)
		if e.srv != nil {
			e.srv.Close()
		}
		if e.l != nil {
			e.l.Close()
		}
		for _, v := range e.views {
			v.Close()
		}
		if e.lock != nil {
			e.lock.Release()
		}
		if !errors.Is(err, context.Canceled) {
			e.err = err
		}
		close(e.done)
	})
}

// Close stops serving: clients are disconnected.
func (e *Export) Close() { e.stop(nil) }

// Done is closed when the export has ended; Err then says why (nil after
// Close).
func (e *Export) Done() <-chan struct{} { return e.done }

// Err is why the export ended, once Done is closed.
func (e *Export) Err() error {
	<-e.done
	return e.err
}

// Idle is closed once a client has read an export and every such client
// has disconnected since (export --once).
func (e *Export) Idle() <-chan struct{} { return e.srv.Idle() }

// Stats returns what the export did so far.
func (e *Export) Stats() Stats {
	s := Stats{Clients: int64(e.srv.Active()), Reads: e.reads.Load(), BytesServed: e.bytes.Load(), ReadErrors: e.readErrors.Load()}
	for _, v := range e.views {
		vs := v.Stats()
		s.CacheHits += vs.Hits
		s.Fetches += vs.Fetches
		s.FetchSeconds += vs.FetchTime.Seconds()
	}
	return s
}

func (e *Export) onRead(_ string, n int64) {
	e.reads.Add(1)
	e.bytes.Add(n)
}

// readFailed counts a failed read and, when a chunk is damaged (not
// merely unreachable), records it as verify would, once per chunk.
func (e *Export) readFailed(backup string, err error) {
	e.readErrors.Add(1)
	key, problem, ok := repo.ChunkDamage(err)
	if !ok {
		return
	}
	if _, seen := e.damaged.LoadOrStore(key, true); seen {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if err := e.r.RecordDamage(ctx, key, problem, []string{backup}); err != nil {
		e.log.Error("cannot record a damaged chunk", "chunk", key, "error", err)
		e.damaged.Delete(key)
		return
	}
	e.log.Error("damaged chunk recorded: the next backups of the domain store it again (nbdmover verify --read-data lists what is damaged)",
		"chunk", key, "problem", problem, "backup", backup)
}

// disk is one disk as an nbdserver.Export.
type disk struct {
	e      *Export
	v      *diskview.View
	name   string
	backup string // domain/id
}

func (d *disk) Size() int64 { return d.v.Size() }

func (d *disk) Read(ctx context.Context, off, n int64, fn func(off int64, data []byte, n int64) error) error {
	chunk := d.v.Grid().ChunkSize
	err := d.v.Pieces(ctx, off, n, func(off int64, data []byte, n int64) error {
		if data != nil && int64(len(data)) < chunk/4 {
			// A small part of a chunk is copied: a reply waiting on a
			// slow client then holds its bytes, not the whole chunk.
			data = bytes.Clone(data)
		}
		return fn(off, data, n)
	})
	if err != nil && ctx.Err() == nil {
		d.e.readFailed(d.backup, err)
	}
	return err
}

func (d *disk) Allocation(off, n int64, max int) []nbdserver.Run {
	var out []nbdserver.Run
	for _, r := range d.v.Allocation(off, n, max) {
		out = append(out, nbdserver.Run{Length: r.Length, Zero: r.Zero})
	}
	return out
}

func (d *disk) Prefetch(off, n int64) { d.v.PrefetchRange(off, n) }
