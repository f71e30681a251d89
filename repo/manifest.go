package repo

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"path"
	"sort"
	"strings"
	"time"

	"github.com/nbdmover/nbdmover/sink"
)

// Manifest describes one committed backup. It is stored as JSON at
// backups/<domain>/<id>/manifest.json and written last.
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
	// checkpoint.xml), by name, with their SHA-256.
	Files map[string]string `json:"files,omitempty"`
}

// DiskManifest describes one disk of a backup.
type DiskManifest struct {
	Name        string `json:"name"`
	Size        int64  `json:"size"`
	Mode        string `json:"mode"` // "full" or "incremental", per disk
	Index       string `json:"index"`
	IndexSHA256 string `json:"index_sha256"`
	Chunks      int64  `json:"chunks"`
	ZeroChunks  int64  `json:"zero_chunks"`
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
	return nil, fmt.Errorf("backup %s/%s has no disk %q (it has %s)", m.Domain, m.ID, name, strings.Join(names, ", "))
}

func backupDir(domain, id string) string { return "backups/" + domain + "/" + id + "/" }

// Key returns the object key of a file of the backup.
func (m *Manifest) Key(name string) string { return backupDir(m.Domain, m.ID) + name }

// Commit stores a backup: the extra files, then every index, then the
// manifest, which commits it. The chunks the indexes name must already be
// stored. It fills in the manifest's index names and checksums.
func (r *Repo) Commit(ctx context.Context, m *Manifest, indexes map[string]*Index, files map[string][]byte) error {
	if err := ValidName("domain", m.Domain); err != nil {
		return err
	}
	if err := ValidBackupID(m.ID); err != nil {
		return err
	}
	m.Version = FormatVersion
	m.ChunkSize = r.cfg.ChunkSize
	m.Files = map[string]string{}
	for name, data := range files {
		if err := ValidName("file", name); err != nil || name == "manifest.json" || strings.HasSuffix(name, ".index") {
			return fmt.Errorf("backup file name %q is not allowed", name)
		}
		if err := r.store.Put(ctx, m.Key(name), data); err != nil {
			return err
		}
		sum := sha256.Sum256(data)
		m.Files[name] = hex.EncodeToString(sum[:])
	}
	for i := range m.Disks {
		d := &m.Disks[i]
		if err := ValidName("disk", d.Name); err != nil {
			return err
		}
		ix, ok := indexes[d.Name]
		if !ok || ix.Size != d.Size || ix.ChunkSize != r.cfg.ChunkSize {
			return fmt.Errorf("backup %s/%s: no matching index for disk %s", m.Domain, m.ID, d.Name)
		}
		b := ix.Marshal()
		d.Index = d.Name + ".index"
		sum := sha256.Sum256(b)
		d.IndexSHA256 = hex.EncodeToString(sum[:])
		d.Chunks = int64(len(ix.Digests))
		d.ZeroChunks = 0
		for _, dg := range ix.Digests {
			if dg.IsZeroChunk() {
				d.ZeroChunks++
			}
		}
		if err := r.store.Put(ctx, m.Key(d.Index), b); err != nil {
			return err
		}
	}
	b, err := json.MarshalIndent(m, "", "  ")
	if err != nil {
		return err
	}
	return r.store.Put(ctx, m.Key("manifest.json"), append(b, '\n'))
}

// ErrNoBackup: the domain has no (such) committed backup.
var ErrNoBackup = errors.New("no such backup")

// Backups returns the committed backups of domain (of every domain when
// domain is ""), oldest first. Directories without a manifest (backups that
// never committed) are not backups and are left out. A manifest that
// cannot be read or decoded (damaged, or written by a newer nbdmover) does
// not hide the others: it is left out too and reported in skipped. Only a
// failing store is an error.
func (r *Repo) Backups(ctx context.Context, domain string) (ms []*Manifest, skipped []Problem, err error) {
	keys, err := r.manifestKeys(ctx, domain)
	if err != nil {
		return nil, nil, err
	}
	ms = make([]*Manifest, 0, len(keys))
	for _, k := range keys {
		m, err := r.loadManifest(ctx, k)
		if isStoreFailure(err) {
			return nil, nil, err
		}
		if err != nil {
			parts := strings.Split(k, "/")
			skipped = append(skipped, Problem{Object: k, Backup: parts[1] + "/" + parts[2], Problem: err.Error()})
			continue
		}
		ms = append(ms, m)
	}
	sort.Slice(ms, func(i, j int) bool { // ids are creation times
		if ms[i].ID != ms[j].ID {
			return ms[i].ID < ms[j].ID
		}
		return ms[i].Domain < ms[j].Domain
	})
	return ms, skipped, nil
}

