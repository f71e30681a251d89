package repo

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"github.com/nbdmover/nbdmover/internal/progress"
	"github.com/nbdmover/nbdmover/repo/index"
	"github.com/nbdmover/nbdmover/repo/lock"
	"log/slog"
	"maps"
	"math/rand/v2"
	"slices"
	"sort"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nbdmover/nbdmover/chunker"
	"github.com/nbdmover/nbdmover/sink"
	"golang.org/x/sync/errgroup"
)

// Problem is one bad object found by Verify.
type Problem struct {
	Object  string `json:"object"` // object key
	Backup  string `json:"backup"` // domain/id of a backup that needs it
	Disk    string `json:"disk,omitempty"`
	Problem string `json:"problem"` // what is wrong
	// Backups: every backup of the selection that references a damaged
	// chunk, index object or file ("domain/id"), when more than Backup.
	Backups []string `json:"backups,omitempty"`
}

// VerifyOptions select what Verify checks.
type VerifyOptions struct {
	Domain string // "" = every domain
	Backup string // "" = every backup of Domain
	// ReadData: also fetch, decode and re-hash every chunk (ReadPercent
	// 100).
	ReadData bool
	// ReadPercent, 1 to 100, reads that share of the chunks: the parts of
	// the repository verified least recently (docs/format.md, "Damage and
	// verification state"), so that runs at 10% of the whole repository
	// read every chunk in ten runs. Chunks with a damage record are read
	// whatever the share (also at 0).
	ReadPercent int
	Seed        uint64 // breaks ties between parts as old as each other; 0 = random
	Parallel    int    // chunk fetches in flight (default 16)
	// NoLock verifies without the shared lock and writes nothing (no
	// damage records, quarantine or verification state): for a
	// read-only repository. A gc running elsewhere may then delete what
	// verify reads, which it reports as missing.
	NoLock bool
	Log    *slog.Logger
	// Progress, if not nil, counts the stored bytes of the chunks read of
	// those to read (known once the backups' indexes are checked: phase
	// check, then read, then record).
	Progress *progress.Counter `json:"-"`
}

// VerifyStats counts what Verify looked at and found.
type VerifyStats struct {
	Backups       int   `json:"backups"`
	Chunks        int   `json:"chunks"` // distinct chunks referenced
	Bytes         int64 `json:"bytes"`  // stored bytes of those chunks
	ReadPercent   int   `json:"read_percent"`
	Verified      int   `json:"verified"` // chunks read, decoded and found whole
	VerifiedBytes int64 `json:"verified_bytes"`
	Corrupt       int   `json:"corrupt"`     // chunks that do not decode to their name (or are truncated)
	Missing       int   `json:"missing"`     // chunks not stored
	Quarantined   int   `json:"quarantined"` // corrupt chunks whose bytes were kept under state/quarantine/
	Repaired      int   `json:"repaired"`    // damaged chunks (and index objects, files) found whole again
	Strays        int   `json:"strays"`      // symbolic links, FIFOs, devices, sockets in a local repository (whole-repository runs)
	// Damaged: the backups of the selection that reference a damaged
	// object ("domain/id"), sorted.
	Damaged []string `json:"damaged_backups"`
}

type chunkRef struct {
	backup, disk string
	index        int64
}

// verify is the state of one Verify.
type verify struct {
	r *Repo
	o VerifyOptions
	// readOnly: it records nothing (--no-lock, or a repository read as
	// of a past time, whose damage is not today's).
	readOnly bool
	now      time.Time
	stats    VerifyStats
	refs     map[chunker.Digest]chunkRef // every referenced chunk, with the first place that references it
	// patchRefs: every referenced patch (chunk, base), likewise; one
	// whose chunk is stored whole as well is checked as that chunk
	// (readers fall back to it).
	patchRefs map[patchRef]chunkRef
	// Damage found: chunk problems by digest, index objects' and files'
	// by key, with the backups that need them.
	mu       sync.Mutex
	chunks   map[chunker.Digest]*damage
	patches  map[patchRef]*damage
	objects  map[string]*damage
	readOK   map[chunker.Digest]bool // chunks read whole
	patchOK  map[patchRef]bool       // patches read and applied whole
	loadedOK map[string]bool         // index objects and files read whole
	records  map[string]string       // damage records before: object key by record key
}

