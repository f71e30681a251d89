package repo

import (
	"bufio"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"github.com/nbdmover/nbdmover/repo/index"
	"github.com/nbdmover/nbdmover/repo/lock"
	"io"
	"log/slog"
	"os"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nbdmover/nbdmover/chunker"
	"github.com/nbdmover/nbdmover/internal/hold"
	"github.com/nbdmover/nbdmover/internal/progress"
	"github.com/nbdmover/nbdmover/sink"
	"golang.org/x/sync/errgroup"
)

// DefaultGrace is how old an unreferenced object must be before gc
// deletes it.
const DefaultGrace = 24 * time.Hour

// GCOptions configure GC.
type GCOptions struct {
	Grace    time.Duration // 0 = DefaultGrace
	DryRun   bool          // find what would be deleted, delete nothing, take no lock
	Parallel int           // delete requests in flight (default 8)
	TempDir  string        // for the list of candidates ("" = os.TempDir)
	// Patience is how long gc waits for a moment when no backup, restore,
	// verify or forget holds the repository before it takes the exclusive
	// lock anyway (then new ones wait for its sweep). 0 = 30 minutes.
	Patience time.Duration
	Log      *slog.Logger
	// Progress is how often a progress line is logged (default 10 s).
	Progress time.Duration
	// Counter, if set, counts the stored bytes of the candidates swept
	// (deleted, or kept for a backup committed meanwhile) of all the
	// candidates, known once they are listed: phases list, wait (for the
	// exclusive lock), sweep.
	Counter *progress.Counter `json:"-"`
}

// GCCount counts the objects of one kind gc looked at.
type GCCount struct {
	Examined      int64 `json:"examined"`
	ExaminedBytes int64 `json:"examined_bytes"`
	Kept          int64 `json:"kept"` // referenced by a committed backup
	KeptBytes     int64 `json:"kept_bytes"`
	Young         int64 `json:"young"` // unreferenced, but younger than the grace period
	YoungBytes    int64 `json:"young_bytes"`
	Deleted       int64 `json:"deleted"` // (a dry run: would be)
	DeletedBytes  int64 `json:"deleted_bytes"`
}

// GCResult is what GC did.
type GCResult struct {
	DryRun  bool   `json:"dry_run"`
	Grace   string `json:"grace"`
	Backups int    `json:"backups"` // committed backups whose references were kept
	// Late: backups committed while gc ran, whose references were
	// added before the sweep; Rescued: candidates they referenced.
	Late     int     `json:"late_backups"`
	Rescued  int64   `json:"rescued"`
	Chunks   GCCount `json:"chunks"`
	Metadata GCCount `json:"metadata"` // index objects and extra files
	Catalogs int     `json:"catalogs_deleted"`
	// Damage: damage records of objects that no backup references and
	// that are gone; Quarantine: quarantined copies of chunks whose
	// record is gone, older than the grace period.
	Damage     int `json:"damage_records_deleted"`
	Quarantine int `json:"quarantined_deleted"`
	TempFiles  int `json:"temp_files_deleted"`
	// ObjectLock: what gc did to object versions in a repository with S3
	// Object Lock (nil otherwise).
	ObjectLock *LockReport `json:"object_lock,omitempty"`
	Seconds    float64     `json:"seconds"`
}

