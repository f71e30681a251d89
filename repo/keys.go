package repo

import (
	"cmp"
	"context"
	"crypto/aes"
	"crypto/cipher"
	"crypto/hkdf"
	"crypto/rand"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"runtime/debug"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/nbdmover/nbdmover/chunker"
	"github.com/nbdmover/nbdmover/internal/hold"
	"github.com/nbdmover/nbdmover/sink"
	"golang.org/x/crypto/argon2"
)

// An encrypted repository's keys (docs/format.md, "Encryption"). Its
// master key set (a naming key and a data key, random) is stored only
// wrapped: each object under keys/ holds it sealed with AES-256-GCM under
// a key derived from one password (Argon2id) or one key file's secret
// (HKDF-SHA256). Any one of them opens the repository.

// ErrWrongPassword: no key object opens with the password given.
var ErrWrongPassword = errors.New("wrong password: no key of the repository opens with it")

// ErrKeyMismatch: a key file does not open this repository.
var ErrKeyMismatch = errors.New("the key file does not open this repository")

// ErrNotEncrypted: a password or key file was given for a repository
// that is not encrypted.
var ErrNotEncrypted = errors.New("the repository is not encrypted")

// ErrKeyNeeded: the repository is encrypted and no password or key file
// was given.
var ErrKeyNeeded = errors.New("the repository is encrypted: give its password (NBDMOVER_PASSWORD, --password-file or --password-command) or --key-file")

const (
	keyPrefix      = "keys/"
	masterVersion  = 1
	masterLen      = masterConfig + sha256.Size // version, naming key, data key, SHA-256 of the config
	masterIDKey    = 1                          // offsets in the master key set
	masterDataKey  = masterIDKey + chunker.SecretKeySize
	masterConfig   = masterDataKey + chunker.SecretKeySize
	keyFileVersion = 1
	kdfArgon2id    = "argon2id"
	kdfHKDF        = "hkdf-sha256"
	cipherName     = "aes-256-gcm"
	namesHMAC      = "hmac-sha256"
)

// Argon2id's cost for new password keys: about half a second and 128 MiB
// on this project's 2-core machines. Tests lower it.
var argonCost = KDF{Name: kdfArgon2id, Time: 10, MemoryKiB: 128 << 10, Threads: 2}

// SetPasswordCost sets the Argon2id cost of the password keys this
// process makes (its repositories' config records it). Tests lower it:
// under the race detector one derivation at the real cost takes seconds.
func SetPasswordCost(c Cost) {
	argonCost = KDF{Name: kdfArgon2id, Time: c.Time, MemoryKiB: c.MemoryKiB, Threads: c.Threads}
}

// legacyCost is the cost of the password keys of repositories whose
// config does not record one (made before it did): argonCost's default.
var legacyCost = Cost{Time: 10, MemoryKiB: 128 << 10, Threads: 2}

// maxKeyTries bounds the password key objects an open tries: each costs a
// derivation, and anyone who can write the repository can add objects;
// maxKeyObjects bounds those it reads at all.
const (
	maxKeyTries   = 8
	maxKeyObjects = 256
)

// Encryption is the config's description of an encrypted repository.
type Encryption struct {
	Cipher string `json:"cipher"` // "aes-256-gcm"
	Names  string `json:"names"`  // "hmac-sha256": how chunks and objects are named
	// PasswordCost is the Argon2id cost the repository's password keys
	// are made with (absent in repositories made before it was
	// recorded: legacyCost). A key object asking more than twice that is
	// refused: a planted one cannot make every open slow.
	PasswordCost *Cost `json:"password_cost,omitempty"`
}

// Cost is an Argon2id cost.
type Cost struct {
	Time      uint32 `json:"time"`
	MemoryKiB uint32 `json:"memory_kib"`
	Threads   uint8  `json:"threads"`
}

