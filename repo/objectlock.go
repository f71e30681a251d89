package repo

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"maps"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sync/errgroup"

	"github.com/nbdmover/nbdmover/chunker"
	"github.com/nbdmover/nbdmover/internal/hold"
	"github.com/nbdmover/nbdmover/sink"
)

// S3 Object Lock (docs/format.md "Object Lock", docs/design.md "Object
// Lock"). A repository made with it has its lock policy in its config;
// every immutable object is put locked until the server's time plus the
// period and a quarter (sink.ObjectLock.Renew), a backup extends what it
// takes over from its parent when the parent's locks could end before its
// own window does, and forget and gc respect the windows and locks.

// LockConfig is the config's object_lock: the mode and the period every
// backup is protected for.
type LockConfig struct {
	Mode          string `json:"mode"` // "governance" or "compliance"
	PeriodSeconds int64  `json:"period_seconds"`
}

// MaxLockPeriod bounds the lock period: ten years.
const MaxLockPeriod = 10 * 365 * 24 * time.Hour

// Policy returns the sink's lock policy.
func (l *LockConfig) Policy() sink.ObjectLock {
	return sink.ObjectLock{Mode: l.Mode, Period: time.Duration(l.PeriodSeconds) * time.Second}
}

// CheckLock says why mode and period cannot be a repository's lock.
func CheckLock(mode string, period time.Duration) error {
	if mode != "governance" && mode != "compliance" {
		return fmt.Errorf("object lock mode %q: want governance or compliance", mode)
	}
	if period < time.Second || period > MaxLockPeriod || period%time.Second != 0 {
		return fmt.Errorf("lock period %s: want whole seconds from 1s to %s", period, MaxLockPeriod)
	}
	return nil
}

// BackupLock is what a manifest says of its backup's protection.
type BackupLock struct {
	// ProtectedUntil is the end of the backup's window: its start (by
	// the server's clock) plus the lock period. Forget refuses the
	// backup before it.
	ProtectedUntil time.Time `json:"protected_until"`
	// LockedUntil: every object the manifest references (and the
	// manifest) is locked at least until then (>= ProtectedUntil).
	LockedUntil time.Time `json:"locked_until"`
	// Extended is how many objects the backup extended the lock of
	// before it read the disks (what it took over from its parent).
	Extended int64 `json:"extended,omitempty"`
	// Missing: chunks taken over that were found deleted (recorded as
	// damaged), for the caller to store again if it can.
	Missing []chunker.Digest `json:"-"`
}

// ObjectLock returns the repository's lock policy; nil without one.
func (r *Repo) ObjectLock() *LockConfig { return r.cfg.ObjectLock }

// lockStore returns the S3 store of a repository with Object Lock,
// ready to lock (nil otherwise, and for an AsOf view).
func (r *Repo) lockStore() *sink.S3 {
	if r.cfg.ObjectLock == nil {
		return nil
	}
	s, ok := sink.Versioned(r.store)
	if !ok || s.Lock() == nil {
		return nil
	}
	return s
}

// setupLock prepares the store of a repository whose config has lock:
// the store must be a versioned S3 bucket, the host's clock near the
// server's, and puts of immutable objects then lock them. An AsOf view
// (which writes nothing immutable) needs none of it.
func setupLock(ctx context.Context, store sink.Store, lock *LockConfig) error {
	if err := CheckLock(lock.Mode, time.Duration(lock.PeriodSeconds)*time.Second); err != nil {
		return fmt.Errorf("%s: repository config: %w", store.Location(), err)
	}
	if sink.IsAsOf(store) {
		return nil
	}
	s, ok := sink.Versioned(store)
	if !ok {
		return fmt.Errorf("%s: the repository's config asks for S3 Object Lock, which this store does not have (it was copied off its bucket?)", store.Location())
	}
	var server, local time.Time
	err := sink.Retried(ctx, store, func() (err error) {
		server, local, err = s.ServerTime(ctx)
		return err
	})
	if err != nil {
		return err
	}
	skew := server.Sub(local)
	if skew > sink.MaxClockSkew || skew < -sink.MaxClockSkew {
		how := fmt.Sprintf("%s behind", skew.Round(time.Second))
		if skew < 0 {
			how = fmt.Sprintf("%s ahead of", (-skew).Round(time.Second))
		}
		return fmt.Errorf("%s: this host's clock is %s the S3 server's (its Date header says %s), more than the %s a repository with Object Lock allows: "+
			"retain-until dates are the server's; set the host's clock right (NTP) and try again",
			store.Location(), how, server.UTC().Format(time.RFC3339), sink.MaxClockSkew)
	}
	s.SetLock(lock.Policy())
	return nil
}

