package repo

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	mrand "math/rand/v2"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/nbdmover/nbdmover/sink"
)

// Repository locks (locks/<kind>-<id>, meta blobs of JSON). Backups,
// restores and verify hold a shared lock; gc holds the exclusive lock while
// it deletes, and only then. The protocol and why it keeps every committed
// backup whole is in docs/design.md ("Deleting from a repository").
const (
	LockShared    = "shared"
	LockExclusive = "exclusive"
)

// lockTiming: how often a holder refreshes its lock's heartbeat, when a
// lock without a heartbeat is stale, how long before that a holder gives
// up its lock (and fails) rather than risk being thought dead, and how
// often a waiter looks again. Tests shorten them.
var lockTiming = struct{ Refresh, Stale, Margin, Poll time.Duration }{
	time.Minute, 30 * time.Minute, 5 * time.Minute, 2 * time.Second}

// ErrLocked: the lock cannot be had (another gc holds the exclusive lock).
var ErrLocked = errors.New("the repository is locked")

// ErrLockLost: a holder's lock was removed, broken by a gc, or not
// refreshed in time; what it was doing must not commit.
var ErrLockLost = errors.New("the repository lock was lost")

// LockInfo is the content of a lock object.
type LockInfo struct {
	Version   int       `json:"version"`
	Kind      string    `json:"kind"` // LockShared or LockExclusive
	ID        string    `json:"id"`   // 16 hex digits, also in the key
	Purpose   string    `json:"purpose"`
	Host      string    `json:"host"`
	PID       int       `json:"pid"`
	Process   string    `json:"process,omitempty"` // boot id and start time of the process: tells a reused pid
	Started   time.Time `json:"started"`
	Heartbeat time.Time `json:"heartbeat"`
	// Broken: an exclusive lock's list of the stale shared locks it went
	// past; their holders must not commit.
	Broken []string `json:"broken,omitempty"`

	Key     string `json:"-"`
	Damaged string `json:"-"` // why the object could not be read (then only Kind, Key and Heartbeat, its mtime, are known)
}

func lockKey(kind, id string) string { return "locks/" + kind + "-" + id }

// parseLockKey returns the kind and id a lock key names.
func parseLockKey(key string) (kind, id string, ok bool) {
	rest, found := strings.CutPrefix(key, "locks/")
	if !found {
		return "", "", false
	}
	kind, id, found = strings.Cut(rest, "-")
	if !found || (kind != LockShared && kind != LockExclusive) || len(id) != 16 {
		return "", "", false
	}
	if _, err := hex.DecodeString(id); err != nil {
		return "", "", false
	}
	return kind, id, true
}

// Stale says why the lock is no longer held by a live process ("" when it
// may be): no heartbeat for lockTiming.Stale, or, on this host, its
// process is gone.
func (l *LockInfo) Stale(now time.Time) string {
	if age := now.Sub(l.Heartbeat); age > lockTiming.Stale {
		return fmt.Sprintf("no heartbeat for %s", age.Round(time.Second))
	}
	if host, _ := os.Hostname(); l.Damaged == "" && l.Host == host && !processAlive(l.PID, l.Process) {
		return fmt.Sprintf("process %d is gone", l.PID)
	}
	return ""
}

// Holder names who holds the lock, for messages.
func (l *LockInfo) Holder() string {
	if l.Damaged != "" {
		return fmt.Sprintf("%s lock %s (unreadable: %s; written %s)", l.Kind, l.Key, l.Damaged, l.Heartbeat.UTC().Format(time.RFC3339))
	}
	return fmt.Sprintf("%s lock of %s by pid %d on %s since %s (heartbeat %s)", l.Kind, l.Purpose, l.PID, l.Host,
		l.Started.UTC().Format(time.RFC3339), l.Heartbeat.UTC().Format(time.RFC3339))
}

// processIdentity is the boot id and start time of process pid ("" when
// it does not exist or /proc cannot tell).
func processIdentity(pid int) string {
	stat, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return ""
	}
	// The command name (field 2) may hold spaces and parentheses: count
	// fields after its closing parenthesis; the start time is field 22.
	i := strings.LastIndexByte(string(stat), ')')
	fields := strings.Fields(string(stat[i+1:]))
	if i < 0 || len(fields) < 20 {
		return ""
	}
	boot, _ := os.ReadFile("/proc/sys/kernel/random/boot_id")
	return strings.TrimSpace(string(boot)) + "/" + fields[19]
}