// passwordCap is the most a password key object of the repository whose
// config is cfg may ask: twice the recorded cost in passes and memory,
// and twice its lanes (at least 4), but never more than twice the cost
// this nbdmover makes keys with. The config is read before the keys can
// authenticate it, so a raised record must not raise the cap: it can
// only lower it.
func passwordCap(cfg Config) Cost {
	c := legacyCost
	if e := cfg.Encryption; e != nil && e.PasswordCost != nil {
		c = *e.PasswordCost
	}
	return Cost{Time: 2 * min(c.Time, legacyCost.Time), MemoryKiB: 2 * min(c.MemoryKiB, legacyCost.MemoryKiB),
		Threads: max(2*min(c.Threads, legacyCost.Threads), 4)}
}

// aboveCap says why a password key object asks more than the cap allows
// ("" when it does not).
func aboveCap(o *keyObject, limit Cost) string {
	k := o.KDF
	if k.Time <= limit.Time && k.MemoryKiB <= limit.MemoryKiB && k.Threads <= limit.Threads {
		return ""
	}
	return fmt.Sprintf("its Argon2id cost (%d passes, %d MiB, %d lanes) is above what this repository's keys may ask "+
		"(%d passes, %d MiB, %d lanes): it is never tried (nbdmover does not make such keys; remove it unless you know whose it is)",
		k.Time, k.MemoryKiB>>10, k.Threads, limit.Time, limit.MemoryKiB>>10, limit.Threads)
}

// KDF is how a key object's wrapping key is derived.
type KDF struct {
	Name      string `json:"name"`                 // "argon2id" (a password) or "hkdf-sha256" (a key file)
	Time      uint32 `json:"time,omitempty"`       // argon2id: passes
	MemoryKiB uint32 `json:"memory_kib,omitempty"` // argon2id: memory
	Threads   uint8  `json:"threads,omitempty"`    // argon2id: lanes
	Salt      []byte `json:"salt"`                 // 16 random bytes
}

// keyObject is the JSON stored under keys/<id>. Only Wrapped is secret,
// and it is sealed.
type keyObject struct {
	Version    int       `json:"version"`
	ID         string    `json:"id"`         // 16 hex digits, also in the key
	Repository string    `json:"repository"` // the config's id
	Kind       string    `json:"kind"`       // "password" or "key-file"
	Label      string    `json:"label,omitempty"`
	Created    time.Time `json:"created"`
	KDF        KDF       `json:"kdf"`
	Check      []byte    `json:"check"`   // 16 bytes that tell a wrong password from a damaged object
	Nonce      []byte    `json:"nonce"`   // 12 bytes
	Wrapped    []byte    `json:"wrapped"` // AES-256-GCM of the master key set, with its tag
}

// KeyInfo describes a key object for key list.
type KeyInfo struct {
	ID      string    `json:"id"`
	Kind    string    `json:"kind"`
	Label   string    `json:"label,omitempty"`
	Created time.Time `json:"created"`
	Current bool      `json:"current"` // the key this process opened the repository with
	Damaged string    `json:"damaged,omitempty"`
}

// keyFileDoc is the content of a key file (JSON, kept 0600 by its owner).
type keyFileDoc struct {
	Version    int    `json:"nbdmover_key_file"`
	Repository string `json:"repository"`
	Key        string `json:"key"`
	Secret     []byte `json:"secret"` // 32 random bytes
}

// Keys is how this process opens an encrypted repository: a password or
// a key file. It is safe for concurrent use; the first Open derives the
// wrapping key and unwraps the master key set, later ones (a daemon's
// jobs) reuse it, and the password is then zeroed.
type Keys struct {
	mu       sync.Mutex
	password []byte
	keyFile  *keyFileDoc
	keyID    string // the password key object to try ("": the cheapest few)
	open     *unlocked
}

// OnlyKey makes a password try only key object id (nbdmover key list
// shows the ids): an open then costs one derivation, however many key
// objects the repository holds.
func (k *Keys) OnlyKey(id string) error {
	if err := ValidKeyID(id); err != nil {
		return err
	}
	if k.keyFile != nil {
		return errors.New("a key file names its key already; --key-id goes with a password")
	}
	k.keyID = id
	return nil
}