// GC deletes what no committed backup references: chunks, index objects
// and extra files older than the grace period, catalogs of domains
// without backups, and temporary files of interrupted writes. It finds
// candidates without a lock, then takes the exclusive lock for the sweep
// (waiting for running backups), adds the references of backups committed
// meanwhile, and deletes. Memory is bounded by 8 bytes per referenced
// chunk; candidates are kept in a file. An interrupted gc can be run
// again. See docs/design.md, "Deleting from a repository".
func (r *Repo) GC(ctx context.Context, o GCOptions) (*GCResult, error) {
	start := time.Now()
	if o.Grace <= 0 {
		o.Grace = DefaultGrace
	}
	if o.Parallel <= 0 {
		o.Parallel = 8
	}
	if o.Log == nil {
		o.Log = slog.New(slog.DiscardHandler)
	}
	if o.Progress <= 0 {
		o.Progress = 10 * time.Second
	}
	if o.Patience <= 0 {
		o.Patience = 30 * time.Minute
	}
	if err := r.refuseFormat1(ctx); err != nil {
		return nil, err
	}
	g := &gc{r: r, o: o, res: &GCResult{DryRun: o.DryRun, Grace: o.Grace.String()}, objects: map[string]bool{},
		seen: map[string]bool{}, cutoff: start.Add(-o.Grace)}
	stop := g.progress()
	defer stop()

	keys, err := r.manifestKeys(ctx, "")
	if err != nil {
		return nil, err
	}
	cache, err := r.catalogs(ctx, "")
	if err != nil {
		return nil, err
	}
	if err := g.reference(ctx, keys, cache); err != nil {
		return nil, err
	}
	g.res.Backups = g.backups()
	spill, err := g.candidates(ctx)
	if err != nil {
		return nil, err
	}
	defer spill.Close()
	if c := o.Counter; c != nil {
		c.Total.Store(g.candBytes)
		c.SetPhase("wait")
	}
	hold.At("gc-candidates")

	var held *lock.Lock
	unlocked := ctx // for the purge, after the lock is let go
	if !o.DryRun {
		if err := g.awaitQuiet(ctx); err != nil {
			return nil, err
		}
		o.Log.Info("gc: taking the exclusive lock for the sweep")
		var lctx context.Context
		held, lctx, err = r.Lock(ctx, lock.Exclusive, "gc", o.Log)
		if err != nil {
			return nil, err
		}
		defer func() {
			if held != nil {
				held.Release()
			}
		}()
		ctx = lctx
	}
	hold.At("gc-locked")
	// Backups committed since the listing: their references count too.
	keys, err = r.manifestKeys(ctx, "")
	if err != nil {
		return nil, err
	}
	before := g.backups()
	if err := g.reference(ctx, keys, nil); err != nil {
		return nil, err
	}
	g.res.Backups = g.backups()
	g.res.Late = g.res.Backups - before
	if c := o.Counter; c != nil {
		c.Begin("sweep")
	}
	if err := g.sweep(ctx, spill, held); err != nil {
		return g.res, err
	}
	if err := g.catalogs(ctx, keys, held); err != nil {
		return g.res, err
	}
	if err := g.damage(ctx, held); err != nil {
		return g.res, err
	}
	if !o.DryRun {
		n, err := sink.RemoveTemp(ctx, r.store, o.Grace)
		g.res.TempFiles = n
		if err != nil {
			return g.res, err
		}
		held.Release()
		held = nil
	}
	// The purge deletes no current version: it needs no lock, and
	// backups need not wait for it.
	if err := g.purge(unlocked); err != nil {
		return g.res, err
	}
	g.res.Seconds = time.Since(start).Seconds()
	return g.res, nil
}

// awaitQuiet waits, up to o.Patience, until no live shared lock exists, so
// that the exclusive lock (which makes new backups wait until the sweep
// is done) is taken when nothing runs, if such a moment comes.
func (g *gc) awaitQuiet(ctx context.Context) error {
	deadline := time.Now().Add(g.o.Patience)
	logged := false
	for {
		locks, err := g.r.Locks(ctx)
		if err != nil {
			return err
		}
		busy := 0
		var export *lock.Info
		for _, l := range locks {
			if l.Kind == lock.Shared && l.Stale(time.Now()) == "" {
				if l.Damaged != "" {
					return g.r.locks.DamagedShared(l)
				}
				if _, ok := lock.ExportedBackup(l.Purpose); ok && export == nil {
					export = l
				}
				busy++
			}
		}
		if busy == 0 {
			return nil
		}
		if time.Now().After(deadline) {
			if export != nil {
				// An export may serve for days: the exclusive lock would
				// wait for it while new backups wait behind it.
				return fmt.Errorf("%w: %s serves a backup (an NBD export): stop it, or run gc when no export is running",
					lock.ErrLocked, export.Holder())
			}
			return nil
		}
		if !logged {
			g.o.Log.Info("gc: waiting for a moment without running backups before locking the repository",
				"running", busy, "patience", g.o.Patience)
			logged = true
		}
		select {
		case <-ctx.Done():
			return context.Cause(ctx)
		case <-time.After(lock.Timing.Poll):
		}
	}
}

