package repo

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/nbdmover/nbdmover/chunker"
	"github.com/nbdmover/nbdmover/sink"
	"golang.org/x/sync/errgroup"
)

// What verify found damaged is recorded under state/ (docs/format.md,
// "Damage and verification state"):
//
//   - state/damage/<object key>: a damage record (a meta blob of JSON) for
//     each damaged chunk (or index object, or file), naming the backups
//     that reference it. A chunk with a record is never trusted: backups
//     do not deduplicate against it but build it from the disk and store
//     it again (which heals it, and every backup that references it), and
//     list marks the backups it names as damaged.
//   - state/quarantine/<chunk key>: the bytes a corrupt chunk had when
//     verify read them, kept for forensics and never read as a chunk.
//
// The chunk object itself is left in place until a backup overwrites it:
// deleting it could race with the backup that heals it and delete the
// good copy (no store here renames atomically or deletes conditionally).
// A corrupt chunk cannot be read as valid anyway (every read checks it
// against its name), and with the record no backup relies on it.
const (
	damagePrefix     = "state/damage/"
	quarantinePrefix = "state/quarantine/"
)

// damageKey is the key of the damage record of the object at key.
func damageKey(key string) string { return damagePrefix + key }

// QuarantineKey is where verify keeps the bytes of a corrupt chunk.
func QuarantineKey(d chunker.Digest) string { return quarantinePrefix + ChunkKey(d) }

// maxRecordBackups bounds the backups a damage record names (and counts
// beyond).
const maxRecordBackups = 10000

// DamageRecord is what verify recorded about a damaged object.
type DamageRecord struct {
	Version     int       `json:"version"`
	Object      string    `json:"object"`  // the damaged object's key
	Problem     string    `json:"problem"` // what is wrong, e.g. "missing"
	Found       time.Time `json:"found"`   // when verify first found it
	Checked     time.Time `json:"checked"` // when verify last found it
	Quarantined string    `json:"quarantined,omitempty"`
	// Backups: "domain/id" of the backups that reference it (at most
	// maxRecordBackups; BackupCount counts them all).
	Backups     []string `json:"backups"`
	BackupCount int      `json:"backup_count"`
}

// damageRecords lists the damage records: the object keys they are about,
// by record key. Keys that are not of a chunk, index object or file are
// not ours, and left alone.
func (r *Repo) damageRecords(ctx context.Context) (map[string]string, error) {
	out := map[string]string{}
	err := r.store.List(ctx, damagePrefix, func(o sink.ObjectInfo) error {
		obj := strings.TrimPrefix(o.Key, damagePrefix)
		if _, _, _, ok := parseObjectKey(obj); ok {
			out[o.Key] = obj
		}
		return nil
	})
	return out, err
}

// DamagedChunks returns the chunks that have a damage record: those a
// backup must build from the disk and store again, never trust. It costs
// one listing.
func (r *Repo) DamagedChunks(ctx context.Context) (map[chunker.Digest]bool, error) {
	recs, err := r.damageRecords(ctx)
	if err != nil {
		return nil, err
	}
	out := map[chunker.Digest]bool{}
	for _, obj := range recs {
		if d, ok := storedDigest(obj); ok && !d.IsZeroChunk() { // no chunk is named so: a planted record
			out[d] = true
		}
	}
	return out, nil
}

// chunkDigest returns the digest a chunk key names.
func chunkDigest(key string) (chunker.Digest, bool) {
	kind, d, _, ok := parseObjectKey(key)
	return d, ok && kind == candChunk
}

// storedDigest returns the chunk a chunk or patch key stores: one whose
// object is damaged is built from the disk and stored whole again.
func storedDigest(key string) (chunker.Digest, bool) {
	kind, d, _, ok := parseObjectKey(key)
	return d, ok && (kind == candChunk || kind == candPatch)
}

// readDamage reads the damage records (16 at once).
func (r *Repo) readDamage(ctx context.Context) ([]*DamageRecord, error) {
	recs, err := r.damageRecords(ctx)
	if err != nil {
		return nil, err
	}
	var mu sync.Mutex
	var out []*DamageRecord
	g, gctx := errgroup.WithContext(ctx)
	g.SetLimit(16)
	for key, obj := range recs {
		g.Go(func() error {
			rec, err := r.readRecord(gctx, key)
			if isNotFound(err) {
				return nil // healed meanwhile
			}
			if isStoreFailure(err) {
				return err
			}
			if err != nil { // unreadable: the object is still damaged, its backups unknown
				rec = &DamageRecord{Object: obj, Problem: "damaged (its damage record cannot be read: " + err.Error() + ")"}
			}
			mu.Lock()
			out = append(out, rec)
			mu.Unlock()
			return nil
		})
	}
	err = g.Wait()
	slices.SortFunc(out, func(a, b *DamageRecord) int { return strings.Compare(a.Object, b.Object) })
	return out, err
}

