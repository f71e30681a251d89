package repo

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"fmt"
	"github.com/nbdmover/nbdmover/repo/index"
	"path"
	"strings"
	"time"

	"github.com/nbdmover/nbdmover/chunker"
	"github.com/nbdmover/nbdmover/sink"
)

// Format 1, read only (by Migrate): backups/<domain>/<id>/manifest.json,
// <disk>.index (a dense index: a digest per chunk) and the extra files
// beside them. See docs/format.md, "Format 1".

const (
	v1IndexMagic      = "NBMI"
	v1IndexHeaderSize = 32
)

// v1Manifest is a format-1 manifest.
type v1Manifest struct {
	Version      int               `json:"version"`
	ID           string            `json:"id"`
	Domain       string            `json:"domain"`
	Created      time.Time         `json:"created"`
	Completed    time.Time         `json:"completed"`
	Mode         string            `json:"mode"`
	Parent       string            `json:"parent,omitempty"`
	Fallback     string            `json:"fallback,omitempty"`
	Source       string            `json:"source"`
	Consistency  string            `json:"consistency"`
	Checkpoint   string            `json:"checkpoint,omitempty"`
	ChunkSize    int64             `json:"chunk_size"`
	Compression  string            `json:"compression"`
	Verification *Verification     `json:"verification,omitempty"`
	Disks        []v1DiskManifest  `json:"disks"`
	Files        map[string]string `json:"files,omitempty"`
}

type v1DiskManifest struct {
	Name           string `json:"name"`
	Size           int64  `json:"size"`
	Mode           string `json:"mode"`
	Index          string `json:"index"`
	IndexSHA256    string `json:"index_sha256"`
	Chunks         int64  `json:"chunks"`
	ZeroChunks     int64  `json:"zero_chunks"`
	BytesRead      int64  `json:"bytes_read"`
	BytesWritten   int64  `json:"bytes_written"`
	BytesDedup     int64  `json:"bytes_dedup"`
	BytesZero      int64  `json:"bytes_zero"`
	DirtyBytes     int64  `json:"dirty_bytes,omitempty"`
	VerifiedChunks int64  `json:"verified_chunks,omitempty"`
	VerifiedBytes  int64  `json:"verified_bytes,omitempty"`
	ZeroedChunks   int64  `json:"zeroed_chunks,omitempty"`
}

func v1Dir(domain, id string) string { return "backups/" + domain + "/" + id + "/" }

// v1ManifestKeys lists the format-1 manifests of the store.
func v1ManifestKeys(ctx context.Context, s sink.Store) ([]string, error) {
	var keys []string
	err := s.List(ctx, "backups/", func(o sink.ObjectInfo) error {
		if path.Base(o.Key) == "manifest.json" && strings.Count(o.Key, "/") == 3 {
			keys = append(keys, o.Key)
		}
		return nil
	})
	return keys, err
}

// v1Load reads a format-1 manifest.
func v1Load(ctx context.Context, s sink.Store, key string) (*v1Manifest, error) {
	b, err := s.Get(ctx, key, nil, maxManifest)
	if err != nil {
		return nil, err
	}
	var m v1Manifest
	if err := strictUnmarshal(b, &m); err != nil {
		return nil, fmt.Errorf("%s: damaged manifest: %w", key, err)
	}
	parts := strings.Split(key, "/")
	switch {
	case m.Version != 1:
		return nil, fmt.Errorf("%s: manifest format %d, not 1", key, m.Version)
	case m.Domain != parts[1] || m.ID != parts[2] || ValidName("domain", m.Domain) != nil || ValidBackupID(m.ID) != nil:
		return nil, fmt.Errorf("%s: manifest names backup %s/%s", key, m.Domain, m.ID)
	}
	for _, d := range m.Disks {
		if ValidName("disk", d.Name) != nil || d.Index != d.Name+".index" {
			return nil, fmt.Errorf("%s: damaged manifest: disk %q", key, d.Name)
		}
	}
	return &m, nil
}

