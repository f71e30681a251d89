package mover

import (
	"context"
	"errors"
	"fmt"
	"github.com/nbdmover/nbdmover/repo/lock"
	"log/slog"
	"runtime"
	"slices"
	"strings"
	"sync/atomic"
	"time"

	"github.com/nbdmover/nbdmover/chunker"
	"github.com/nbdmover/nbdmover/internal/hold"
	"github.com/nbdmover/nbdmover/nbdclient"
	"github.com/nbdmover/nbdmover/pipeline"
	"github.com/nbdmover/nbdmover/repo"
	"golang.org/x/sync/errgroup"
)

// Backup modes.
const (
	ModeAuto        = "auto"
	ModeFull        = "full"
	ModeIncremental = "incremental"
)

// DefaultRunDir holds the per-name locks and each job's private socket
// directory.
const DefaultRunDir = "/run/nbdmover"

// DefaultMaxMemory is the default bound on a backup's buffers.
const DefaultMaxMemory = 1 << 30

// ErrInvalid is matched by the errors for options that can never work:
// bad usage, not a failure of the backup.
var ErrInvalid = errors.New("invalid option")

type invalidError struct{ err error }

func (e invalidError) Error() string        { return e.err.Error() }
func (e invalidError) Unwrap() error        { return e.err }
func (e invalidError) Is(target error) bool { return target == ErrInvalid }

// Invalidf returns an error that matches ErrInvalid.
func Invalidf(format string, args ...any) error {
	return invalidError{fmt.Errorf(format, args...)}
}

// Options describe a backup, whatever its source.
type Options struct {
	Repo repo.Options
	// Repository, when set, is the open repository to use instead of
	// opening Repo (a daemon's, shared by its jobs and their store's
	// limits).
	Repository  *repo.Repo `json:"-"`
	ChunkSize   int64      // for a repository this backup creates
	Compression string     // for new chunks; "" = the repository's default
	Mode        string     // auto (default), full, incremental
	// Init creates the repository when there is none (else a missing
	// repository is an error matching repo.ErrNoRepository).
	Init   bool
	Tuning pipeline.Tuning
	RunDir string // locks and job sockets (default DefaultRunDir)
	// MaxMemory bounds the buffers of the pipeline (default
	// DefaultMaxMemory): a backup whose readers, disks and chunk size need
	// more is refused before it reads.
	MaxMemory int64
	// VerifySample is how many clean chunks per disk an incremental reads
	// to check its dirty bitmap: nil for pipeline.SampleSize (16 plus 0.1%
	// of the chunks holding data, at most 256), 0 for none.
	VerifySample *int
	// Hooks run before and after the backup (hooks.go).
	Hooks Hooks

	Log *slog.Logger `json:"-"`
	// Progress, if set, is called as each disk starts with the counters
	// that the disk's backup updates.
	Progress func(disk string, st *pipeline.Stats) `json:"-"`
}

// Validate checks the options without touching anything; its errors
// match ErrInvalid.
func (o Options) Validate() error {
	_, err := o.validate()
	return err
}

// validate is Validate, and returns the parameters a repository this backup
// creates gets (ChunkSize, Compression parsed).
func (o Options) validate() (repo.InitOptions, error) {
	init := repo.InitOptions{ChunkSize: o.ChunkSize}
	switch o.Mode {
	case "", ModeAuto, ModeFull, ModeIncremental:
	default:
		return init, Invalidf("backup mode %q: want auto, full or incremental", o.Mode)
	}
	if o.ChunkSize != 0 {
		if err := chunker.CheckChunkSize(o.ChunkSize); err != nil {
			return init, Invalidf("%w", err)
		}
	}
	if o.Compression != "" {
		c, err := chunker.ParseCompression(o.Compression)
		if err != nil {
			return init, Invalidf("%w", err)
		}
		init.Compression = c
	}
	if r := o.Tuning.Readers; r < 0 || r > 64 {
		return init, Invalidf("readers %d: want 1 to 64", r)
	}
	if o.VerifySample != nil && *o.VerifySample < 0 {
		return init, Invalidf("verify sample %d: want a number of chunks, or 0 for none", *o.VerifySample)
	}
	if o.RunDir != "" {
		if err := CheckDir(o.RunDir); err != nil {
			return init, fmt.Errorf("run directory: %w", err)
		}
	}
	return init, nil
}