type damage struct {
	problem, quarantined string
	backups              map[string]bool
}

// patchRef is a patch: the chunk it makes and its base.
type patchRef struct{ d, base chunker.Digest }

func (p patchRef) key() string { return PatchKey(p.d, p.base) }

// Verify checks the selected backups: every manifest and index decodes and
// matches its checksum, and every chunk they reference is stored (and with
// ReadData or ReadPercent, decodes to bytes that hash to its name). It
// reports every problem through report, not only the first, and returns
// an error only when it could not check (the store failed).
//
// What it finds damaged it records (state/damage/), with the backups that
// reference it, and the bytes of a corrupt chunk it keeps under
// state/quarantine/; damage recorded before that it finds whole again it
// clears (Repaired). See "Damage and verification state" in
// docs/format.md.
func (r *Repo) Verify(ctx context.Context, o VerifyOptions, report func(Problem)) (VerifyStats, error) {
	v := &verify{r: r, o: o, now: time.Now().UTC(), chunks: map[chunker.Digest]*damage{}, objects: map[string]*damage{},
		patches: map[patchRef]*damage{}, readOK: map[chunker.Digest]bool{}, patchOK: map[patchRef]bool{},
		loadedOK: map[string]bool{}, readOnly: o.NoLock || sink.IsAsOf(r.store)}
	if o.ReadData || o.ReadPercent >= 100 {
		v.o.ReadPercent = 100
	}
	v.stats.ReadPercent = v.o.ReadPercent
	v.stats.Damaged = []string{}
	// Under a shared lock, so that no gc deletes what a backup forgotten
	// meanwhile referenced: verify reports only what is really wrong.
	if !o.NoLock {
		held, lctx, err := r.Lock(ctx, lock.Shared, "verify", o.Log)
		if err != nil {
			return v.stats, lock.NoLockHint(err)
		}
		defer held.Release()
		ctx = lctx
	}
	var err error
	if err := r.verifyKeys(ctx, report); err != nil {
		return v.stats, err
	}
	ms, err := r.verifySelection(ctx, o, report)
	if err != nil {
		return v.stats, err
	}
	v.stats.Backups = len(ms)
	if err := v.chunkRefs(ctx, ms, report); err != nil {
		return v.stats, err
	}
	if v.records, err = r.damageRecords(ctx); err != nil {
		return v.stats, err
	}
	present, sizes, patches, err := v.listedChunks(ctx)
	if err != nil {
		return v.stats, err
	}
	v.stats.Chunks = len(v.refs) + len(v.patchRefs)
	sample, err := v.sample(ctx)
	if err != nil {
		return v.stats, err
	}
	toRead, total := v.toRead(present, sizes, sample)
	var patchesToRead []patchRef
	for _, p := range patches {
		if v.o.ReadPercent >= 100 || sample != nil && sample.picked[bucketOf(p.d)] || v.records[damageKey(p.key())] != "" {
			patchesToRead = append(patchesToRead, p)
		}
	}
	if c := o.Progress; c != nil {
		c.Total.Store(total)
		c.Begin("read")
	}
	err = v.readChunks(ctx, toRead)
	if err == nil {
		err = v.readPatches(ctx, patchesToRead)
	}
	if err != nil {
		v.record(ctx, ms, report) // what was found before, as far as the store still answers
		return v.stats, err
	}
	if c := o.Progress; c != nil {
		c.Done.Store(c.Total.Load()) // every chunk examined, also those missing or damaged
		c.SetPhase("record")
	}
	if err := v.record(ctx, ms, report); err != nil {
		return v.stats, err
	}
	if v.readOnly {
		return v.stats, nil // writes nothing
	}
	if err := v.repaired(ctx); err != nil {
		return v.stats, err
	}
	if o.Domain == "" && o.Backup == "" {
		if err := v.strays(ctx, report); err != nil {
			return v.stats, err
		}
	}
	// The parts read are verified now, for the whole repository only.
	if sample != nil && o.Domain == "" && o.Backup == "" {
		if err := r.saveVerified(ctx, sample); err != nil {
			return v.stats, err
		}
	}
	return v.stats, nil
}