// checkConfig checks, on S3, what the versions of the config say: a
// config with a version before the current one was replaced (an
// encrypted repository's config is authenticated by its keys; an
// unencrypted one's is not), and one whose first version had Object Lock
// and the current one not, or another, is refused: a writer of the
// bucket would make every host write unlocked from then on. An AsOf
// view needs a bucket with versioning.
func checkConfig(ctx context.Context, store sink.Store, cfg Config) error {
	if sink.IsAsOf(store) {
		return checkVersioning(ctx, store)
	}
	s, ok := sink.Versioned(store)
	if !ok || cfg.Encryption != nil {
		return nil
	}
	vs, err := keyVersions(ctx, store, s, configKey)
	if err != nil && cfg.ObjectLock == nil && !sink.IsTransient(err) {
		// A service without version listings, or credentials without
		// s3:ListBucketVersions: nothing to check, and a repository
		// without Object Lock works as it did (a host that wrote with
		// a lock still has its record, checkPolicyPin).
		return nil
	}
	if err != nil {
		return err
	}
	var first *sink.Version
	for i := range vs {
		if !vs[i].Marker {
			first = &vs[i] // the oldest comes last
		}
	}
	if first == nil || first.Latest {
		return nil
	}
	var b []byte
	err = sink.Retried(ctx, store, func() (err error) {
		b, err = s.GetVersion(ctx, configKey, first.ID, nil, maxSmallObject)
		return err
	})
	if err != nil {
		return err
	}
	var was Config
	if err := strictUnmarshal(b, &was); err != nil || was.ObjectLock == nil {
		return nil // not a repository with Object Lock from the start
	}
	if cfg.ObjectLock == nil || *cfg.ObjectLock != *was.ObjectLock {
		return fmt.Errorf("%s: the repository's config was replaced (%d versions): its first, of %s, has S3 Object Lock (%s, %ds), the current one %s: "+
			"refused, so that nothing is written unprotected; if the bucket was attacked, see nbdmover recover --as-of (README, \"After an attack\")",
			store.Location(), len(vs), first.Modified.UTC().Format(time.RFC3339), was.ObjectLock.Mode, was.ObjectLock.PeriodSeconds, describeLock(cfg.ObjectLock))
	}
	return nil
}

func describeLock(l *LockConfig) string {
	if l == nil {
		return "none"
	}
	return fmt.Sprintf("%s, %ds", l.Mode, l.PeriodSeconds)
}

// checkVersioning fails unless the store's bucket keeps versions (what
// --as-of and recover read).
func checkVersioning(ctx context.Context, store sink.Store) error {
	s, ok := sink.Bucket(store)
	if !ok {
		return fmt.Errorf("%s: --as-of and recover read object versions, which only an S3 bucket with versioning keeps", store.Location())
	}
	var b sink.BucketLock
	err := sink.Retried(ctx, store, func() (err error) {
		b, err = s.BucketLock(ctx)
		return err
	})
	if err != nil {
		return err
	}
	if b.Versioning != "Enabled" && b.Versioning != "Suspended" {
		return fmt.Errorf("%s: the bucket has no versioning: it keeps no object but the current one, so there is no past to read (--as-of, recover)", store.Location())
	}
	return nil
}

// keyVersions lists the versions of exactly key in s, the S3 store
// beneath store, with store's retry policy.
func keyVersions(ctx context.Context, store sink.Store, s *sink.S3, key string) ([]sink.Version, error) {
	var vs []sink.Version
	err := sink.Retried(ctx, store, func() (err error) {
		vs, err = s.KeyVersions(ctx, key)
		return err
	})
	return vs, err
}

