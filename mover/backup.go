package mover

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"runtime"
	"time"

	"github.com/nbdmover/nbdmover/chunker"
	"github.com/nbdmover/nbdmover/nbdclient"
	"github.com/nbdmover/nbdmover/repo"
	"golang.org/x/sync/errgroup"
)

// Backup modes.
const (
	ModeAuto        = "auto"
	ModeFull        = "full"
	ModeIncremental = "incremental"
)

// BackupOptions describe one backup. Either Domain (a libvirt domain) or
// NBD and Name (any NBD export) say what to back up.
type BackupOptions struct {
	Repo        RepoOptions
	ChunkSize   int64  // for a repository this backup creates
	Compression string // for new chunks; "" = the repository's default
	Mode        string // auto (default), full, incremental
	Disks       []string
	Tuning      Tuning

	// A libvirt domain.
	Domain  string
	Connect string // libvirt URI
	// Quiesce freezes the guest's filesystems (guest agent) and fails when
	// it cannot; QuiesceOptional tries and continues crash-consistent.
	Quiesce, QuiesceOptional bool
	ScratchDir               string // scratch images (default DefaultScratchDir)
	RunDir                   string // locks and sockets (default DefaultRunDir)

	// Any NBD export, stored as domain Name with one disk (Disks[0], or
	// "nbd"); Bitmap names the dirty bitmap for incrementals.
	NBD    string
	Name   string
	Bitmap string

	Log *slog.Logger `json:"-"`
	// Progress, if set, is called as each disk starts with the counters
	// that the disk's backup updates.
	Progress func(disk string, st *DiskStats) `json:"-"`
}

// BackupResult is what a committed backup did.
type BackupResult struct {
	ID          string       `json:"id"`
	Domain      string       `json:"domain"`
	Mode        string       `json:"mode"`
	Parent      string       `json:"parent,omitempty"`
	Fallback    string       `json:"fallback,omitempty"`
	Consistency string       `json:"consistency"`
	Repository  string       `json:"repository"`
	Seconds     float64      `json:"seconds"`
	Disks       []DiskResult `json:"disks"`
	// Totals over the disks.
	BytesRead    int64   `json:"bytes_read"`
	BytesWritten int64   `json:"bytes_written"`
	BytesDedup   int64   `json:"bytes_dedup"`
	BytesZero    int64   `json:"bytes_zero"`
	RateMBps     float64 `json:"rate_mb_per_s"` // disk bytes covered per second
}

// DiskResult is what the backup did for one disk.
type DiskResult struct {
	Name         string  `json:"name"`
	Size         int64   `json:"size"`
	Mode         string  `json:"mode"`
	BytesRead    int64   `json:"bytes_read"`
	BytesWritten int64   `json:"bytes_written"`
	BytesDedup   int64   `json:"bytes_dedup"`
	BytesZero    int64   `json:"bytes_zero"`
	Seconds      float64 `json:"seconds"`
}

// Backup takes one backup and commits it, or commits nothing and says why.
func Backup(ctx context.Context, o BackupOptions) (*BackupResult, error) {
	if o.Log == nil {
		o.Log = slog.New(slog.DiscardHandler)
	}
	switch o.Mode {
	case "":
		o.Mode = ModeAuto
	case ModeAuto, ModeFull, ModeIncremental:
	default:
		return nil, fmt.Errorf("backup mode %q: want auto, full or incremental", o.Mode)
	}
	o.Tuning = o.Tuning.withDefaults(runtime.NumCPU())
	switch {
	case o.NBD != "" && o.Domain != "":
		return nil, errors.New("backup: give either --domain or --nbd, not both")
	case o.NBD != "":
		return backupNBD(ctx, o)
	case o.Domain != "":
		return backupDomain(ctx, o)
	}
	return nil, errors.New("backup: give --domain NAME, or --nbd URI with --name NAME")
}

// openForBackup opens (creating on first use) the repository, with the
// chosen compression for new chunks.
func openForBackup(ctx context.Context, o BackupOptions) (*repo.Repo, error) {
	init, err := InitOptions{ChunkSize: o.ChunkSize, Compression: o.Compression}.repoInit()
	if err != nil {
		return nil, err
	}
	s, err := o.Repo.store()
	if err != nil {
		return nil, err
	}
	r, err := repo.OpenOrInit(ctx, s, init)
	if err != nil || o.Compression == "" {
		return r, err
	}
	return r.WithCompression(init.Compression)
}