func processAlive(pid int, identity string) bool {
	if identity == "" { // unknown when the lock was taken: trust the pid
		_, err := os.Stat("/proc/" + strconv.Itoa(pid))
		return err == nil
	}
	return processIdentity(pid) == identity
}

// Locks returns every lock object in the repository.
func (r *Repo) Locks(ctx context.Context) ([]*LockInfo, error) {
	var objs []sink.ObjectInfo
	if err := r.store.List(ctx, "locks/", func(o sink.ObjectInfo) error {
		if _, _, ok := parseLockKey(o.Key); ok {
			objs = append(objs, o)
		}
		return nil
	}); err != nil {
		return nil, err
	}
	var out []*LockInfo
	for _, o := range objs {
		l, err := r.readLock(ctx, o)
		if isNotFound(err) {
			continue // released meanwhile
		}
		if err != nil {
			return nil, err
		}
		out = append(out, l)
	}
	return out, nil
}

// readLock reads a lock object. One that cannot be decoded is returned as
// Damaged, its heartbeat the object's modification time, so it goes stale
// like any other.
func (r *Repo) readLock(ctx context.Context, o sink.ObjectInfo) (*LockInfo, error) {
	kind, id, _ := parseLockKey(o.Key)
	blob, err := r.store.Get(ctx, o.Key, nil)
	if err != nil {
		return nil, err
	}
	var l LockInfo
	b, err := r.meta.DecodeMeta(nil, blob)
	if err == nil {
		err = strictUnmarshal(b, &l)
	}
	if err == nil && (l.Kind != kind || l.ID != id) {
		err = fmt.Errorf("names lock %s-%s", l.Kind, l.ID)
	}
	if err != nil {
		return &LockInfo{Kind: kind, ID: id, Key: o.Key, Heartbeat: o.Modified, Damaged: err.Error()}, nil
	}
	l.Key = o.Key
	return &l, nil
}

// Lock is a held repository lock.
type Lock struct {
	r      *Repo
	log    *slog.Logger
	cancel context.CancelCauseFunc
	done   chan struct{}

	mu     sync.Mutex
	info   LockInfo
	lastOK time.Time // when the last successful write of the lock began (monotonic)
	lost   error
}

// Lock takes a lock of kind for purpose (a short description: "backup
// web1", "gc"). A shared lock waits while a live exclusive lock exists; an
// exclusive lock fails with ErrLocked when another live exclusive lock
// exists, and otherwise waits until no live shared lock does (stale ones
// it lists as broken). Waiting is logged with who is waited for. The
// returned context is cancelled, with cause ErrLockLost, when the lock is
// lost; work done under the lock uses it. Release the lock when done.
func (r *Repo) Lock(ctx context.Context, kind, purpose string, log *slog.Logger) (*Lock, context.Context, error) {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	host, _ := os.Hostname()
	pid := os.Getpid()
	for attempt := 0; ; attempt++ {
		l := &Lock{r: r, log: log, done: make(chan struct{}), info: LockInfo{Version: FormatVersion, Kind: kind,
			ID: randomHex(8), Purpose: purpose, Host: host, PID: pid, Process: processIdentity(pid), Started: time.Now().UTC()}}
		l.info.Key = lockKey(kind, l.info.ID)
		// A shared locker looks before it writes, so that while gc holds
		// the exclusive lock, waiting backups do not keep adding locks;
		// it looks again after writing, for a gc that came meanwhile.
		blocker, err := l.blocker(ctx)
		if err == nil && blocker == nil {
			if err = l.write(ctx, true); err == nil {
				if blocker, err = l.blocker(ctx); err != nil || blocker != nil {
					l.remove()
				}
			}
		}
		if err != nil {
			return nil, nil, err
		}
		if blocker == nil {
			if kind == LockExclusive {
				if err := l.waitShared(ctx); err != nil {
					l.remove()
					return nil, nil, err
				}
			}
			lctx, cancel := context.WithCancelCause(ctx)
			l.cancel = cancel
			go l.heartbeat(lctx)
			return l, lctx, nil
		}
		if kind == LockExclusive && attempt >= 2 {
			return nil, nil, fmt.Errorf("%s: %w by another gc: %s (if that process is dead, nbdmover unlock removes its lock once it is stale)",
				r.Location(), ErrLocked, blocker.Holder())
		}
		if attempt == 0 {
			log.Info("waiting for the repository's exclusive lock to be released", "holder", blocker.Holder())
		}
		// Back off with jitter: two exclusive lockers that saw each other
		// do not meet again.
		if err := sleep(ctx, lockTiming.Poll/2+mrand.N(lockTiming.Poll)); err != nil {
			return nil, nil, err
		}
	}
}