// checkBucketLock checks, for init, that the bucket can hold a
// repository with Object Lock.
func checkBucketLock(ctx context.Context, s *sink.S3) error {
	b, err := s.BucketLock(ctx)
	if err != nil {
		return err
	}
	switch {
	case !b.Enabled:
		return fmt.Errorf("%s: the bucket does not have Object Lock enabled (its ObjectLockConfiguration's ObjectLockEnabled is not Enabled): "+
			"S3 enables it only when a bucket is created (aws s3api create-bucket --object-lock-enabled-for-bucket, mc mb --with-lock), "+
			"so use a new bucket, or let nbdmover init create it", s.Location())
	case b.Versioning != "Enabled":
		return fmt.Errorf("%s: the bucket's versioning is %q, not Enabled: Object Lock needs it (aws s3api put-bucket-versioning)", s.Location(), b.Versioning)
	case b.Default != "":
		return fmt.Errorf("%s: the bucket has a default retention (%s), which would lock the repository's locks and state too, so that they could never be removed: "+
			"remove it (aws s3api put-object-lock-configuration with no Rule); nbdmover locks each object it keeps", s.Location(), b.Default)
	}
	return nil
}

// ProtectBackup is called by a backup that started at created (the
// host's clock) with parent, the backup its incremental disks continue,
// and chains, their parent chains (nil for a disk read in full). It
// returns the backup's BackupLock (nil without Object Lock), having
// extended, unless the parent's locks provably outlast the new backup's
// window, the lock of everything the backup takes over: the chunks its
// chains name (but those in damaged, which it stores again), their index
// objects, the config and the key objects. A chunk found missing is
// recorded as damaged (the next backups store it again) instead of
// failing the backup. Warnings are for the log.
//
// The parent's locked_until is believed only when this host committed
// the parent and its manifest was written once (lockClaim): a writer of
// the bucket can put a new version of a manifest (never remove the
// first, locked one), or a manifest of a backup that never was, claiming
// locks that do not exist.
func (r *Repo) ProtectBackup(ctx context.Context, created time.Time, parent *Manifest, chains []*Chain, damaged map[chunker.Digest]bool) (*BackupLock, []string, error) {
	s := r.lockStore()
	if s == nil {
		return nil, nil, nil
	}
	pol := r.cfg.ObjectLock.Policy()
	start := created.Add(s.Now().Sub(time.Now())).Truncate(time.Second) // the server's clock
	bl := &BackupLock{ProtectedUntil: start.Add(pol.Period), LockedUntil: start.Add(pol.Period + pol.Renew())}
	var warnings []string
	if parent != nil {
		since := parent.Created
		if pl := parent.ObjectLock; pl != nil {
			since = pl.ProtectedUntil.Add(-pol.Period) // its start there (a copy's: when it was copied)
		}
		if gap := start.Sub(since); gap > pol.Period {
			warnings = append(warnings, fmt.Sprintf("the last backup of %s (%s) started %s before this one, more than the lock period %s: "+
				"what it alone referenced was unprotected from %s; back up more often than the period, or init a repository with a longer one",
				parent.Domain, parent.ID, gap.Round(time.Second), pol.Period, since.Add(pol.Period+pol.Renew()).UTC().Format(time.RFC3339)))
		}
		trusted, err := r.lockClaim(ctx, s, parent, pol)
		if err != nil {
			return nil, warnings, err
		}
		if !trusted.Before(bl.ProtectedUntil) {
			bl.LockedUntil = trusted
			return bl, warnings, nil
		}
	}
	keys, err := r.takenOver(ctx, chains, damaged)
	if err != nil {
		return nil, warnings, err
	}
	var n atomic.Int64
	var mu sync.Mutex
	var missing []string
	g, gctx := errgroup.WithContext(ctx)
	g.SetLimit(32)
	for _, k := range keys {
		g.Go(func() error {
			err := sink.Retried(gctx, r.store, func() error { return s.Extend(gctx, k, "", bl.LockedUntil) })
			if errors.Is(err, sink.ErrNotFound) && (strings.HasPrefix(k, "chunks/") || strings.HasPrefix(k, "patches/")) {
				// Deleted: a delete marker may hide the version a
				// backup references; it stays locked, for recover.
				if err := r.extendHidden(gctx, s, k, bl.LockedUntil); err != nil {
					return err
				}
				mu.Lock()
				missing = append(missing, k)
				mu.Unlock()
				return nil
			}
			if err != nil {
				return fmt.Errorf("extend the Object Lock of %s, which this backup takes over: %w", k, err)
			}
			n.Add(1)
			return nil
		})
	}
	err = g.Wait()
	bl.Extended = n.Load()
	if err != nil {
		return bl, warnings, err
	}
	for _, k := range missing {
		if d, ok := storedDigest(k); ok {
			bl.Missing = append(bl.Missing, d)
		}
		backups := []string{}
		if parent != nil {
			backups = append(backups, parent.Domain+"/"+parent.ID)
		}
		if err := r.RecordDamage(ctx, k, "missing (found when its Object Lock was extended)", backups); err != nil {
			return bl, warnings, err
		}
		warnings = append(warnings, fmt.Sprintf("chunk %s of the parent backup is missing: recorded as damaged; the next backups store it again where the disks still hold it", k))
	}
	return bl, warnings, nil
}

