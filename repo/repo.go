package repo

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"time"

	"github.com/nbdmover/nbdmover/chunker"
	"github.com/nbdmover/nbdmover/repo/lock"
	"github.com/nbdmover/nbdmover/sink"
)

// formatVersion is the repository format this code reads and writes
// (Migrate converts format 1).
const formatVersion = 2

// patchedVersion is the config version of a repository whose backups
// may store chunks as patches (docs/format.md, "Patched chunks"): format
// 2 with version 3 index objects. init creates such repositories; one of
// version 2 is read and written as before, without patches, so that the
// nbdmover that made it still reads it.
const patchedVersion = 3

const configKey = "config"

// Config is the repository's parameters, stored as JSON under "config".
type Config struct {
	Version     int         `json:"version"`
	ID          string      `json:"id"`
	Created     time.Time   `json:"created"`
	ChunkSize   int64       `json:"chunk_size"`
	Digest      string      `json:"digest"`      // "sha256", or "hmac-sha256" when encrypted
	Compression string      `json:"compression"` // default for new chunks: "zstd", "zstd:N", "s2", "none"
	Encryption  *Encryption `json:"encryption"`  // null: nothing is encrypted
	// ObjectLock, when set, is the repository's S3 Object Lock policy.
	ObjectLock *LockConfig `json:"object_lock,omitempty"`
}

// InitOptions choose a new repository's parameters.
type InitOptions struct {
	ChunkSize   int64               // 0 = chunker.DefaultChunkSize
	Compression chunker.Compression // zero = zstd
	// Keys, when set, make the repository encrypted, its first key
	// wrapped with their password.
	Keys *Keys
	// KeysFrom, an open encrypted repository, gives the new one its
	// naming and data keys (init --copy-keys-from): a chunk then has the
	// same name and blob in both, and a copy between them moves
	// ciphertext. The new repository's own password wraps them.
	KeysFrom *Repo
	// ObjectLock, when set, makes a repository with S3 Object Lock: the
	// store must be an S3 bucket with Object Lock enabled (created so
	// when it is missing).
	ObjectLock *LockConfig
}

// ErrNoRepository: the store holds no repository config.
var ErrNoRepository = errors.New("no nbdmover repository here")

// errFormat1: the repository is of format 1, which Migrate converts.
var errFormat1 = errors.New("the repository is of format 1, this nbdmover reads format 2")

// ErrExists: Init found a repository already.
var ErrExists = errors.New("a repository already exists here")

// Repo is an open repository. It is safe for concurrent use.
type Repo struct {
	store sink.Store
	cfg   Config
	codec *chunker.Codec // chunks
	meta  *chunker.Codec // indexes, manifests, catalogs, files, locks
	keys  *unlocked      // an encrypted repository's master keys; nil when not encrypted
	locks *lock.Locks    // shared by views (which keep store and meta)
}