func (o Options) withDefaults() Options {
	if o.Mode == "" {
		o.Mode = ModeAuto
	}
	if o.RunDir == "" {
		o.RunDir = DefaultRunDir
	}
	if o.Log == nil {
		o.Log = slog.New(slog.DiscardHandler)
	}
	if o.MaxMemory <= 0 {
		o.MaxMemory = DefaultMaxMemory
	}
	return o
}

// Memory is what the pipeline of a backup with these options takes for
// disks disks of chunkSize-byte chunks.
func (o Options) Memory(disks int, chunkSize int64) int64 {
	return o.Tuning.WithDefaults(runtime.NumCPU(), chunkSize).Memory(disks, chunkSize)
}

// checkMemory refuses a backup whose buffers exceed MaxMemory.
func (o Options) checkMemory(name string, disks int, chunkSize int64) error {
	if need := o.Memory(disks, chunkSize); need > o.MaxMemory {
		t := o.Tuning.WithDefaults(runtime.NumCPU(), chunkSize)
		return Invalidf("backup %s needs %d MiB of buffers (%d readers x %d disks of %d KiB chunks, %d workers, %d uploads), "+
			"more than the limit of %d MiB: use fewer readers, or raise the limit", name, need>>20, t.Readers, disks,
			chunkSize>>10, t.Workers, t.Uploads, o.MaxMemory>>20)
	}
	return nil
}

// BackupResult is what a committed backup did.
type BackupResult struct {
	ID          string `json:"id"`
	Domain      string `json:"domain"`
	Mode        string `json:"mode"`
	Parent      string `json:"parent,omitempty"`
	Fallback    string `json:"fallback,omitempty"`
	Consistency string `json:"consistency"`
	Repository  string `json:"repository"`
	// RepositoryID is the repository's id; CreatedRepository says this
	// backup created the repository (Init).
	RepositoryID      string `json:"repository_id"`
	CreatedRepository bool   `json:"created_repository,omitempty"`
	// Checkpoint is what the next incremental starts from: the libvirt
	// checkpoint (domain.CheckpointName) or the NBD export's bitmap.
	Checkpoint string `json:"checkpoint,omitempty"`
	// Verification is what the check of the dirty bitmaps found.
	Verification *repo.Verification `json:"verification,omitempty"`
	// ObjectLock is the backup's protection (S3 Object Lock).
	ObjectLock *repo.BackupLock `json:"object_lock,omitempty"`
	Seconds    float64          `json:"seconds"`
	Disks      []DiskResult     `json:"disks"`
	// Totals over the disks.
	BytesRead    int64 `json:"bytes_read"`
	BytesWritten int64 `json:"bytes_written"`
	BytesDedup   int64 `json:"bytes_dedup"`
	BytesZero    int64 `json:"bytes_zero"`
	// Rates over the backup's time: bytes read from the disks and bytes
	// stored, per second (MB = 10^6 bytes). RateMBps is ReadMBps (it was
	// the disks' size over the time, which made an incremental look
	// thousands of times faster than what it moved).
	ReadMBps    float64 `json:"read_mb_per_s"`
	WrittenMBps float64 `json:"written_mb_per_s"`
	RateMBps    float64 `json:"rate_mb_per_s"`
	// Healed counts the chunks verify had found damaged that this backup
	// built from the disks and stored again.
	Healed int `json:"healed_chunks,omitempty"`
	// PostHookError is why the post-hook failed (the backup stands).
	PostHookError string `json:"post_hook_error,omitempty"`
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
	// Rates over the disk's time, as the backup's.
	ReadMBps    float64 `json:"read_mb_per_s"`
	WrittenMBps float64 `json:"written_mb_per_s"`
	// The dirty bitmap's check: bytes it marked, clean chunks read and
	// found unchanged (and their bytes), clean chunks found unallocated.
	DirtyBytes int64 `json:"dirty_bytes,omitempty"`
	// PatchedChunks: dirty chunks stored as patches over their parent's
	// chunk (docs/format.md, "Patched chunks").
	PatchedChunks  int64 `json:"patched_chunks,omitempty"`
	VerifiedChunks int64 `json:"verified_chunks,omitempty"`
	VerifiedBytes  int64 `json:"verified_bytes,omitempty"`
	ZeroedChunks   int64 `json:"zeroed_chunks,omitempty"`
}