// extendHidden extends the newest version of key beneath a delete
// marker, if there is one.
func (r *Repo) extendHidden(ctx context.Context, s *sink.S3, key string, until time.Time) error {
	vs, err := keyVersions(ctx, r.store, s, key)
	if err != nil {
		return err
	}
	for _, v := range vs {
		if !v.Marker {
			return sink.Retried(ctx, r.store, func() error { return s.Extend(ctx, key, v.ID, until) })
		}
	}
	return nil
}

// lockClaim returns how long parent's objects are locked at least, as far
// as it can be believed: its locked_until, when this host committed it
// (lockpin.go) and its manifest has one version, no later than that
// version's time (the server's) plus the period and Renew; otherwise the
// zero time.
func (r *Repo) lockClaim(ctx context.Context, s *sink.S3, parent *Manifest, pol sink.ObjectLock) (time.Time, error) {
	if parent.ObjectLock == nil || !r.pinned(parent) {
		return time.Time{}, nil
	}
	vs, err := keyVersions(ctx, r.store, s, parent.Key())
	if err != nil {
		return time.Time{}, err
	}
	if len(vs) != 1 || vs[0].Marker {
		return time.Time{}, nil // rewritten (or forgotten) since: extend
	}
	claim := parent.ObjectLock.LockedUntil
	if most := vs[0].Modified.Add(pol.Period + pol.Renew() + time.Second); claim.After(most) {
		return time.Time{}, nil
	}
	return claim, nil
}

// takenOver are the keys whose locks a backup extends: the config, the
// key objects, and the index objects and chunks of chains (but damaged
// ones), once each.
func (r *Repo) takenOver(ctx context.Context, chains []*Chain, damaged map[chunker.Digest]bool) ([]string, error) {
	keys := []string{configKey}
	err := r.store.List(ctx, "keys/", func(o sink.ObjectInfo) error {
		keys = append(keys, o.Key)
		return nil
	})
	if err != nil {
		return nil, err
	}
	seen := map[string]bool{}
	var chunks []chunker.Digest
	patches := map[string]bool{}
	for _, c := range chains {
		if c == nil {
			continue
		}
		for _, ref := range c.Refs {
			for _, o := range ref.Objects {
				if !seen[o] {
					seen[o] = true
					keys = append(keys, o)
				}
			}
		}
		for i, d := range c.Index.All() {
			base := c.Index.Base(i)
			switch {
			case damaged[d] || damaged[base]:
			case base.IsZeroChunk():
				chunks = append(chunks, d)
			default: // a patch, and its base
				patches[PatchKey(d, base)] = true
				chunks = append(chunks, base)
			}
		}
	}
	slices.SortFunc(chunks, func(a, b chunker.Digest) int { return bytes.Compare(a[:], b[:]) })
	chunks = slices.Compact(chunks)
	for _, d := range chunks {
		keys = append(keys, ChunkKey(d))
	}
	keys = append(keys, slices.Sorted(maps.Keys(patches))...)
	return keys, nil
}

// extendHeld extends the lock of a chunk (or patch) a backup found
// stored (and so did not put): it may be another backup's, locked for
// less.
func (r *Repo) extendHeld(ctx context.Context, key string) error {
	s := r.lockStore()
	if s == nil {
		return nil
	}
	return sink.Retried(ctx, r.store, func() error { return s.Extend(ctx, key, "", s.LockTarget()) })
}