// unlocked is a repository's master key set, in memory.
type unlocked struct {
	repository string
	keyID      string // the key object that opened it
	master     []byte // masterLen bytes
	secret     *chunker.Secret
}

// PasswordKeys returns Keys that open a repository with password (which
// they take over and zero once used).
func PasswordKeys(password []byte) (*Keys, error) {
	if len(password) == 0 {
		return nil, errors.New("the password is empty")
	}
	return &Keys{password: password}, nil
}

// KeyFileKeys returns Keys that open a repository with the key file whose
// content is b.
func KeyFileKeys(b []byte) (*Keys, error) {
	var f keyFileDoc
	if err := strictUnmarshal(b, &f); err != nil || f.Version != keyFileVersion || len(f.Secret) != 32 || !validHexID(f.Key, 16) {
		return nil, errors.New("not an nbdmover key file (want the JSON that nbdmover key add --new-key-file wrote)")
	}
	return &Keys{keyFile: &f}, nil
}

// Kind says what the keys are, for messages: "password" or "key file".
func (k *Keys) Kind() string {
	if k.keyFile != nil {
		return "key file"
	}
	return "password"
}

func validHexID(s string, n int) bool {
	if len(s) != n {
		return false
	}
	_, err := hex.DecodeString(s)
	return err == nil && strings.ToLower(s) == s
}

func keyObjectKey(id string) string { return keyPrefix + id }

// ValidKeyID checks a key id given by a user (16 lowercase hex digits).
func ValidKeyID(id string) error {
	if !validHexID(id, 16) {
		return fmt.Errorf("key ID %q: want 16 lowercase hex digits (nbdmover key list shows them)", id)
	}
	return nil
}

// needKeys refuses key management on a repository that is not encrypted.
func (r *Repo) needKeys() error {
	if r.keys == nil {
		return fmt.Errorf("%s: %w", r.Location(), ErrNotEncrypted)
	}
	return nil
}

func newKeyID() string {
	b := make([]byte, 8)
	rand.Read(b)
	return hex.EncodeToString(b)
}

// derive returns the wrapping key (32 bytes) and check value (16 bytes)
// of a key object from its credential. The caller zeroes the wrapping key.
func derive(kdf KDF, credential []byte) (wrap, check []byte, err error) {
	var out []byte
	switch kdf.Name {
	case kdfArgon2id:
		if kdf.Time < 1 || kdf.Time > 100 || kdf.MemoryKiB < 8<<10 || kdf.MemoryKiB > 1<<20 || kdf.Threads < 1 || len(kdf.Salt) < 16 {
			return nil, nil, fmt.Errorf("argon2id parameters out of range (time %d, memory %d KiB, threads %d)", kdf.Time, kdf.MemoryKiB, kdf.Threads)
		}
		out = argon2.IDKey(credential, kdf.Salt, kdf.Time, kdf.MemoryKiB, kdf.Threads, 64)
		debug.FreeOSMemory() // give back Argon2's memory at once
	case kdfHKDF:
		if len(kdf.Salt) < 16 {
			return nil, nil, errors.New("hkdf salt too short")
		}
		out, err = hkdf.Key(sha256.New, credential, kdf.Salt, "nbdmover key wrap", 64)
		if err != nil {
			return nil, nil, err
		}
	default:
		return nil, nil, fmt.Errorf("unknown key derivation %q", kdf.Name)
	}
	sum := sha256.Sum256(append([]byte("nbdmover key check\x00"), out[32:]...))
	clear(out[32:])
	return out[:32], sum[:16], nil
}

// wrapAAD binds a wrapped master key set to its repository and key id.
func wrapAAD(repository, id string) []byte {
	return []byte("nbdmover key\x00" + repository + "\x00" + id)
}