// newManifest starts the manifest of a full backup of domain taken at
// start: its id sorts after the last backup's, and it records the
// compression new chunks get.
func newManifest(r *repo.Repo, o BackupOptions, domain, source string, last *repo.Manifest, start time.Time) *repo.Manifest {
	lastID := ""
	if last != nil {
		lastID = last.ID
	}
	m := &repo.Manifest{ID: repo.NewBackupID(start, lastID), Domain: domain, Created: start.UTC(), Source: source,
		Compression: r.Config().Compression, Mode: ModeFull}
	if o.Compression != "" {
		m.Compression = o.Compression
	}
	return m
}

// lastBackup returns the newest committed backup of domain, or nil.
func lastBackup(ctx context.Context, r *repo.Repo, domain string) (*repo.Manifest, error) {
	m, err := r.Backup(ctx, domain, "latest")
	if errors.Is(err, repo.ErrNoBackup) {
		return nil, nil
	}
	return m, err
}

// diskSource is one disk ready to back up.
type diskSource struct {
	name   string
	pool   *nbdclient.Pool
	parent *repo.Index // nil: full
}

// runDisks backs up every disk in parallel, sharing one buffer budget. On
// any error the others stop and nothing is returned.
func runDisks(ctx context.Context, o BackupOptions, r *repo.Repo, disks []diskSource) ([]*repo.Index, []DiskResult, error) {
	o.Tuning = o.Tuning.forChunks(r.Config().ChunkSize)
	bufs := newBuffers(o.Tuning, len(disks), r.Config().ChunkSize)
	indexes := make([]*repo.Index, len(disks))
	results := make([]DiskResult, len(disks))
	g, gctx := errgroup.WithContext(ctx)
	for i, d := range disks {
		g.Go(func() error {
			start := time.Now()
			job := &diskJob{name: d.name, pool: d.pool, repo: r, bufs: bufs, tuning: o.Tuning, stats: &DiskStats{}}
			mode := ModeFull
			if d.parent != nil {
				mode = ModeIncremental
				job.parent, job.stale = d.parent.Resized(d.pool.Info().Size)
				job.known = make(map[chunker.Digest]bool, len(d.parent.Digests))
				for _, dg := range d.parent.Digests {
					job.known[dg] = true
				}
			}
			if o.Progress != nil {
				o.Progress(d.name, job.stats)
			}
			ix, err := job.run(gctx)
			if err != nil {
				return err
			}
			indexes[i] = ix
			st := job.stats
			results[i] = DiskResult{Name: d.name, Size: ix.Size, Mode: mode,
				BytesRead: st.BytesRead.Load(), BytesWritten: st.BytesWritten.Load(),
				BytesDedup: st.BytesDedup.Load(), BytesZero: st.BytesZero.Load(),
				Seconds: time.Since(start).Seconds()}
			o.Log.Info("disk done", "disk", d.name, "mode", mode, "size", ix.Size,
				"read", results[i].BytesRead, "written", results[i].BytesWritten, "seconds", results[i].Seconds)
			return nil
		})
	}
	if err := g.Wait(); err != nil {
		return nil, nil, err
	}
	return indexes, results, nil
}

