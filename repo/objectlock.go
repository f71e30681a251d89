package repo

import (
	"context"
	"errors"
	"fmt"
	"strings"
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
		return fmt.Errorf("%s: this host's clock is %s off the S3 server's (its Date header says %s), more than the %s a repository with Object Lock allows: "+
			"retain-until dates are the server's; set the host's clock right (NTP) and try again",
			store.Location(), skew.Round(time.Second), server.UTC().Format(time.RFC3339), sink.MaxClockSkew)
	}
	s.SetLock(lock.Policy(), skew)
	return nil
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

// ProtectBackup is called by a backup that starts at created (the
// host's clock), before it reads its disks; parent is the backup its
// incremental disks continue and chains their parent chains (nil for a
// disk read in full). It returns the backup's BackupLock (nil without
// Object Lock), having extended, when the parent's objects could be
// unlocked before the new backup's window ends, the lock of everything
// the new backup takes over from the parent: the chunks its chains
// name and their index objects. Warnings are for the log.
func (r *Repo) ProtectBackup(ctx context.Context, created time.Time, parent *Manifest, chains []*Chain) (*BackupLock, []string, error) {
	s := r.lockStore()
	if s == nil {
		return nil, nil, nil
	}
	pol := r.cfg.ObjectLock.Policy()
	start := created.Add(s.Now().Sub(time.Now())).Truncate(time.Second) // the server's clock
	bl := &BackupLock{ProtectedUntil: start.Add(pol.Period), LockedUntil: start.Add(pol.Period + pol.Renew())}
	var warnings []string
	var keys []string
	if parent != nil {
		if gap := created.Sub(parent.Created); gap > pol.Period {
			warnings = append(warnings, fmt.Sprintf("the last backup of %s (%s) is %s old, more than the lock period %s: "+
				"what it alone referenced was unprotected from %s; back up more often than the period, or init a repository with a longer one",
				parent.Domain, parent.ID, gap.Round(time.Second), pol.Period, parent.Created.Add(pol.Period+pol.Renew()).UTC().Format(time.RFC3339)))
		}
		if parent.ObjectLock != nil && !parent.ObjectLock.LockedUntil.Before(bl.ProtectedUntil) {
			bl.LockedUntil = parent.ObjectLock.LockedUntil
		} else {
			keys = parentKeys(chains)
		}
	}
	if len(keys) == 0 {
		return bl, warnings, nil
	}
	var n atomic.Int64
	g, gctx := errgroup.WithContext(ctx)
	g.SetLimit(32)
	for _, k := range keys {
		g.Go(func() error {
			err := sink.Retried(gctx, r.store, func() error { return s.Extend(gctx, k, bl.LockedUntil) })
			if err != nil {
				return fmt.Errorf("extend the lock of %s, which this backup takes over from %s/%s: %w", k, parent.Domain, parent.ID, err)
			}
			n.Add(1)
			return nil
		})
	}
	err := g.Wait()
	bl.Extended = n.Load()
	return bl, warnings, err
}

// parentKeys are the chunks and index objects of chains, once each.
func parentKeys(chains []*Chain) []string {
	seen := map[string]bool{}
	var keys []string
	add := func(k string) {
		if !seen[k] {
			seen[k] = true
			keys = append(keys, k)
		}
	}
	for _, c := range chains {
		if c == nil {
			continue
		}
		for _, ref := range c.Refs {
			for _, o := range ref.Objects {
				add(o)
			}
		}
		for _, d := range c.Index.All() {
			add(ChunkKey(d))
		}
	}
	return keys
}