// Backup takes one backup of src and commits it, or commits nothing and
// says why. The steps are the same for every source: lock the name, find
// the last committed backup, start the source's session, read every disk
// (incrementally where the source allows), commit, end the session.
func Backup(ctx context.Context, src Source, o Options) (*BackupResult, error) {
	start := time.Now()
	o = o.withDefaults()
	init, err := o.validate()
	if err != nil {
		return nil, err
	}
	if err := src.Validate(); err != nil {
		return nil, err
	}
	// Everything that can refuse the backup is checked before anything is
	// made: the repository (read), the source's disks (a domain libvirt
	// does not know leaves no lock file behind) and the memory they need.
	r, err := openForBackup(ctx, o, init)
	if err != nil {
		return nil, err
	}
	if err := o.checkSource(src, r, init); err != nil {
		return nil, err
	}
	nameLock, err := LockName(o.RunDir, src.Name())
	if err != nil {
		return nil, err
	}
	defer nameLock.Close()
	if o.Hooks.Pre == "" && o.Hooks.Post == "" {
		return backupLocked(ctx, src, o, r, init, start)
	}
	location := o.Repo.Location
	if r != nil {
		location = r.Location()
	}
	env := func() map[string]string {
		return map[string]string{"NBDMOVER_DOMAIN": src.Name(), "NBDMOVER_MODE": o.Mode, "NBDMOVER_REPOSITORY": location}
	}
	if o.Hooks.Pre != "" {
		err = runHook(ctx, o, "pre", o.Hooks.Pre, env())
		start = time.Now() // the backup's point in time is after its pre-hook
	}
	var res *BackupResult
	if err == nil {
		res, err = backupLocked(ctx, src, o, r, init, start)
	}
	if o.Hooks.Post != "" {
		if perr := postHook(ctx, o, env(), res, err); perr != nil {
			if err != nil {
				err = fmt.Errorf("%w; and then %v", err, perr)
			} else {
				res.PostHookError = perr.Error()
				o.Log.Error("the backup is committed, but its post-hook failed", "name", src.Name(), "id", res.ID, "error", perr)
			}
		}
	}
	return res, err
}

