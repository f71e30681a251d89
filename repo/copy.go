package repo

import (
	"context"
	"crypto/subtle"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"sync"
	"time"

	"github.com/nbdmover/nbdmover/chunker"
	"github.com/nbdmover/nbdmover/internal/hold"
	"github.com/nbdmover/nbdmover/internal/progress"
	"github.com/nbdmover/nbdmover/repo/index"
	"github.com/nbdmover/nbdmover/repo/lock"
	"github.com/nbdmover/nbdmover/sink"
	"golang.org/x/sync/errgroup"
)

// CopyOptions say what Copy copies.
type CopyOptions struct {
	Domain string // "" = every domain
	Backup string // one backup id (with Domain); "" = every backup the target lacks
	DryRun bool   // list what would be copied, copy nothing
	// Parallel is how many chunks are in flight (default 8; 32 when
	// either repository is remote).
	Parallel int
	Log      *slog.Logger
	// Progress, if set, is given each backup's counter as its copy
	// starts: bytes of the chunks examined of the chunks it references,
	// read from the source and written to the target.
	Progress func(*progress.Counter) `json:"-"`
}

// CopyResult is what Copy did (or, in a dry run, would do).
type CopyResult struct {
	Backups []CopiedBackup `json:"backups"` // copied (or to copy), in order
	Present int            `json:"present"` // of the selection, backups the target had already
	// Chunks and Bytes: chunks stored into the target, their bytes as
	// stored; ChunksHeld: chunks it held already (a rerun after a kill);
	// BytesRead: chunk bytes read from the source.
	Chunks     int64 `json:"chunks"`
	Bytes      int64 `json:"bytes"`
	ChunksHeld int64 `json:"chunks_held"`
	BytesRead  int64 `json:"bytes_read"`
	Reencoded  bool  `json:"reencoded"`               // chunks were decoded and encoded again (the repositories' keys differ)
	Healed     int   `json:"healed_chunks,omitempty"` // chunks the target held damaged, stored again
	// Failed: backups that could not be copied (the others were).
	Failed  []CopyFailure `json:"failed,omitempty"`
	Seconds float64       `json:"seconds"`
}

// CopyFailure is a backup a copy could not copy, and why.
type CopyFailure struct {
	Domain string `json:"domain"`
	ID     string `json:"id"`
	Error  string `json:"error"`
}

// CopiedBackup is one backup of a copy.
type CopiedBackup struct {
	Domain string `json:"domain"`
	ID     string `json:"id"`
	Base   string `json:"base,omitempty"` // the backup both held that the copy's indexes are relative to
	Chunks int64  `json:"chunks"`         // chunks stored for it
	Bytes  int64  `json:"bytes"`
}

// ErrCopyMismatch is matched by the error for repositories a copy cannot
// go between (another chunk size, the same repository).
var ErrCopyMismatch = errors.New("repositories do not fit")

// Copy copies the backups of from that to lacks (Domain, Backup narrow
// them) into to: each backup's extra files, its indexes and the chunks to
// lacks, then its manifest, by the commit rule of a backup (under to's
// shared lock, with every chunk and index durable before the manifest),
// so that a copy killed at any moment leaves in to only whole backups,
// and a rerun copies what is missing (chunks already stored are found
// and not sent again). from is read under its shared lock, as a restore
// reads it; gc on either side is as safe beside a copy as beside a backup
// or a restore.
//
// Backups are copied oldest first. A backup's indexes in to are a delta
// against the newest earlier backup of its domain both repositories hold
// (its base), and its chunks are those of the base where the source's
// digests are unchanged since the base; only the others are read from
// from. Where the repositories' chunk keys differ (encryption with other
// keys, or one side encrypted), those chunks are decoded and encoded for
// to, under to's names; otherwise each blob is checked (decoded, its
// digest compared) and stored as it is. The repositories must have the
// same chunk size.
func Copy(ctx context.Context, from, to *Repo, o CopyOptions) (*CopyResult, error) {
	start := time.Now()
	if o.Log == nil {
		o.Log = slog.New(slog.DiscardHandler)
	}
	if from.cfg.ID == to.cfg.ID {
		return nil, fmt.Errorf("%w: %s and %s are the same repository (id %s)", ErrCopyMismatch, from.Location(), to.Location(), to.cfg.ID)
	}
	if from.cfg.ChunkSize != to.cfg.ChunkSize {
		return nil, fmt.Errorf("%w: %s has %d-byte chunks, %s %d-byte ones: a copy needs the same chunk size (init the target with --chunk-size %d)",
			ErrCopyMismatch, from.Location(), from.cfg.ChunkSize, to.Location(), to.cfg.ChunkSize, from.cfg.ChunkSize)
	}
	if o.Backup != "" && o.Domain == "" {
		return nil, errors.New("copy of one backup: name its domain")
	}
	if o.Parallel <= 0 {
		o.Parallel = 8
		if from.Remote() || to.Remote() {
			o.Parallel = 32
		}
	}
	c := &copier{from: from, to: to, o: o, same: sameChunkNames(from, to), res: &CopyResult{Backups: []CopiedBackup{}},
		done: map[chunker.Digest]chunker.Digest{}}
	c.res.Reencoded = !c.same
	if !o.DryRun {
		lctx, release, err := c.lockBoth(ctx)
		if err != nil {
			return nil, err
		}
		defer release()
		ctx = lctx
		if c.damaged, err = to.DamagedChunks(ctx); err != nil {
			return nil, err
		}
	}
	err := c.run(ctx)
	c.res.Seconds = time.Since(start).Seconds()
	return c.res, err
}