// manifestKeys lists the manifests of domain (of all domains for "").
func (r *Repo) manifestKeys(ctx context.Context, domain string) ([]string, error) {
	prefix := "backups/"
	if domain != "" {
		if err := ValidName("domain", domain); err != nil {
			return nil, err
		}
		prefix += domain + "/"
	}
	var keys []string
	err := r.store.List(ctx, prefix, func(o sink.ObjectInfo) error {
		if path.Base(o.Key) == "manifest.json" && strings.Count(o.Key, "/") == 3 {
			keys = append(keys, o.Key)
		}
		return nil
	})
	sort.Strings(keys)
	return keys, err
}

func (r *Repo) loadManifest(ctx context.Context, key string) (*Manifest, error) {
	b, err := r.store.Get(ctx, key, nil)
	if err != nil {
		return nil, err
	}
	m, err := UnmarshalManifest(b)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", key, err)
	}
	parts := strings.Split(key, "/")
	if m.Domain != parts[1] || m.ID != parts[2] {
		return nil, fmt.Errorf("%s: manifest names backup %s/%s", key, m.Domain, m.ID)
	}
	return m, nil
}

// UnmarshalManifest decodes and checks a manifest.
func UnmarshalManifest(b []byte) (*Manifest, error) {
	var m Manifest
	if err := strictUnmarshal(b, &m); err != nil {
		return nil, fmt.Errorf("damaged manifest: %w", err)
	}
	if m.Version != FormatVersion {
		return nil, fmt.Errorf("manifest format %d; this nbdmover reads format %d", m.Version, FormatVersion)
	}
	if err := ValidName("domain", m.Domain); err != nil {
		return nil, fmt.Errorf("damaged manifest: %w", err)
	}
	if err := ValidBackupID(m.ID); err != nil {
		return nil, fmt.Errorf("damaged manifest: %w", err)
	}
	for _, d := range m.Disks {
		if err := ValidName("disk", d.Name); err != nil || d.Index != d.Name+".index" || d.Size < 0 {
			return nil, fmt.Errorf("damaged manifest: disk %q", d.Name)
		}
	}
	return &m, nil
}

// Backup returns a committed backup of domain by id, or the newest when id
// is "" or "latest" (an error when the newest manifest cannot be read).
func (r *Repo) Backup(ctx context.Context, domain, id string) (*Manifest, error) {
	if err := ValidName("domain", domain); err != nil {
		return nil, err
	}
	if id == "" || id == "latest" {
		ms, skipped, err := r.Backups(ctx, domain)
		if err != nil {
			return nil, err
		}
		newest := ""
		if len(ms) > 0 {
			newest = ms[len(ms)-1].ID
		}
		// The newest backup must be readable: restoring an older one
		// instead, silently, would be a wrong restore.
		for _, p := range skipped {
			if _, pid, _ := strings.Cut(p.Backup, "/"); pid > newest {
				return nil, fmt.Errorf("the newest backup %s cannot be read (%s); name the backup to use with --backup "+
					"(nbdmover list shows the readable ones)", p.Backup, p.Problem)
			}
		}
		if len(ms) == 0 {
			return nil, fmt.Errorf("domain %s in %s: %w", domain, r.Location(), ErrNoBackup)
		}
		return ms[len(ms)-1], nil
	}
	if err := ValidBackupID(id); err != nil {
		return nil, err
	}
	m, err := r.loadManifest(ctx, backupDir(domain, id)+"manifest.json")
	if errors.Is(err, sink.ErrNotFound) {
		return nil, fmt.Errorf("backup %s/%s in %s: %w", domain, id, r.Location(), ErrNoBackup)
	}
	return m, err
}

// LoadIndex reads and checks the index of a disk of a backup.
func (r *Repo) LoadIndex(ctx context.Context, m *Manifest, disk string) (*Index, error) {
	d, err := m.Disk(disk)
	if err != nil {
		return nil, err
	}
	key := m.Key(d.Index)
	b, err := r.store.Get(ctx, key, nil)
	if err != nil {
		return nil, err
	}
	if sum := sha256.Sum256(b); hex.EncodeToString(sum[:]) != d.IndexSHA256 {
		return nil, fmt.Errorf("%s: %w: does not match the manifest's checksum", key, ErrBadIndex)
	}
	ix, err := UnmarshalIndex(b)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", key, err)
	}
	if ix.Size != d.Size || ix.ChunkSize != m.ChunkSize {
		return nil, fmt.Errorf("%s: %w: size or chunk size differs from the manifest", key, ErrBadIndex)
	}
	return ix, nil
}

// ReadFile returns an extra file of a backup (e.g. domain.xml), checked
// against the manifest.
func (r *Repo) ReadFile(ctx context.Context, m *Manifest, name string) ([]byte, error) {
	want, ok := m.Files[name]
	if !ok {
		return nil, fmt.Errorf("backup %s/%s has no file %s", m.Domain, m.ID, name)
	}
	b, err := r.store.Get(ctx, m.Key(name), nil)
	if err != nil {
		return nil, err
	}
	if sum := sha256.Sum256(b); hex.EncodeToString(sum[:]) != want {
		return nil, fmt.Errorf("%s: damaged: does not match the manifest's checksum", m.Key(name))
	}
	return b, nil
}