// initStore creates a repository in store (and its bucket, for S3). It refuses
// to touch a store that already has a config: the config is created with
// a conditional write (sink.Store.Create), so of two hosts initialising
// one store at once, one wins and the other gets ErrExists.
func initStore(ctx context.Context, store sink.Store, o InitOptions) (*Repo, error) {
	if o.ChunkSize == 0 {
		o.ChunkSize = chunker.DefaultChunkSize
	}
	if err := chunker.CheckChunkSize(o.ChunkSize); err != nil {
		return nil, err
	}
	if o.Compression.Algorithm == "" {
		o.Compression = chunker.Compression{Algorithm: "zstd", Level: 1}
	}
	if err := sink.CreateBucket(ctx, store, o.ObjectLock != nil); err != nil {
		return nil, err
	}
	if o.ObjectLock != nil {
		s, ok := sink.Versioned(store)
		if !ok {
			return nil, fmt.Errorf("%s: Object Lock needs an S3 repository (s3://BUCKET[/PREFIX])", store.Location())
		}
		if err := checkBucketLock(ctx, s); err != nil {
			return nil, err
		}
		if err := setupLock(ctx, store, o.ObjectLock); err != nil {
			return nil, err
		}
	}
	id := make([]byte, 16)
	rand.Read(id)
	cfg := Config{Version: patchedVersion, ID: hex.EncodeToString(id), Created: time.Now().UTC(),
		ChunkSize: o.ChunkSize, Digest: "sha256", Compression: o.Compression.String(), ObjectLock: o.ObjectLock}
	if o.Keys != nil {
		cfg.Digest, cfg.Encryption = namesHMAC, &Encryption{Cipher: cipherName, Names: namesHMAC,
			PasswordCost: &Cost{Time: argonCost.Time, MemoryKiB: argonCost.MemoryKiB, Threads: argonCost.Threads}}
	}
	b, _ := json.MarshalIndent(cfg, "", "  ")
	b = append(b, '\n')
	// An encrypted repository's first key is stored before its config:
	// a config that exists always has a key. A key left by a create that
	// lost the race (or crashed) names another repository id, and is
	// never tried.
	var master []byte
	var key *keyObject
	if o.KeysFrom != nil && (o.Keys == nil || !o.KeysFrom.Encrypted()) {
		return nil, errors.New("keys from another repository: both must be encrypted (give the new one's password)")
	}
	if o.Keys != nil {
		master = newMaster(b)
		if o.KeysFrom != nil {
			copy(master[masterIDKey:masterConfig], o.KeysFrom.keys.master[masterIDKey:masterConfig])
		}
		var err error
		if key, err = o.Keys.firstKey(cfg.ID, master); err != nil {
			return nil, err
		}
		if err := putKeyObject(ctx, store, key); err != nil {
			return nil, fmt.Errorf("init %s: store the first key: %w", store.Location(), err)
		}
	}
	err := store.Create(ctx, configKey, b)
	if err != nil && !errors.Is(err, sink.ErrExists) {
		return nil, err
	}
	created := err == nil
	if key != nil && created {
		if err := o.Keys.adopt(cfg.ID, key.ID, master); err != nil {
			return nil, err
		}
	}
	// Read back what the store holds: after ErrExists it may still be
	// ours (a retried create whose first attempt landed); on a store that
	// ignores conditional writes, the last writer's.
	held, raw, rerr := readConfigRaw(ctx, store)
	if rerr == nil && !bytes.Equal(raw, b) {
		if key != nil {
			store.Delete(ctx, keyObjectKey(key.ID))
		}
		if created {
			return nil, fmt.Errorf("init %s: %w: another host wrote its config over this one just now (the store ignores conditional writes?)", store.Location(), ErrExists)
		}
		return nil, fmt.Errorf("init %s: %w (id %s, created %s)", store.Location(), ErrExists, held.ID, held.Created.Format(time.RFC3339))
	}
	if rerr != nil {
		return nil, rerr
	}
	return openConfig(ctx, store, o.Keys, held, raw)
}

// readConfig reads and decodes the store's config, whatever its format
// version; ErrNoRepository when there is none (or no bucket).
func readConfig(ctx context.Context, store sink.Store) (Config, error) {
	cfg, _, err := readConfigRaw(ctx, store)
	return cfg, err
}

// readConfigBytes returns the config object as stored.
func readConfigBytes(ctx context.Context, store sink.Store) ([]byte, error) {
	b, err := store.Get(ctx, configKey, nil, maxSmallObject)
	if errors.Is(err, sink.ErrNotFound) || errors.Is(err, sink.ErrNoBucket) {
		return nil, fmt.Errorf("%s: %w", store.Location(), ErrNoRepository)
	}
	return b, err
}

// readConfigRaw is readConfig, also returning the config's bytes.
func readConfigRaw(ctx context.Context, store sink.Store) (Config, []byte, error) {
	b, err := readConfigBytes(ctx, store)
	if err != nil {
		return Config{}, nil, err
	}
	var cfg Config
	if err := strictUnmarshal(b, &cfg); err != nil {
		return Config{}, nil, fmt.Errorf("%s: repository config is damaged: %w", store.Location(), err)
	}
	return cfg, b, nil
}

// Recheck reads the config again and fails unless it is still this
// repository's (the same id and encryption): for a process that keeps a
// repository open (the daemon) to check before each job that it was not
// removed or replaced meanwhile. ErrNoRepository when it is gone.
func (r *Repo) Recheck(ctx context.Context) error {
	cfg, _, err := readConfigRaw(ctx, r.store)
	if err != nil {
		return err
	}
	sameLock := (cfg.ObjectLock == nil) == (r.cfg.ObjectLock == nil) && (cfg.ObjectLock == nil || *cfg.ObjectLock == *r.cfg.ObjectLock)
	if cfg.ID != r.cfg.ID || (cfg.Encryption == nil) != (r.cfg.Encryption == nil) || cfg.ChunkSize != r.cfg.ChunkSize || !sameLock {
		return fmt.Errorf("%s: the repository was replaced since it was opened (id %s, was %s): restart nbdmover to use the new one",
			r.Location(), cfg.ID, r.cfg.ID)
	}
	return nil
}

// openStore opens the repository in store, which must not be encrypted.
func openStore(ctx context.Context, store sink.Store) (*Repo, error) {
	return openKeys(ctx, store, nil)
}