// lockWait is how long a copy that holds the source's lock waits for the
// target's before it lets the source's go and tries again: two copies in
// opposite directions, each waiting for a gc of the other's target, would
// otherwise hold each other's gc for hours.
var lockWait = 30 * time.Second

// lockBoth takes the source's shared lock, then the target's; when the
// target's does not come within lockWait (a gc holds it), it lets the
// source's go, waits a while and tries again, for up to two hours.
func (c *copier) lockBoth(ctx context.Context) (context.Context, func(), error) {
	deadline := time.Now().Add(2 * time.Hour)
	for {
		held, lctx, err := c.from.Lock(ctx, lock.Shared, "copy to "+c.to.Location(), c.o.Log)
		if err != nil {
			return nil, nil, fmt.Errorf("%s: %w", c.from.Location(), err)
		}
		wctx, cancel := context.WithCancel(lctx)
		timer := time.AfterFunc(lockWait, cancel)
		tlock, tctx, err := c.to.Lock(wctx, lock.Shared, "copy from "+c.from.Location(), c.o.Log)
		if err == nil && timer.Stop() {
			c.lock = tlock
			return tctx, func() { tlock.Release(); cancel(); held.Release() }, nil
		}
		if err == nil {
			tlock.Release()
		}
		cancel()
		held.Release()
		if ctx.Err() != nil {
			return nil, nil, context.Cause(ctx)
		}
		if !errors.Is(err, context.Canceled) && err != nil && wctx.Err() == nil {
			return nil, nil, fmt.Errorf("%s: %w", c.to.Location(), err)
		}
		if time.Now().After(deadline) {
			return nil, nil, fmt.Errorf("%s: %w: its lock did not come in two hours (a gc holds it? nbdmover unlock lists the locks)", c.to.Location(), lock.ErrLocked)
		}
		c.o.Log.Info("the target is locked (a gc?); the source's lock is let go meanwhile", "target", c.to.Location())
		select {
		case <-ctx.Done():
			return nil, nil, context.Cause(ctx)
		case <-time.After(lockWait / 3):
		}
	}
}

// sameChunkNames reports whether a chunk has the same name and blob in
// both repositories: neither is encrypted, or both are with the same
// naming and data keys (init --copy-keys-from).
func sameChunkNames(a, b *Repo) bool {
	if !a.Encrypted() || !b.Encrypted() {
		return !a.Encrypted() && !b.Encrypted()
	}
	ka, kb := a.keys.master[masterIDKey:masterConfig], b.keys.master[masterIDKey:masterConfig]
	return subtle.ConstantTimeCompare(ka, kb) == 1
}

type copier struct {
	from, to *Repo
	o        CopyOptions
	same     bool
	lock     *lock.Lock // to's
	res      *CopyResult
	// damaged: chunks the target holds damaged (verify's records):
	// never taken as held or from the base, but stored again (healed)
	// from the source; healed: those this backup stored.
	damaged map[chunker.Digest]bool
	healed  []chunker.Digest

	mu sync.Mutex
	// done: chunks this run copied or found held, source name -> target
	// name (at most maxDone: it only spares a question to the target, or a
	// decode, for a chunk several backups of the run changed).
	done map[chunker.Digest]chunker.Digest
}

const maxDone = 1 << 20

