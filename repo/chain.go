package repo

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"github.com/nbdmover/nbdmover/repo/index"
	"math/bits"
	"strings"

	"github.com/nbdmover/nbdmover/chunker"
	"github.com/nbdmover/nbdmover/sink"
)

// A disk's index in a backup is a chain: a full index, then deltas, each
// applied to what comes before (see docs/format.md). The chain follows a
// binary counter, so that a restore reads few index objects and an
// incremental writes little: the n-th incremental since the full merges
// the last t deltas (t = the trailing zero bits of n) with its own changes
// into one delta holding 2^t incrementals' changes, so a chain holds
// popcount(n) deltas, at most maxDeltas. When its deltas would list more
// chunks than half of what the index lists, or the chain would grow past
// maxDeltas, the incremental writes a full index instead.
const maxDeltas = 12

// DiskData is what a backup commits of one disk: the full index of a full
// backup, or for an incremental the parent's chain and what changed.
type DiskData struct {
	Full   *index.Index
	Parent *Chain
	Delta  *index.Delta
}

// Chain is a disk's index chain, loaded: its links, the index it makes,
// and the parts (for the next incremental to merge).
type Chain struct {
	Refs   []IndexRef
	Index  *index.Index   // the index of the disk at the backup
	deltas []*index.Delta // the deltas of Refs[1:], in order
}

// LoadChain reads and checks a disk's index chain.
func (r *Repo) LoadChain(ctx context.Context, m *Manifest, disk string) (*Chain, error) {
	d, err := m.Disk(disk)
	if err != nil {
		return nil, err
	}
	if err := checkChain(d.Index); err != nil {
		return nil, fmt.Errorf("backup %s/%s disk %s: %w: %v", m.Domain, m.ID, disk, index.ErrBadIndex, err)
	}
	c := &Chain{Refs: d.Index}
	links, err := r.loadLinks(ctx, d.Index, m.ChunkSize)
	if err != nil {
		return nil, fmt.Errorf("backup %s/%s disk %s: %w", m.Domain, m.ID, disk, err)
	}
	for k, l := range links {
		full, delta := l.Index(), l.Delta()
		if k == 0 {
			c.Index = full
			continue
		}
		if delta.Trunc > c.Index.Size {
			return nil, fmt.Errorf("backup %s/%s disk %s: %w: a delta truncates a %d-byte disk at %d",
				m.Domain, m.ID, disk, index.ErrBadIndex, c.Index.Size, delta.Trunc)
		}
		c.Index = c.Index.Apply(delta)
		c.deltas = append(c.deltas, delta)
	}
	if c.Index.Size != d.Size {
		return nil, fmt.Errorf("backup %s/%s disk %s: %w: the index is of a %d-byte disk, the manifest says %d",
			m.Domain, m.ID, disk, index.ErrBadIndex, c.Index.Size, d.Size)
	}
	return c, nil
}

// LoadIndex reads and checks the index of a disk of a backup.
func (r *Repo) LoadIndex(ctx context.Context, m *Manifest, disk string) (*index.Index, error) {
	c, err := r.LoadChain(ctx, m, disk)
	if err != nil {
		return nil, err
	}
	return c.Index, nil
}

