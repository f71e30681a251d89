package daemon

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"log/slog"
	"path/filepath"
	"slices"
	"sync"
	"time"

	"github.com/nbdmover/nbdmover/export"
	"github.com/nbdmover/nbdmover/repo"
)

// ExportRequest is the body of POST /v1/exports.
type ExportRequest struct {
	Domain string   `json:"domain"`
	Backup string   `json:"backup,omitempty"` // id, or "latest" (default)
	Disks  []string `json:"disks,omitempty"`  // default: every disk
}

// ExportView is an export as the API shows it.
type ExportView struct {
	ID      string        `json:"id"`
	Domain  string        `json:"domain"`
	Backup  string        `json:"backup"`
	Socket  string        `json:"socket"`
	Disks   []export.Disk `json:"disks"`
	Created time.Time     `json:"created"`
	Stats   export.Stats  `json:"stats"`
}

// exports are the NBD exports the daemon serves: each on a socket of its
// own, <run dir>/exports/<id>.sock (the daemon names it: a request never
// chooses a path), at most max at once, until DELETE /v1/exports/{id},
// the loss of its repository lock, or the daemon's shutdown.
type exports struct {
	ctx   context.Context // ends at shutdown
	o     exportsOptions
	log   *slog.Logger
	mu    sync.Mutex
	live  map[string]*export.Export
	ended export.Stats // what ended exports did, for the metrics' totals
	wg    sync.WaitGroup
}

type exportsOptions struct {
	repo       *repo.Repo
	dir        string // the sockets' directory
	max        int
	cacheBytes int64
	// idle ends an export no client has been connected to for that long
	// (0: never), so that one a scheduler forgot to DELETE does not hold
	// its lock (and every gc's exit 11) for ever.
	idle time.Duration
}

func newExports(ctx context.Context, o exportsOptions, log *slog.Logger) *exports {
	return &exports{ctx: ctx, o: o, log: log, live: map[string]*export.Export{}}
}

// reserved marks an id whose export is starting.
var reserved = &export.Export{}

// start starts an export of req.
func (x *exports) start(ctx context.Context, req ExportRequest) (ExportView, error) {
	if req.Domain == "" {
		return ExportView{}, invalidf("an export needs a domain")
	}
	if err := repo.ValidName("domain", req.Domain); err != nil {
		return ExportView{}, refuse(ErrInvalid, "%v", err)
	}
	if req.Backup != "" && req.Backup != "latest" {
		if err := repo.ValidBackupID(req.Backup); err != nil {
			return ExportView{}, refuse(ErrInvalid, "%v", err)
		}
	}
	for _, d := range req.Disks {
		if err := repo.ValidName("disk", d); err != nil {
			return ExportView{}, refuse(ErrInvalid, "%v", err)
		}
	}
	b := make([]byte, 8)
	rand.Read(b)
	id := hex.EncodeToString(b)
	x.mu.Lock()
	switch {
	case x.ctx.Err() != nil:
		x.mu.Unlock()
		return ExportView{}, ErrShuttingDown
	case len(x.live) >= x.o.max:
		x.mu.Unlock()
		return ExportView{}, refuse(ErrUnavailable, "%d exports are open, the most this daemon serves at once (--max-exports): delete one first", x.o.max)
	}
	x.live[id] = reserved
	x.wg.Add(1) // from the reservation: the daemon's end waits for a start in progress
	x.mu.Unlock()
	ctx, cancel := context.WithCancel(ctx)
	defer context.AfterFunc(x.ctx, cancel)() // the daemon ending stops a start in progress
	defer cancel()
	e, err := export.Start(ctx, export.Options{Repository: x.o.repo, Domain: req.Domain, Backup: req.Backup, Disks: req.Disks,
		Listen: "unix://" + filepath.Join(x.o.dir, id+".sock"), CacheBytes: x.o.cacheBytes, Log: x.log.With("export", id)})
	x.mu.Lock()
	defer x.mu.Unlock()
	if err != nil {
		delete(x.live, id)
		x.wg.Done()
		if errors.Is(err, export.ErrInvalid) {
			return ExportView{}, refuse(ErrInvalid, "%v", err)
		}
		if errors.Is(err, repo.ErrNoBackup) || errors.Is(err, repo.ErrNoDisk) {
			return ExportView{}, refuse(ErrNotFound, "%v", err)
		}
		return ExportView{}, err
	}
	x.live[id] = e
	go func() { // an export that ends by itself (its lock lost) goes
		defer x.wg.Done()
		select {
		case <-e.Done():
			if err := e.Err(); err != nil {
				x.log.Error("export ended", "export", id, "error", err)
			}
		case <-x.ctx.Done():
			e.Close()
		case <-x.idleFor(e):
			x.log.Info("export ended: no client was connected for the idle timeout", "export", id, "idle_timeout", x.o.idle)
			e.Close()
		}
		x.remove(id, e)
	}()
	x.log.Info("export started", "export", id, "domain", e.Domain, "backup", e.Backup, "socket", e.Address)
	return view(id, e), nil
}