// commit writes the backup's indexes, files and manifest.
func commit(ctx context.Context, r *repo.Repo, m *repo.Manifest, disks []diskSource, indexes []*repo.Index,
	results []DiskResult, files map[string][]byte, start time.Time) (*BackupResult, error) {
	ixs := map[string]*repo.Index{}
	res := &BackupResult{ID: m.ID, Domain: m.Domain, Mode: m.Mode, Parent: m.Parent, Fallback: m.Fallback,
		Consistency: m.Consistency, Repository: r.Location(), Disks: results}
	var covered int64
	for i, d := range disks {
		ixs[d.name] = indexes[i]
		dr := results[i]
		m.Disks = append(m.Disks, repo.DiskManifest{Name: d.name, Size: dr.Size, Mode: dr.Mode,
			BytesRead: dr.BytesRead, BytesWritten: dr.BytesWritten, BytesDedup: dr.BytesDedup, BytesZero: dr.BytesZero})
		res.BytesRead += dr.BytesRead
		res.BytesWritten += dr.BytesWritten
		res.BytesDedup += dr.BytesDedup
		res.BytesZero += dr.BytesZero
		covered += dr.Size
	}
	m.Completed = time.Now().UTC()
	if err := r.Commit(ctx, m, ixs, files); err != nil {
		return nil, fmt.Errorf("commit backup %s/%s: %w", m.Domain, m.ID, err)
	}
	res.Seconds = time.Since(start).Seconds()
	if res.Seconds > 0 {
		res.RateMBps = float64(covered) / res.Seconds / 1e6
	}
	return res, nil
}

// backupNBD backs up one NBD export as domain o.Name. With o.Bitmap, and a
// last backup taken at the same bitmap, only the chunks the bitmap marks
// are read: the bitmap must have been recording since before that backup
// (a persistent bitmap that is never cleared does).
func backupNBD(ctx context.Context, o BackupOptions) (*BackupResult, error) {
	start := time.Now()
	if o.Name == "" {
		return nil, errors.New("backup --nbd: --name NAME is required (the name the backup is listed and restored by)")
	}
	if err := repo.ValidName("backup", o.Name); err != nil {
		return nil, err
	}
	disk := "nbd"
	if len(o.Disks) > 1 {
		return nil, errors.New("backup --nbd: an NBD export is one disk; give at most one --disk name")
	} else if len(o.Disks) == 1 {
		disk = o.Disks[0]
	}
	if err := repo.ValidName("disk", disk); err != nil {
		return nil, err
	}
	r, err := openForBackup(ctx, o)
	if err != nil {
		return nil, err
	}
	last, err := lastBackup(ctx, r, o.Name)
	if err != nil {
		return nil, err
	}

	m := newManifest(r, o, o.Name, "nbd", last, start)
	m.Consistency, m.Checkpoint = "crash-consistent", o.Bitmap
	var parent *repo.Index
	switch reason := nbdIncrementalBlocker(o, last, disk); {
	case o.Mode == ModeFull:
	case reason == "":
		if parent, err = r.LoadIndex(ctx, last, disk); err != nil {
			return nil, fmt.Errorf("backup %s: parent backup %s: %w", o.Name, last.ID, err)
		}
		m.Mode, m.Parent = ModeIncremental, last.ID
	case o.Mode == ModeIncremental:
		return nil, fmt.Errorf("backup %s: cannot take an incremental: %s", o.Name, reason)
	case last == nil: // the first backup is full; nothing fell back
	default:
		m.Fallback = reason
		o.Log.Info("taking a full backup", "name", o.Name, "reason", reason)
	}

	pool, err := nbdclient.DialPool(ctx, nbdclient.Config{URI: o.NBD, Bitmap: o.Bitmap}, o.Tuning.Readers)
	if err != nil {
		return nil, fmt.Errorf("backup %s disk %s: %w", o.Name, disk, err)
	}
	defer pool.Close()
	disks := []diskSource{{name: disk, pool: pool, parent: parent}}
	indexes, results, err := runDisks(ctx, o, r, disks)
	if err != nil {
		return nil, fmt.Errorf("backup %s: %w", o.Name, err)
	}
	return commit(ctx, r, m, disks, indexes, results, nil, start)
}

// nbdIncrementalBlocker says why an NBD backup cannot be incremental, or
// returns "".
func nbdIncrementalBlocker(o BackupOptions, last *repo.Manifest, disk string) string {
	switch {
	case o.Bitmap == "":
		return "no --bitmap given"
	case last == nil:
		return "no earlier backup of " + o.Name
	case last.Checkpoint != o.Bitmap:
		return fmt.Sprintf("the last backup (%s) was not taken at bitmap %s", last.ID, o.Bitmap)
	}
	if _, err := last.Disk(disk); err != nil {
		return fmt.Sprintf("the last backup (%s) has no disk %s", last.ID, disk)
	}
	return ""
}
