package lock

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"github.com/nbdmover/nbdmover/internal/liveness"
	"log/slog"
	mrand "math/rand/v2"
	"os"
	"strings"
	"sync"
	"time"
	"unicode/utf8"

	"github.com/nbdmover/nbdmover/sink"
)

// Kinds of lock.
const (
	Shared    = "shared"
	Exclusive = "exclusive"
)

// ExportPurpose is the purpose of the shared lock of an NBD export of
// backup domain/id: list shows such backups as exported, and gc does not
// take its exclusive lock while one is live (it would wait for an export
// that may serve for days, and new backups with it).
func ExportPurpose(domain, id string) string { return "export " + domain + "/" + id }

// ExportedBackup says which backup ("domain/id") a lock's purpose
// exports, if it is an export's.
func ExportedBackup(purpose string) (string, bool) { return strings.CutPrefix(purpose, "export ") }

// Config is where the locks live and how their objects are written.
type Config struct {
	Store    sink.Store
	Location string // the repository's, for messages
	Version  int    // the format version written into lock objects
	// Encode seals the plaintext of the object at key (a meta blob);
	// Decode opens one read from key.
	Encode func(key string, plain []byte) []byte
	Decode func(key string, blob []byte) ([]byte, error)
	// MaxObject is the largest lock or tombstone object read; Fits
	// refuses to write a plaintext of n bytes at key that a reader would
	// refuse.
	MaxObject int64
	Fits      func(key string, n int) error
}

// Locks are a repository's locks. Copies of a repository (its views) share
// one Locks. It is safe for concurrent use.
type Locks struct {
	c    Config
	seen struct {
		mu sync.Mutex
		at map[string]time.Time // damaged locks: when this process first saw each
	}
}

// New returns the locks of the repository c describes.
func New(c Config) *Locks {
	s := &Locks{c: c}
	s.seen.at = map[string]time.Time{}
	return s
}

// get reads the lock or tombstone object at key, refusing one larger than
// MaxObject.
func (s *Locks) get(ctx context.Context, key string) ([]byte, error) {
	return s.c.Store.Get(ctx, key, nil, s.c.MaxObject)
}

// putMeta stores v, as JSON, as the meta blob under key.
func (s *Locks) putMeta(ctx context.Context, key string, v any) error {
	b, err := json.Marshal(v)
	if err == nil {
		err = s.c.Fits(key, len(b))
	}
	if err != nil {
		return err
	}
	return s.c.Store.Put(ctx, key, s.c.Encode(key, b))
}

// Timing: how often a holder refreshes its lock's heartbeat, when a
// lock without a heartbeat is stale, how long before that a holder gives
// up its lock (and fails) rather than risk being thought dead, and how
// often a waiter looks again. Only tests may change them (to shorten
// them); the protocol's safety rests on every process using the same.
// Wait bounds every wait for a lock (a backup for a gc's sweep, a gc for
// running backups); Damaged is how long a lock object that cannot be read
// counts as held (a live holder rewrites its lock every minute).
var Timing = struct{ Refresh, Stale, Margin, Poll, Wait, Damaged time.Duration }{
	time.Minute, 30 * time.Minute, 5 * time.Minute, 2 * time.Second, 2 * time.Hour, 2 * time.Minute}

// ErrLocked: the lock cannot be had (another gc holds the exclusive lock).
var ErrLocked = errors.New("the repository is locked")

// ErrLost: a holder's lock was removed, broken by a gc, or not
// refreshed in time; what it was doing must not commit.
var ErrLost = errors.New("the repository lock was lost")

// Info is the content of a lock object.
type Info struct {
	Version   int       `json:"version"`
	Kind      string    `json:"kind"` // Shared or Exclusive
	ID        string    `json:"id"`   // 16 hex digits, also in the key
	Purpose   string    `json:"purpose"`
	Host      string    `json:"host"`
	Machine   string    `json:"machine,omitempty"` // /etc/machine-id: two hosts of one name are told apart
	PID       int       `json:"pid"`
	Process   string    `json:"process,omitempty"` // boot id and start time of the process: tells a reused pid
	Started   time.Time `json:"started"`
	Heartbeat time.Time `json:"heartbeat"`

	Key     string `json:"-"`
	Damaged string `json:"-"` // why the object could not be read (then only Kind, Key and Heartbeat, its mtime, are known)
	// seen is when this process first saw the damaged lock.
	seen time.Time
}