// openKeys opens the repository in store; an encrypted one with keys,
// which must be nil for one that is not (a password given for a
// repository found unencrypted is refused: its config may have been
// replaced to make this host write in the clear).
func openKeys(ctx context.Context, store sink.Store, keys *Keys) (*Repo, error) {
	cfg, raw, err := readConfigRaw(ctx, store)
	if errors.Is(err, ErrNoRepository) {
		return nil, fmt.Errorf("%w: run nbdmover init (or back up with --init) to create one here", err)
	}
	if err != nil {
		return nil, err
	}
	return openConfig(ctx, store, keys, cfg, raw)
}

// openConfig opens the repository whose config, read as raw, is cfg.
func openConfig(ctx context.Context, store sink.Store, keys *Keys, cfg Config, raw []byte) (*Repo, error) {
	if cfg.Version == 1 {
		return nil, fmt.Errorf("%s: %w: run nbdmover migrate --repo ... once (safe to interrupt and to run again)", store.Location(), errFormat1)
	}
	if cfg.Version != formatVersion && cfg.Version != patchedVersion {
		return nil, fmt.Errorf("%s: repository format %d; this nbdmover reads formats %d and %d", store.Location(), cfg.Version, formatVersion, patchedVersion)
	}
	r, err := newRepo(store, cfg)
	if err != nil {
		return nil, err
	}
	if err := checkConfig(ctx, store, cfg); err != nil {
		return nil, err
	}
	if _, ok := sink.Versioned(store); ok {
		if err := checkPolicyPin(cfg, store.Location()); err != nil {
			return nil, err
		}
	}
	if cfg.ObjectLock != nil {
		if err := setupLock(ctx, store, cfg.ObjectLock); err != nil {
			return nil, err
		}
	}
	switch {
	case cfg.Encryption == nil && keys != nil:
		return nil, fmt.Errorf("%s: %w, but a %s was given: if it should be, its config was replaced, and nbdmover refuses it "+
			"so that nothing is written there in the clear; if not, drop the %s (NBDMOVER_PASSWORD, --password-file, --password-command, --key-file)",
			store.Location(), ErrNotEncrypted, keys.Kind(), keys.Kind())
	case cfg.Encryption == nil:
		return r, nil
	case keys == nil:
		return nil, fmt.Errorf("%s: %w", store.Location(), ErrKeyNeeded)
	}
	u, err := keys.unlock(ctx, store, cfg, raw)
	if err != nil {
		return nil, err
	}
	r.keys = u
	r.codec = r.codec.Encrypted(u.secret)
	r.meta = r.meta.Encrypted(u.secret)
	return r, nil
}

// openOrInitStore opens the repository, creating it (and its bucket) with o
// when the store has none, and says whether it created it: Open finds no
// repository where the bucket is missing, and Init creates the bucket, so
// an existing repository costs one read.
//
// With keys (o.Keys) it never creates: an encrypted repository is made by
// nbdmover init --encryption, so that a mistyped location does not start
// a new repository under a password nobody wrote down.
func openOrInitStore(ctx context.Context, store sink.Store, o InitOptions) (*Repo, bool, error) {
	r, err := openKeys(ctx, store, o.Keys)
	if errors.Is(err, ErrNoRepository) && o.Keys != nil {
		return nil, false, fmt.Errorf("%w; an encrypted repository is created by nbdmover init --encryption", err)
	}
	if !errors.Is(err, ErrNoRepository) {
		return r, false, err
	}
	r, err = initStore(ctx, store, o)
	if errors.Is(err, ErrExists) { // created concurrently
		r, err = openStore(ctx, store)
		return r, false, err
	}
	return r, err == nil, err
}

func newRepo(store sink.Store, cfg Config) (*Repo, error) {
	if err := chunker.CheckChunkSize(cfg.ChunkSize); err != nil {
		return nil, fmt.Errorf("%s: repository config: %w", store.Location(), err)
	}
	switch e := cfg.Encryption; {
	case e == nil && cfg.Digest != "sha256":
		return nil, fmt.Errorf("%s: repository digest %q is not supported", store.Location(), cfg.Digest)
	case e != nil && (e.Cipher != cipherName || e.Names != namesHMAC || cfg.Digest != namesHMAC):
		return nil, fmt.Errorf("%s: the repository is encrypted with %s/%s, which this nbdmover does not support", store.Location(), e.Cipher, e.Names)
	}
	comp, err := chunker.ParseCompression(cfg.Compression)
	if err != nil {
		return nil, fmt.Errorf("%s: repository config: %w", store.Location(), err)
	}
	codec, err := chunker.NewCodec(comp)
	if err != nil {
		return nil, err
	}
	r := &Repo{store: store, cfg: cfg, codec: codec, meta: chunker.NewMetaCodec()}
	r.locks = newLocks(r)
	return r, nil
}