func (c *copier) run(ctx context.Context) error {
	src, skipped, err := c.from.Backups(ctx, c.o.Domain)
	if err != nil {
		return err
	}
	for _, p := range skipped {
		c.o.Log.Warn("a backup of the source cannot be read; it is not copied", "object", p.Object, "problem", p.Problem)
	}
	dst, unreadable, err := c.to.Backups(ctx, c.o.Domain)
	if err != nil {
		return err
	}
	in := map[string]*Manifest{} // the target's, by domain/id
	for _, m := range dst {
		in[m.Domain+"/"+m.ID] = m
	}
	taken := map[string]bool{} // names the target has a manifest of, readable or not
	for _, p := range unreadable {
		taken[p.Backup] = true
		c.o.Log.Warn("a backup of the target cannot be read; the source's of that name is not copied over it", "object", p.Object, "problem", p.Problem)
	}
	var todo []*Manifest
	for _, m := range src {
		key := m.Domain + "/" + m.ID
		if c.o.Backup != "" && m.ID != c.o.Backup {
			continue
		}
		if t := in[key]; t != nil || taken[key] {
			if t != nil && !sameBackup(m, t) {
				c.o.Log.Warn("the target has a backup of this name that is not a copy of the source's (two sites with one domain name?); it is left alone",
					"domain", m.Domain, "id", m.ID)
			}
			c.res.Present++
			continue
		}
		todo = append(todo, m)
	}
	if c.o.Backup != "" && len(todo) == 0 && c.res.Present == 0 {
		return fmt.Errorf("%w: %s/%s in %s", ErrNoBackup, c.o.Domain, c.o.Backup, c.from.Location())
	}
	slices.SortStableFunc(todo, func(a, b *Manifest) int {
		if a.Domain != b.Domain {
			return cmpString(a.Domain, b.Domain)
		}
		return cmpString(a.ID, b.ID)
	})
	srcByKey := map[string]*Manifest{}
	for _, m := range src {
		srcByKey[m.Domain+"/"+m.ID] = m
	}
	var failed []error
	for _, m := range todo {
		cb := CopiedBackup{Domain: m.Domain, ID: m.ID}
		base := c.base(m, src, in)
		if base != nil && !sameBackup(srcByKey[base.Domain+"/"+base.ID], base) {
			c.o.Log.Warn("the target's backup of the same name is not a copy of the source's: copying in full", "domain", base.Domain, "id", base.ID)
			base = nil
		}
		if base != nil {
			cb.Base = base.ID
		}
		if c.o.DryRun {
			c.res.Backups = append(c.res.Backups, cb)
			in[m.Domain+"/"+m.ID] = m // the base of the next, once copied
			continue
		}
		if err := c.backup(ctx, m, base, srcByKey, in, &cb); err != nil {
			if ctx.Err() != nil { // cancelled, or a lock lost: nothing more goes
				return errors.Join(append(failed, fmt.Errorf("copy %s/%s: %w", m.Domain, m.ID, err))...)
			}
			// The others go on: one damaged object must not hold every
			// later copy back.
			c.o.Log.Error("a backup was not copied; the others go on", "domain", m.Domain, "id", m.ID, "error", err)
			failed = append(failed, fmt.Errorf("copy %s/%s: %w", m.Domain, m.ID, err))
			c.res.Failed = append(c.res.Failed, CopyFailure{Domain: m.Domain, ID: m.ID, Error: err.Error()})
			continue
		}
		c.res.Backups = append(c.res.Backups, cb)
		c.o.Log.Info("backup copied", "domain", m.Domain, "id", m.ID, "base", cb.Base, "chunks", cb.Chunks, "bytes", cb.Bytes)
	}
	return errors.Join(failed...)
}

func cmpString(a, b string) int {
	switch {
	case a < b:
		return -1
	case a > b:
		return 1
	}
	return 0
}

// base is the newest backup of m's domain, older than m, that both
// repositories hold (the target's manifest of it), or nil.
func (c *copier) base(m *Manifest, src []*Manifest, in map[string]*Manifest) *Manifest {
	var best *Manifest
	for _, s := range src {
		if s.Domain != m.Domain || s.ID >= m.ID {
			continue
		}
		if t := in[s.Domain+"/"+s.ID]; t != nil && (best == nil || s.ID > best.ID) {
			best = t
		}
	}
	return best
}