// strays reports what the store holds that nbdmover never writes and
// refuses to read: a symbolic link (to anywhere) or a special file in a
// local repository, which someone with write access to it planted.
func (v *verify) strays(ctx context.Context, report func(Problem)) error {
	return sink.Strays(ctx, v.r.store, "", func(key, what string) error {
		v.stats.Strays++
		report(Problem{Object: key, Problem: what + ": nbdmover never makes one and does not follow or read it " +
			"(someone with write access to the repository put it there); see what it points to, then remove it"})
		return nil
	})
}

// verifySelection returns the backups Verify checks; manifests that cannot
// be read are problems.
func (r *Repo) verifySelection(ctx context.Context, o VerifyOptions, report func(Problem)) ([]*Manifest, error) {
	if o.Backup != "" {
		m, err := r.Backup(ctx, o.Domain, o.Backup)
		if err != nil {
			return nil, err
		}
		return []*Manifest{m}, nil
	}
	ms, skipped, err := r.backups(ctx, o.Domain, false) // every manifest read: no catalog
	for _, p := range skipped {
		report(p)
	}
	return ms, err
}

// chunkRefs checks the backups' indexes and files and collects every
// chunk they reference, each with the first place that references it.
func (v *verify) chunkRefs(ctx context.Context, ms []*Manifest, report func(Problem)) error {
	v.refs, v.patchRefs = map[chunker.Digest]chunkRef{}, map[patchRef]chunkRef{}
	for _, m := range ms {
		name := m.Domain + "/" + m.ID
		err := v.indexes(ctx, m, func(disk string, ix *index.Index) {
			for i, dg := range ix.All() {
				ref := chunkRef{backup: name, disk: disk, index: i}
				if base := ix.Base(i); !base.IsZeroChunk() {
					if _, seen := v.patchRefs[patchRef{dg, base}]; !seen {
						v.patchRefs[patchRef{dg, base}] = ref
					}
					dg = base // the base must be stored whole
				}
				if _, seen := v.refs[dg]; !seen {
					v.refs[dg] = ref
				}
			}
		}, report)
		if err != nil {
			return err
		}
		for f, key := range m.Files {
			_, err := v.r.ReadFile(ctx, m, f)
			if isStoreFailure(err) {
				return err
			}
			if err != nil {
				v.objectDamage(problemObject(err, key), err.Error(), name)
				report(Problem{Object: problemObject(err, key), Backup: name, Problem: err.Error()})
				continue
			}
			v.loadedOK[key] = true
		}
	}
	return nil
}

// indexes loads the index of each disk of m and calls f with it. One that
// cannot be loaded is a problem (reported when report is not nil).
func (v *verify) indexes(ctx context.Context, m *Manifest, f func(disk string, ix *index.Index), report func(Problem)) error {
	name := m.Domain + "/" + m.ID
	for _, d := range m.Disks {
		ix, err := v.r.LoadIndex(ctx, m, d.Name)
		if isStoreFailure(err) {
			return err
		}
		if err != nil {
			if report != nil {
				v.objectDamage(problemObject(err, ""), err.Error(), name)
				report(Problem{Object: problemObject(err, "index of disk "+d.Name), Backup: name, Disk: d.Name, Problem: err.Error()})
			}
			continue
		}
		for _, link := range d.Index {
			for _, key := range link.Objects {
				v.loadedOK[key] = true
			}
		}
		f(d.Name, ix)
	}
	return nil
}

// objectDamage notes a damaged index object or file (key "" when the
// problem names none: it is then reported only).
func (v *verify) objectDamage(key, problem, backup string) {
	if key == "" || !isObjectKey("indexes/", key) && !isObjectKey("files/", key) {
		return
	}
	d := v.objects[key]
	if d == nil {
		d = &damage{problem: problem, backups: map[string]bool{}}
		v.objects[key] = d
	}
	d.backups[backup] = true
}