func gcm(key []byte) cipher.AEAD {
	block, err := aes.NewCipher(key)
	if err != nil {
		panic(err) // only for a key of the wrong size
	}
	aead, err := cipher.NewGCM(block)
	if err != nil {
		panic(err)
	}
	return aead
}

// sealKey makes the key object that wraps master under credential.
func sealKey(repository, kind, label string, kdf KDF, credential, master []byte) (*keyObject, error) {
	kdf.Salt = make([]byte, 16)
	rand.Read(kdf.Salt)
	wrap, check, err := derive(kdf, credential)
	if err != nil {
		return nil, err
	}
	defer clear(wrap)
	o := &keyObject{Version: formatVersion, ID: newKeyID(), Repository: repository, Kind: kind, Label: label,
		Created: time.Now().UTC(), KDF: kdf, Check: check, Nonce: make([]byte, 12)}
	rand.Read(o.Nonce)
	o.Wrapped = gcm(wrap).Seal(nil, o.Nonce, master, wrapAAD(repository, o.ID))
	return o, nil
}

// openKey unwraps o with credential. A wrong credential is
// ErrWrongPassword; a right one whose object does not authenticate is
// a damage naming the object.
func openKey(o *keyObject, credential []byte) ([]byte, error) {
	wrap, check, err := derive(o.KDF, credential)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", keyObjectKey(o.ID), err)
	}
	defer clear(wrap)
	var master []byte
	if len(o.Nonce) == 12 {
		master, err = gcm(wrap).Open(nil, o.Nonce, o.Wrapped, wrapAAD(o.Repository, o.ID))
	} else {
		err = errors.New("bad nonce")
	}
	match := subtle.ConstantTimeCompare(check, o.Check) == 1
	switch {
	case err == nil && len(master) == masterLen && master[0] == masterVersion:
		return master, nil
	case !match:
		return nil, ErrWrongPassword
	default:
		clear(master)
		return nil, fmt.Errorf("key object %s is damaged or was changed: the %s matches it, but its wrapped key does not authenticate", keyObjectKey(o.ID), kindWord(o.Kind))
	}
}

func kindWord(kind string) string {
	if kind == "key-file" {
		return "key file"
	}
	return "password"
}

// readKeyObject reads and decodes keys/<id>.
func readKeyObject(ctx context.Context, store sink.Store, key string) (*keyObject, error) {
	b, err := store.Get(ctx, key, nil, maxSmallObject)
	if err != nil {
		return nil, err
	}
	var o keyObject
	if err := strictUnmarshal(b, &o); err != nil {
		return nil, fmt.Errorf("key object %s is damaged: %v", key, err)
	}
	kdf := map[string]string{"password": kdfArgon2id, "key-file": kdfHKDF}[o.Kind]
	if o.Version != formatVersion || keyObjectKey(o.ID) != key || kdf == "" || o.KDF.Name != kdf {
		return nil, fmt.Errorf("key object %s is damaged: version %d, id %q, kind %q, derivation %q", key, o.Version, o.ID, o.Kind, o.KDF.Name)
	}
	return &o, nil
}

// keyObjects lists and reads every key object; those that cannot be
// read come back as problems.
func keyObjects(ctx context.Context, store sink.Store) ([]*keyObject, []Problem, error) {
	var keys []string
	errEnough := errors.New("enough")
	err := store.List(ctx, keyPrefix, func(info sink.ObjectInfo) error {
		if validHexID(strings.TrimPrefix(info.Key, keyPrefix), 16) {
			keys = append(keys, info.Key)
		}
		if len(keys) > maxKeyObjects {
			return errEnough
		}
		return nil
	})
	if errors.Is(err, errEnough) {
		return nil, nil, fmt.Errorf("%s: more than %d key objects under %s: nbdmover never makes that many (planted?); "+
			"remove those you do not know (a key file or --key-id opens the repository meanwhile)", store.Location(), maxKeyObjects, keyPrefix)
	}
	if err != nil {
		return nil, nil, err
	}
	var objs []*keyObject
	var probs []Problem
	for _, k := range keys {
		o, err := readKeyObject(ctx, store, k)
		switch {
		case isNotFound(err): // removed meanwhile
		case err != nil:
			probs = append(probs, Problem{Object: k, Problem: err.Error()})
		default:
			objs = append(objs, o)
		}
	}
	return objs, probs, nil
}