// sameBackup reports whether two repositories' manifests are of one
// backup: the same times and disks (a copy of it), not only the same name.
func sameBackup(a, b *Manifest) bool {
	if a == nil || b == nil || !a.Created.Equal(b.Created) || !a.Completed.Equal(b.Completed) || len(a.Disks) != len(b.Disks) {
		return false
	}
	for k, d := range a.Disks {
		e := b.Disks[k]
		if d.Name != e.Name || d.Size != e.Size || d.Chunks != e.Chunks || d.ZeroChunks != e.ZeroChunks {
			return false
		}
	}
	return true
}

// backup copies one backup and commits it in the target.
func (c *copier) backup(ctx context.Context, m, base *Manifest, src, in map[string]*Manifest, cb *CopiedBackup) error {
	counter := progress.NewCounter(m.Domain+"/"+m.ID, "plan", -1)
	if c.o.Progress != nil {
		c.o.Progress(counter)
	}
	if len(m.Disks) > maxCopyDisks || len(m.Files) > maxCopyFiles {
		return fmt.Errorf("%d disks and %d files: more than a copy takes (%d, %d): a manifest written by someone else?", len(m.Disks), len(m.Files), maxCopyDisks, maxCopyFiles)
	}
	var srcBase *Manifest
	if base != nil {
		srcBase = src[base.Domain+"/"+base.ID]
	}
	c.healed = nil
	type diskWork struct {
		name     string
		ix       *index.Index // the source's
		srcBase  *index.Index // the source's index of the base (nil: none)
		dstBase  *Chain       // the target's chain of the base
		todo     []int        // entries of ix to copy (others are the base's)
		resolved []chunker.Digest
		bases    map[int]chunker.Digest // of resolved entries that are patches in the target
	}
	disks := make([]*diskWork, len(m.Disks))
	for k, d := range m.Disks {
		w := &diskWork{name: d.Name}
		var err error
		if w.ix, err = c.from.LoadIndex(ctx, m, d.Name); err != nil {
			return err
		}
		if srcBase != nil {
			if _, err := srcBase.Disk(d.Name); err == nil {
				w.srcBase, err = c.from.LoadIndex(ctx, srcBase, d.Name)
				if err == nil {
					w.dstBase, err = c.to.LoadChain(ctx, base, d.Name)
				}
				if err != nil { // copied in full instead
					c.o.Log.Warn("the base's index cannot be read; the disk is copied in full", "disk", d.Name, "base", base.ID, "error", err)
					w.srcBase, w.dstBase = nil, nil
				}
			}
		}
		disks[k] = w
	}
	// In a target with S3 Object Lock the copy gets its own window, from
	// now; what it takes over from the base there is extended as a
	// backup's would be.
	var chains []*Chain
	for _, w := range disks {
		chains = append(chains, w.dstBase)
	}
	var parent *Manifest
	if slices.ContainsFunc(chains, func(c *Chain) bool { return c != nil }) {
		parent = base
	}
	bl, warnings, err := c.to.ProtectBackup(ctx, time.Now(), parent, chains, c.damaged)
	if err != nil {
		return err
	}
	for _, w := range warnings {
		c.o.Log.Warn(w)
	}
	if bl != nil {
		for _, d := range bl.Missing { // recorded as damaged: copied again below
			c.damaged[d] = true
		}
	}
	var total int64
	for _, w := range disks {
		w.resolved, w.bases = make([]chunker.Digest, w.ix.Len()), map[int]chunker.Digest{}
		for e := range w.ix.Len() {
			i, sd := w.ix.At(e)
			if w.srcBase != nil && w.srcBase.Digest(i) == sd {
				td, tb := w.dstBase.Index.Digest(i), w.dstBase.Index.Base(i)
				if !td.IsZeroChunk() && !c.damaged[td] && !c.damaged[tb] {
					// Unchanged since the base: its entry in the target (a
					// patch there, when the target's backup stored one).
					w.resolved[e] = td
					if !tb.IsZeroChunk() {
						w.bases[e] = tb
					}
					continue
				}
			}
			w.todo = append(w.todo, e)
		}
		total += int64(len(w.todo)) * c.from.cfg.ChunkSize
	}
	counter.Total.Store(total)
	if bl != nil {
		// A chunk an earlier backup of this run stored or found is
		// locked for that backup's window, which may end before this
		// one's: it is looked at (and extended) again.
		c.mu.Lock()
		clear(c.done)
		c.mu.Unlock()
	}
	counter.Begin("copy")

	// The chunks, Parallel at once.
	type item struct {
		w *diskWork
		e int
	}
	items := make(chan item)
	g, gctx := errgroup.WithContext(ctx)
	g.Go(func() error {
		defer close(items)
		for _, w := range disks {
			for _, e := range w.todo {
				select {
				case items <- item{w, e}:
				case <-gctx.Done():
					return gctx.Err()
				}
			}
		}
		return nil
	})
	putter := c.to.NewPutter()
	for range c.o.Parallel {
		g.Go(func() error {
			var plain, blob, out []byte
			for it := range items {
				i, sd := it.w.ix.At(it.e)
				td, err := c.chunk(gctx, putter, sd, it.w.ix.Base(i), &plain, &blob, &out, counter, cb)
				if err != nil {
					return err
				}
				it.w.resolved[it.e] = td
				counter.Done.Add(c.from.cfg.ChunkSize)
				hold.At("copy-chunk")
			}
			return nil
		})
	}
	if err := g.Wait(); err != nil {
		return err
	}

	// The indexes, the files, the manifest.
	counter.SetPhase("commit")
	dds := map[string]DiskData{}
	for _, w := range disks {
		var b index.Builder
		for e := range w.ix.Len() {
			i, _ := w.ix.At(e)
			b.Set(i, w.resolved[e], w.bases[e]) // copied chunks are whole in the target
		}
		ix := b.Index(w.ix.ChunkSize, w.ix.Size)
		w.ix, w.srcBase, w.resolved, w.bases = nil, nil, nil, nil // their memory, for the next disks' indexes
		if w.dstBase != nil {
			dds[w.name] = DiskData{Parent: w.dstBase, Delta: index.Diff(w.dstBase.Index, ix)}
		} else {
			dds[w.name] = DiskData{Full: ix}
		}
	}
	files := map[string][]byte{}
	byKey := map[string][]byte{} // a file object named twice is read once
	for name, key := range m.Files {
		data, ok := byKey[key]
		if !ok {
			var err error
			if data, err = c.from.ReadFile(ctx, m, name); err != nil {
				return err
			}
			byKey[key] = data
		}
		files[name] = data
	}
	nm := *m
	nm.Disks = slices.Clone(m.Disks)
	nm.ObjectLock = bl // the target's, not the source's
	if !c.same {
		nm.Compression = c.to.cfg.Compression // the chunks it stored were encoded so
	}
	hold.At("copy-commit")
	deadline, err := c.lock.Check(ctx)
	if err != nil {
		return fmt.Errorf("not committed: %w", err)
	}
	cctx, cancel := lock.WithDeadline(ctx, deadline)
	defer cancel()
	if err := c.to.Commit(cctx, &nm, dds, files); err != nil {
		return err
	}
	in[nm.Domain+"/"+nm.ID] = &nm
	if len(c.healed) > 0 {
		n, err := c.to.Healed(ctx, c.healed)
		if err != nil {
			c.o.Log.Warn("damaged chunks were stored again, but their damage records were not all cleared (verify clears them)", "error", err)
		}
		c.res.Healed += n
		for _, d := range c.healed {
			delete(c.damaged, d)
		}
	}
	if err := c.to.UpdateCatalog(ctx, nm.Domain); err != nil {
		c.o.Log.Warn("the target's catalog of backups was not updated (listing it is slower until the next copy or backup updates it)",
			"domain", nm.Domain, "error", err)
	}
	counter.SetPhase(progress.PhaseDone)
	return nil
}