// backupLocked is Backup once its checks have passed and its name's lock
// is held (and its pre-hook has run).
func backupLocked(ctx context.Context, src Source, o Options, r *repo.Repo, init repo.InitOptions, start time.Time) (*BackupResult, error) {
	var err error
	created := false
	if r == nil {
		if r, created, err = o.Repo.OpenOrInit(ctx, init); err != nil {
			return nil, err
		}
		if created {
			o.Log.Info("created the repository", "repository", r.Location(), "chunk_size", r.Config().ChunkSize)
		}
		if r, err = withCompression(r, o, init); err != nil {
			return nil, err
		}
	}
	// The shared lock keeps gc from deleting what this backup will
	// reference (chunks it finds stored, its parent's chunks and index
	// objects) until it has committed; ctx ends if the lock is lost.
	rlock, ctx, err := r.Lock(ctx, lock.Shared, "backup "+src.Name(), o.Log)
	if err != nil {
		return nil, err
	}
	defer rlock.Release()
	last, newest, err := LastBackup(ctx, r, src.Name(), o.Log)
	if err != nil {
		return nil, err
	}
	m := newManifest(r, o, src.Name(), newest, start)
	sess, err := src.Start(ctx, StartRequest{Repo: r, ID: m.ID, Last: last, Mode: o.Mode,
		Readers: o.Tuning.Readers, RunDir: o.RunDir, Log: o.Log})
	if err != nil {
		return nil, err
	}
	b := &backup{o: o, r: r, lock: rlock, m: m, last: last, sess: sess, start: start, created: created}
	res, err := b.run(ctx)
	// From here on the session is ended on every path, also when ctx is
	// done: the job must not outlive the backup.
	endErr := sess.End(context.WithoutCancel(ctx), err == nil)
	if err != nil {
		if endErr != nil {
			err = fmt.Errorf("%w; also: %v", err, endErr)
		}
		return nil, err
	}
	if endErr != nil {
		o.Log.Error("backup committed, but ending the session failed", "name", src.Name(), "error", endErr)
	}
	return res, nil
}