// unlock opens the master key set of the repository whose config is
// cfg (its bytes raw) with k.
func (k *Keys) unlock(ctx context.Context, store sink.Store, cfg Config, raw []byte) (*unlocked, error) {
	k.mu.Lock()
	defer k.mu.Unlock()
	if k.open == nil {
		master, id, err := k.unwrap(ctx, store, cfg)
		if err != nil {
			return nil, err
		}
		u, err := newUnlocked(cfg.ID, id, master)
		if err != nil {
			return nil, err
		}
		k.open = u
		clear(k.password)
		k.password = nil
	}
	if k.open.repository != cfg.ID {
		return nil, fmt.Errorf("%s: these keys opened repository %s already; one process opens one encrypted repository", store.Location(), k.open.repository)
	}
	if sum := sha256.Sum256(raw); subtle.ConstantTimeCompare(sum[:], k.open.master[masterConfig:]) != 1 {
		return nil, fmt.Errorf("%s: the repository config is not the one its keys were made for: it was changed (restore the original config)", store.Location())
	}
	return k.open, nil
}

// unwrap finds the key object that k opens and returns the master key
// set and the object's id. Every candidate's derivation runs in full,
// whatever fails, so the time taken says nothing about which check did.
func (k *Keys) unwrap(ctx context.Context, store sink.Store, cfg Config) ([]byte, string, error) {
	repository := cfg.ID
	if k.keyFile != nil {
		f := k.keyFile
		if f.Repository != repository {
			return nil, "", fmt.Errorf("%s: %w: the key file is for repository %s, this is %s", store.Location(), ErrKeyMismatch, f.Repository, repository)
		}
		o, err := readKeyObject(ctx, store, keyObjectKey(f.Key))
		if isNotFound(err) {
			return nil, "", fmt.Errorf("%s: %w: the key file's key %s was removed from the repository (nbdmover key list shows the keys left)%s", store.Location(), ErrKeyMismatch, f.Key, strays(ctx, store, keyPrefix))
		}
		if err != nil {
			return nil, "", err
		}
		if o.Kind != "key-file" || o.Repository != repository {
			return nil, "", fmt.Errorf("key object %s is damaged or was changed: it is not this key file's", keyObjectKey(o.ID))
		}
		master, err := openKey(o, f.Secret)
		if errors.Is(err, ErrWrongPassword) {
			err = fmt.Errorf("key object %s does not open with this key file: it is damaged or was replaced", keyObjectKey(o.ID))
		}
		return master, o.ID, err
	}
	var objs []*keyObject
	var probs []Problem
	var err error
	if k.keyID != "" { // one read, however many key objects there are
		o, rerr := readKeyObject(ctx, store, keyObjectKey(k.keyID))
		switch {
		case isNotFound(rerr):
			return nil, "", fmt.Errorf("%s: --key-id %s: there is no such key (nbdmover key list shows them)", store.Location(), k.keyID)
		case rerr != nil:
			return nil, "", fmt.Errorf("%s: --key-id %s: %w", store.Location(), k.keyID, rerr)
		}
		objs = []*keyObject{o}
	} else if objs, probs, err = keyObjects(ctx, store); err != nil {
		return nil, "", err
	}
	cands, skipped := passwordCandidates(objs, cfg, k.keyID)
	if k.keyID != "" && len(cands) == 0 {
		why := "it is not a password key of this repository"
		if len(skipped) > 0 {
			why = skipped[0]
		}
		return nil, "", fmt.Errorf("%s: --key-id %s: %s", store.Location(), k.keyID, why)
	}
	var damaged error
	tried := 0
	for _, o := range cands {
		if tried == maxKeyTries {
			return nil, "", fmt.Errorf("%s: %w (tried the %d password keys that cost least of %d; name yours with --key-id or %s: nbdmover key list shows them)",
				store.Location(), ErrWrongPassword, maxKeyTries, len(cands), KeyIDEnv)
		}
		tried++
		master, err := openKey(o, k.password)
		switch {
		case err == nil:
			return master, o.ID, nil
		case !errors.Is(err, ErrWrongPassword):
			damaged = err
		}
	}
	switch {
	case damaged != nil:
		return nil, "", fmt.Errorf("%s: %w", store.Location(), damaged)
	case tried == 0 && len(skipped) > 0:
		return nil, "", fmt.Errorf("%s: no password key can be tried: %s", store.Location(), skipped[0])
	case tried == 0 && len(probs) > 0:
		return nil, "", fmt.Errorf("%s: no password key can be read: %s: %s", store.Location(), probs[0].Object, probs[0].Problem)
	case tried == 0:
		return nil, "", fmt.Errorf("%s: the repository has no password key (open it with its key file)%s", store.Location(), strays(ctx, store, keyPrefix))
	}
	return nil, "", fmt.Errorf("%s: %w", store.Location(), ErrWrongPassword)
}

