package repo

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/nbdmover/nbdmover/sink"
)

// Manifest describes one committed backup. It is stored as a meta blob of
// JSON under manifests/<domain>/<rank>-<id> (see ManifestKey), written
// last: its presence commits the backup.
type Manifest struct {
	Version     int       `json:"version"`
	ID          string    `json:"id"`
	Domain      string    `json:"domain"`
	Created     time.Time `json:"created"`
	Completed   time.Time `json:"completed"`
	Mode        string    `json:"mode"`             // "full" or "incremental"
	Parent      string    `json:"parent,omitempty"` // id of the backup this one was incremental from
	Fallback    string    `json:"fallback,omitempty"`
	Source      string    `json:"source"`      // "libvirt" or "nbd"
	Consistency string    `json:"consistency"` // "crash-consistent" or "quiesced"
	// Checkpoint is the libvirt checkpoint (or, for NBD sources, the dirty
	// bitmap) this backup was taken at; the next incremental starts there.
	Checkpoint  string `json:"checkpoint,omitempty"`
	ChunkSize   int64  `json:"chunk_size"`
	Compression string `json:"compression"`
	// Verification is what an incremental's check of its dirty bitmaps
	// found (nil for a full backup that needed none).
	Verification *Verification  `json:"verification,omitempty"`
	Disks        []DiskManifest `json:"disks"`
	// Files are extra objects stored with the backup (domain.xml,
	// checkpoint.xml), by name: the key of each file object.
	Files map[string]string `json:"files,omitempty"`
	// ObjectLock is the backup's protection in a repository with S3
	// Object Lock (nil otherwise).
	ObjectLock *BackupLock `json:"object_lock,omitempty"`
}

// DiskManifest describes one disk of a backup.
type DiskManifest struct {
	Name string `json:"name"`
	Size int64  `json:"size"`
	Mode string `json:"mode"` // "full" or "incremental", per disk
	// Index is the disk's index: a full index, then the deltas to apply
	// to it in order (see Chain).
	Index      []IndexRef `json:"index"`
	Chunks     int64      `json:"chunks"`      // of the disk's grid
	ZeroChunks int64      `json:"zero_chunks"` // of them, zero
	// What the backup moved for this disk.
	BytesRead    int64 `json:"bytes_read"`    // read from the source
	BytesWritten int64 `json:"bytes_written"` // stored (after compression)
	BytesDedup   int64 `json:"bytes_dedup"`   // read but already stored
	BytesZero    int64 `json:"bytes_zero"`    // all-zero chunks or never read holes
	// The dirty bitmap's check (see Verification).
	DirtyBytes     int64 `json:"dirty_bytes,omitempty"`     // bytes the dirty bitmap marked
	VerifiedChunks int64 `json:"verified_chunks,omitempty"` // clean chunks read and found unchanged
	VerifiedBytes  int64 `json:"verified_bytes,omitempty"`  // bytes read for them
	ZeroedChunks   int64 `json:"zeroed_chunks,omitempty"`   // clean chunks unallocated now that held data before
	PatchedChunks  int64 `json:"patched_chunks,omitempty"`  // dirty chunks stored as patches
}

// IndexRef is one link of a disk's index chain: a full index or a delta,
// stored as one or more index objects.
type IndexRef struct {
	Kind    string   `json:"kind"`              // "full" or "delta"
	Backups int      `json:"backups,omitempty"` // delta: how many incrementals' changes it holds
	Entries int64    `json:"entries"`           // chunks it lists
	Objects []string `json:"objects"`           // its index objects, in chunk order
}

// Verification is the outcome of an incremental's check that its dirty
// bitmaps told the truth: a sample of the chunks they call clean is read
// and compared with the parent's index.
type Verification struct {
	// Outcome is "passed", "off" (no sample asked for),
	// "nothing-to-check" (no clean chunk held data) or "mismatch" (a
	// bitmap missed a change; the backup was taken in full instead and
	// Detail says where).
	Outcome string `json:"outcome"`
	Chunks  int64  `json:"chunks"` // chunks read and checked
	Bytes   int64  `json:"bytes"`  // bytes read for them
	Detail  string `json:"detail,omitempty"`
}

// Disk returns the named disk of m.
func (m *Manifest) Disk(name string) (*DiskManifest, error) {
	for i := range m.Disks {
		if m.Disks[i].Name == name {
			return &m.Disks[i], nil
		}
	}
	names := make([]string, len(m.Disks))
	for i, d := range m.Disks {
		names[i] = d.Name
	}
	return nil, noDisk{fmt.Errorf("backup %s/%s has no disk %q (it has %s)", m.Domain, m.ID, name, strings.Join(names, ", "))}
}

// Key is the object key of the manifest.
func (m *Manifest) Key() string { return ManifestKey(m.Domain, m.ID) }

// rankLimit bounds a backup id's time in milliseconds since 1970 (year
// 2286): rank = rankLimit - ms sorts the newest first.
const rankLimit = 9999999999999