// blocker returns a live exclusive lock other than l, or nil.
func (l *Lock) blocker(ctx context.Context) (*LockInfo, error) {
	locks, err := l.r.Locks(ctx)
	if err != nil {
		return nil, err
	}
	now := time.Now()
	for _, o := range locks {
		if o.Kind == LockExclusive && o.Key != l.info.Key && o.Stale(now) == "" {
			return o, nil
		}
	}
	return nil, nil
}

// waitShared waits until no live shared lock exists; the stale ones are
// recorded in l's Broken list (written before it returns), so that their
// holders, should they be alive after all, refuse to commit.
func (l *Lock) waitShared(ctx context.Context) error {
	logged := ""
	for {
		locks, err := l.r.Locks(ctx)
		if err != nil {
			return err
		}
		now := time.Now()
		var live []string
		l.mu.Lock()
		before := len(l.info.Broken)
		for _, o := range locks {
			if o.Kind != LockShared {
				continue
			}
			if why := o.Stale(now); why != "" {
				if !slices.Contains(l.info.Broken, o.ID) {
					l.info.Broken = append(l.info.Broken, o.ID)
					l.log.Warn("going past a stale lock", "holder", o.Holder(), "why", why)
				}
			} else {
				live = append(live, o.Holder())
			}
		}
		grew := len(l.info.Broken) > before
		l.mu.Unlock()
		if grew {
			if err := l.write(ctx, false); err != nil {
				return err
			}
		}
		if len(live) == 0 {
			return nil
		}
		if s := strings.Join(live, "; "); s != logged {
			l.log.Info("waiting for the backups, restores and verifies that hold the repository to finish", "holders", s)
			logged = s
		}
		if err := sleep(ctx, lockTiming.Poll); err != nil {
			return err
		}
		if err := l.refreshIfDue(ctx); err != nil {
			return err
		}
	}
}

// write stores the lock with a fresh heartbeat: a conditional create for
// a new lock, else a rewrite of one that must still exist (a lock removed
// by unlock is not brought back).
func (l *Lock) write(ctx context.Context, create bool) error {
	began := time.Now()
	l.mu.Lock()
	l.info.Heartbeat = began.UTC()
	b, err := json.Marshal(&l.info)
	l.mu.Unlock()
	if err != nil {
		return err
	}
	blob := l.r.meta.Encode(nil, b)
	if create {
		err = l.r.store.Create(ctx, l.info.Key, blob)
	} else {
		_, err = l.r.store.Stat(ctx, l.info.Key)
		if isNotFound(err) {
			err = fmt.Errorf("%w: %s was removed (by nbdmover unlock?)", ErrLockLost, l.info.Key)
		}
		if err == nil {
			err = l.r.store.Put(ctx, l.info.Key, blob)
		}
	}
	if err != nil {
		return err
	}
	l.mu.Lock()
	l.lastOK = began
	l.mu.Unlock()
	return nil
}

func (l *Lock) refreshIfDue(ctx context.Context) error {
	l.mu.Lock()
	due := time.Since(l.lastOK) >= lockTiming.Refresh
	l.mu.Unlock()
	if !due {
		return nil
	}
	return l.write(ctx, false)
}

// heartbeat refreshes the lock until it is released, and gives it up
// (cancelling its context) once it has not been refreshed for
// lockTiming.Stale - lockTiming.Margin: before anyone may call it stale.
func (l *Lock) heartbeat(ctx context.Context) {
	defer close(l.done)
	for {
		l.mu.Lock()
		left := lockTiming.Stale - lockTiming.Margin - time.Since(l.lastOK)
		l.mu.Unlock()
		wait := min(lockTiming.Refresh, left)
		if wait <= 0 {
			l.lose(fmt.Errorf("%w: %s could not be refreshed for %s", ErrLockLost, l.info.Key, lockTiming.Stale-lockTiming.Margin))
			return
		}
		if sleep(ctx, wait) != nil {
			return
		}
		err := l.write(ctx, false)
		switch {
		case errors.Is(err, ErrLockLost):
			l.lose(err)
			return
		case err != nil && ctx.Err() == nil:
			l.log.Warn("could not refresh the repository lock (trying again)", "lock", l.info.Key, "error", err)
		}
	}
}