// strays names, for an error's end, what lies under prefix that is not an
// object (a link or FIFO planted where a key belongs), or returns "".
func strays(ctx context.Context, store sink.Store, prefix string) string {
	var found []string
	sink.Strays(ctx, store, prefix, func(key, what string) error {
		found = append(found, key+" is "+what)
		return nil
	})
	if len(found) == 0 {
		return ""
	}
	return "; " + strings.Join(found, ", ") + ", which nbdmover never makes nor reads (planted by someone who can write the repository?)"
}

// KeyIDEnv names the password key to try, like --key-id.
const KeyIDEnv = "NBDMOVER_KEY_ID"

// passwordCandidates returns the password key objects of the repository
// whose config is cfg that an open may try, cheapest first (only id, when
// given), and why the others above the cost cap are not tried.
func passwordCandidates(objs []*keyObject, cfg Config, id string) ([]*keyObject, []string) {
	limit := passwordCap(cfg)
	var out []*keyObject
	var skipped []string
	for _, o := range objs {
		if o.Kind != "password" || o.Repository != cfg.ID || id != "" && o.ID != id {
			continue
		}
		if why := aboveCap(o, limit); why != "" {
			skipped = append(skipped, keyObjectKey(o.ID)+": "+why)
			continue
		}
		out = append(out, o)
	}
	slices.SortStableFunc(out, func(a, b *keyObject) int {
		return cmp.Or(cmp.Compare(uint64(a.KDF.Time)*uint64(a.KDF.MemoryKiB), uint64(b.KDF.Time)*uint64(b.KDF.MemoryKiB)),
			a.Created.Compare(b.Created), strings.Compare(a.ID, b.ID))
	})
	return out, skipped
}

func newUnlocked(repository, keyID string, master []byte) (*unlocked, error) {
	s, err := chunker.NewSecret(master[masterIDKey:masterDataKey], master[masterDataKey:masterConfig])
	if err != nil {
		return nil, err
	}
	return &unlocked{repository: repository, keyID: keyID, master: master, secret: s}, nil
}

// newMaster makes a random master key set for a config whose bytes are raw.
func newMaster(raw []byte) []byte {
	m := make([]byte, masterLen)
	m[0] = masterVersion
	rand.Read(m[masterIDKey:masterConfig])
	sum := sha256.Sum256(raw)
	copy(m[masterConfig:], sum[:])
	return m
}

// putKeyObject stores o, refusing to replace one.
func putKeyObject(ctx context.Context, store sink.Store, o *keyObject) error {
	b, _ := json.MarshalIndent(o, "", "  ")
	return store.Create(ctx, keyObjectKey(o.ID), append(b, '\n'))
}