// LockedBackup is a backup still inside its Object Lock window.
type LockedBackup struct {
	Backup         string    `json:"backup"` // domain/id
	ProtectedUntil time.Time `json:"protected_until"`
}

// ErrInWindow is matched by the error of a forget that would forget
// backups still inside their Object Lock window.
var ErrInWindow = errors.New("inside its Object Lock window")

// WindowError names the backups a forget kept for their window.
type WindowError struct {
	Backups []LockedBackup
	Mode    string
}

func (e *WindowError) Error() string {
	var names []string
	for i, b := range e.Backups {
		if i == 8 {
			names = append(names, fmt.Sprintf("and %d more", len(e.Backups)-i))
			break
		}
		names = append(names, fmt.Sprintf("%s (until %s)", b.Backup, b.ProtectedUntil.UTC().Format(time.RFC3339)))
	}
	how := "forget them once their window has ended"
	if e.Mode == "governance" {
		how += ", or now with --bypass-governance (which needs the s3:BypassGovernanceRetention permission)"
	}
	return fmt.Sprintf("%d backups the policy forgets are %s, and were kept: %s; %s",
		len(e.Backups), ErrInWindow, strings.Join(names, ", "), how)
}

func (e *WindowError) Is(target error) bool { return target == ErrInWindow }

// inWindow says whether the backup m is inside its lock window now.
func (r *Repo) inWindow(m *Manifest) bool {
	s := r.lockStore()
	return s != nil && m.ObjectLock != nil && s.Now().Before(m.ObjectLock.ProtectedUntil)
}

// deleteManifestBypass removes every version of a manifest (and its
// delete markers) with the governance bypass.
func (r *Repo) deleteManifestBypass(ctx context.Context, key string) error {
	s := r.lockStore()
	vs, err := keyVersions(ctx, r.store, s, key)
	if err == nil {
		_, _, _, err = s.DeleteVersions(ctx, vs, true)
	}
	if err != nil {
		return fmt.Errorf("forget %s with --bypass-governance: %w (the credentials need the s3:BypassGovernanceRetention permission)", key, err)
	}
	return nil
}

// LockReport is what gc's purge of a repository with Object Lock did.
type LockReport struct {
	// Purged: object versions and delete markers removed.
	Purged int `json:"versions_deleted"`
	// Locked: versions gc would remove but whose lock has not ended.
	Locked int `json:"versions_locked"`
	// LockedUntil: when the first of those locks ends.
	LockedUntil *time.Time `json:"locked_until,omitempty"`
	// Denied: deletes the store refused (0 in normal operation: gc
	// deletes no version before its lock ends).
	Denied int `json:"denied"`
	// RetentionRequests: the locks gc asked the store for.
	RetentionRequests int `json:"retention_requests"`
}

// repositoryKey reports whether key is one nbdmover writes (of a kind it
// knows, and valid): purge and recover touch nothing else a bucket holds.
func repositoryKey(key string) bool {
	if sink.ValidKey(key) != nil {
		return false
	}
	if sink.Immutable(key) {
		return true
	}
	for _, p := range []string{"locks/", "protected/", "holds/", "state/"} {
		if strings.HasPrefix(key, p) {
			return true
		}
	}
	return false
}

// maxPurgeVersions bounds the versions of one key a purge looks at (and
// holds in memory); a key with more (planted) is purged a part per gc.
const maxPurgeVersions = 10000

// purgeMargin: a version is deleted only this long after its lock ended
// by the server's clock as the host knows it (the Date header has whole
// seconds).
const purgeMargin = 5 * time.Second