// idleFor is closed once no client has been connected to e for the idle
// timeout (never when there is none); it looks every tenth of it, at most
// every 30 s, until e ends.
func (x *exports) idleFor(e *export.Export) <-chan struct{} {
	idle := make(chan struct{})
	if x.o.idle <= 0 {
		return idle
	}
	go func() {
		t := time.NewTicker(min(x.o.idle/10, 30*time.Second))
		defer t.Stop()
		since := time.Now()
		for {
			select {
			case <-e.Done():
				return
			case <-x.ctx.Done():
				return
			case now := <-t.C:
				if e.Stats().Clients > 0 {
					since = now
				} else if now.Sub(since) >= x.o.idle {
					close(idle)
					return
				}
			}
		}
	}()
	return idle
}

func view(id string, e *export.Export) ExportView {
	return ExportView{ID: id, Domain: e.Domain, Backup: e.Backup, Socket: e.Address, Disks: e.Disks, Created: e.Started, Stats: e.Stats()}
}

// remove forgets an ended export, adding its counts to the totals.
func (x *exports) remove(id string, e *export.Export) {
	x.mu.Lock()
	defer x.mu.Unlock()
	if x.live[id] != e {
		return
	}
	delete(x.live, id)
	s := e.Stats()
	x.ended.Reads += s.Reads
	x.ended.BytesServed += s.BytesServed
	x.ended.ReadErrors += s.ReadErrors
	x.ended.CacheHits += s.CacheHits
	x.ended.Fetches += s.Fetches
	x.ended.FetchSeconds += s.FetchSeconds
}

// list returns the live exports, oldest first.
func (x *exports) list() []ExportView {
	x.mu.Lock()
	defer x.mu.Unlock()
	out := []ExportView{}
	for id, e := range x.live {
		if e != reserved {
			out = append(out, view(id, e))
		}
	}
	slices.SortFunc(out, func(a, b ExportView) int { return a.Created.Compare(b.Created) })
	return out
}

func (x *exports) get(id string) (ExportView, bool) {
	x.mu.Lock()
	defer x.mu.Unlock()
	e, ok := x.live[id]
	if !ok || e == reserved {
		return ExportView{}, false
	}
	return view(id, e), true
}

// stop ends an export: its clients are disconnected.
func (x *exports) stop(id string) (ExportView, error) {
	x.mu.Lock()
	e, ok := x.live[id]
	x.mu.Unlock()
	if !ok || e == reserved {
		return ExportView{}, refuse(ErrNotFound, "no export %s", id)
	}
	v := view(id, e)
	e.Close()
	x.remove(id, e)
	x.log.Info("export stopped", "export", id, "bytes_served", e.Stats().BytesServed)
	return v, nil
}

// totals are the counts of every export, live and ended, and how many
// are open and how many clients they have.
func (x *exports) totals() (s export.Stats, open int) {
	x.mu.Lock()
	defer x.mu.Unlock()
	s = x.ended
	s.Clients = 0
	for _, e := range x.live {
		if e == reserved {
			continue
		}
		open++
		l := e.Stats()
		s.Clients += l.Clients
		s.Reads += l.Reads
		s.BytesServed += l.BytesServed
		s.ReadErrors += l.ReadErrors
		s.CacheHits += l.CacheHits
		s.Fetches += l.Fetches
		s.FetchSeconds += l.FetchSeconds
	}
	return s, open
}

// wait waits for the exports to end (after the daemon's context did).
func (x *exports) wait() { x.wg.Wait() }