// listedChunks notes the referenced chunks and patches that are missing
// or too short to be a blob, from one listing each instead of a request
// per chunk, and returns the other chunks in disk order and the other
// patches. A patch whose chunk is stored whole is checked as that chunk.
func (v *verify) listedChunks(ctx context.Context) ([]chunker.Digest, []int64, []patchRef, error) {
	sizes := map[string]int64{}
	for _, prefix := range []string{"chunks/", "patches/"} {
		if prefix == "patches/" && len(v.patchRefs) == 0 {
			break
		}
		if err := v.r.store.List(ctx, prefix, func(o sink.ObjectInfo) error {
			sizes[o.Key] = o.Size
			return nil
		}); err != nil {
			return nil, nil, nil, err
		}
	}
	var patches []patchRef
	for p, ref := range v.patchRefs {
		if _, whole := sizes[ChunkKey(p.d)]; whole {
			if _, seen := v.refs[p.d]; !seen {
				v.refs[p.d] = ref
			}
			continue
		}
		switch size, ok := sizes[p.key()]; {
		case !ok:
			v.patches[p] = &damage{problem: "missing"}
			v.stats.Missing++
		case size < chunker.HeaderSize || size > chunker.MaxPatchLen(v.r.cfg.ChunkSize)+blobOverhead:
			v.patches[p] = &damage{problem: fmt.Sprintf("%d bytes, not what a patch of a %d-byte chunk is stored in (planted or damaged; never read)", size, v.r.cfg.ChunkSize)}
			v.stats.Corrupt++
		default:
			v.stats.Bytes += size
			patches = append(patches, p)
		}
	}
	digests := make([]chunker.Digest, 0, len(v.refs))
	for dg := range v.refs {
		digests = append(digests, dg)
	}
	sort.Slice(digests, func(i, j int) bool { return v.refs[digests[i]].index < v.refs[digests[j]].index })
	var present []chunker.Digest
	var presentSizes []int64
	for _, dg := range digests {
		size, ok := sizes[ChunkKey(dg)]
		switch {
		case !ok:
			v.chunks[dg] = &damage{problem: "missing"}
			v.stats.Missing++
		case size < chunker.HeaderSize:
			v.chunks[dg] = &damage{problem: fmt.Sprintf("truncated to %d bytes", size)}
			v.stats.Corrupt++
		case size > int64(chunker.MaxBlobLen(int(v.r.cfg.ChunkSize))):
			v.chunks[dg] = &damage{problem: fmt.Sprintf("%d bytes, more than a chunk of %d bytes can be stored in (planted or damaged; never read)", size, v.r.cfg.ChunkSize)}
			v.stats.Corrupt++
		default:
			v.stats.Bytes += size
			present = append(present, dg)
			presentSizes = append(presentSizes, size)
		}
	}
	return present, presentSizes, patches, nil
}

// readPatches reads the patches, each applied to its base and checked
// against its chunk's digest, Parallel at once, and notes each one that
// is damaged (a base found damaged so is noted as that chunk). A
// corrupt patch is not quarantined: a backup stores its chunk whole.
func (v *verify) readPatches(ctx context.Context, patches []patchRef) error {
	g, gctx := errgroup.WithContext(ctx)
	g.SetLimit(v.parallel())
	for _, p := range patches {
		g.Go(func() error {
			_, blob, err := v.r.getPatched(gctx, p.d, p.base, nil, nil)
			if isStoreFailure(err) {
				return err
			}
			if c := v.o.Progress; c != nil {
				c.Read.Add(int64(len(blob)))
			}
			v.mu.Lock()
			defer v.mu.Unlock()
			var ce *ChunkError
			switch {
			case err == nil:
				v.stats.Verified++
				v.patchOK[p] = true
			case errors.As(err, &ce) && ce.Key == ChunkKey(p.base):
				if v.chunks[p.base] == nil {
					v.chunks[p.base] = v.damageOf(ce)
				}
			case errors.As(err, &ce):
				v.patches[p] = v.damageOf(ce)
			}
			return nil
		})
	}
	return g.Wait()
}

// toRead is the chunks of present to read: those in the parts sampled
// (every one without a sample), and those with a damage record.
func (v *verify) toRead(present []chunker.Digest, sizes []int64, sample *sampleState) ([]chunker.Digest, int64) {
	if v.o.ReadPercent >= 100 {
		return present, v.stats.Bytes
	}
	var out []chunker.Digest
	var total int64
	for i, dg := range present {
		if sample != nil && sample.picked[bucketOf(dg)] || v.records[damageKey(ChunkKey(dg))] != "" {
			out = append(out, dg)
			total += sizes[i]
		}
	}
	return out, total
}