// extendHeld extends the lock of a chunk a backup found stored (and so
// did not put): it may be another backup's, locked for less.
func (r *Repo) extendHeld(ctx context.Context, d chunker.Digest) error {
	s := r.lockStore()
	if s == nil {
		return nil
	}
	key := ChunkKey(d)
	return sink.Retried(ctx, r.store, func() error { return s.Extend(ctx, key, s.LockTarget()) })
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
	var vs []sink.Version
	err := sink.Retried(ctx, r.store, func() error {
		vs = vs[:0]
		return s.Versions(ctx, key, func(v sink.Version) error {
			if v.Key == key {
				vs = append(vs, v)
			}
			return nil
		})
	})
	if err == nil {
		_, err = s.DeleteVersions(ctx, vs, true)
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

// purge removes what the versions of a repository with Object Lock keep
// that nothing needs: every noncurrent version and delete marker of a
// mutable object; of an immutable one, every noncurrent version whose lock
// has ended, and a delete marker once no version is left beneath it.
// Current versions are never touched (gc's sweep deletes through delete
// markers, as forget does), and every delete names a version listed
// before, so nothing a backup, restore or concurrent put sees changes:
// it runs after gc let its lock go.
func (g *gc) purge(ctx context.Context) error {
	s := g.r.lockStore()
	if s == nil {
		return nil
	}
	rep := &LockReport{}
	g.res.ObjectLock = rep
	pol := g.r.cfg.ObjectLock.Policy()
	now := s.Now()
	var dead []sink.Version
	var markers []sink.Version // deletable once the versions beneath them are gone
	blocked := map[string]bool{}
	var group []sink.Version
	decide := func() error {
		if len(group) == 0 {
			return nil
		}
		key := group[0].Key
		mutable := !sink.Immutable(key)
		for i, v := range group {
			if i == 0 && !v.Marker {
				continue // the current version
			}
			switch {
			case v.Marker:
				markers = append(markers, v)
			case mutable:
				dead = append(dead, v)
			default:
				// Locked at least until it was put plus the period and
				// Renew, as nbdmover puts every immutable object (an
				// object nbdmover did not put waits as long). Past
				// that, ask.
				until := v.Modified.Add(pol.Period + pol.Renew())
				if !until.After(now) {
					rep.RetentionRequests++
					var err error
					err = sink.Retried(ctx, g.r.store, func() (err error) {
						_, until, err = s.Retention(ctx, key, v.ID)
						return err
					})
					if err != nil {
						return err
					}
				}
				if until.After(now) {
					rep.Locked++
					blocked[key] = true
					if rep.LockedUntil == nil || until.Before(*rep.LockedUntil) {
						rep.LockedUntil = &until
					}
					continue
				}
				dead = append(dead, v)
			}
		}
		group = group[:0]
		return nil
	}
	err := sink.Retried(ctx, g.r.store, func() error {
		dead, markers, group, rep.Locked, rep.LockedUntil = nil, nil, nil, 0, nil
		clear(blocked)
		return s.Versions(ctx, "", func(v sink.Version) error {
			if len(group) > 0 && group[0].Key != v.Key {
				if err := decide(); err != nil {
					return err
				}
			}
			group = append(group, v)
			return nil
		})
	})
	if err == nil {
		err = decide()
	}
	if err != nil {
		return err
	}
	var free []sink.Version // markers with nothing left beneath them
	for _, m := range markers {
		if !blocked[m.Key] {
			free = append(free, m)
		}
	}
	if g.o.DryRun {
		rep.Purged = len(dead) + len(free)
		return nil
	}
	hold.At("gc-purge")
	// The versions first, then the markers above them, only once every
	// version went: a marker removed while a version beneath it is left
	// would bring that version back.
	n, err := s.DeleteVersions(ctx, dead, false)
	if err == nil {
		var m int
		m, err = s.DeleteVersions(ctx, free, false)
		n += m
	}
	rep.Purged = n
	if errors.Is(err, sink.ErrLocked) || sink.IsDenied(err) {
		rep.Denied++
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
// t is deleted (a delete marker, for an immutable key). Locks (locks/)
// are left as they are. Nothing else may use the repository meanwhile:
// backups committed after t are gone from it afterwards (their versions
// stay until their locks end, and a later Recover can bring them back).
func Recover(ctx context.Context, store sink.Store, t time.Time, dryRun bool) (*RecoverResult, error) {
	start := time.Now()
	s, ok := sink.Versioned(store)
	if !ok {
		return nil, fmt.Errorf("%s: recover reads object versions, which only an S3 bucket with versioning keeps", store.Location())
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
	var group []sink.Version
	decide := func() {
		if len(group) == 0 || strings.HasPrefix(group[0].Key, "locks/") {
			group = group[:0]
			return
		}
		key, cur := group[0].Key, group[0]
		var then *sink.Version
		for i := range group {
			if !group[i].Modified.After(t) {
				then = &group[i]
				break
			}
		}
		kind, _, _ := strings.Cut(key, "/")
		switch {
		case then != nil && !then.Marker && (cur.Marker || cur.ID != then.ID):
			todo = append(todo, action{key, then.ID})
			res.Restored[kind]++
			if len(res.RestoredKeys) < 100 {
				res.RestoredKeys = append(res.RestoredKeys, key)
			}
		case (then == nil || then.Marker) && !cur.Marker:
			todo = append(todo, action{key, ""})
			res.Removed[kind]++
			if len(res.RemovedKeys) < 100 {
				res.RemovedKeys = append(res.RemovedKeys, key)
			}
		}
		group = group[:0]
	}
	err = sink.Retried(ctx, store, func() error {
		todo, group = nil, nil
		clear(res.Restored)
		clear(res.Removed)
		res.RestoredKeys, res.RemovedKeys = nil, nil
		return s.Versions(ctx, "", func(v sink.Version) error {
			if len(group) > 0 && group[0].Key != v.Key {
				decide()
			}
			group = append(group, v)
			return nil
		})
	})
	if err != nil {
		return nil, err
	}
	decide()
	if !dryRun {
		g, gctx := errgroup.WithContext(ctx)
		g.SetLimit(32)
		for _, a := range todo {
			g.Go(func() error {
				if a.version == "" {
					return store.Delete(gctx, a.key)
				}
				return sink.Retried(gctx, store, func() error { return s.Restore(gctx, a.key, a.version) })
			})
		}
		if err := g.Wait(); err != nil {
			return res, err
		}
	}
	res.Seconds = time.Since(start).Seconds()
	return res, nil
}