func (r *Repo) readRecord(ctx context.Context, key string) (*DamageRecord, error) {
	var rec DamageRecord
	if err := r.getMeta(ctx, key, &rec); err != nil {
		return nil, err
	}
	return &rec, nil
}

// Damage returns the damage records, and the backups they name as damaged
// ("domain/id"). It costs a listing and a read per record.
func (r *Repo) Damage(ctx context.Context) ([]*DamageRecord, map[string]bool, error) {
	recs, err := r.readDamage(ctx)
	damaged := map[string]bool{}
	for _, rec := range recs {
		for _, b := range rec.Backups {
			damaged[b] = true
		}
	}
	return recs, damaged, err
}

// recordDamage writes (or rewrites) the damage record of obj, naming
// backups as well as those an earlier record named (a verify of one domain
// does not forget the others').
func (r *Repo) recordDamage(ctx context.Context, obj, problem, quarantined string, backups []string, now time.Time) error {
	key := damageKey(obj)
	rec := &DamageRecord{Version: formatVersion, Object: obj, Problem: problem, Found: now, Checked: now, Quarantined: quarantined}
	old, err := r.readRecord(ctx, key)
	switch {
	case err == nil:
		rec.Found = old.Found
		if rec.Quarantined == "" {
			rec.Quarantined = old.Quarantined
		}
		backups = append(backups, old.Backups...)
	case isStoreFailure(err):
		return err
	}
	slices.Sort(backups)
	backups = slices.Compact(backups)
	rec.BackupCount = len(backups)
	rec.Backups = backups[:min(len(backups), maxRecordBackups)]
	return r.putMeta(ctx, key, rec)
}

// quarantine keeps the bytes a corrupt chunk had, once: the first copy
// found is the evidence.
func (r *Repo) quarantine(ctx context.Context, d chunker.Digest, blob []byte) (string, error) {
	key := QuarantineKey(d)
	err := r.store.Create(ctx, key, blob)
	if errors.Is(err, sink.ErrExists) {
		err = nil
	}
	return key, err
}

// Healed deletes the damage records of chunks a backup built from its
// disk and stored again: they are whole now, and so is every backup that
// referenced them (as far as they go), with the records of patches of
// them (readers fall back to the whole chunk). It returns how many
// chunks it cleared.
func (r *Repo) Healed(ctx context.Context, ds []chunker.Digest) (int, error) {
	seen := map[chunker.Digest]bool{}
	var keys []string
	for _, d := range ds {
		if seen[d] {
			continue
		}
		seen[d] = true
		keys = append(keys, damageKey(ChunkKey(d)))
		if !r.Patches() {
			continue
		}
		// The chunk whole serves every entry that names it as a patch
		// (readers fall back to it): the patches' records go too.
		h := d.String()
		err := r.store.List(ctx, damageKey("patches/"+h[:2]+"/"+h+"."), func(o sink.ObjectInfo) error {
			keys = append(keys, o.Key)
			return nil
		})
		if err != nil {
			return 0, err
		}
	}
	if len(keys) == 0 {
		return 0, nil
	}
	if err := sink.DeleteMany(ctx, r.store, keys, 8, nil); err != nil {
		return 0, err
	}
	return len(seen), nil
}

// ChunkDamage says whether err, from reading a chunk (GetChunk), means
// the chunk is damaged (missing, corrupt, or not a readable object) rather
// than unreachable (a store failure, a cancelled read): then it returns
// the chunk's key and the problem, as verify would record them.
func ChunkDamage(err error) (key, problem string, ok bool) {
	var ce *ChunkError
	if !errors.As(err, &ce) || isStoreFailure(ce.Err) || errors.Is(ce.Err, context.Canceled) || errors.Is(ce.Err, context.DeadlineExceeded) {
		return "", "", false
	}
	problem = ce.Err.Error()
	if isNotFound(ce.Err) {
		problem = "missing"
	}
	return ce.Key, problem, true
}

// RecordDamage records, as verify does, that a reader found the chunk at
// key damaged (ChunkDamage), naming the backups ("domain/id") that were
// being read: list marks them, and the next backups of their domains
// store the chunk again rather than deduplicate against it. The chunk's
// bytes are not quarantined (the next verify --read-data does that).
func (r *Repo) RecordDamage(ctx context.Context, key, problem string, backups []string) error {
	if _, ok := storedDigest(key); !ok {
		return fmt.Errorf("%s is not a chunk's or patch's key", key)
	}
	return r.recordDamage(ctx, key, problem, "", backups, time.Now())
}