// readChunks fetches, decodes and re-hashes the chunks, Parallel at once,
// notes each one that is damaged, and keeps the bytes of a corrupt one.
func (v *verify) readChunks(ctx context.Context, chunks []chunker.Digest) error {
	var next atomic.Int64
	g, gctx := errgroup.WithContext(ctx)
	for range v.parallel() {
		g.Go(func() error {
			var plain, blob, raw []byte
			for {
				i := next.Add(1) - 1
				if i >= int64(len(chunks)) {
					return nil
				}
				dg := chunks[i]
				key := ChunkKey(dg)
				var err error
				blob, err = v.r.get(gctx, key, blob)
				if isStoreFailure(err) {
					return err
				}
				if c := v.o.Progress; c != nil {
					c.Done.Add(int64(len(blob)))
					c.Read.Add(int64(len(blob)))
				}
				d := &damage{}
				switch {
				case errors.Is(err, sink.ErrDamaged): // too large, or not a file: never read
					d.problem = err.Error()
				case err != nil:
					d.problem = "missing" // deleted since the listing
				default:
					// Decoding an encrypted blob changes it: keep the
					// bytes as stored for the quarantine.
					stored := blob
					if v.r.keys != nil {
						raw = append(raw[:0], blob...)
						stored = raw
					}
					var derr error
					if plain, derr = v.r.codec.DecodeChunk(plain, blob, key, dg, int(v.r.cfg.ChunkSize)); derr == nil {
						v.mu.Lock()
						v.stats.Verified++
						v.stats.VerifiedBytes += int64(len(stored))
						v.readOK[dg] = true
						v.mu.Unlock()
						continue
					}
					d.problem = derr.Error() // a *chunker.CorruptError
					if v.readOnly {
						d.problem += " (not quarantined: --no-lock and --as-of write nothing)"
					} else {
						d.quarantined, err = v.r.quarantine(gctx, dg, stored)
					}
					if errors.Is(err, sink.ErrDamaged) { // its place is a planted link: keep nothing
						d.problem, d.quarantined = d.problem+"; its bytes could not be kept: "+err.Error(), ""
					} else if err != nil {
						return err
					}
				}
				v.mu.Lock()
				v.chunks[dg] = d
				switch {
				case d.quarantined != "":
					v.stats.Corrupt++
					v.stats.Quarantined++
				case d.problem == "missing":
					v.stats.Missing++
				default:
					v.stats.Corrupt++
				}
				v.mu.Unlock()
			}
		})
	}
	return g.Wait()
}

// parallel is how many objects verify reads at once.
func (v *verify) parallel() int {
	if v.o.Parallel <= 0 {
		return 16
	}
	return v.o.Parallel
}

// damageOf is the damage a read found (missing: deleted since the
// listing), counted; v.mu is held.
func (v *verify) damageOf(ce *ChunkError) *damage {
	if errors.Is(ce.Err, sink.ErrNotFound) {
		v.stats.Missing++
		return &damage{problem: "missing"}
	}
	v.stats.Corrupt++
	return &damage{problem: ce.Err.Error()}
}

