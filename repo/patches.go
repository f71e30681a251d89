package repo

import (
	"context"
	"errors"
	"fmt"
	"strings"

	"github.com/nbdmover/nbdmover/chunker"
)

// Patched chunks (docs/design.md, "Patched chunks"): an incremental may
// store a chunk D of which few blocks changed as a patch over the whole
// chunk B its slot held, under PatchKey(D, B). An index entry names both,
// so gc keeps B from the indexes alone, and a reader applies the patch
// to B and checks the result against D as it checks a chunk.

// Patches reports whether backups may store chunks as patches (a
// repository of config version 3).
func (r *Repo) Patches() bool { return r.cfg.Version >= patchedVersion }

// PatchKey is the object key of the patch that makes chunk d from the
// whole chunk base: both digests name it, so two patches of one chunk
// over different bases never share a key.
func PatchKey(d, base chunker.Digest) string {
	h := d.String()
	return "patches/" + h[:2] + "/" + h + "." + base.String()
}

// parsePatchKey returns the digests a well-formed patch key names.
func parsePatchKey(key string) (d, base chunker.Digest, ok bool) {
	head, tail, found := strings.Cut(key, ".")
	if !found || !isObjectKey("patches/", head) {
		return d, base, false
	}
	d, _ = chunker.ParseDigest(head[len(head)-64:])
	base, err := chunker.ParseDigest(tail)
	return d, base, err == nil && PatchKey(d, base) == key // the one spelling PatchKey writes
}

// EncodePatch appends to dst[:0] the blob of a patch (chunker.EncodePatch's
// plaintext) of chunk d over base; store it under PatchKey(d, base).
func (r *Repo) EncodePatch(dst []byte, d, base chunker.Digest, patch []byte) []byte {
	return r.codec.Encode(dst, patch, PatchKey(d, base))
}

// GetPatch fetches and checks the patch of chunk d over base (not its
// result: GetEntry checks that). A missing or damaged one is a
// *ChunkError naming its key.
func (r *Repo) GetPatch(ctx context.Context, d, base chunker.Digest, blob []byte) (*chunker.Patch, []byte, error) {
	key := PatchKey(d, base)
	blob, err := r.get(ctx, key, blob)
	if err != nil {
		return nil, blob, &ChunkError{Key: key, Err: err}
	}
	plain, err := r.codec.DecodeMeta(nil, blob, key, int(chunker.MaxPatchLen(r.cfg.ChunkSize)))
	var pt *chunker.Patch
	if err == nil {
		pt, err = chunker.ParsePatch(plain, r.cfg.ChunkSize)
	}
	if err == nil && pt.Base != base {
		err = fmt.Errorf("%w: the patch is over %s, its key says %s", chunker.ErrCorrupt, pt.Base, base)
	}
	if err != nil {
		return nil, blob, &ChunkError{Key: key, Err: err}
	}
	return pt, blob, nil
}

// GetEntry fetches chunk d as an index entry names it: whole (base the
// zero digest), or as the patch over base applied to base, the result
// checked against d. Where the patch or its base cannot be read but the
// chunk is stored whole (a backup healed it so), the whole chunk is
// read. plain and blob are reused as GetChunk's are; a failure is a
// *ChunkError naming the patch's key (or the base's).
func (r *Repo) GetEntry(ctx context.Context, d, base chunker.Digest, plain, blob []byte) ([]byte, []byte, error) {
	if base.IsZeroChunk() {
		return r.GetChunk(ctx, d, plain, blob)
	}
	out, blob, err := r.getPatched(ctx, d, base, plain, blob)
	var ce *ChunkError
	if err != nil && errors.As(err, &ce) {
		if whole, b, werr := r.GetChunk(ctx, d, plain, blob); werr == nil {
			return whole, b, nil
		}
	}
	return out, blob, err
}

// getPatched reads the patch of d over base and applies it.
func (r *Repo) getPatched(ctx context.Context, d, base chunker.Digest, plain, blob []byte) ([]byte, []byte, error) {
	pt, blob, err := r.GetPatch(ctx, d, base, blob)
	if err != nil {
		return plain, blob, err
	}
	// The patch's plaintext lives in its own allocation (DecodeMeta's),
	// so blob may be reused for the base.
	plain, blob, err = r.GetChunk(ctx, base, plain, blob)
	if err != nil {
		return plain, blob, err
	}
	key := PatchKey(d, base)
	out, err := pt.Apply(plain, plain)
	if err == nil && r.Sum(out) != d {
		err = fmt.Errorf("%w: applied to its base it hashes to %s", chunker.ErrCorrupt, r.Sum(out))
	}
	if err != nil {
		return plain, blob, &ChunkError{Key: key, Err: err}
	}
	return out, blob, nil
}