// openForBackup opens the repository with the chosen compression for new
// chunks. With Init, a missing repository is not an error: r is nil, and
// the caller creates it (with init) once the options are checked.
func openForBackup(ctx context.Context, o Options, init repo.InitOptions) (*repo.Repo, error) {
	r := o.Repository
	var err error
	if r == nil {
		r, err = o.Repo.Open(ctx)
	} else {
		err = r.Recheck(ctx) // kept open: still the repository it was?
	}
	if errors.Is(err, repo.ErrNoRepository) && o.Init {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	return withCompression(r, o, init)
}

// withCompression is r compressing new chunks as the options ask.
func withCompression(r *repo.Repo, o Options, init repo.InitOptions) (*repo.Repo, error) {
	if o.Compression == "" {
		return r, nil
	}
	return r.WithCompression(init.Compression)
}

// DiskCounter is a source that can tell how many disks it will read
// before it starts (a domain, from libvirt).
type DiskCounter interface {
	CountDisks() (int, error)
}

// checkSource checks, before anything is made, that the source exists
// and that its disks' buffers fit MaxMemory (at the chunk size of r, or
// of the repository init would create).
func (o Options) checkSource(src Source, r *repo.Repo, init repo.InitOptions) error {
	disks := 1
	if dc, ok := src.(DiskCounter); ok {
		n, err := dc.CountDisks()
		if err != nil {
			return fmt.Errorf("backup of %s: %w", src.Name(), err)
		}
		disks = n
	}
	chunk := init.ChunkSize
	if r != nil {
		chunk = r.Config().ChunkSize
	} else if chunk == 0 {
		chunk = chunker.DefaultChunkSize
	}
	return o.checkMemory(src.Name(), disks, chunk)
}

// newManifest starts the manifest of a full backup of name taken at
// start: its id sorts after newest (the newest backup id of name, "" when
// none), and it records the compression new chunks get.
func newManifest(r *repo.Repo, o Options, name, newest string, start time.Time) *repo.Manifest {
	m := &repo.Manifest{ID: repo.NewBackupID(start, newest), Domain: name, Created: start.UTC(),
		Compression: r.Config().Compression, Mode: ModeFull}
	if o.Compression != "" {
		m.Compression = o.Compression
	}
	return m
}

// LastBackup returns the newest committed backup of name that can be read
// (nil when none), and the newest id of all, counting manifests that
// cannot be read (which are skipped, with a warning).
func LastBackup(ctx context.Context, r *repo.Repo, name string, log *slog.Logger) (*repo.Manifest, string, error) {
	last, newest, skipped, err := r.Latest(ctx, name)
	for _, p := range skipped {
		log.Warn("skipping a backup whose manifest cannot be read", "object", p.Object, "error", p.Problem)
	}
	return last, newest, err
}

// backup is one Backup between the session's start and end.
type backup struct {
	o       Options
	r       *repo.Repo
	lock    *lock.Lock
	m       *repo.Manifest
	last    *repo.Manifest
	sess    Session
	start   time.Time
	created bool // the repository, by this backup

	fallbacks    []string // why disks are read in full
	verification *repo.Verification
	// damaged: the chunks verify recorded as damaged, which the disks
	// rebuild where they still hold them; healed: those stored again.
	damaged map[chunker.Digest]bool
	healed  []chunker.Digest
	// The pipeline's buffers and the disks' counters, made by the first
	// pass over the disks and reused by a second (after a lie).
	bufs  *pipeline.Buffers
	stats []*pipeline.Stats
}

// run reads the disks and commits the backup.
func (b *backup) run(ctx context.Context) (*BackupResult, error) {
	disks := b.sess.Disks()
	info := b.sess.Info()
	if err := b.o.checkMemory(b.m.Domain, len(disks), b.r.Config().ChunkSize); err != nil {
		return nil, err
	}
	if info.Fallback != "" {
		b.fallbacks = append(b.fallbacks, info.Fallback)
	}
	// The damage records are listed while the parents' indexes load (a
	// round trip to S3 spared).
	type damagedChunks struct {
		d   map[chunker.Digest]bool
		err error
	}
	damagedc := make(chan damagedChunks, 1)
	go func() {
		d, err := b.r.DamagedChunks(ctx)
		damagedc <- damagedChunks{d, err}
	}()
	parents, err := b.parents(ctx, disks)
	dc := <-damagedc
	if err != nil {
		return nil, err
	}
	if b.damaged, err = dc.d, dc.err; err != nil {
		return nil, fmt.Errorf("backup %s: %w", b.m.Domain, err)
	}
	// Object Lock extensions go on while the disks are read (they may
	// be many requests), and must be done before the commit.
	pctx, stopProtect := context.WithCancel(ctx)
	protected := make(chan error, 1)
	go func(parents []*repo.Chain) { protected <- b.protect(pctx, parents) }(parents)
	joined := false
	defer func() { // it ends with the backup, whatever becomes of it
		stopProtect()
		if !joined {
			<-protected
		}
	}()
	if len(b.damaged) > 0 {
		b.o.Log.Info("the repository holds damaged chunks: those still on the disks are stored again", "name", b.m.Domain, "damaged", len(b.damaged))
	}
	indexes, results, err := b.readDisks(ctx, disks, parents)
	var lie *pipeline.BitmapError
	if errors.As(err, &lie) {
		if parents, err = b.distrust(lie, len(disks)); err != nil {
			return nil, err
		}
		indexes, results, err = b.readDisks(ctx, disks, parents)
	}
	if err != nil {
		return nil, err
	}
	joined = true
	if err := <-protected; err != nil {
		return nil, err
	}
	files, err := b.sess.Files(ctx)
	if err != nil {
		return nil, err
	}
	b.m.Source, b.m.Consistency, b.m.Checkpoint = info.Source, info.Consistency, info.Checkpoint
	b.m.Fallback = strings.Join(b.fallbacks, "; ")
	b.m.Verification = b.verified(parents, results)
	for _, p := range parents {
		if p != nil {
			b.m.Mode, b.m.Parent = ModeIncremental, b.last.ID
		}
	}
	return b.commit(ctx, disks, indexes, results, files)
}

// protect, in a repository with S3 Object Lock, gives the backup its
// window and extends the locks of what it takes over from its parent
// when they could end before the window does (repo.ProtectBackup).
func (b *backup) protect(ctx context.Context, parents []*repo.Chain) error {
	var parent *repo.Manifest
	for _, p := range parents {
		if p != nil {
			parent = b.last
		}
	}
	bl, warnings, err := b.r.ProtectBackup(ctx, b.m.Created, parent, parents, b.damaged)
	if err != nil {
		return fmt.Errorf("backup %s: %w", b.m.Domain, err)
	}
	for _, w := range warnings {
		b.o.Log.Warn(w, "name", b.m.Domain)
	}
	if bl != nil && bl.Extended > 0 {
		b.o.Log.Info("extended the Object Lock of what the backup takes over from its parent", "name", b.m.Domain,
			"objects", bl.Extended, "locked_until", bl.LockedUntil.UTC().Format(time.RFC3339))
	}
	b.m.ObjectLock = bl
	return nil
}

// distrust handles a dirty bitmap caught missing a change: an incremental
// forced by --mode incremental fails; otherwise every disk is read in full
// (from the same exports, so at the same point in time), and the reason
// is recorded.
func (b *backup) distrust(lie *pipeline.BitmapError, disks int) ([]*repo.Chain, error) {
	if b.o.Mode == ModeIncremental {
		return nil, fmt.Errorf("backup %s: the incremental cannot be trusted: %w; "+
			"nothing was committed: take a full backup (--mode full or auto)", b.m.Domain, lie)
	}
	b.o.Log.Warn("a dirty bitmap missed changes: taking a full backup instead", "name", b.m.Domain,
		"disk", lie.Disk, "chunk", lie.Chunk, "error", lie.Error())
	b.verification = &repo.Verification{Outcome: "mismatch", Detail: lie.Error()}
	b.fallbacks = append(b.fallbacks, lie.Error()+"; read every disk in full instead")
	return make([]*repo.Chain, disks), nil
}

// verified sums up the check of the dirty bitmaps.
func (b *backup) verified(parents []*repo.Chain, results []DiskResult) *repo.Verification {
	if b.verification != nil {
		return b.verification
	}
	v := &repo.Verification{Outcome: "passed"}
	incremental := false
	for i, r := range results {
		if parents[i] != nil {
			incremental = true
			v.Chunks += r.VerifiedChunks
			v.Bytes += r.VerifiedBytes
		}
	}
	switch {
	case !incremental:
		return nil
	case b.o.VerifySample != nil && *b.o.VerifySample == 0:
		v.Outcome = "off"
	case v.Chunks == 0:
		v.Outcome = "nothing-to-check" // no clean chunk held data
	}
	return v
}

// parents loads the last backup's index chain of each disk the session reads
// incrementally (nil for the others). A disk whose export grants no dirty
// bitmap cannot be read incrementally: that is an error with --mode
// incremental, and a full read of the disk otherwise.
func (b *backup) parents(ctx context.Context, disks []SourceDisk) ([]*repo.Chain, error) {
	parents := make([]*repo.Chain, len(disks))
	for i, d := range disks {
		if !d.Incremental {
			continue
		}
		if why := dirtyContextMissing(d); why != "" {
			if b.o.Mode == ModeIncremental {
				return nil, fmt.Errorf("backup %s: cannot take an incremental: %s", b.m.Domain, why)
			}
			b.o.Log.Warn("reading a disk in full", "name", b.m.Domain, "disk", d.Name, "reason", why)
			b.fallbacks = append(b.fallbacks, why)
			continue
		}
		c, err := b.r.LoadChain(ctx, b.last, d.Name)
		if err != nil {
			return nil, fmt.Errorf("backup %s: parent backup %s: %w", b.m.Domain, b.last.ID, err)
		}
		parents[i] = c
	}
	return parents, nil
}

// dirtyContextMissing says why d, marked incremental, cannot be read
// incrementally after all (no dirty bitmap granted on its export), or "".
func dirtyContextMissing(d SourceDisk) string {
	switch {
	case d.Bitmap == "":
		return fmt.Sprintf("disk %s is exported without a dirty bitmap", d.Name)
	case !d.Disk.Info().HasContext(nbdclient.BitmapContext(d.Bitmap)):
		return fmt.Sprintf("disk %s: the export does not offer dirty bitmap %s", d.Name, d.Bitmap)
	}
	return ""
}

// minDirty is what a cumulative bitmap (one never cleared, like an NBD
// export's persistent bitmap) must mark now: at least what it marked at
// the parent, unless the disk was resized.
func (b *backup) minDirty(d SourceDisk, parent *repo.Chain) int64 {
	if !d.CumulativeBitmap || parent == nil {
		return 0
	}
	was, err := b.last.Disk(d.Name)
	if err != nil || was.Size != d.Disk.Info().Size {
		return 0
	}
	return was.DirtyBytes
}

// readDisks backs up every disk in parallel, sharing one buffer budget. On
// any error the others stop and nothing is returned.
func (b *backup) readDisks(ctx context.Context, disks []SourceDisk, parents []*repo.Chain) ([]repo.DiskData, []DiskResult, error) {
	chunkSize := b.r.Config().ChunkSize
	tuning := b.o.Tuning.WithDefaults(runtime.NumCPU(), chunkSize)
	if b.bufs == nil { // the first pass: one budget, one set of counters per disk for every pass
		b.bufs = pipeline.NewBuffers(tuning, len(disks), chunkSize)
		for _, d := range disks {
			st := &pipeline.Stats{}
			b.stats = append(b.stats, st)
			if b.o.Progress != nil {
				b.o.Progress(d.Name, st)
			}
		}
	}
	data := make([]repo.DiskData, len(disks))
	results := make([]DiskResult, len(disks))
	healed := make([][]chunker.Digest, len(disks))
	// A disk whose bitmap lies does not stop the others: every disk is
	// read again in full then, over the same connections.
	var lie atomic.Pointer[pipeline.BitmapError]
	g, gctx := errgroup.WithContext(ctx)
	for i, d := range disks {
		g.Go(func() error {
			start := time.Now()
			b.stats[i].Reset()
			job := &pipeline.Job{Name: d.Name, Disk: d.Disk, Repo: b.r, Buffers: b.bufs, Tuning: tuning,
				Stats: b.stats[i], Sample: -1, MinDirty: b.minDirty(d, parents[i]), Damaged: b.damaged}
			if parents[i] != nil {
				job.Parent = parents[i].Index
			}
			if b.o.VerifySample != nil {
				job.Sample = *b.o.VerifySample
			}
			res, err := job.Run(gctx)
			var be *pipeline.BitmapError
			if errors.As(err, &be) {
				lie.CompareAndSwap(nil, be)
				return nil
			}
			if err != nil {
				return err
			}
			data[i] = repo.DiskData{Full: res.Index, Parent: parents[i], Delta: res.Delta}
			healed[i] = res.Healed
			size := d.Disk.Info().Size
			results[i] = diskResult(d.Name, size, parents[i] != nil, job.Stats, time.Since(start))
			b.o.Log.Info("disk done", "disk", d.Name, "mode", results[i].Mode, "size", size,
				"read", results[i].BytesRead, "written", results[i].BytesWritten, "seconds", results[i].Seconds,
				"plan_seconds", job.Stats.PlanTime.Seconds())
			return nil
		})
	}
	if err := g.Wait(); err != nil {
		return nil, nil, fmt.Errorf("backup %s: %w", b.m.Domain, err)
	}
	if be := lie.Load(); be != nil {
		return nil, nil, be
	}
	b.healed = slices.Concat(healed...)
	return data, results, nil
}

func diskResult(name string, size int64, incremental bool, st *pipeline.Stats, took time.Duration) DiskResult {
	mode := ModeFull
	if incremental {
		mode = ModeIncremental
	}
	return DiskResult{Name: name, Size: size, Mode: mode,
		BytesRead: st.BytesRead.Load(), BytesWritten: st.BytesWritten.Load(),
		BytesDedup: st.BytesDedup.Load(), BytesZero: st.BytesZero.Load(), Seconds: took.Seconds(),
		DirtyBytes: st.BytesDirty, VerifiedChunks: st.VerifiedChunks, VerifiedBytes: st.VerifiedBytes, ZeroedChunks: st.ZeroedChunks,
		PatchedChunks: st.Patched.Load()}
}

// commit writes the backup's indexes, files and manifest.
func (b *backup) commit(ctx context.Context, disks []SourceDisk, data []repo.DiskData,
	results []DiskResult, files map[string][]byte) (*BackupResult, error) {
	m := b.m
	dds := map[string]repo.DiskData{}
	res := &BackupResult{ID: m.ID, Domain: m.Domain, Mode: m.Mode, Parent: m.Parent, Fallback: m.Fallback,
		Consistency: m.Consistency, Repository: b.r.Location(), RepositoryID: b.r.Config().ID, Checkpoint: m.Checkpoint,
		CreatedRepository: b.created, Disks: results, Verification: m.Verification, ObjectLock: m.ObjectLock}
	for i, d := range disks {
		dds[d.Name] = data[i]
		dr := results[i]
		results[i].ReadMBps, results[i].WrittenMBps = mbps(dr.BytesRead, dr.Seconds), mbps(dr.BytesWritten, dr.Seconds)
		m.Disks = append(m.Disks, repo.DiskManifest{Name: d.Name, Size: dr.Size, Mode: dr.Mode,
			BytesRead: dr.BytesRead, BytesWritten: dr.BytesWritten, BytesDedup: dr.BytesDedup, BytesZero: dr.BytesZero,
			DirtyBytes: dr.DirtyBytes, VerifiedChunks: dr.VerifiedChunks, VerifiedBytes: dr.VerifiedBytes, ZeroedChunks: dr.ZeroedChunks,
			PatchedChunks: dr.PatchedChunks})
		res.BytesRead += dr.BytesRead
		res.BytesWritten += dr.BytesWritten
		res.BytesDedup += dr.BytesDedup
		res.BytesZero += dr.BytesZero
	}
	m.Completed = time.Now().UTC()
	hold.At("backup-commit")
	// Commit only while the lock provably holds, and before anyone could
	// call it stale: then a gc either waits for this commit or sees it.
	deadline, err := b.lock.Check(ctx)
	if err != nil {
		return nil, fmt.Errorf("backup %s/%s not committed: %w", m.Domain, m.ID, err)
	}
	cctx, cancel := lock.WithDeadline(ctx, deadline)
	defer cancel()
	if err := b.r.Commit(cctx, m, dds, files); err != nil {
		return nil, fmt.Errorf("commit backup %s/%s: %w", m.Domain, m.ID, err)
	}
	if len(b.healed) > 0 {
		n, err := b.r.Healed(ctx, b.healed)
		if err != nil {
			b.o.Log.Warn("damaged chunks were stored again, but their damage records were not all cleared (verify clears them)",
				"domain", m.Domain, "healed", len(b.healed), "error", err)
		}
		res.Healed = n
		b.o.Log.Info("damaged chunks stored again from the disks", "domain", m.Domain, "healed", n)
	}
	if err := b.r.UpdateCatalog(ctx, m.Domain); err != nil {
		b.o.Log.Warn("the catalog of backups was not updated (listing is slower until the next backup updates it)",
			"domain", m.Domain, "error", err)
	}
	res.Seconds = time.Since(b.start).Seconds()
	res.ReadMBps, res.WrittenMBps = mbps(res.BytesRead, res.Seconds), mbps(res.BytesWritten, res.Seconds)
	res.RateMBps = res.ReadMBps
	return res, nil
}

// mbps is n bytes over secs seconds in MB/s (0 for no time).
func mbps(n int64, secs float64) float64 {
	if secs <= 0 {
		return 0
	}
	return float64(n) / secs / 1e6
}