func (l *Lock) lose(err error) {
	l.mu.Lock()
	if l.lost == nil {
		l.lost = err
	}
	l.mu.Unlock()
	l.log.Error("lost the repository lock", "error", err)
	l.cancel(err)
}

// Check tells whether the lock still holds: it exists, was refreshed in
// time, and (a shared lock) no exclusive lock lists it as broken; an
// exclusive lock also checks that no live shared lock has appeared. On
// success it returns the time by which the work it guards must be done
// (a commit is given that deadline: after it, a gc may call the lock
// stale).
func (l *Lock) Check(ctx context.Context) (time.Time, error) {
	l.mu.Lock()
	lost, lastOK := l.lost, l.lastOK
	l.mu.Unlock()
	if lost != nil {
		return time.Time{}, lost
	}
	deadline := lastOK.Add(lockTiming.Stale - lockTiming.Margin)
	if time.Until(deadline) <= 0 {
		return time.Time{}, fmt.Errorf("%w: %s not refreshed since %s", ErrLockLost, l.info.Key, lastOK.Format(time.RFC3339))
	}
	if _, err := l.r.store.Stat(ctx, l.info.Key); err != nil {
		if isNotFound(err) {
			err = fmt.Errorf("%w: %s was removed (by nbdmover unlock?)", ErrLockLost, l.info.Key)
		}
		return time.Time{}, err
	}
	locks, err := l.r.Locks(ctx)
	if err != nil {
		return time.Time{}, err
	}
	now := time.Now()
	for _, o := range locks {
		switch {
		case l.info.Kind == LockShared && o.Kind == LockExclusive && slices.Contains(o.Broken, l.info.ID):
			return time.Time{}, fmt.Errorf("%w: a gc took %s for stale (%s)", ErrLockLost, l.info.Key, o.Holder())
		case l.info.Kind == LockExclusive && o.Kind == LockShared && !slices.Contains(l.info.Broken, o.ID) && o.Stale(now) == "":
			// A shared locker that finds the exclusive lock removes its
			// own at once; one still there a poll later did not see it.
			if err := sleep(ctx, lockTiming.Poll); err != nil {
				return time.Time{}, err
			}
			if _, err := l.r.store.Stat(ctx, o.Key); !isNotFound(err) {
				return time.Time{}, fmt.Errorf("%w: %s appeared while %s was held (was it removed by nbdmover unlock?)",
					ErrLockLost, o.Holder(), l.info.Key)
			}
		}
	}
	return deadline.Add(lockTiming.Margin / 2), nil
}

// Release stops the heartbeat and removes the lock.
func (l *Lock) Release() {
	l.cancel(nil)
	<-l.done
	l.remove()
}

func (l *Lock) remove() {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if err := l.r.store.Delete(ctx, l.info.Key); err != nil {
		l.log.Warn("could not remove the repository lock (it goes stale; nbdmover unlock removes it)", "lock", l.info.Key, "error", err)
	}
}

// Unlock removes the stale locks (and every lock when all, which is only
// safe when no nbdmover uses the repository) and returns the removed ones
// and the live ones it left.
func (r *Repo) Unlock(ctx context.Context, all bool) (removed, live []*LockInfo, err error) {
	locks, err := r.Locks(ctx)
	if err != nil {
		return nil, nil, err
	}
	now := time.Now()
	for _, l := range locks {
		if !all && l.Stale(now) == "" {
			live = append(live, l)
			continue
		}
		if err := r.store.Delete(ctx, l.Key); err != nil {
			return removed, live, err
		}
		removed = append(removed, l)
	}
	return removed, live, nil
}

func randomHex(n int) string {
	b := make([]byte, n)
	rand.Read(b)
	return hex.EncodeToString(b)
}

func sleep(ctx context.Context, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return nil
	case <-ctx.Done():
		return context.Cause(ctx)
	}
}