func key(kind, id string) string { return "locks/" + kind + "-" + id }

// tombstoneKey marks lock id as taken for stale.
func tombstoneKey(id string) string { return "locks/broken-" + id }

// parseKey returns the kind and id a lock key names.
func parseKey(key string) (kind, id string, ok bool) {
	rest, found := strings.CutPrefix(key, "locks/")
	if !found {
		return "", "", false
	}
	kind, id, found = strings.Cut(rest, "-")
	if !found || (kind != Shared && kind != Exclusive) || len(id) != 16 {
		return "", "", false
	}
	if _, err := hex.DecodeString(id); err != nil {
		return "", "", false
	}
	return kind, id, true
}

// Stale says why the lock is no longer held by a live process ("" when it
// may be): no heartbeat for Timing.Stale, or, on this machine (same
// host name and machine id), its process is provably gone. When /proc
// cannot tell, the process counts as alive. A heartbeat further ahead of
// this clock than clocks may differ (Timing.Margin) proves nothing:
// such a lock ages from when this process first saw it.
//
// A lock object that cannot be read (Damaged) is no lock a live holder
// keeps, as one rewrites its lock every minute, but one damaged under a
// live holder cannot be told from a planted one. A damaged exclusive lock
// is stale Timing.Damaged after it was written or first seen,
// whichever came first (its writer can keep touching it; going past a
// live gc is safe, as its tombstone stops it). A damaged shared lock goes
// stale only as any other does: gc never goes past a backup that may be
// live, and refuses to wait for one instead (damagedShared).
func (l *Info) Stale(now time.Time) string {
	hb := l.Heartbeat
	if hb.Round(0).Sub(now.Round(0)) > Timing.Margin && !l.seen.IsZero() {
		hb = l.seen
	}
	if age := now.Round(0).Sub(hb.Round(0)); age > Timing.Stale {
		return fmt.Sprintf("no heartbeat for %s", age.Round(time.Second))
	}
	if l.Damaged != "" && l.Kind == Exclusive {
		if a := max(now.Round(0).Sub(l.Heartbeat.Round(0)), now.Sub(l.seen)); a > Timing.Damaged {
			return fmt.Sprintf("unreadable for over %s", Timing.Damaged)
		}
	}
	host, _ := os.Hostname()
	if l.Damaged == "" && l.Host == host && l.Machine != "" && l.Machine == liveness.MachineID() && liveness.Gone(l.PID, l.Process) {
		return fmt.Sprintf("process %d is gone", l.PID)
	}
	return ""
}

// Holder names who holds the lock, for messages.
func (l *Info) Holder() string {
	if l.Damaged != "" {
		return fmt.Sprintf("%s lock %s (unreadable: %s; written %s)", l.Kind, l.Key, l.Damaged, l.Heartbeat.UTC().Format(time.RFC3339))
	}
	return fmt.Sprintf("%s lock of %s by pid %d on %s since %s (heartbeat %s)", l.Kind, l.Purpose, l.PID, l.Host,
		l.Started.UTC().Format(time.RFC3339), l.Heartbeat.UTC().Format(time.RFC3339))
}

// List returns every lock object in the repository.
func (s *Locks) List(ctx context.Context) ([]*Info, error) {
	var objs []sink.ObjectInfo
	if err := s.c.Store.List(ctx, "locks/", func(o sink.ObjectInfo) error {
		if _, _, ok := parseKey(o.Key); ok {
			objs = append(objs, o)
		}
		return nil
	}); err != nil {
		return nil, err
	}
	var out []*Info
	listed := map[string]bool{}
	for _, o := range objs {
		l, err := s.readLock(ctx, o)
		if errors.Is(err, sink.ErrNotFound) {
			continue // released meanwhile
		}
		if err != nil {
			return nil, err
		}
		out = append(out, l)
		listed[o.Key] = true
	}
	s.forgetUnseen(listed)
	return out, nil
}