// loadLinks reads the index objects of the links of a chain (a full
// index, then deltas), each checked against its ref. The objects are
// fetched ahead of their use, linkObjectsAhead at once: a chain of 13
// links costs about one round trip to S3, not 13.
func (r *Repo) loadLinks(ctx context.Context, refs []IndexRef, chunkSize int64) ([]*index.Link, error) {
	links := make([]*index.Link, len(refs))
	var keys []string
	var owner []int // the link of each key
	for k, ref := range refs {
		kind := byte(index.KindFull)
		if ref.Kind == "delta" {
			kind = index.KindDelta
		}
		links[k] = index.NewLink(kind, chunkSize, ref.Backups)
		for _, key := range ref.Objects {
			keys, owner = append(keys, key), append(owner, k)
		}
	}
	err := r.getInOrder(ctx, keys, func(i int, b []byte) error {
		if err := links[owner[i]].Add(b); err != nil {
			return &ObjectError{Key: keys[i], Err: err}
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	for k, ref := range refs {
		if n := links[k].Entries(); n != ref.Entries {
			return nil, &ObjectError{Key: ref.Objects[0], Err: fmt.Errorf("%w: %d entries, the manifest says %d", index.ErrBadIndex, n, ref.Entries)}
		}
	}
	return links, nil
}

// linkObjectsAhead bounds the index objects fetched and not yet used
// (each up to 16 MiB).
const linkObjectsAhead = 8

// getInOrder fetches the objects at keys (getObject), up to
// linkObjectsAhead at once, and calls use with each in order; it stops
// at the first error.
func (r *Repo) getInOrder(ctx context.Context, keys []string, use func(i int, b []byte) error) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	type got struct {
		b   []byte
		err error
	}
	slots := make([]chan got, len(keys))
	for i := range slots {
		slots[i] = make(chan got, 1)
	}
	ahead := make(chan struct{}, linkObjectsAhead)
	go func() {
		for i, key := range keys {
			select {
			case ahead <- struct{}{}:
			case <-ctx.Done():
				return
			}
			go func() {
				b, err := r.getObject(ctx, key)
				slots[i] <- got{b, err}
			}()
		}
	}()
	for i := range keys {
		var g got
		select {
		case g = <-slots[i]:
		case <-ctx.Done():
			return context.Cause(ctx)
		}
		<-ahead
		if g.err != nil {
			return g.err
		}
		if err := use(i, g.b); err != nil {
			return err
		}
	}
	return nil
}

// writeIndex stores the index objects of a disk and returns its chain's
// links and the index they make.
func (r *Repo) writeIndex(ctx context.Context, dd DiskData) ([]IndexRef, *index.Index, error) {
	if dd.Full != nil {
		ref, err := r.writeLink(ctx, "full", 0, dd.Full.Parts())
		return []IndexRef{ref}, dd.Full, err
	}
	p, delta := dd.Parent, dd.Delta
	if p == nil || delta == nil || delta.ChunkSize != p.Index.ChunkSize {
		return nil, nil, errors.New("internal error: an incremental without its parent's chain or delta")
	}
	ix := p.Index.Apply(delta)
	n := 1
	for _, d := range p.deltas {
		n += d.Backups
	}
	t := bits.TrailingZeros(uint(n))
	keep := max(0, len(p.deltas)-t) // the deltas that stay; the others merge with this one
	merged := delta
	for k := len(p.deltas) - 1; k >= keep; k-- {
		merged = index.Merge(p.deltas[k], merged)
	}
	entries := int64(merged.Len())
	for _, d := range p.deltas[:keep] {
		entries += int64(d.Len())
	}
	if keep+1 > maxDeltas || 2*entries > int64(ix.Len()) {
		ref, err := r.writeLink(ctx, "full", 0, ix.Parts())
		return []IndexRef{ref}, ix, err
	}
	ref, err := r.writeLink(ctx, "delta", merged.Backups, merged.Parts())
	if err != nil {
		return nil, nil, err
	}
	refs := append(append([]IndexRef{}, p.Refs[:1+keep]...), ref)
	return refs, ix, nil
}

// writeLink stores the parts of one link.
func (r *Repo) writeLink(ctx context.Context, kind string, backups int, ps []*index.Part) (IndexRef, error) {
	ref := IndexRef{Kind: kind, Backups: backups}
	for _, p := range ps {
		key, err := r.putObject(ctx, "indexes/", p.Marshal())
		if err != nil {
			return ref, err
		}
		ref.Objects = append(ref.Objects, key)
		ref.Entries += int64(p.Len())
	}
	return ref, nil
}

// Objects (index objects under indexes/, extra files under files/) are
// meta blobs named <prefix><2 hex>/<64 hex>: by the SHA-256 of the stored
// blob, or in an encrypted repository (where two encodings of one
// plaintext differ) by the keyed digest of the plaintext. The name checks
// the object, and equal objects are stored once.

// putObject stores plain as an object under prefix and returns its key.
func (r *Repo) putObject(ctx context.Context, prefix string, plain []byte) (string, error) {
	if err := r.fits(prefix, len(plain)); err != nil {
		return "", err
	}
	var key string
	var blob []byte
	if r.keys != nil {
		h := r.meta.Sum(plain).String()
		key = prefix + h[:2] + "/" + h
		blob = r.encodeMeta(key, plain)
	} else {
		blob = r.meta.Encode(nil, plain, "")
		sum := sha256.Sum256(blob)
		h := hex.EncodeToString(sum[:])
		key = prefix + h[:2] + "/" + h
	}
	if err := sink.PutDeferred(ctx, r.store, key, blob); err != nil {
		return "", err
	}
	return key, nil
}

// ObjectError is an index or file object that cannot be read back intact.
type ObjectError struct {
	Key string
	Err error
}

func (e *ObjectError) Error() string { return e.Key + ": " + e.Err.Error() }
func (e *ObjectError) Unwrap() error { return e.Err }

// getObject reads an object and checks it against its name.
func (r *Repo) getObject(ctx context.Context, key string) ([]byte, error) {
	b, _, err := r.getObjectInto(ctx, key, nil, nil)
	return b, err
}

// getObjectInto is getObject decoding into plain[:0] with blob as
// scratch space; both are returned for reuse.
func (r *Repo) getObjectInto(ctx context.Context, key string, plain, blob []byte) ([]byte, []byte, error) {
	blob, err := r.get(ctx, key, blob)
	if err != nil {
		return plain, blob, &ObjectError{Key: key, Err: err}
	}
	name := key[strings.LastIndex(key, "/")+1:]
	if r.keys != nil {
		b, err := r.meta.DecodeMeta(plain, blob, key, int(r.bound(key)))
		if err != nil {
			return plain, blob, &ObjectError{Key: key, Err: err}
		}
		if r.meta.Sum(b).String() != name {
			return b, blob, &ObjectError{Key: key, Err: errors.New("damaged: its plaintext does not hash to its name")}
		}
		return b, blob, nil
	}
	if sum := sha256.Sum256(blob); hex.EncodeToString(sum[:]) != name {
		return plain, blob, &ObjectError{Key: key, Err: errors.New("damaged: its bytes do not hash to its name")}
	}
	b, err := r.meta.DecodeMeta(plain, blob, key, int(r.bound(key)))
	if err != nil {
		return plain, blob, &ObjectError{Key: key, Err: err}
	}
	return b, blob, nil
}

// isObjectKey reports whether key names an object under prefix.
func isObjectKey(prefix, key string) bool {
	rest, ok := strings.CutPrefix(key, prefix)
	if !ok || len(rest) != 67 || rest[2] != '/' || rest[:2] != rest[3:5] {
		return false
	}
	_, err := chunker.ParseDigest(rest[3:])
	return err == nil
}

// ReadFile returns an extra file of a backup (e.g. domain.xml), checked
// against its name.
func (r *Repo) ReadFile(ctx context.Context, m *Manifest, name string) ([]byte, error) {
	key, ok := m.Files[name]
	if !ok {
		return nil, fmt.Errorf("backup %s/%s has no file %s", m.Domain, m.ID, name)
	}
	return r.getObject(ctx, key)
}

func isNotFound(err error) bool { return errors.Is(err, sink.ErrNotFound) }