// refuseFormat1 fails when format-1 backups are left under backups/ (a
// migration that did not finish): their chunks are referenced by nothing
// gc reads.
func (r *Repo) refuseFormat1(ctx context.Context) error {
	found := errors.New("found")
	err := r.store.List(ctx, "backups/", func(o sink.ObjectInfo) error {
		if strings.HasSuffix(o.Key, "/manifest.json") {
			return found
		}
		return nil
	})
	if errors.Is(err, found) {
		return fmt.Errorf("%s holds format-1 backups under backups/ (a migration did not finish): run nbdmover migrate before gc", r.Location())
	}
	return err
}

type gc struct {
	r      *Repo
	o      GCOptions
	res    *GCResult
	cutoff time.Time

	mu      sync.Mutex
	refs    digestSet       // chunks referenced
	objects map[string]bool // index and file objects referenced
	seen    map[string]bool // manifests read
	listed  atomic.Int64    // objects listed so far, for progress
	deleted atomic.Int64
	// candBytes: the candidates' stored bytes (after candidates).
	candBytes int64
}

// progress logs a line every o.Progress until stopped.
func (g *gc) progress() (stop func()) {
	done := make(chan struct{})
	go func() {
		t := time.NewTicker(g.o.Progress)
		defer t.Stop()
		for {
			select {
			case <-done:
				return
			case <-t.C:
				g.mu.Lock()
				backups, refs := len(g.seen), g.refs.len()
				g.mu.Unlock()
				g.o.Log.Info("gc: working", "backups_read", backups, "chunks_referenced", refs,
					"objects_listed", g.listed.Load(), "deleted", g.deleted.Load())
			}
		}
	}()
	return func() { close(done) }
}

// reference adds the references of the manifests listed in keys that it
// has not read yet (from cache where it holds them). A manifest that
// cannot be read, or an index object of one, stops gc: what it
// references is unknown. One that vanished since the listing was
// forgotten.
func (g *gc) reference(ctx context.Context, keys []sink.ObjectInfo, cache map[string]cached) error {
	var fresh []sink.ObjectInfo
	g.mu.Lock()
	for _, k := range keys {
		if !g.seen[k.Key] {
			fresh = append(fresh, k)
		}
	}
	g.mu.Unlock()
	if cache == nil {
		cache = map[string]cached{}
	}
	ms, skipped, err := g.r.manifests(ctx, fresh, cache)
	if err != nil {
		return err
	}
	if len(skipped) > 0 {
		var lines []string
		for _, p := range skipped {
			lines = append(lines, p.Backup+": "+p.Problem)
		}
		return fmt.Errorf("gc cannot tell what %d backups reference, so it deletes nothing: %s (restore an intact copy of the manifest, or remove it to forget the backup, then run gc again)",
			len(skipped), strings.Join(lines, "; "))
	}
	todo := g.mark(ms)
	// Two readers, each with its own buffers: an index object's blob
	// and plaintext are up to ~9 MB each.
	next := make(chan string)
	eg, ectx := errgroup.WithContext(ctx)
	for range min(2, len(todo)) {
		eg.Go(func() error {
			var plain, blob []byte
			batch := make([]uint64, 0, 1<<16)
			var hdr index.Part
			for key := range next {
				var err error
				plain, blob, err = g.r.getObjectInto(ectx, key, plain, blob)
				if err == nil {
					err = index.WalkPart(plain, &hdr, func(_ int64, d, base chunker.Digest) {
						for _, d := range [2]chunker.Digest{d, base} { // a patched chunk's base too
							if d.IsZeroChunk() {
								continue
							}
							if batch = append(batch, prefix64(d)); len(batch) == cap(batch) {
								g.addRefs(batch)
								batch = batch[:0]
							}
						}
					})
					if err != nil {
						err = &ObjectError{Key: key, Err: err}
					}
				}
				if err != nil {
					return fmt.Errorf("gc cannot read index object %s of a committed backup, so it deletes nothing (nbdmover verify names the backups): %w", key, err)
				}
				g.addRefs(batch)
				batch = batch[:0]
			}
			return nil
		})
	}
	eg.Go(func() error {
		defer close(next)
		for _, key := range todo {
			select {
			case next <- key:
			case <-ectx.Done():
				return nil
			}
		}
		return nil
	})
	err = eg.Wait()
	g.mu.Lock()
	g.refs.flush()
	g.mu.Unlock()
	return err
}

