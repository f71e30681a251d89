package repo

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"sort"
	"strings"

	"github.com/nbdmover/nbdmover/sink"
)

// MigrateResult is what Migrate did.
type MigrateResult struct {
	Backups   int  `json:"backups"` // format-1 backups converted (now or by an earlier run)
	Skipped   int  `json:"skipped"` // format-1 backups that could not be converted (reported, left in place)
	Removed   int  `json:"removed"` // format-1 objects removed
	Left      int  `json:"left"`    // format-1 objects left: of backups not converted, or never committed
	AlreadyV2 bool `json:"already_format_2"`
}

// Migrate converts a format-1 repository to format 2, in a way that is
// safe to interrupt and to run again: it writes every backup's format-2
// index, files and manifest (a manifest already there is kept), then
// replaces the config (the switch: until then format-1 readers see the old
// repository, after it format-2 readers see every backup), then removes
// the format-1 objects of the backups it converted. Chunks are shared by
// both formats and stay. A format-1 backup it cannot read (or one an old
// nbdmover is still writing) is reported and left; one committed after the
// switch by an old nbdmover that opened the repository before it is
// converted by the next run. report, if set, is told of each backup.
func Migrate(ctx context.Context, store sink.Store, report func(string)) (MigrateResult, error) {
	var res MigrateResult
	if report == nil {
		report = func(string) {}
	}
	cfg, err := readConfig(ctx, store)
	if err != nil {
		return res, err
	}
	switch cfg.Version {
	case formatVersion, patchedVersion:
		res.AlreadyV2 = true // an earlier run switched; finish its removals
	case 1:
	default:
		return res, fmt.Errorf("%s: repository format %d; this nbdmover migrates format 1", store.Location(), cfg.Version)
	}
	cfg.Version = max(cfg.Version, formatVersion)
	r, err := newRepo(store, cfg)
	if err != nil {
		return res, err
	}
	keys, err := v1ManifestKeys(ctx, store)
	if err != nil {
		return res, err
	}
	// Every format-1 manifest is converted, also after the switch (a
	// backup an old nbdmover committed late); only converted backups are
	// removed.
	converted := map[string]bool{} // backups/<domain>/<id>/
	for _, key := range keys {
		done, err := r.migrateBackup(ctx, key, report)
		if err != nil {
			return res, err
		}
		if done {
			res.Backups++
			converted[strings.TrimSuffix(key, "manifest.json")] = true
		} else {
			res.Skipped++
		}
	}
	if !res.AlreadyV2 {
		b, _ := json.MarshalIndent(cfg, "", "  ")
		if err := store.Put(ctx, configKey, append(b, '\n')); err != nil {
			return res, err
		}
	}
	res.Removed, res.Left, err = removeV1(ctx, store, converted)
	if res.Left > 0 {
		report(fmt.Sprintf("left %d format-1 objects under backups/: of backups that could not be converted, or never committed", res.Left))
	}
	return res, err
}

// migrateBackup writes the format-2 objects of one format-1 backup. It
// returns false for a manifest it cannot read (reported and left alone).
func (r *Repo) migrateBackup(ctx context.Context, key string, report func(string)) (bool, error) {
	// leave stops the migration when the store fails, and otherwise
	// reports a backup it cannot read and leaves it.
	leave := func(what string, err error) (bool, error) {
		if isStoreFailure(err) {
			return false, err
		}
		report("cannot migrate " + what + ": " + err.Error())
		return false, nil
	}
	old, err := v1Load(ctx, r.store, key)
	if err != nil {
		return leave(key, err)
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
			return leave(old.Domain+"/"+old.ID, err)
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
			return leave(old.Domain+"/"+old.ID, err)
		}
		files[name] = b
	}
	if err := r.Commit(ctx, m, disks, files); err != nil && !errors.Is(err, sink.ErrExists) {
		return false, fmt.Errorf("migrate %s/%s: %w", old.Domain, old.ID, err)
	}
	report("migrated " + old.Domain + "/" + old.ID)
	return true, nil
}

// removeV1 removes the format-1 objects of the converted backups (their
// directories under backups/) and counts the others, which it leaves.
func removeV1(ctx context.Context, store sink.Store, converted map[string]bool) (removed, left int, err error) {
	var keys []string
	if err := store.List(ctx, "backups/", func(o sink.ObjectInfo) error {
		keys = append(keys, o.Key)
		return nil
	}); err != nil {
		return 0, 0, err
	}
	// The manifests last: a run interrupted here leaves each converted
	// directory with its manifest, so the next run still knows it.
	sort.SliceStable(keys, func(i, j int) bool {
		return !strings.HasSuffix(keys[i], "/manifest.json") && strings.HasSuffix(keys[j], "/manifest.json")
	})
	for _, k := range keys {
		if !converted[k[:strings.LastIndex(k, "/")+1]] {
			left++
			continue
		}
		if err := store.Delete(ctx, k); err != nil {
			return removed, left, err
		}
		removed++
	}
	return removed, left, nil
}