// readLock reads a lock object. One that cannot be read or decoded (but
// is there, and the store answers) is returned as Damaged, its heartbeat
// the object's modification time.
func (s *Locks) readLock(ctx context.Context, o sink.ObjectInfo) (*Info, error) {
	kind, id, _ := parseKey(o.Key)
	blob, err := s.get(ctx, o.Key)
	if errors.Is(err, sink.ErrNotFound) || sink.IsTransient(err) || ctx.Err() != nil {
		return nil, err
	}
	var l Info
	var b []byte
	if err == nil {
		b, err = s.c.Decode(o.Key, blob)
	}
	if err == nil {
		err = json.Unmarshal(b, &l) // fields a later nbdmover adds are fine
	}
	if err == nil && (l.Kind != kind || l.ID != id) {
		err = fmt.Errorf("names lock %s-%s", l.Kind, l.ID)
	}
	if err != nil {
		return &Info{Kind: kind, ID: id, Key: o.Key, Heartbeat: o.Modified, Damaged: err.Error(), seen: s.firstSeen(o.Key)}, nil
	}
	l.Key, l.seen = o.Key, s.firstSeen(o.Key)
	return &l, nil
}

// forgetUnseen drops, of the times locks were first seen, those of locks
// no longer listed.
func (s *Locks) forgetUnseen(listed map[string]bool) {
	s.seen.mu.Lock()
	defer s.seen.mu.Unlock()
	for k := range s.seen.at {
		if !listed[k] {
			delete(s.seen.at, k)
		}
	}
}

// firstSeen is when this process first saw the lock at key.
func (s *Locks) firstSeen(key string) time.Time {
	s.seen.mu.Lock()
	defer s.seen.mu.Unlock()
	t, ok := s.seen.at[key]
	if !ok {
		t = time.Now()
		s.seen.at[key] = t
	}
	return t
}

// NoLockHint adds to the error of a shared lock that could not be
// written for want of permission (a read-only repository) that --no-lock
// reads without it, and what that risks.
func NoLockHint(err error) error {
	if !sink.IsDenied(err) {
		return err
	}
	return fmt.Errorf("%w: the repository's shared lock cannot be written here (a read-only repository?); "+
		"--no-lock reads without it, at the risk that a gc running elsewhere deletes what is being read", err)
}

// Lock is a held repository lock.
type Lock struct {
	s      *Locks
	log    *slog.Logger
	cancel context.CancelCauseFunc
	done   chan struct{}

	mu     sync.Mutex
	info   Info
	lastOK time.Time // when the last successful write of the lock began
	lost   error
	broken map[string]bool // exclusive: the shared locks it tombstoned
}

// Info is what the lock's object says now.
func (l *Lock) Info() Info {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.info
}

// shorten cuts s to at most n bytes (on a rune boundary), marking the cut.
func shorten(s string, n int) string {
	if len(s) <= n {
		return s
	}
	for n > 0 && !utf8.RuneStart(s[n]) {
		n--
	}
	return s[:n] + "…"
}

// age is how long ago t was, by the monotonic clock or the wall clock,
// whichever says longer (the monotonic clock stops while a machine
// sleeps; the others judge by their wall clocks).
func age(t time.Time) time.Duration {
	return max(time.Since(t), time.Now().Round(0).Sub(t.Round(0)))
}