// mark records the manifests as read, their files as referenced, and
// returns the index objects they reference that were not yet.
func (g *gc) mark(ms []*Manifest) []string {
	g.mu.Lock()
	defer g.mu.Unlock()
	var todo []string
	for _, m := range ms {
		g.seen[m.Key()] = true
		for _, key := range m.Files {
			g.objects[key] = true
		}
		for _, d := range m.Disks {
			for _, link := range d.Index {
				for _, key := range link.Objects {
					if !g.objects[key] {
						g.objects[key] = true
						todo = append(todo, key)
					}
				}
			}
		}
	}
	return todo
}

func (g *gc) addRefs(prefixes []uint64) {
	g.mu.Lock()
	defer g.mu.Unlock()
	for _, p := range prefixes {
		g.refs.add(p)
	}
}

// A candidate, in the spill file: kind, the object's digest (a patch's
// chunk's), a patch's base (zero for the others), its size.
const (
	candChunk byte = iota
	candIndex
	candFile
	candPatch
	candRecord = 1 + 32 + 32 + 8
)

var candPrefix = [...]string{candChunk: "chunks/", candIndex: "indexes/", candFile: "files/", candPatch: "patches/"}

// parseObjectKey returns the kind (candChunk, candIndex, candFile or
// candPatch) and digest of a well-formed chunk, index object, file or
// patch key, and a patch's base.
func parseObjectKey(key string) (kind byte, d, base chunker.Digest, ok bool) {
	if d, base, ok := parsePatchKey(key); ok {
		return candPatch, d, base, true
	}
	for k, p := range candPrefix {
		if byte(k) != candPatch && isObjectKey(p, key) {
			d, _ = chunker.ParseDigest(key[len(p)+3:])
			return byte(k), d, base, true
		}
	}
	return 0, d, base, false
}

// objectKey is the key parseObjectKey parses.
func objectKey(kind byte, d, base chunker.Digest) string {
	if kind == candPatch {
		return PatchKey(d, base)
	}
	h := d.String()
	return candPrefix[kind] + h[:2] + "/" + h
}

// candidates lists chunks, index objects and files, counts them, and
// writes those unreferenced and older than the cutoff to a temporary file
// (41 bytes each), which it returns rewound.
func (g *gc) candidates(ctx context.Context) (*os.File, error) {
	f, err := os.CreateTemp(g.o.TempDir, "nbdmover-gc-*")
	if err != nil {
		return nil, fmt.Errorf("gc: the list of candidates: %w", err)
	}
	os.Remove(f.Name()) // unlinked at once: a killed gc leaves no file
	fail := func(err error) (*os.File, error) {
		f.Close()
		return nil, err
	}
	w := bufio.NewWriterSize(f, 1<<20)
	var rec [candRecord]byte
	for kind, prefix := range candPrefix {
		count := g.count(byte(kind))
		err := g.r.store.List(ctx, prefix, func(o sink.ObjectInfo) error {
			g.listed.Add(1)
			k, d, base, ok := parseObjectKey(o.Key)
			if !ok || k != byte(kind) {
				return nil // not ours: left alone
			}
			count.Examined++
			count.ExaminedBytes += o.Size
			switch {
			case g.referenced(byte(kind), o.Key, d, base):
				count.Kept++
				count.KeptBytes += o.Size
			case o.Modified.IsZero() || !o.Modified.Before(g.cutoff):
				count.Young++
				count.YoungBytes += o.Size
			default:
				g.candBytes += o.Size
				rec[0] = byte(kind)
				copy(rec[1:], d[:])
				copy(rec[33:], base[:])
				binary.LittleEndian.PutUint64(rec[65:], uint64(o.Size))
				_, err := w.Write(rec[:])
				return err
			}
			return nil
		})
		if err != nil {
			return fail(err)
		}
	}
	if err := w.Flush(); err != nil {
		return fail(err)
	}
	if _, err := f.Seek(0, io.SeekStart); err != nil {
		return fail(err)
	}
	return f, nil
}

// count is the result's count of objects of kind: chunks (and patches),
// or metadata.
func (g *gc) count(kind byte) *GCCount {
	if kind == candChunk || kind == candPatch {
		return &g.res.Chunks
	}
	return &g.res.Metadata
}