// chunk copies one chunk (unless this run did, or the target holds it)
// and returns its name in the target. A chunk the source stores as a
// patch over base is stored whole in the target, which may not hold the
// base (and a copy stays one chunk per slot).
func (c *copier) chunk(ctx context.Context, putter *Putter, sd, base chunker.Digest, plain, blob, out *[]byte,
	counter *progress.Counter, cb *CopiedBackup) (chunker.Digest, error) {
	c.mu.Lock()
	td, seen := c.done[sd]
	c.mu.Unlock()
	if seen {
		return td, nil
	}
	if c.same && !c.isDamaged(sd) {
		held, err := c.to.has(ctx, ChunkKey(sd))
		if err != nil {
			return sd, err
		}
		if held {
			sink.SyncLater(c.to.store, ChunkKey(sd)) // another writer's, perhaps not yet durable: this commit makes it so
			c.remember(sd, sd, false, 0, cb)
			return sd, c.to.extendHeld(ctx, ChunkKey(sd)) // locked, perhaps for less than this copy's window
		}
	}
	if !base.IsZeroChunk() {
		return c.patched(ctx, putter, sd, base, plain, blob, out, counter, cb)
	}
	key := ChunkKey(sd)
	var err error
	if *blob, err = c.from.get(ctx, key, *blob); err != nil {
		return sd, &ChunkError{Key: key, Err: fmt.Errorf("%w (in %s; verify and heal it there)", err, c.from.Location())}
	}
	counter.Read.Add(int64(len(*blob)))
	c.mu.Lock()
	c.res.BytesRead += int64(len(*blob))
	c.mu.Unlock()
	if c.same && c.from.Encrypted() {
		// Shared keys: the ciphertext moves as it is, never decrypted
		// here; the target's verify checks it (its tag binds it to its
		// name).
		return c.store(ctx, putter, sd, sd, *blob, counter, cb)
	}
	stored := *blob
	if c.from.Encrypted() { // decoding decrypts in place
		*out = append((*out)[:0], *blob...)
		stored = *out
	}
	if *plain, err = c.from.codec.DecodeChunk(*plain, stored, key, sd, int(c.from.cfg.ChunkSize)); err != nil {
		return sd, &ChunkError{Key: key, Err: fmt.Errorf("%w (in %s; verify records it, the next backup heals it)", err, c.from.Location())}
	}
	if c.same {
		return c.store(ctx, putter, sd, sd, *blob, counter, cb) // the blob as stored: the same in the target
	}
	return c.encode(ctx, putter, sd, *plain, out, counter, cb)
}