// v1LoadIndex reads and checks a format-1 index, as a sparse Index.
func v1LoadIndex(ctx context.Context, s sink.Store, m *v1Manifest, d v1DiskManifest) (*index.Index, error) {
	key := v1Dir(m.Domain, m.ID) + d.Index
	// A complete index: a digest per chunk of the disk the manifest
	// describes, so its bound is that disk's.
	if d.Size < 0 || chunker.CheckChunkSize(m.ChunkSize) != nil {
		return nil, fmt.Errorf("%s: %w: the manifest's disk size or chunk size is out of range", key, index.ErrBadIndex)
	}
	// At most 1 GiB whatever a manifest claims: 32 million chunks, a
	// 32 TiB disk at 1 MiB (format 1 was never used for larger ones).
	limit := min(v1IndexHeaderSize+32*(chunker.Grid{ChunkSize: m.ChunkSize, Size: d.Size}.Count()+1), 1<<30)
	b, err := s.Get(ctx, key, nil, limit)
	if err != nil {
		return nil, err
	}
	if sum := sha256.Sum256(b); hex.EncodeToString(sum[:]) != d.IndexSHA256 {
		return nil, fmt.Errorf("%s: %w: does not match the manifest's checksum", key, index.ErrBadIndex)
	}
	ix, err := v1UnmarshalIndex(b)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", key, err)
	}
	if ix.Size != d.Size || ix.ChunkSize != m.ChunkSize {
		return nil, fmt.Errorf("%s: %w: size or chunk size differs from the manifest", key, index.ErrBadIndex)
	}
	return ix, nil
}

// v1UnmarshalIndex decodes a format-1 index: a 32-byte header, a digest
// per chunk (zero: a zero chunk), the SHA-256 of all before it.
func v1UnmarshalIndex(b []byte) (*index.Index, error) {
	if len(b) < v1IndexHeaderSize+32 {
		return nil, badIndex("%d bytes is too short (truncated?)", len(b))
	}
	if string(b[:4]) != v1IndexMagic || binary.LittleEndian.Uint16(b[4:]) != 1 || binary.LittleEndian.Uint16(b[6:]) != 0 {
		return nil, badIndex("not a format-1 index")
	}
	ix := &index.Index{ChunkSize: int64(binary.LittleEndian.Uint32(b[8:])), Size: int64(binary.LittleEndian.Uint64(b[12:]))}
	count := binary.LittleEndian.Uint64(b[20:])
	if chunker.CheckChunkSize(ix.ChunkSize) != nil || ix.Size < 0 || uint64(ix.Grid().Count()) != count {
		return nil, badIndex("disk size %d and %d chunks do not fit the %d-byte grid", ix.Size, count, ix.ChunkSize)
	}
	if count > uint64(len(b)) || uint64(len(b)) != uint64(v1IndexHeaderSize)+32*count+32 {
		return nil, badIndex("%d bytes for %d chunks (truncated?)", len(b), count)
	}
	body, sum := b[:len(b)-32], b[len(b)-32:]
	if got := sha256.Sum256(body); !bytes.Equal(got[:], sum) {
		return nil, badIndex("checksum mismatch")
	}
	var ib index.Builder
	for i := range int64(count) {
		var d chunker.Digest
		copy(d[:], body[v1IndexHeaderSize+32*i:])
		if !d.IsZeroChunk() {
			ib.Set(i, d, chunker.Digest{})
		}
	}
	return ib.Index(ix.ChunkSize, ix.Size), nil
}

func badIndex(format string, args ...any) error {
	return fmt.Errorf("%w: %s", index.ErrBadIndex, fmt.Sprintf(format, args...))
}

// v1ReadFile reads an extra file of a format-1 backup, checked against
// the manifest.
func v1ReadFile(ctx context.Context, s sink.Store, m *v1Manifest, name string) ([]byte, error) {
	key := v1Dir(m.Domain, m.ID) + name
	b, err := s.Get(ctx, key, nil, maxFile)
	if err != nil {
		return nil, err
	}
	if sum := sha256.Sum256(b); hex.EncodeToString(sum[:]) != m.Files[name] {
		return nil, fmt.Errorf("%s: damaged: does not match the manifest's checksum", key)
	}
	return b, nil
}