func (g *gc) backups() int {
	g.mu.Lock()
	defer g.mu.Unlock()
	return len(g.seen)
}

// referenced reports whether a backup read so far references the
// object: a chunk, its digest (as a chunk or as a patch's base); a patch
// (d over base), both (every index entry that names the patch names
// both).
func (g *gc) referenced(kind byte, key string, d, base chunker.Digest) bool {
	g.mu.Lock()
	defer g.mu.Unlock()
	switch kind {
	case candChunk:
		return g.refs.has(d)
	case candPatch:
		return g.refs.has(d) && g.refs.has(base)
	}
	return g.objects[key]
}

// sweep deletes the candidates no backup references now, in batches,
// checking before each that the exclusive lock still holds.
func (g *gc) sweep(ctx context.Context, spill *os.File, held *lock.Lock) error {
	rd := bufio.NewReaderSize(spill, 1<<20)
	var rec [candRecord]byte
	const batch = 8192
	var keys []string
	var counts []*GCCount
	var sizes []int64
	flush := func() error {
		if len(keys) == 0 {
			return nil
		}
		if held != nil {
			deadline, err := held.Check(ctx)
			if err != nil {
				return err
			}
			dctx, cancel := lock.WithDeadline(ctx, deadline)
			err = sink.DeleteMany(dctx, g.r.store, keys, g.o.Parallel, nil)
			cancel()
			if err != nil {
				return fmt.Errorf("gc: %w (nothing a backup references was touched; run gc again)", err)
			}
		}
		for i, c := range counts {
			c.Deleted++
			c.DeletedBytes += sizes[i]
			if pc := g.o.Counter; pc != nil {
				pc.Done.Add(sizes[i])
			}
		}
		g.deleted.Add(int64(len(keys)))
		keys, counts, sizes = keys[:0], counts[:0], sizes[:0]
		hold.At("gc-batch")
		return nil
	}
	for {
		if _, err := io.ReadFull(rd, rec[:]); err == io.EOF {
			break
		} else if err != nil {
			return fmt.Errorf("gc: the list of candidates: %w", err)
		}
		kind := rec[0]
		var d, base chunker.Digest
		copy(d[:], rec[1:33])
		copy(base[:], rec[33:65])
		size := int64(binary.LittleEndian.Uint64(rec[65:]))
		key := objectKey(kind, d, base)
		count := g.count(kind)
		if g.referenced(kind, key, d, base) { // by a backup committed meanwhile
			if c := g.o.Counter; c != nil {
				c.Done.Add(size)
			}
			g.res.Rescued++
			count.Kept++
			count.KeptBytes += size
			continue
		}
		keys, counts, sizes = append(keys, key), append(counts, count), append(sizes, size)
		if len(keys) == batch {
			if err := flush(); err != nil {
				return err
			}
		}
	}
	return flush()
}

// catalogs deletes the catalogs of domains that have no backup left
// (keys: every manifest).
func (g *gc) catalogs(ctx context.Context, keys []sink.ObjectInfo, held *lock.Lock) error {
	domains := map[string]bool{}
	for _, k := range keys {
		if d, _, ok := parseManifestKey(k.Key); ok {
			domains[d] = true
		}
	}
	var dead []string
	if err := g.r.store.List(ctx, "catalog/", func(o sink.ObjectInfo) error {
		if d, _, ok := parseCatalogKey(o.Key); ok && !domains[d] {
			dead = append(dead, o.Key)
		}
		return nil
	}); err != nil {
		return err
	}
	g.res.Catalogs = len(dead)
	if held == nil || len(dead) == 0 {
		return nil
	}
	if _, err := held.Check(ctx); err != nil {
		return err
	}
	return sink.DeleteMany(ctx, g.r.store, dead, g.o.Parallel, nil)
}