// patched copies a chunk the source stores as a patch over base: read
// and applied (GetEntry), stored whole.
func (c *copier) patched(ctx context.Context, putter *Putter, sd, base chunker.Digest, plain, blob, out *[]byte,
	counter *progress.Counter, cb *CopiedBackup) (chunker.Digest, error) {
	var err error
	if *plain, *blob, err = c.from.GetEntry(ctx, sd, base, *plain, *blob); err != nil {
		return sd, fmt.Errorf("%w (in %s; verify records it, the next backup heals it)", err, c.from.Location())
	}
	n := int64(len(*blob)) // the patch's (or the base's) blob: what was read last
	counter.Read.Add(n)
	c.mu.Lock()
	c.res.BytesRead += n
	c.mu.Unlock()
	return c.encode(ctx, putter, sd, *plain, out, counter, cb)
}

// encode stores a chunk's plaintext (sd in the source) in the target,
// encoded with its codec, unless the target holds it.
func (c *copier) encode(ctx context.Context, putter *Putter, sd chunker.Digest, plain []byte, out *[]byte,
	counter *progress.Counter, cb *CopiedBackup) (chunker.Digest, error) {
	td := c.to.Sum(plain)
	if !c.isDamaged(td) {
		held, err := c.to.has(ctx, ChunkKey(td))
		if err != nil {
			return td, err
		}
		if held {
			sink.SyncLater(c.to.store, ChunkKey(td))
			c.remember(sd, td, false, 0, cb)
			return td, c.to.extendHeld(ctx, ChunkKey(td))
		}
	}
	*out = c.to.EncodeChunk(*out, td, plain)
	return c.store(ctx, putter, sd, td, *out, counter, cb)
}

// store puts the blob of chunk td (sd in the source) into the target.
func (c *copier) store(ctx context.Context, putter *Putter, sd, td chunker.Digest, blob []byte, counter *progress.Counter, cb *CopiedBackup) (chunker.Digest, error) {
	heal := c.isDamaged(td)
	held, err := putter.Put(ctx, td, blob, heal)
	if err != nil {
		return td, err
	}
	if heal {
		c.mu.Lock()
		c.healed = append(c.healed, td)
		c.mu.Unlock()
	}
	c.remember(sd, td, !held, int64(len(blob)), cb)
	if !held {
		counter.Written.Add(int64(len(blob)))
	}
	return td, nil
}

// isDamaged reports whether the target holds chunk d damaged.
func (c *copier) isDamaged(d chunker.Digest) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.damaged[d]
}

// maxCopyDisks and maxCopyFiles bound what one copied backup may have:
// more is a manifest someone else wrote, not one nbdmover makes.
const (
	maxCopyDisks = 256
	maxCopyFiles = 64
)

// remember notes a chunk handled: stored (n bytes) or found held.
func (c *copier) remember(sd, td chunker.Digest, stored bool, n int64, cb *CopiedBackup) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if len(c.done) < maxDone {
		c.done[sd] = td
	}
	if stored {
		c.res.Chunks++
		c.res.Bytes += n
		cb.Chunks++
		cb.Bytes += n
	} else {
		c.res.ChunksHeld++
	}
}
