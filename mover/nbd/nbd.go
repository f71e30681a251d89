package nbd

import (
	"context"
	"errors"
	"fmt"
	"github.com/nbdmover/nbdmover/mover"

	"github.com/nbdmover/nbdmover/nbdclient"
	"github.com/nbdmover/nbdmover/repo"
)

// Options say which NBD export to back up.
type Options struct {
	URI  string // NBD URI of the export
	Name string // the name the backups are stored and restored by
	// Disk names the export's one disk in the backup (default "nbd").
	Disk string
	// Bitmap names the export's dirty bitmap. The backup is incremental
	// when the last backup of Name was taken at the same bitmap, which
	// must then have been recording since before that backup (a
	// persistent bitmap that is never cleared does).
	Bitmap string
}

// New returns the source that backs up one NBD export, e.g. a
// stopped domain's disk served by qemu-nbd.
func New(o Options) mover.Source {
	if o.Disk == "" {
		o.Disk = "nbd"
	}
	return &nbdSource{o: o}
}

type nbdSource struct{ o Options }

func (s *nbdSource) Name() string { return s.o.Name }

func (s *nbdSource) Validate() error {
	if s.o.URI == "" {
		return mover.Invalidf("backup --nbd: no NBD URI given")
	}
	if s.o.Name == "" {
		return mover.Invalidf("backup --nbd: --name NAME is required (the name the backup is listed and restored by)")
	}
	if err := repo.ValidName("backup", s.o.Name); err != nil {
		return mover.Invalidf("%w", err)
	}
	if err := repo.ValidName("disk", s.o.Disk); err != nil {
		return mover.Invalidf("%w", err)
	}
	return nil
}

func (s *nbdSource) Start(ctx context.Context, req mover.StartRequest) (mover.Session, error) {
	info := mover.SessionInfo{Source: "nbd", Consistency: "crash-consistent", Checkpoint: s.o.Bitmap}
	incremental := false
	switch reason := s.incrementalBlocker(req.Last); {
	case req.Mode == mover.ModeFull:
	case reason == "":
		incremental = true
	case req.Mode == mover.ModeIncremental:
		return nil, fmt.Errorf("backup %s: cannot take an incremental: %s", s.o.Name, reason)
	case req.Last == nil: // the first backup is full; nothing fell back
	default:
		info.Fallback = reason
		req.Log.Info("taking a full backup", "name", s.o.Name, "reason", reason)
	}
	cfg := nbdclient.Config{URI: s.o.URI, Bitmap: s.o.Bitmap}
	pool, err := nbdclient.DialPool(ctx, cfg, req.Readers)
	if errors.Is(err, nbdclient.ErrNoContext) && incremental {
		// The bitmap the last backup was taken at is gone: Backup reads
		// the disk in full, or refuses with --mode incremental.
		cfg.Bitmap, info.Checkpoint = "", ""
		pool, err = nbdclient.DialPool(ctx, cfg, req.Readers)
	}
	if err != nil {
		return nil, fmt.Errorf("backup %s disk %s: %w", s.o.Name, s.o.Disk, err)
	}
	disk := mover.SourceDisk{Name: s.o.Disk, Disk: pool, Incremental: incremental, Bitmap: s.o.Bitmap, CumulativeBitmap: true}
	return &nbdSession{pool: pool, disk: disk, info: info}, nil
}

// incrementalBlocker says why the backup cannot be incremental from last,
// or returns "".
func (s *nbdSource) incrementalBlocker(last *repo.Manifest) string {
	switch {
	case s.o.Bitmap == "":
		return "no --bitmap given"
	case last == nil:
		return "no earlier backup of " + s.o.Name
	case last.Checkpoint != s.o.Bitmap:
		return fmt.Sprintf("the last backup (%s) was not taken at bitmap %s", last.ID, s.o.Bitmap)
	}
	if _, err := last.Disk(s.o.Disk); err != nil {
		return fmt.Sprintf("the last backup (%s) has no disk %s", last.ID, s.o.Disk)
	}
	return ""
}

type nbdSession struct {
	pool *nbdclient.Pool
	disk mover.SourceDisk
	info mover.SessionInfo
}

func (s *nbdSession) Disks() []mover.SourceDisk                        { return []mover.SourceDisk{s.disk} }
func (s *nbdSession) Info() mover.SessionInfo                          { return s.info }
func (s *nbdSession) Files(context.Context) (map[string][]byte, error) { return nil, nil }
func (s *nbdSession) End(context.Context, bool) error                  { return s.pool.Close() }