// Lock takes a lock of kind for purpose (a short description: "backup
// web1", "gc"). A shared lock waits while a live exclusive lock exists; an
// exclusive lock fails with ErrLocked when another live exclusive lock
// exists, and otherwise waits until no live shared lock does (stale ones
// it tombstones). Waiting is logged with who is waited for. The
// returned context is cancelled, with cause ErrLost, when the lock is
// lost; work done under the lock uses it. Release the lock when done.
func (s *Locks) Take(ctx context.Context, kind, purpose string, log *slog.Logger) (*Lock, context.Context, error) {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	host, _ := os.Hostname()
	pid := os.Getpid()
	began := time.Now()
	for attempt := 0; ; attempt++ {
		l := &Lock{s: s, log: log, done: make(chan struct{}), broken: map[string]bool{}, info: Info{Version: s.c.Version,
			Kind: kind, ID: randomHex(8), Purpose: purpose, Host: host, Machine: liveness.MachineID(), PID: pid,
			Process: liveness.Identity(pid), Started: time.Now().UTC()}}
		l.info.Key = key(kind, l.info.ID)
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
			if kind == Exclusive {
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
		if kind == Exclusive && attempt >= 2 {
			return nil, nil, fmt.Errorf("%s: %w by another gc: %s (if that process is dead, nbdmover unlock removes its lock once it is stale)",
				s.c.Location, ErrLocked, blocker.Holder())
		}
		if time.Since(began) > Timing.Wait {
			return nil, nil, fmt.Errorf("%s: %w: waited %s for the %s (if that process is dead, nbdmover unlock removes its lock once it is stale)",
				s.c.Location, ErrLocked, Timing.Wait, blocker.Holder())
		}
		if attempt == 0 {
			log.Info("waiting for the repository's exclusive lock to be released", "holder", blocker.Holder(), "at most", Timing.Wait)
		}
		// Back off with jitter: two exclusive lockers that saw each other
		// do not meet again.
		if err := sleep(ctx, Timing.Poll/2+mrand.N(Timing.Poll)); err != nil {
			return nil, nil, err
		}
	}
}

// blocker returns a live exclusive lock other than l, or nil.
func (l *Lock) blocker(ctx context.Context) (*Info, error) {
	locks, err := l.s.List(ctx)
	if err != nil {
		return nil, err
	}
	now := time.Now()
	for _, o := range locks {
		if o.Kind != Exclusive || o.Key == l.info.Key || l.broken[o.ID] {
			continue
		}
		why := o.Stale(now)
		if why == "" {
			return o, nil
		}
		// Going past a stale gc: its tombstone stops it, should it wake
		// up (a machine back from sleep) and try to delete more.
		if err := l.s.breakLock(ctx, o, why, l.info.Purpose+" "+l.info.ID); err != nil {
			return nil, err
		}
		l.broken[o.ID] = true
		l.log.Warn("going past a stale lock", "holder", o.Holder(), "why", why)
	}
	return nil, nil
}

// waitShared waits until no live shared lock exists; the stale ones get
// tombstones (written before it returns), so that their holders, should
// they be alive after all, refuse to commit.
func (l *Lock) waitShared(ctx context.Context) error {
	logged := ""
	deadline := time.Now().Add(Timing.Wait)
	for {
		live, err := l.sharedHolders(ctx)
		if err != nil {
			return err
		}
		if len(live) == 0 {
			return nil
		}
		var names []string
		for _, o := range live {
			names = append(names, o.Holder())
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%s: %w: waited %s for the backups, restores, verifies and forgets that hold it to finish: %s",
				l.s.c.Location, ErrLocked, Timing.Wait, strings.Join(names, "; "))
		}
		if s := strings.Join(names, "; "); s != logged {
			l.log.Info("waiting for the backups, restores, verifies and forgets that hold the repository to finish", "holders", s, "at most", time.Until(deadline).Round(time.Second))
			logged = s
		}
		if err := sleep(ctx, Timing.Poll); err != nil {
			return err
		}
		if err := l.refreshIfDue(ctx); err != nil {
			return err
		}
	}
}

// sharedHolders returns the live shared locks, after writing a tombstone
// for each stale one it has not tombstoned yet.
func (l *Lock) sharedHolders(ctx context.Context) ([]*Info, error) {
	locks, err := l.s.List(ctx)
	if err != nil {
		return nil, err
	}
	now := time.Now()
	var live []*Info
	for _, o := range locks {
		if o.Kind != Shared || l.broken[o.ID] {
			continue
		}
		why := o.Stale(now)
		if why == "" && o.Damaged != "" {
			return nil, l.s.DamagedShared(o)
		}
		if why == "" {
			live = append(live, o)
			continue
		}
		if err := l.s.breakLock(ctx, o, why, l.info.Purpose+" "+l.info.ID); err != nil {
			return nil, err
		}
		l.broken[o.ID] = true
		l.log.Warn("going past a stale lock", "holder", o.Holder(), "why", why)
	}
	return live, nil
}

// DamagedShared is gc's refusal of a shared lock it cannot read: it may be
// a live backup's, whose chunks gc must not delete, and waiting for it
// would hold up every backup behind gc's exclusive lock.
func (s *Locks) DamagedShared(o *Info) error {
	return fmt.Errorf("%s: %w: %s cannot be read (%s), so gc cannot tell whether a backup holds it; "+
		"if no nbdmover uses the repository now, nbdmover unlock removes it", s.c.Location, ErrLocked, o.Key, o.Damaged)
}