// record finds every backup of the selection that references a damaged
// chunk, reports the damaged chunks, and writes the damage records (16 at
// once). A second pass over the indexes that fails (the store, or ctx)
// leaves each chunk with the first backup found to need it; every problem
// is reported whatever fails.
func (v *verify) record(ctx context.Context, ms []*Manifest, report func(Problem)) error {
	var passErr error
	if len(v.chunks)+len(v.patches) > 0 {
		// Only when something is damaged: the first pass keeps one place
		// per chunk, not every backup (memory).
		for dg, d := range v.chunks {
			d.backups = map[string]bool{v.refs[dg].backup: true}
		}
		for p, d := range v.patches {
			d.backups = map[string]bool{v.patchRefs[p].backup: true}
		}
		for _, m := range ms {
			name := m.Domain + "/" + m.ID
			passErr = v.indexes(ctx, m, func(_ string, ix *index.Index) {
				for i, dg := range ix.All() {
					base := ix.Base(i)
					if d := v.chunks[dg]; d != nil && base.IsZeroChunk() {
						d.backups[name] = true
					}
					if d := v.chunks[base]; d != nil && !base.IsZeroChunk() {
						d.backups[name] = true
					}
					if d := v.patches[patchRef{dg, base}]; d != nil {
						d.backups[name] = true
					}
				}
			}, nil)
			if passErr != nil {
				break
			}
		}
	}
	damaged := map[string]bool{}
	digests := slices.SortedFunc(maps.Keys(v.chunks), func(a, b chunker.Digest) int { return cmp.Compare(v.refs[a].index, v.refs[b].index) })
	for _, dg := range digests {
		d, ref := v.chunks[dg], v.refs[dg]
		p := Problem{Object: ChunkKey(dg), Backup: ref.backup, Disk: ref.disk,
			Problem: fmt.Sprintf("%s (chunk %d of the disk)", d.problem, ref.index)}
		if len(d.backups) > 1 {
			p.Backups = slices.Sorted(maps.Keys(d.backups))
		}
		if d.quarantined != "" {
			p.Problem += "; its bytes are kept in " + d.quarantined
		}
		report(p)
	}
	patches := slices.SortedFunc(maps.Keys(v.patches), func(a, b patchRef) int {
		return cmp.Compare(v.patchRefs[a].index, v.patchRefs[b].index)
	})
	for _, pr := range patches {
		d, ref := v.patches[pr], v.patchRefs[pr]
		p := Problem{Object: pr.key(), Backup: ref.backup, Disk: ref.disk,
			Problem: fmt.Sprintf("%s (chunk %d of the disk, stored as a patch)", d.problem, ref.index)}
		if len(d.backups) > 1 {
			p.Backups = slices.Sorted(maps.Keys(d.backups))
		}
		report(p)
	}
	g, gctx := errgroup.WithContext(ctx)
	g.SetLimit(16)
	write := func(key string, d *damage) {
		backups := slices.Sorted(maps.Keys(d.backups))
		for _, b := range backups {
			damaged[b] = true
		}
		if !v.readOnly {
			g.Go(func() error { return v.r.recordDamage(gctx, key, d.problem, d.quarantined, backups, v.now) })
		}
	}
	for _, dg := range digests {
		write(ChunkKey(dg), v.chunks[dg])
	}
	for _, p := range patches {
		write(p.key(), v.patches[p])
	}
	for _, key := range slices.Sorted(maps.Keys(v.objects)) {
		write(key, v.objects[key])
	}
	v.stats.Damaged = append([]string{}, slices.Sorted(maps.Keys(damaged))...)
	if err := g.Wait(); err != nil {
		return fmt.Errorf("recording what is damaged: %w", err)
	}
	return passErr
}

// repaired deletes the damage records of the objects this verify read
// whole: a backup stored the chunk again (or someone put the object
// back).
func (v *verify) repaired(ctx context.Context) error {
	var keys []string
	for rec, obj := range v.records {
		p, base, patch := parsePatchKey(obj)
		if d, ok := chunkDigest(obj); ok && v.readOK[d] && v.chunks[d] == nil || v.loadedOK[obj] && v.objects[obj] == nil ||
			patch && v.patches[patchRef{p, base}] == nil && (v.patchOK[patchRef{p, base}] || v.readOK[p] && v.chunks[p] == nil) {
			keys = append(keys, rec)
		}
	}
	v.stats.Repaired = len(keys)
	return sink.DeleteMany(ctx, v.r.store, keys, 8, nil)
}

// isStoreFailure tells a failing store (stop: we cannot check) from a bad
// or missing object (a problem to report).
func isStoreFailure(err error) bool {
	var se *sink.Error
	return errors.As(err, &se) && !errors.Is(err, sink.ErrNotFound) && !errors.Is(err, sink.ErrDamaged)
}

// problemObject names the object a problem is about: the one an
// ObjectError names, else what.
func problemObject(err error, what string) string {
	var oe *ObjectError
	if errors.As(err, &oe) {
		return oe.Key
	}
	return what
}

