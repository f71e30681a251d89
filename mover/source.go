package mover

import (
	"context"
	"log/slog"

	"github.com/nbdmover/nbdmover/pipeline"
	"github.com/nbdmover/nbdmover/repo"
)

// Source is what a backup reads: a running libvirt domain (package
// mover/domain) or any NBD export (package mover/nbd). Backup drives
// every source through the
// same steps; a source only knows how to reach its disks.
type Source interface {
	// Name is the name its backups are stored, listed and restored by.
	Name() string
	// Validate checks the source's options without touching anything;
	// its errors match ErrInvalid.
	Validate() error
	// Start prepares a backup and connects to the disks: it ends what a
	// crashed run left behind, decides for each disk whether it can be
	// read incrementally from the last backup, and starts whatever job
	// exports the disks. The caller holds the name's lock and calls End
	// exactly once on the returned session.
	Start(ctx context.Context, req StartRequest) (Session, error)
}

// StartRequest is what a source is told when a backup starts.
type StartRequest struct {
	Repo    *repo.Repo
	ID      string         // the new backup's id
	Last    *repo.Manifest // the last committed backup of the source, nil when none
	Mode    string         // ModeAuto, ModeFull or ModeIncremental
	Readers int            // NBD connections per disk
	RunDir  string         // the host's run directory (locks, sockets)
	Log     *slog.Logger
}

// Session is a backup being read from a source.
type Session interface {
	// Disks are the disks to read.
	Disks() []SourceDisk
	// Info says how the backup is taken.
	Info() SessionInfo
	// Files are the extra objects to store with the backup (domain.xml,
	// checkpoint.xml), read once the disks are read.
	Files(ctx context.Context) (map[string][]byte, error)
	// End ends the session: the export job is ended and the connections
	// closed; committed says whether the backup was committed (a libvirt
	// domain then drops its older checkpoints, otherwise the new one).
	End(ctx context.Context, committed bool) error
}

// SourceDisk is one disk of a session.
type SourceDisk struct {
	Name string
	Disk pipeline.Disk
	// Incremental: the source's dirty bitmap Bitmap covers every change
	// since the last backup, so only the chunks it marks need reading.
	Incremental bool
	Bitmap      string // the dirty bitmap exported with the disk, "" when none
	// CumulativeBitmap: Bitmap is never cleared (a persistent bitmap of
	// an NBD export), so it must mark at least what it marked at the
	// last backup.
	CumulativeBitmap bool
}

// SessionInfo says how a backup is taken, for its manifest.
type SessionInfo struct {
	Source      string // "libvirt" or "nbd"
	Consistency string // "crash-consistent" or "quiesced"
	// Checkpoint is what the next incremental starts from: the libvirt
	// checkpoint this backup creates, or the NBD export's bitmap.
	Checkpoint string
	// Fallback says why disks that could not be read incrementally are
	// read in full.
	Fallback string
}