// ManifestKey is the object key of a backup's manifest: the rank of its id
// first, so that a listing of the domain's manifests starts with the
// newest.
func ManifestKey(domain, id string) string {
	t, _ := time.Parse(idLayout, id)
	return fmt.Sprintf("manifests/%s/%013d-%s", domain, rankLimit-t.UnixMilli(), id)
}

// parseManifestKey returns the domain and id a manifest key names, or
// ok false for a key that is not one.
func parseManifestKey(key string) (domain, id string, ok bool) {
	parts := strings.Split(key, "/")
	if len(parts) != 3 || parts[0] != "manifests" || ValidName("domain", parts[1]) != nil {
		return "", "", false
	}
	_, id, found := strings.Cut(parts[2], "-")
	if !found || ValidBackupID(id) != nil || ManifestKey(parts[1], id) != key {
		return "", "", false
	}
	return parts[1], id, true
}

// Commit stores a backup: the extra files, then every disk's index
// objects, then the manifest, which commits it. The chunks the indexes
// name must already be stored, with Put or sink.PutDeferred: before the
// manifest, Commit makes every deferred put of the store durable. It
// fills in the manifest's index chains, chunk counts and file keys. The
// manifest is created with a conditional write: a backup id is committed
// once.
func (r *Repo) Commit(ctx context.Context, m *Manifest, disks map[string]DiskData, files map[string][]byte) error {
	if err := ValidName("domain", m.Domain); err != nil {
		return err
	}
	if err := ValidBackupID(m.ID); err != nil {
		return err
	}
	m.Version = formatVersion
	m.ChunkSize = r.cfg.ChunkSize
	m.Files = map[string]string{}
	for name, data := range files {
		if err := ValidName("file", name); err != nil {
			return fmt.Errorf("backup file name %q is not allowed", name)
		}
		key, err := r.putObject(ctx, "files/", data)
		if err != nil {
			return err
		}
		m.Files[name] = key
	}
	for i := range m.Disks {
		d := &m.Disks[i]
		if err := ValidName("disk", d.Name); err != nil {
			return err
		}
		dd, ok := disks[d.Name]
		if !ok {
			return fmt.Errorf("backup %s/%s: no index for disk %s", m.Domain, m.ID, d.Name)
		}
		refs, ix, err := r.writeIndex(ctx, dd)
		if err != nil {
			return fmt.Errorf("backup %s/%s disk %s: %w", m.Domain, m.ID, d.Name, err)
		}
		if ix.Size != d.Size || ix.ChunkSize != r.cfg.ChunkSize {
			return fmt.Errorf("backup %s/%s: the index of disk %s does not fit it", m.Domain, m.ID, d.Name)
		}
		d.Index, d.Chunks, d.ZeroChunks = refs, ix.Count(), ix.Count()-int64(ix.Len())
	}
	b, err := json.Marshal(m)
	if err == nil {
		err = r.fits(m.Key(), len(b))
	}
	if err != nil {
		return err
	}
	if err := sink.Sync(ctx, r.store); err != nil {
		return fmt.Errorf("backup %s/%s: make its chunks and indexes durable: %w", m.Domain, m.ID, err)
	}
	err = r.store.Create(ctx, m.Key(), r.encodeMeta(m.Key(), b))
	if errors.Is(err, sink.ErrExists) && r.sameManifest(ctx, m.Key(), b) {
		err = nil // an earlier attempt of this create landed, its answer did not
	}
	if err != nil {
		return fmt.Errorf("commit manifest %s: %w", m.Key(), err)
	}
	// Best effort: without the record, the next backup extends what it
	// takes over instead of believing this one's lock.
	r.pinBackup(m)
	return nil
}

// sameManifest reports whether the manifest at key holds json.
func (r *Repo) sameManifest(ctx context.Context, key string, json []byte) bool {
	blob, err := r.get(ctx, key, nil)
	if err != nil {
		return false
	}
	b, err := r.decodeMeta(key, blob)
	return err == nil && bytes.Equal(b, json)
}

// ErrNoBackup: the domain has no (such) committed backup.
var ErrNoBackup = errors.New("no such backup")

// ErrNoDisk is matched by the error for a disk a backup does not have.
var ErrNoDisk = errors.New("no such disk")

type noDisk struct{ error }

func (noDisk) Is(target error) bool { return target == ErrNoDisk }

// unmarshalManifest decodes and checks a manifest's JSON.
func unmarshalManifest(b []byte) (*Manifest, error) {
	var version struct {
		Version int `json:"version"`
	}
	if err := json.Unmarshal(b, &version); err == nil && version.Version != formatVersion {
		return nil, fmt.Errorf("manifest format %d; this nbdmover reads format %d", version.Version, formatVersion)
	}
	var m Manifest
	if err := strictUnmarshal(b, &m); err != nil {
		return nil, fmt.Errorf("damaged manifest: %w", err)
	}
	if err := m.check(); err != nil {
		return nil, err
	}
	return &m, nil
}