// firstKey wraps a new repository's master key set for k: a password key
// (a key file can only be added to a repository that exists).
func (k *Keys) firstKey(repository string, master []byte) (*keyObject, error) {
	k.mu.Lock()
	defer k.mu.Unlock()
	if k.keyFile != nil {
		return nil, errors.New("a key file opens an existing repository; create an encrypted repository with a password, then add key files (nbdmover key add --new-key-file)")
	}
	if k.open != nil || len(k.password) == 0 {
		return nil, errors.New("these keys opened another repository already; one process opens one encrypted repository")
	}
	return sealKey(repository, "password", "", argonCost, k.password, master)
}

// adopt makes k hold the master key set of a repository it just created.
func (k *Keys) adopt(repository, keyID string, master []byte) error {
	u, err := newUnlocked(repository, keyID, master)
	if err != nil {
		return err
	}
	k.mu.Lock()
	defer k.mu.Unlock()
	k.open = u
	clear(k.password)
	k.password = nil
	return nil
}

// Keys lists the repository's key objects.
func (r *Repo) Keys(ctx context.Context) ([]KeyInfo, error) {
	if err := r.needKeys(); err != nil {
		return nil, err
	}
	objs, probs, err := keyObjects(ctx, r.store)
	if err != nil {
		return nil, err
	}
	var out []KeyInfo
	for _, o := range objs {
		if o.Repository == r.cfg.ID {
			out = append(out, KeyInfo{ID: o.ID, Kind: o.Kind, Label: o.Label, Created: o.Created, Current: o.ID == r.keys.keyID})
		}
	}
	for _, p := range probs {
		out = append(out, KeyInfo{ID: strings.TrimPrefix(p.Object, keyPrefix), Damaged: p.Problem})
	}
	slices.SortFunc(out, func(a, b KeyInfo) int { return a.Created.Compare(b.Created) })
	return out, nil
}

// AddPasswordKey wraps the repository's master key set under another
// password.
func (r *Repo) AddPasswordKey(ctx context.Context, label string, password []byte) (KeyInfo, error) {
	defer clear(password)
	if len(password) == 0 {
		return KeyInfo{}, errors.New("the new password is empty")
	}
	return r.addKey(ctx, "password", label, argonCost, password)
}

// AddKeyFile makes a new key file for the repository and returns its
// content, which the caller writes (0600) where the host keeps it.
func (r *Repo) AddKeyFile(ctx context.Context, label string) (KeyInfo, []byte, error) {
	secret := make([]byte, 32)
	rand.Read(secret)
	defer clear(secret)
	info, err := r.addKey(ctx, "key-file", label, KDF{Name: kdfHKDF}, secret)
	if err != nil {
		return info, nil, err
	}
	b, _ := json.MarshalIndent(keyFileDoc{Version: keyFileVersion, Repository: r.cfg.ID, Key: info.ID, Secret: secret}, "", "  ")
	return info, append(b, '\n'), nil
}

func (r *Repo) addKey(ctx context.Context, kind, label string, kdf KDF, credential []byte) (KeyInfo, error) {
	if err := r.needKeys(); err != nil {
		return KeyInfo{}, err
	}
	if len(label) > 200 || strings.ContainsFunc(label, func(c rune) bool { return c < ' ' || c == 0x7f }) {
		return KeyInfo{}, errors.New("a key label is at most 200 printable characters")
	}
	o, err := sealKey(r.cfg.ID, kind, label, kdf, credential, r.keys.master)
	if err != nil {
		return KeyInfo{}, err
	}
	if err := putKeyObject(ctx, r.store, o); err != nil {
		return KeyInfo{}, fmt.Errorf("store key %s: %w", keyObjectKey(o.ID), err)
	}
	return KeyInfo{ID: o.ID, Kind: o.Kind, Label: o.Label, Created: o.Created}, nil
}