func strictUnmarshal(b []byte, v any) error {
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		return err
	}
	if dec.More() {
		return errors.New("trailing data after the JSON document")
	}
	return nil
}

// Config returns the repository's parameters.
func (r *Repo) Config() Config { return r.cfg }

// Store returns the store the repository lives in.
func (r *Repo) Store() sink.Store { return r.store }

// Location names the repository in messages.
func (r *Repo) Location() string { return r.store.Location() }

// WithCompression returns a view of r that compresses new chunks as c says
// (reading is unaffected).
func (r *Repo) WithCompression(c chunker.Compression) (*Repo, error) {
	codec, err := chunker.NewCodec(c)
	if err != nil {
		return nil, err
	}
	if r.keys != nil {
		codec = codec.Encrypted(r.keys.secret)
	}
	v := *r
	v.codec = codec
	return &v, nil
}

// Encrypted reports whether the repository is encrypted.
func (r *Repo) Encrypted() bool { return r.keys != nil }

// Sum names a chunk's plaintext: its SHA-256, or in an encrypted
// repository its keyed digest.
func (r *Repo) Sum(plain []byte) chunker.Digest { return r.codec.Sum(plain) }

// ChunkKey is the object key of a chunk.
func ChunkKey(d chunker.Digest) string {
	h := d.String()
	return "chunks/" + h[:2] + "/" + h
}

// has reports whether the object at key is stored.
func (r *Repo) has(ctx context.Context, key string) (bool, error) {
	_, err := r.store.Stat(ctx, key)
	if errors.Is(err, sink.ErrNotFound) {
		return false, nil
	}
	return err == nil, err
}

// EncodeChunk appends the blob of a chunk's plaintext, whose digest
// (Sum) is d, to dst[:0] with the repository's codec; store it under
// ChunkKey(d).
func (r *Repo) EncodeChunk(dst []byte, d chunker.Digest, plain []byte) []byte {
	return r.codec.Encode(dst, plain, ChunkKey(d))
}

// encodeMeta is the meta blob of plain, to be stored under key.
func (r *Repo) encodeMeta(key string, plain []byte) []byte { return r.meta.Encode(nil, plain, key) }

// decodeMeta decodes the meta blob read from key.
func (r *Repo) decodeMeta(key string, blob []byte) ([]byte, error) {
	return r.meta.DecodeMeta(nil, blob, key, int(r.bound(key)))
}

// putMeta stores v, as JSON, as the meta blob under key.
func (r *Repo) putMeta(ctx context.Context, key string, v any) error {
	b, err := json.Marshal(v)
	if err == nil {
		err = r.fits(key, len(b))
	}
	if err != nil {
		return err
	}
	return r.store.Put(ctx, key, r.encodeMeta(key, b))
}

// getMeta reads the meta blob under key into v (JSON; unknown fields are
// refused). The store's error is returned as it is (sink.ErrNotFound when
// there is none); an object that does not decode is an *ObjectError.
func (r *Repo) getMeta(ctx context.Context, key string, v any) error {
	blob, err := r.get(ctx, key, nil)
	if err != nil {
		return err
	}
	b, err := r.decodeMeta(key, blob)
	if err == nil {
		err = strictUnmarshal(b, v)
	}
	if err != nil {
		return &ObjectError{Key: key, Err: err}
	}
	return nil
}

// ChunkError is a chunk that cannot be read back intact.
type ChunkError struct {
	Key string
	Err error
}

func (e *ChunkError) Error() string { return fmt.Sprintf("chunk %s: %v", e.Key, e.Err) }
func (e *ChunkError) Unwrap() error { return e.Err }

// GetChunk fetches and decodes chunk d, appending its plaintext to
// plain[:0]; blob is scratch space. Both buffers are returned for reuse.
// A missing or damaged chunk is a *ChunkError naming its key.
func (r *Repo) GetChunk(ctx context.Context, d chunker.Digest, plain, blob []byte) ([]byte, []byte, error) {
	key := ChunkKey(d)
	blob, err := r.get(ctx, key, blob)
	if err != nil {
		return plain, blob, &ChunkError{Key: key, Err: err}
	}
	out, err := r.codec.DecodeChunk(plain, blob, key, d, int(r.cfg.ChunkSize))
	if err != nil {
		return plain, blob, &ChunkError{Key: key, Err: err}
	}
	return out, blob, nil
}