// tombstone is the content of locks/broken-<id>.
type tombstone struct {
	Version int       `json:"version"`
	Lock    string    `json:"lock"` // the lock's key
	Holder  string    `json:"holder"`
	Why     string    `json:"why"`
	By      string    `json:"by"`
	Broken  time.Time `json:"broken"`
}

// breakLock writes lock o's tombstone.
func (s *Locks) breakLock(ctx context.Context, o *Info, why, by string) error {
	host, _ := os.Hostname()
	// The holder's words come from a lock anyone may have written:
	// shortened, so that its tombstone always fits.
	return s.putMeta(ctx, tombstoneKey(o.ID), tombstone{Version: s.c.Version, Lock: o.Key, Holder: shorten(o.Holder(), 1024), Why: why,
		By: fmt.Sprintf("%s (pid %d on %s)", by, os.Getpid(), host), Broken: time.Now().UTC()})
}

// tombstoned reports whether lock id has a tombstone.
func (s *Locks) tombstoned(ctx context.Context, id string) error {
	_, err := s.c.Store.Stat(ctx, tombstoneKey(id))
	switch {
	case err == nil:
		return fmt.Errorf("%w: lock %s was taken for stale (by a gc or nbdmover unlock; %s says why)", ErrLost, id, tombstoneKey(id))
	case errors.Is(err, sink.ErrNotFound):
		return nil
	}
	return err
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
	blob := l.s.c.Encode(l.info.Key, b)
	if create {
		err = l.s.c.Store.Create(ctx, l.info.Key, blob)
		if errors.Is(err, sink.ErrExists) {
			err = nil // the name is random: an earlier attempt landed, its answer did not
		} else if err != nil {
			l.remove() // it may have landed all the same
		}
	} else {
		l.mu.Lock()
		last := l.lastOK
		l.mu.Unlock()
		if a := age(last); a >= Timing.Stale-Timing.Margin {
			// Others may take it for stale by now (this machine slept, or
			// the store was out of reach): refreshing is too late.
			return fmt.Errorf("%w: %s was last refreshed %s ago", ErrLost, l.info.Key, a.Round(time.Second))
		}
		_, err = l.s.c.Store.Stat(ctx, l.info.Key)
		if errors.Is(err, sink.ErrNotFound) {
			err = fmt.Errorf("%w: %s was removed (by nbdmover unlock?)", ErrLost, l.info.Key)
		}
		if err == nil {
			err = l.s.tombstoned(ctx, l.info.ID)
		}
		if err == nil {
			err = l.s.c.Store.Put(ctx, l.info.Key, blob)
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
	due := age(l.lastOK) >= Timing.Refresh
	l.mu.Unlock()
	if !due {
		return nil
	}
	return l.write(ctx, false)
}

// heartbeat refreshes the lock until it is released, and gives it up
// (cancelling its context) once it has not been refreshed for
// Timing.Stale - Timing.Margin: before anyone may call it stale.
func (l *Lock) heartbeat(ctx context.Context) {
	defer close(l.done)
	for {
		l.mu.Lock()
		left := Timing.Stale - Timing.Margin - age(l.lastOK)
		l.mu.Unlock()
		wait := min(Timing.Refresh, left)
		if wait <= 0 {
			l.lose(fmt.Errorf("%w: %s could not be refreshed for %s", ErrLost, l.info.Key, Timing.Stale-Timing.Margin))
			return
		}
		if sleep(ctx, wait) != nil {
			return
		}
		err := l.write(ctx, false)
		switch {
		case errors.Is(err, ErrLost):
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
// time, and has no tombstone; for the exclusive lock, also that no live
// shared lock has appeared (a stale one gets a tombstone). On success it
// returns the time by which the work it guards must be done (a commit is
// given that deadline: after it, a gc may call the lock stale).
func (l *Lock) Check(ctx context.Context) (time.Time, error) {
	l.mu.Lock()
	lost, lastOK := l.lost, l.lastOK
	l.mu.Unlock()
	if lost != nil {
		return time.Time{}, lost
	}
	left := Timing.Stale - Timing.Margin - age(lastOK)
	if left <= 0 {
		return time.Time{}, fmt.Errorf("%w: %s not refreshed since %s", ErrLost, l.info.Key, lastOK.Format(time.RFC3339))
	}
	deadline := time.Now().Add(left + Timing.Margin/2)
	// The lock and its tombstone are asked at once (one round trip to S3
	// instead of two): both answers must be in before it holds.
	tomb := make(chan error, 1)
	go func() { tomb <- l.s.tombstoned(ctx, l.info.ID) }()
	_, err := l.s.c.Store.Stat(ctx, l.info.Key)
	terr := <-tomb
	if err != nil {
		if errors.Is(err, sink.ErrNotFound) {
			err = fmt.Errorf("%w: %s was removed (by nbdmover unlock?)", ErrLost, l.info.Key)
		}
		return time.Time{}, err
	}
	if terr != nil {
		return time.Time{}, terr
	}
	if l.info.Kind == Shared {
		return deadline, nil
	}
	// A shared locker that finds the exclusive lock removes its own at
	// once; one still there a few polls later did not see it.
	for tries := 0; ; tries++ {
		live, err := l.sharedHolders(ctx)
		if err != nil || len(live) == 0 {
			return deadline, err
		}
		if tries == 3 {
			return time.Time{}, fmt.Errorf("%w: %s appeared while %s was held (was %s removed by nbdmover unlock?)",
				ErrLost, live[0].Holder(), l.info.Key, l.info.Key)
		}
		if err := sleep(ctx, Timing.Poll); err != nil {
			return time.Time{}, err
		}
	}
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
	if err := l.s.c.Store.Delete(ctx, l.info.Key); err != nil {
		l.log.Warn("could not remove the repository lock (it goes stale; nbdmover unlock removes it)", "lock", l.info.Key, "error", err)
	}
}

// Unlock removes the stale locks (and every lock when all, which is only
// safe when no nbdmover uses the repository), each after writing its
// tombstone, and returns the removed ones and the live ones it left. It
// also removes tombstones older than Timing.Stale whose lock is gone
// (its holder has noticed, or is dead).
func (s *Locks) Unlock(ctx context.Context, all bool) (removed, live []*Info, err error) {
	locks, err := s.List(ctx)
	if err != nil {
		return nil, nil, err
	}
	now := time.Now()
	for _, l := range locks {
		why := l.Stale(now)
		if why == "" && l.Damaged != "" {
			why = "unreadable: " + l.Damaged // no holder can be told, none refreshes it
		}
		if !all && why == "" {
			live = append(live, l)
			continue
		}
		if why == "" {
			why = "removed with --remove-all"
		}
		if err := s.breakLock(ctx, l, why, "nbdmover unlock"); err != nil {
			return removed, live, err
		}
		if err := s.c.Store.Delete(ctx, l.Key); err != nil {
			return removed, live, err
		}
		removed = append(removed, l)
	}
	return removed, live, s.pruneTombstones(ctx)
}

// pruneTombstones removes the tombstones older than Timing.Stale
// whose lock object no longer exists.
func (s *Locks) pruneTombstones(ctx context.Context) error {
	held := map[string]bool{}
	var old []string
	err := s.c.Store.List(ctx, "locks/", func(o sink.ObjectInfo) error {
		if _, id, ok := parseKey(o.Key); ok {
			held[id] = true
		} else if id, ok := strings.CutPrefix(o.Key, "locks/broken-"); ok && !o.Modified.IsZero() && age(o.Modified) > Timing.Stale {
			old = append(old, id)
		}
		return nil
	})
	if err != nil {
		return err
	}
	for _, id := range old {
		if !held[id] {
			if err := s.c.Store.Delete(ctx, tombstoneKey(id)); err != nil {
				return err
			}
		}
	}
	return nil
}

// WithDeadline is context.WithDeadline that also watches the wall clock:
// timers run on the monotonic clock, which stops while the machine
// sleeps, and others judge a lock by their wall clocks.
func WithDeadline(ctx context.Context, deadline time.Time) (context.Context, context.CancelFunc) {
	dctx, cancel := context.WithDeadline(ctx, deadline)
	wall := deadline.Round(0)
	go func() {
		t := time.NewTicker(time.Second)
		defer t.Stop()
		for {
			select {
			case <-dctx.Done():
				return
			case <-t.C:
				if time.Now().Round(0).After(wall) {
					cancel()
					return
				}
			}
		}
	}()
	return dctx, cancel
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