// damage deletes the damage records of objects no backup references that
// are gone (deleted by this sweep, or missing), and the quarantined copies
// of chunks without a record that are older than the grace period. A
// record of an object that still exists is kept even when nothing
// references it: without it a later backup would deduplicate against the
// damaged copy. (A dry run, which deleted nothing, counts only the records
// of objects gone already.)
func (g *gc) damage(ctx context.Context, held *lock.Lock) error {
	recs, err := g.r.damageRecords(ctx)
	if err != nil {
		return err
	}
	var mu sync.Mutex
	var dead []string
	eg, ectx := errgroup.WithContext(ctx)
	eg.SetLimit(g.o.Parallel)
	for rec, obj := range recs {
		kind, d, base, _ := parseObjectKey(obj) // damageRecords keeps only object keys
		if g.referenced(kind, obj, d, base) {
			continue
		}
		eg.Go(func() error {
			if _, err := g.r.store.Stat(ectx, obj); !isNotFound(err) {
				return err // nil: it exists, the record stays
			}
			mu.Lock()
			dead = append(dead, rec)
			mu.Unlock()
			return nil
		})
	}
	if err := eg.Wait(); err != nil {
		return err
	}
	for _, rec := range dead {
		delete(recs, rec)
	}
	g.res.Damage = len(dead)
	kept := map[string]bool{}
	for _, obj := range recs {
		kept[obj] = true
	}
	var copies []string
	err = g.r.store.List(ctx, quarantinePrefix, func(o sink.ObjectInfo) error {
		obj := strings.TrimPrefix(o.Key, quarantinePrefix)
		if isObjectKey("chunks/", obj) && !kept[obj] && !o.Modified.IsZero() && o.Modified.Before(g.cutoff) {
			copies = append(copies, o.Key)
		}
		return nil
	})
	if err != nil {
		return err
	}
	g.res.Quarantine = len(copies)
	if held == nil || len(dead)+len(copies) == 0 {
		return nil
	}
	if _, err := held.Check(ctx); err != nil {
		return err
	}
	return sink.DeleteMany(ctx, g.r.store, append(dead, copies...), g.o.Parallel, nil)
}

// digestSet is a set of chunk digests kept as their first 8 bytes: 8
// bytes a chunk (plus at most a quarter for growth), 80 MB for 10 million.
// Digests that share a prefix are one member, so the set can only say yes
// too often: gc then keeps an unreferenced chunk, never deletes a
// referenced one. The prefixes are sorted in 4096 buckets by their top 12
// bits, so that growing the set never copies more than a bucket at once
// (one sorted slice would need twice its size to grow). add collects into
// a buffer that flush merges; has needs a flush after the last add.
type digestSet struct {
	buckets [1 << digestSetBits][]uint64
	pending []uint64
	n       int
}

const (
	digestSetBits   = 12
	digestSetBuffer = 1 << 18
)

func prefix64(d chunker.Digest) uint64 { return binary.BigEndian.Uint64(d[:8]) }

// add adds a digest's prefix64.
func (s *digestSet) add(prefix uint64) {
	if s.pending == nil {
		s.pending = make([]uint64, 0, digestSetBuffer)
	}
	s.pending = append(s.pending, prefix)
	if len(s.pending) == cap(s.pending) {
		s.flush()
	}
}

// flush merges the buffer into the buckets.
func (s *digestSet) flush() {
	slices.Sort(s.pending)
	p := slices.Compact(s.pending)
	for len(p) > 0 {
		b := p[0] >> (64 - digestSetBits)
		n := 1
		for n < len(p) && p[n]>>(64-digestSetBits) == b {
			n++
		}
		before := len(s.buckets[b])
		s.buckets[b] = mergeSorted(s.buckets[b], p[:n])
		s.n += len(s.buckets[b]) - before
		p = p[n:]
	}
	s.pending = s.pending[:0]
}

// mergeSorted merges the sorted, distinct values of p into the sorted
// set a, in place from its end, and returns it.
func mergeSorted(a, p []uint64) []uint64 {
	n := len(a)
	a = slices.Grow(a, len(p))[:n+len(p)]
	i, j, k := n-1, len(p)-1, n+len(p)
	for j >= 0 {
		switch {
		case i >= 0 && a[i] > p[j]:
			k--
			a[k] = a[i]
			i--
		case i >= 0 && a[i] == p[j]:
			j-- // already a member
		default:
			k--
			a[k] = p[j]
			j--
		}
	}
	// a[:i+1] is in place; the merged rest starts at k.
	m := copy(a[i+1:], a[k:])
	return a[:i+1+m]
}

func (s *digestSet) has(d chunker.Digest) bool {
	p := prefix64(d)
	_, ok := slices.BinarySearch(s.buckets[p>>(64-digestSetBits)], p)
	return ok
}

func (s *digestSet) len() int { return s.n }