// purge removes what the versions of a repository with Object Lock keep
// that nothing needs: every noncurrent version and delete marker of a
// mutable object; of an immutable one, every noncurrent version whose lock
// has ended, and a delete marker once no version is left beneath it.
// Current versions are never touched (gc's sweep deletes through delete
// markers, as forget does), and every delete names a version listed
// before, so nothing a backup, restore or concurrent put sees changes:
// it runs after gc let its lock go. Only the repository's own keys are
// looked at. A version the store refuses to delete (a legal hold, a lock
// someone else set) is counted in Denied and left; the purge goes on.
// Deletes go in batches as the listing goes, so memory does not grow
// with the bucket.
func (g *gc) purge(ctx context.Context) error {
	s := g.r.lockStore()
	if s == nil {
		return nil
	}
	rep := &LockReport{}
	g.res.ObjectLock = rep
	pol := g.r.cfg.ObjectLock.Policy()
	now := s.Now()
	var dead, free []sink.Version // versions, then the markers above them
	flush := func(all bool) error {
		if g.o.DryRun {
			rep.Purged += len(dead) + len(free)
			dead, free = dead[:0], free[:0]
			return nil
		}
		if len(dead) >= 1000 || len(free) >= 1000 || all {
			hold.At("gc-purge")
			// The versions first, then the markers above them (a marker
			// removed while a version beneath it is left would bring
			// that version back): a marker is in free only when every
			// version beneath it is in dead (or was deleted before), and
			// it stays when one of those was refused.
			n, failed, refused, err := s.DeleteVersions(ctx, dead, false)
			rep.Purged += n
			rep.Denied += refused
			if err != nil && (len(failed) == 0 || refused < len(failed)) {
				return err // not only refusals: no marker goes
			}
			kept := map[string]bool{}
			for _, v := range failed {
				kept[v.Key] = true
			}
			free = slices.DeleteFunc(free, func(v sink.Version) bool { return kept[v.Key] })
			n, failed, refused, err = s.DeleteVersions(ctx, free, false)
			rep.Purged += n
			rep.Denied += refused
			if err != nil && (len(failed) == 0 || refused < len(failed)) {
				return err
			}
			dead, free = dead[:0], free[:0]
		}
		return nil
	}
	var key string
	var blocked bool
	var markers []sink.Version
	perKey := 0
	endKey := func() error {
		if !blocked {
			free = append(free, markers...)
		}
		markers = markers[:0]
		return flush(false)
	}
	err := s.Versions(ctx, "", func(v sink.Version) error {
		if v.Key != key {
			if err := endKey(); err != nil {
				return err
			}
			key, blocked, perKey = v.Key, false, 0
		}
		if perKey++; perKey > maxPurgeVersions || !repositoryKey(v.Key) {
			blocked = true // the rest of a key's versions wait for the next gc
			return nil
		}
		switch {
		case v.Latest && !v.Marker:
			// the current version: never
		case v.Marker:
			markers = append(markers, v)
		case !sink.Immutable(v.Key):
			dead = append(dead, v)
		default:
			// Locked at least until it was put plus the period and
			// Renew, as nbdmover puts every immutable object (one
			// nbdmover did not put waits as long). Past that, ask.
			until := v.Modified.Add(pol.Period + pol.Renew())
			if !until.Add(purgeMargin).After(now) {
				rep.RetentionRequests++
				err := sink.Retried(ctx, g.r.store, func() (err error) {
					_, until, err = s.Retention(ctx, v.Key, v.ID)
					return err
				})
				if isNotFound(err) {
					return nil // gone meanwhile (another gc's purge)
				}
				if err != nil {
					return err
				}
			}
			if until.Add(purgeMargin).After(now) {
				rep.Locked++
				blocked = true
				if rep.LockedUntil == nil || until.Before(*rep.LockedUntil) {
					rep.LockedUntil = &until
				}
				return nil
			}
			dead = append(dead, v)
		}
		return nil
	})
	if err == nil {
		err = endKey()
	}
	if err == nil {
		err = flush(true)
	}
	return err
}

// RecoverResult is what Recover did (or, in a dry run, would do).
type RecoverResult struct {
	AsOf   time.Time `json:"as_of"`
	DryRun bool      `json:"dry_run"`
	// Restored: keys whose version of AsOf was made current again (they
	// were deleted or overwritten since); Removed: keys that did not
	// exist at AsOf and were deleted. Each by kind (the key's first
	// segment: chunks, manifests, ...).
	Restored map[string]int `json:"restored"`
	Removed  map[string]int `json:"removed"`
	// Keys: the first of them (at most 100 of each), for the record.
	RestoredKeys []string `json:"restored_keys,omitempty"`
	RemovedKeys  []string `json:"removed_keys,omitempty"`
	Seconds      float64  `json:"seconds"`
}

