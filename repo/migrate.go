package repo

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strings"

	"github.com/nbdmover/nbdmover/sink"
)

// MigrateResult is what Migrate did.
type MigrateResult struct {
	Backups   int  `json:"backups"` // format-1 backups converted (now or by an earlier run)
	Skipped   int  `json:"skipped"` // format-1 manifests that could not be read (reported, left in place)
	Removed   int  `json:"removed"` // format-1 objects removed
	AlreadyV2 bool `json:"already_format_2"`
}

// Migrate converts a format-1 repository to format 2, in a way that is
// safe to interrupt and to run again: it writes every backup's format-2
// index, files and manifest (a manifest already there is kept), then
// replaces the config (the switch: until then format-1 readers see the old
// repository, after it format-2 readers see every backup), then removes
// the format-1 objects. Chunks are shared by both formats and stay. No
// backup may run during a migration. report, if set, is told of each
// backup and of manifests it could not read.
func Migrate(ctx context.Context, store sink.Store, report func(string)) (MigrateResult, error) {
	var res MigrateResult
	if report == nil {
		report = func(string) {}
	}
	b, err := store.Get(ctx, configKey, nil)
	if errors.Is(err, sink.ErrNotFound) {
		return res, fmt.Errorf("%s: %w", store.Location(), ErrNoRepository)
	}
	if err != nil {
		return res, err
	}
	var cfg Config
	if err := strictUnmarshal(b, &cfg); err != nil {
		return res, fmt.Errorf("%s: repository config is damaged: %w", store.Location(), err)
	}
	switch cfg.Version {
	case FormatVersion:
		res.AlreadyV2 = true // an earlier run switched; finish its removals
	case 1:
	default:
		return res, fmt.Errorf("%s: repository format %d; this nbdmover migrates format 1", store.Location(), cfg.Version)
	}
	cfg.Version = FormatVersion
	r, err := newRepo(store, cfg)
	if err != nil {
		return res, err
	}
	keys, err := v1ManifestKeys(ctx, store)
	if err != nil {
		return res, err
	}
	if !res.AlreadyV2 {
		for _, key := range keys {
			done, err := r.migrateBackup(ctx, key, report)
			if err != nil {
				return res, err
			}
			if done {
				res.Backups++
			} else {
				res.Skipped++
			}
		}
		b, _ := json.MarshalIndent(cfg, "", "  ")
		if err := store.Put(ctx, configKey, append(b, '\n')); err != nil {
			return res, err
		}
	}
	res.Removed, err = removeV1(ctx, store, res.Skipped > 0, report)
	return res, err
}

// migrateBackup writes the format-2 objects of one format-1 backup. It
// returns false for a manifest it cannot read (reported and left alone).
func (r *Repo) migrateBackup(ctx context.Context, key string, report func(string)) (bool, error) {
	old, err := v1Load(ctx, r.store, key)
	if isStoreFailure(err) {
		return false, err
	}
	if err != nil {
		report("cannot migrate " + key + ": " + err.Error())
		return false, nil
	}
	if _, err := r.store.Stat(ctx, ManifestKey(old.Domain, old.ID)); err == nil {
		report("already migrated " + old.Domain + "/" + old.ID)
		return true, nil
	}
	m := &Manifest{ID: old.ID, Domain: old.Domain, Created: old.Created, Completed: old.Completed, Mode: old.Mode,
		Parent: old.Parent, Fallback: old.Fallback, Source: old.Source, Consistency: old.Consistency,
		Checkpoint: old.Checkpoint, Compression: old.Compression, Verification: old.Verification}
	disks := map[string]DiskData{}
	for _, d := range old.Disks {
		ix, err := v1LoadIndex(ctx, r.store, old, d)
		if err != nil {
			return false, fmt.Errorf("migrate %s/%s: %w", old.Domain, old.ID, err)
		}
		disks[d.Name] = DiskData{Full: ix}
		m.Disks = append(m.Disks, DiskManifest{Name: d.Name, Size: d.Size, Mode: d.Mode, BytesRead: d.BytesRead,
			BytesWritten: d.BytesWritten, BytesDedup: d.BytesDedup, BytesZero: d.BytesZero, DirtyBytes: d.DirtyBytes,
			VerifiedChunks: d.VerifiedChunks, VerifiedBytes: d.VerifiedBytes, ZeroedChunks: d.ZeroedChunks})
	}
	files := map[string][]byte{}
	for name := range old.Files {
		b, err := v1ReadFile(ctx, r.store, old, name)
		if err != nil {
			return false, fmt.Errorf("migrate %s/%s: %w", old.Domain, old.ID, err)
		}
		files[name] = b
	}
	if err := r.Commit(ctx, m, disks, files); err != nil && !errors.Is(err, sink.ErrExists) {
		return false, fmt.Errorf("migrate %s/%s: %w", old.Domain, old.ID, err)
	}
	report("migrated " + old.Domain + "/" + old.ID)
	return true, nil
}

// removeV1 removes the format-1 objects (everything under backups/), but
// those of backups whose manifest could not be read when keepUnread.
func removeV1(ctx context.Context, store sink.Store, keepUnread bool, report func(string)) (int, error) {
	var keys []string
	if err := store.List(ctx, "backups/", func(o sink.ObjectInfo) error {
		keys = append(keys, o.Key)
		return nil
	}); err != nil {
		return 0, err
	}
	unread := map[string]bool{}
	if keepUnread {
		for _, k := range keys {
			if strings.HasSuffix(k, "/manifest.json") {
				if _, err := v1Load(ctx, store, k); err != nil && !isStoreFailure(err) {
					unread[strings.TrimSuffix(k, "manifest.json")] = true
				}
			}
		}
	}
	n := 0
	for _, k := range keys {
		if unread[k[:strings.LastIndex(k, "/")+1]] {
			continue
		}
		if err := store.Delete(ctx, k); err != nil {
			return n, err
		}
		n++
	}
	if len(unread) > 0 {
		report(fmt.Sprintf("left %d format-1 backups that could not be read under backups/", len(unread)))
	}
	return n, nil
}