// RemoveKey deletes key object id. It refuses the key this process opened
// the repository with (open it with another key to remove this one), and
// it never leaves the repository without a key, even when other sessions
// remove keys at once: after the delete it checks that the key this
// process opened with still exists, and if another session removed it
// meanwhile, it puts the removed object back, byte for byte, and fails.
// (Of sessions that each removed a key and then found their own key
// present, the last delete was followed by a check that found its
// session's key: so a key is left.) Removing a key stops its password or
// key file from opening the repository; it does not change the master
// keys, which whoever held that key could have kept.
func (r *Repo) RemoveKey(ctx context.Context, id string) error {
	if err := r.needKeys(); err != nil {
		return err
	}
	if err := ValidKeyID(id); err != nil {
		return err
	}
	if id == r.keys.keyID {
		return fmt.Errorf("key %s is the one this command opened the repository with: open it with another key to remove this one (a repository keeps at least one key)", id)
	}
	key := keyObjectKey(id)
	raw, err := r.store.Get(ctx, key, nil, maxSmallObject)
	if isNotFound(err) {
		return fmt.Errorf("%s: no key %s (nbdmover key list shows them)", r.Location(), id)
	}
	if err != nil && !errors.Is(err, sink.ErrDamaged) {
		return err
	}
	hold.At("key-remove")
	if err := r.store.Delete(ctx, key); err != nil {
		return err
	}
	hold.At("key-removed")
	return r.keepOwnKey(ctx, key, raw)
}

// keepOwnKey checks, after key was deleted, that the key object this
// process opened the repository with still exists; if not (another
// session removed it meanwhile), it puts raw back under key and fails.
func (r *Repo) keepOwnKey(ctx context.Context, key string, raw []byte) error {
	own := keyObjectKey(r.keys.keyID)
	_, err := r.store.Stat(ctx, own)
	if err == nil {
		return nil
	}
	why := "was removed meanwhile (by nbdmover key remove or key passwd in another session)"
	if !isNotFound(err) {
		why = fmt.Sprintf("cannot be checked (%v)", err)
	}
	if raw == nil { // a damaged object: nothing to put back
		return fmt.Errorf("the key this command opened the repository with, %s, %s: check nbdmover key list", own, why)
	}
	if perr := r.store.Create(ctx, key, raw); perr != nil && !errors.Is(perr, sink.ErrExists) {
		return fmt.Errorf("the key this command opened the repository with, %s, %s, and %s could not be put back: %w; "+
			"check nbdmover key list at once", own, why, key, perr)
	}
	return fmt.Errorf("%s was not removed: the key this command opened the repository with, %s, %s, so removing %s too "+
		"could have left the repository without a key; it was put back (open the repository with a key that exists and try again)", key, own, why, key)
}

// ChangePassword replaces the password key this process opened the
// repository with by one for password: the new key is stored before the
// old one is removed, so the repository never lacks a key.
func (r *Repo) ChangePassword(ctx context.Context, password []byte) (KeyInfo, error) {
	if err := r.needKeys(); err != nil {
		return KeyInfo{}, err
	}
	old, err := readKeyObject(ctx, r.store, keyObjectKey(r.keys.keyID))
	if err != nil {
		return KeyInfo{}, err
	}
	if old.Kind != "password" {
		clear(password)
		return KeyInfo{}, errors.New("the repository was opened with a key file, which has no password: open it with the password to change")
	}
	raw, err := r.store.Get(ctx, keyObjectKey(old.ID), nil, maxSmallObject)
	if err != nil {
		return KeyInfo{}, err
	}
	info, err := r.AddPasswordKey(ctx, old.Label, password)
	if err != nil {
		return info, err
	}
	if err := r.store.Delete(ctx, keyObjectKey(old.ID)); err != nil {
		return info, fmt.Errorf("the new password works (key %s), but the old key %s could not be removed: %w (nbdmover key remove %s)", info.ID, old.ID, err, old.ID)
	}
	r.keys.keyID = info.ID
	// As RemoveKey: the new key must still exist once the old one is gone.
	if err := r.keepOwnKey(ctx, keyObjectKey(old.ID), raw); err != nil {
		r.keys.keyID = old.ID
		return info, err
	}
	return info, nil
}
