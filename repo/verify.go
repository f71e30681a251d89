package repo

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sort"
	"sync"
	"sync/atomic"

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
}

// VerifyOptions select what Verify checks.
type VerifyOptions struct {
	Domain   string // "" = every domain
	Backup   string // "" = every backup of Domain
	ReadData bool   // also fetch, decode and re-hash every chunk
	Parallel int    // chunk fetches in flight (default 16)
	Log      *slog.Logger
}

// VerifyStats counts what Verify looked at.
type VerifyStats struct {
	Backups int   `json:"backups"`
	Chunks  int   `json:"chunks"` // distinct chunks referenced
	Bytes   int64 `json:"bytes"`  // stored bytes of those chunks
}

type chunkRef struct {
	backup, disk string
	index        int64
}

// Verify checks the selected backups: every manifest and index decodes and
// matches its checksum, and every chunk they reference is stored (and with
// ReadData, decodes to bytes that hash to its name). It reports every
// problem through report, not only the first, and returns an error only
// when it could not check (the store failed).
func (r *Repo) Verify(ctx context.Context, o VerifyOptions, report func(Problem)) (VerifyStats, error) {
	var stats VerifyStats
	// Under a shared lock, so that no gc deletes what a backup forgotten
	// meanwhile referenced: verify reports only what is really wrong.
	lock, ctx, err := r.Lock(ctx, LockShared, "verify", o.Log)
	if err != nil {
		return stats, err
	}
	defer lock.Release()
	if err := r.verifyKeys(ctx, report); err != nil {
		return stats, err
	}
	ms, err := r.verifySelection(ctx, o, report)
	if err != nil {
		return stats, err
	}
	stats.Backups = len(ms)
	refs, err := r.chunkRefs(ctx, ms, report)
	if err != nil {
		return stats, err
	}
	stats.Chunks = len(refs)
	present, err := r.listedChunks(ctx, refs, report, &stats)
	if err != nil || !o.ReadData {
		return stats, err
	}
	parallel := o.Parallel
	if parallel <= 0 {
		parallel = 16
	}
	return stats, r.readChunks(ctx, present, refs, parallel, report)
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

// chunkRefs checks the backups' indexes and files and returns every chunk
// they reference, each with the first place that references it.
func (r *Repo) chunkRefs(ctx context.Context, ms []*Manifest, report func(Problem)) (map[chunker.Digest]chunkRef, error) {
	refs := map[chunker.Digest]chunkRef{}
	for _, m := range ms {
		name := m.Domain + "/" + m.ID
		for _, d := range m.Disks {
			ix, err := r.LoadIndex(ctx, m, d.Name)
			if isStoreFailure(err) {
				return nil, err
			}
			if err != nil {
				report(Problem{Object: problemObject(err, "index of disk "+d.Name), Backup: name, Disk: d.Name, Problem: err.Error()})
				continue
			}
			for i, dg := range ix.All() {
				if _, seen := refs[dg]; !seen {
					refs[dg] = chunkRef{backup: name, disk: d.Name, index: i}
				}
			}
		}
		for f := range m.Files {
			_, err := r.ReadFile(ctx, m, f)
			if isStoreFailure(err) {
				return nil, err
			}
			if err != nil {
				report(Problem{Object: problemObject(err, m.Files[f]), Backup: name, Problem: err.Error()})
			}
		}
	}
	return refs, nil
}

// listedChunks reports the referenced chunks that are missing or too
// short to be a blob, from one listing instead of a request per chunk, and
// returns the others in disk order.
func (r *Repo) listedChunks(ctx context.Context, refs map[chunker.Digest]chunkRef, report func(Problem), stats *VerifyStats) ([]chunker.Digest, error) {
	sizes := map[string]int64{}
	if err := r.store.List(ctx, "chunks/", func(o sink.ObjectInfo) error {
		sizes[o.Key] = o.Size
		return nil
	}); err != nil {
		return nil, err
	}
	digests := make([]chunker.Digest, 0, len(refs))
	for dg := range refs {
		digests = append(digests, dg)
	}
	sort.Slice(digests, func(i, j int) bool { return refs[digests[i]].index < refs[digests[j]].index })
	var present []chunker.Digest
	for _, dg := range digests {
		key, ref := ChunkKey(dg), refs[dg]
		size, ok := sizes[key]
		switch {
		case !ok:
			report(Problem{Object: key, Backup: ref.backup, Disk: ref.disk,
				Problem: fmt.Sprintf("missing (chunk %d of the disk)", ref.index)})
		case size < chunker.HeaderSize:
			report(Problem{Object: key, Backup: ref.backup, Disk: ref.disk,
				Problem: fmt.Sprintf("truncated to %d bytes (chunk %d of the disk)", size, ref.index)})
		default:
			stats.Bytes += size
			present = append(present, dg)
		}
	}
	return present, nil
}

// readChunks fetches, decodes and re-hashes the chunks, parallel at once,
// and reports each one that is damaged.
func (r *Repo) readChunks(ctx context.Context, present []chunker.Digest, refs map[chunker.Digest]chunkRef,
	parallel int, report func(Problem)) error {
	var mu sync.Mutex
	var next atomic.Int64
	g, gctx := errgroup.WithContext(ctx)
	for range parallel {
		g.Go(func() error {
			var plain, blob []byte
			for {
				i := next.Add(1) - 1
				if i >= int64(len(present)) {
					return nil
				}
				dg := present[i]
				var err error
				plain, blob, err = r.GetChunk(gctx, dg, plain, blob)
				if err == nil {
					continue
				}
				var ce *chunker.CorruptError
				if !errors.As(err, &ce) && !errors.Is(err, sink.ErrNotFound) {
					return err
				}
				ref := refs[dg]
				mu.Lock()
				report(Problem{Object: ChunkKey(dg), Backup: ref.backup, Disk: ref.disk,
					Problem: fmt.Sprintf("%v (chunk %d of the disk)", errors.Unwrap(err), ref.index)})
				mu.Unlock()
			}
		})
	}
	return g.Wait()
}

// isStoreFailure tells a failing store (stop: we cannot check) from a bad
// or missing object (a problem to report).
func isStoreFailure(err error) bool {
	var se *sink.Error
	return errors.As(err, &se) && !errors.Is(err, sink.ErrNotFound)
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
	for _, o := range objs {
		if o.Repository != r.cfg.ID {
			report(Problem{Object: keyObjectKey(o.ID), Problem: fmt.Sprintf("a key of another repository (%s): left by an init that lost a race, or planted", o.Repository)})
		}
	}
	return nil
}