// verifyKeys reports the key objects of an encrypted repository that
// cannot be read. (Only the one this process opened with can be checked
// further: the others need their passwords.)
func (r *Repo) verifyKeys(ctx context.Context, report func(Problem)) error {
	if r.keys == nil {
		return nil
	}
	objs, probs, err := keyObjects(ctx, r.store)
	if err != nil {
		return err
	}
	for _, p := range probs {
		report(p)
	}
	limit := passwordCap(r.cfg)
	for _, o := range objs {
		if o.Repository != r.cfg.ID {
			report(Problem{Object: keyObjectKey(o.ID), Problem: fmt.Sprintf("a key of another repository (%s): left by an init that lost a race, or planted", o.Repository)})
		} else if why := aboveCap(o, limit); o.Kind == "password" && why != "" {
			report(Problem{Object: keyObjectKey(o.ID), Problem: why})
		}
	}
	return nil
}

// Sampled verification divides the chunks into sampleParts parts by the
// top 12 bits of their digest (uniform: a hash, or in an encrypted
// repository a keyed one) and reads, each run, the parts verified least
// recently. state/verified records when each part was last read.
const (
	sampleParts = 4096
	verifiedKey = "state/verified"
)

func bucketOf(d chunker.Digest) int { return int(d[0])<<4 | int(d[1])>>4 }

// verifiedState is state/verified (a meta blob of JSON).
type verifiedState struct {
	Version int     `json:"version"`
	Parts   int     `json:"parts"`
	Read    []int64 `json:"read"` // per part: when a verify last read it (Unix nanoseconds; 0 never)
}

// sampleState is the parts one sampled Verify reads.
type sampleState struct {
	state  verifiedState
	picked [sampleParts]bool
	now    int64
}

// sample picks the parts a run at ReadPercent reads: the share of them
// read least recently, ties broken at random (every part at 100%; nil
// when no chunk is read).
func (v *verify) sample(ctx context.Context) (*sampleState, error) {
	p := v.o.ReadPercent
	if p <= 0 {
		return nil, nil
	}
	st, err := v.r.loadVerified(ctx, v.o.Log)
	if err != nil {
		return nil, err
	}
	s := &sampleState{state: st, now: v.now.UnixNano()}
	for _, t := range st.Read { // always later than every part read before
		s.now = max(s.now, t+1)
	}
	seed := v.o.Seed
	if seed == 0 {
		seed = rand.Uint64()
	}
	order := rand.New(rand.NewPCG(seed, 0)).Perm(sampleParts)
	slices.SortStableFunc(order, func(a, b int) int { return cmp.Compare(st.Read[a], st.Read[b]) })
	n := min(sampleParts, (sampleParts*p+99)/100)
	for _, part := range order[:n] {
		s.picked[part] = true
	}
	return s, nil
}

// loadVerified reads state/verified; one that is missing or cannot be
// read is a repository never verified (with a warning).
func (r *Repo) loadVerified(ctx context.Context, log *slog.Logger) (verifiedState, error) {
	fresh := verifiedState{Version: formatVersion, Parts: sampleParts, Read: make([]int64, sampleParts)}
	var st verifiedState
	err := r.getMeta(ctx, verifiedKey, &st)
	switch {
	case isNotFound(err):
		return fresh, nil
	case isStoreFailure(err):
		return fresh, err
	}
	if err == nil && (st.Parts != sampleParts || len(st.Read) != sampleParts) {
		err = fmt.Errorf("%d parts (%d times), want %d", st.Parts, len(st.Read), sampleParts)
	}
	if err != nil {
		if log != nil {
			log.Warn("the verification state cannot be read: starting it again (every part counts as never verified)",
				"object", verifiedKey, "error", err)
		}
		return fresh, nil
	}
	return st, nil
}

// saveVerified records that the parts s picked were read now. Two
// verifies saving at once: the last one wins, and the parts only the
// other read are read again sooner than needed.
func (r *Repo) saveVerified(ctx context.Context, s *sampleState) error {
	for part, ok := range s.picked {
		if ok {
			s.state.Read[part] = s.now
		}
	}
	return r.putMeta(ctx, verifiedKey, s.state)
}

// AllBackups is every backup the problem concerns.
func (p Problem) AllBackups() []string {
	if len(p.Backups) > 0 {
		return p.Backups
	}
	return []string{p.Backup}
}