// Recover makes the repository in store what it was at t, by the S3
// server's clock: every key's version current at t is made current again
// (a server-side copy, locked anew), and every key that did not exist at
// t is deleted (a delete marker, for an immutable key). Locks and state
// are left as they are; protection markers and holds are put back, never
// removed. A key whose current version has the content of then (ETag and
// size) is left, so a second run changes nothing. Nothing else may use the repository meanwhile:
// backups committed after t are gone from it afterwards (their versions
// stay until their locks end, and a later Recover can bring them back).
func Recover(ctx context.Context, store sink.Store, t time.Time, dryRun bool) (*RecoverResult, error) {
	start := time.Now()
	s, ok := sink.Versioned(store)
	if !ok {
		return nil, fmt.Errorf("%s: recover reads object versions, which only an S3 bucket with versioning keeps", store.Location())
	}
	if err := checkVersioning(ctx, store); err != nil {
		return nil, err
	}
	past, err := sink.AsOf(store, t)
	if err != nil {
		return nil, err
	}
	cfg, err := readConfig(ctx, past)
	if err != nil {
		return nil, fmt.Errorf("the repository as of %s: %w", t.UTC().Format(time.RFC3339), err)
	}
	if cfg.ObjectLock != nil {
		if err := setupLock(ctx, store, cfg.ObjectLock); err != nil {
			return nil, err
		}
	}
	res := &RecoverResult{AsOf: t.UTC(), DryRun: dryRun, Restored: map[string]int{}, Removed: map[string]int{}}
	type action struct {
		key, version string // version "": remove
	}
	var todo []action
	var key string
	var cur, then *sink.Version
	// decide what to do with the key just listed: cur is its current
	// version (or marker), then the one current at t.
	decide := func() {
		defer func() { cur, then = nil, nil }()
		if cur == nil || !repositoryKey(key) || strings.HasPrefix(key, "locks/") || strings.HasPrefix(key, "state/") {
			return // locks and state are left as they are
		}
		kind, _, _ := strings.Cut(key, "/")
		had := then != nil && !then.Marker
		switch {
		case had && (cur.Marker || cur.ETag != then.ETag || cur.Size != then.Size):
			todo = append(todo, action{key, then.ID})
			res.Restored[kind]++
			if len(res.RestoredKeys) < 100 {
				res.RestoredKeys = append(res.RestoredKeys, key)
			}
		case !had && !cur.Marker && sink.Immutable(key):
			// Made since (protection markers and holds are never
			// removed, only put back).
			todo = append(todo, action{key, ""})
			res.Removed[kind]++
			if len(res.RemovedKeys) < 100 {
				res.RemovedKeys = append(res.RemovedKeys, key)
			}
		}
	}
	err = sink.Retried(ctx, store, func() error {
		todo, key, cur, then = nil, "", nil, nil
		clear(res.Restored)
		clear(res.Removed)
		res.RestoredKeys, res.RemovedKeys = nil, nil
		return s.Versions(ctx, "", func(v sink.Version) error {
			if v.Key != key {
				decide()
				key = v.Key
			}
			if v.Latest {
				cur = &v
			}
			if then == nil && !v.Modified.After(t) {
				then = &v // the newest of then (versions come newest first)
			}
			return nil
		})
	})
	if err != nil {
		return nil, err
	}
	decide()
	if !dryRun {
		var failed atomic.Int64
		var first atomic.Pointer[error]
		g, gctx := errgroup.WithContext(ctx)
		g.SetLimit(32)
		for _, a := range todo {
			g.Go(func() error {
				var err error
				if a.version == "" {
					err = store.Delete(gctx, a.key)
				} else {
					err = sink.Retried(gctx, store, func() error { return s.Restore(gctx, a.key, a.version) })
				}
				if err != nil && gctx.Err() == nil {
					failed.Add(1)
					first.CompareAndSwap(nil, &err)
				}
				return nil
			})
		}
		g.Wait()
		if err := ctx.Err(); err != nil {
			return res, err
		}
		if f := failed.Load(); f > 0 {
			return res, fmt.Errorf("%d of %d keys could not be recovered (the others were; run recover again): the first: %w", f, len(todo), *first.Load())
		}
	}
	res.Seconds = time.Since(start).Seconds()
	return res, nil
}