// check checks what a manifest says of itself: its version, names, index
// chains and file keys.
func (m *Manifest) check() error {
	if m.Version != formatVersion {
		return fmt.Errorf("manifest format %d; this nbdmover reads format %d", m.Version, formatVersion)
	}
	if err := ValidName("domain", m.Domain); err != nil {
		return fmt.Errorf("damaged manifest: %w", err)
	}
	if err := ValidBackupID(m.ID); err != nil {
		return fmt.Errorf("damaged manifest: %w", err)
	}
	for _, d := range m.Disks {
		if err := ValidName("disk", d.Name); err != nil || d.Size < 0 || checkChain(d.Index) != nil {
			return fmt.Errorf("damaged manifest: disk %q", d.Name)
		}
	}
	for name, key := range m.Files {
		if ValidName("file", name) != nil || !isObjectKey("files/", key) {
			return fmt.Errorf("damaged manifest: file %q", name)
		}
	}
	return nil
}

// checkChain checks the shape of a disk's index chain: a full index, then
// deltas, each naming index objects.
func checkChain(refs []IndexRef) error {
	if len(refs) == 0 || refs[0].Kind != "full" {
		return errors.New("the index does not start with a full index")
	}
	for k, ref := range refs {
		switch {
		case k > 0 && (ref.Kind != "delta" || ref.Backups < 1):
			return fmt.Errorf("index link %d is %q", k, ref.Kind)
		case len(ref.Objects) == 0 || ref.Entries < 0:
			return fmt.Errorf("index link %d names no object", k)
		}
		for _, o := range ref.Objects {
			if !isObjectKey("indexes/", o) {
				return fmt.Errorf("index object %q", o)
			}
		}
	}
	return nil
}

// loadManifest reads the manifest at key (a manifest key).
func (r *Repo) loadManifest(ctx context.Context, key string) (*Manifest, error) {
	blob, err := r.get(ctx, key, nil)
	if err != nil {
		return nil, err
	}
	b, err := r.decodeMeta(key, blob)
	if err != nil {
		return nil, fmt.Errorf("%s: damaged manifest: %w", key, err)
	}
	m, err := unmarshalManifest(b)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", key, err)
	}
	if m.Key() != key {
		return nil, fmt.Errorf("%s: manifest names backup %s/%s", key, m.Domain, m.ID)
	}
	return m, nil
}

// Backup returns a committed backup of domain by id, or the newest when id
// is "" or "latest" (an error when the newest manifest cannot be read).
func (r *Repo) Backup(ctx context.Context, domain, id string) (*Manifest, error) {
	if err := ValidName("domain", domain); err != nil {
		return nil, err
	}
	if id == "" || id == "latest" {
		last, newest, skipped, err := r.Latest(ctx, domain)
		switch {
		case err != nil:
			return nil, err
		case len(skipped) > 0 && skipped[0].Backup == domain+"/"+newest:
			// Restoring an older backup instead, silently, would be a
			// wrong restore.
			return nil, fmt.Errorf("the newest backup %s cannot be read (%s); name the backup to use with --backup "+
				"(nbdmover list shows the readable ones)", skipped[0].Backup, skipped[0].Problem)
		case last == nil:
			return nil, fmt.Errorf("domain %s in %s: %w", domain, r.Location(), ErrNoBackup)
		}
		return last, nil
	}
	if err := ValidBackupID(id); err != nil {
		return nil, err
	}
	m, err := r.loadManifest(ctx, ManifestKey(domain, id))
	if isNotFound(err) {
		return nil, fmt.Errorf("backup %s/%s in %s: %w", domain, id, r.Location(), ErrNoBackup)
	}
	return m, err
}

// Latest returns the newest committed backup of domain that can be read
// (nil when none), the newest id of all (counting manifests that cannot
// be read, "" when none), and the manifests it skipped on the way. It
// reads the manifests newest first, so it costs a listing request and a
// read, plus one read per manifest it skips.
func (r *Repo) Latest(ctx context.Context, domain string) (last *Manifest, newest string, skipped []Problem, err error) {
	if err := ValidName("domain", domain); err != nil {
		return nil, "", nil, err
	}
	errFound := errors.New("found")
	err = r.store.List(ctx, "manifests/"+domain+"/", func(o sink.ObjectInfo) error {
		d, id, ok := parseManifestKey(o.Key)
		if !ok || d != domain {
			return nil
		}
		if newest == "" {
			newest = id
		}
		m, err := r.loadManifest(ctx, o.Key)
		if isStoreFailure(err) {
			return err
		}
		if err != nil {
			skipped = append(skipped, Problem{Object: o.Key, Backup: domain + "/" + id, Problem: err.Error()})
			return nil
		}
		last = m
		return errFound
	})
	if errors.Is(err, errFound) {
		err = nil
	}
	return last, newest, skipped, err
}
