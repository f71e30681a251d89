package repo

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"github.com/nbdmover/nbdmover/repo/lock"
	"sort"
	"strings"
	"time"

	"github.com/nbdmover/nbdmover/sink"
)

// Policy is a retention policy, with Proxmox Backup Server's semantics:
// the rules apply in the order of the fields, each keeps the newest
// backup of each of its last N periods (UTC; ISO weeks) that no backup
// kept by an earlier rule covers (protected backups are kept, but cover
// no period and are not counted), and KeepWithin keeps every backup
// younger than that (counted from the domain's newest backup). A nil
// field is a rule not given; a policy with none is invalid (forgetting
// everything is KeepLast 0, spelled out).
type Policy struct {
	KeepLast    *int     `json:"keep_last,omitempty"`
	KeepHourly  *int     `json:"keep_hourly,omitempty"`
	KeepDaily   *int     `json:"keep_daily,omitempty"`
	KeepWeekly  *int     `json:"keep_weekly,omitempty"`
	KeepMonthly *int     `json:"keep_monthly,omitempty"`
	KeepYearly  *int     `json:"keep_yearly,omitempty"`
	KeepWithin  Duration `json:"keep_within,omitempty"`
}

// Duration is a time.Duration that JSON spells as Go does ("36h").
type Duration time.Duration

func (d Duration) MarshalJSON() ([]byte, error) { return json.Marshal(time.Duration(d).String()) }

func (d *Duration) UnmarshalJSON(b []byte) error {
	var s string
	if err := json.Unmarshal(b, &s); err != nil {
		return fmt.Errorf("a duration is a string such as \"36h\": %w", err)
	}
	v, err := time.ParseDuration(s)
	if err != nil {
		return err
	}
	*d = Duration(v)
	return nil
}

// rule is one rule of a policy: its name, its count and the period a
// backup falls in.
type rule struct {
	name   string
	keep   *int
	period func(Decision) string
}

func (p Policy) rules() []rule {
	return []rule{
		{"last", p.KeepLast, func(d Decision) string { return d.ID }}, // every backup its own period
		{"hourly", p.KeepHourly, func(d Decision) string { return d.Created.Format("2006-01-02T15") }},
		{"daily", p.KeepDaily, func(d Decision) string { return d.Created.Format("2006-01-02") }},
		{"weekly", p.KeepWeekly, func(d Decision) string { y, w := d.Created.ISOWeek(); return fmt.Sprintf("%d-W%02d", y, w) }},
		{"monthly", p.KeepMonthly, func(d Decision) string { return d.Created.Format("2006-01") }},
		{"yearly", p.KeepYearly, func(d Decision) string { return d.Created.Format("2006") }},
	}
}

// Validate says why the policy cannot be applied.
func (p Policy) Validate() error {
	given := p.KeepWithin != 0
	for _, r := range p.rules() {
		if r.keep != nil {
			if *r.keep < 0 {
				return fmt.Errorf("keep-%s %d: must be 0 or more", r.name, *r.keep)
			}
			given = true
		}
	}
	if p.KeepWithin < 0 {
		return fmt.Errorf("keep-within %s: must be positive", time.Duration(p.KeepWithin))
	}
	if !given {
		return errors.New("a retention policy needs at least one keep option (to forget every backup, say keep-last 0)")
	}
	return nil
}

// String is the policy as forget's flags spell it.
func (p Policy) String() string {
	var parts []string
	for _, r := range p.rules() {
		if r.keep != nil {
			parts = append(parts, fmt.Sprintf("--keep-%s %d", r.name, *r.keep))
		}
	}
	if p.KeepWithin != 0 {
		parts = append(parts, "--keep-within "+time.Duration(p.KeepWithin).String())
	}
	return strings.Join(parts, " ")
}

// Decision is what a policy does with one backup.
type Decision struct {
	ID      string    `json:"id"`
	Created time.Time `json:"created"`
	Keep    bool      `json:"keep"`
	// Reason: the rule that keeps it ("last", "daily", ..., "within",
	// "protected"), or "" when it is forgotten.
	Reason string `json:"reason,omitempty"`
}

// Apply decides, for the backups of one domain (any order), which the
// policy keeps; protected backups (by id) are always kept. The decisions
// are newest first.
func (p Policy) Apply(ms []*Manifest, protected map[string]bool) []Decision {
	ds := make([]Decision, len(ms))
	for i, m := range ms {
		ds[i] = Decision{ID: m.ID, Created: m.Created.UTC()}
		if protected[m.ID] {
			ds[i].Keep, ds[i].Reason = true, "protected"
		}
	}
	sort.Slice(ds, func(i, j int) bool { return ds[i].ID > ds[j].ID })
	marked := make([]bool, len(ds)) // protected, or kept or forgotten by a rule before
	for i := range ds {
		marked[i] = ds[i].Keep
	}
	for _, r := range p.rules() {
		if r.keep == nil || *r.keep == 0 {
			continue
		}
		// Periods a backup kept by an earlier rule stands for (protected
		// backups stand for none, as in Proxmox's prune).
		covered := map[string]bool{}
		for _, d := range ds {
			if d.Keep && d.Reason != "protected" {
				covered[r.period(d)] = true
			}
		}
		chosen := map[string]bool{}
		for i := range ds {
			if marked[i] {
				continue
			}
			pid := r.period(ds[i])
			if covered[pid] {
				continue
			}
			if !chosen[pid] {
				if len(chosen) >= *r.keep {
					break
				}
				chosen[pid] = true
				ds[i].Keep, ds[i].Reason, marked[i] = true, r.name, true
			} else {
				marked[i] = true // an older backup of a period this rule kept one of
			}
		}
	}
	if p.KeepWithin > 0 && len(ds) > 0 {
		newest := ds[0].Created
		for i := range ds {
			if !ds[i].Keep && newest.Sub(ds[i].Created) < time.Duration(p.KeepWithin) {
				ds[i].Keep, ds[i].Reason = true, "within"
			}
		}
	}
	return ds
}

// ForgetResult is what Forget did for one domain.
type ForgetResult struct {
	Domain    string     `json:"domain"`
	Decisions []Decision `json:"backups"`
	Kept      int        `json:"kept"`
	Forgotten int        `json:"forgotten"`
	Skipped   []Problem  `json:"skipped,omitempty"` // manifests that cannot be read: neither counted nor forgotten
}

// Forget applies the policy to the backups of domain (of every domain
// when ""), deleting the manifests of the backups it does not keep (none
// when dryRun). Forgetting deletes manifests only: the objects they
// referenced are left to gc, and every backup stays restorable whatever
// else is forgotten (each names its whole index chain). A protected
// backup is never forgotten (see forgetOne); a real forget holds a shared
// lock, so that no gc sweeps while it may put a manifest back.
func (r *Repo) Forget(ctx context.Context, domain string, p Policy, dryRun bool) ([]ForgetResult, error) {
	return r.ForgetWith(ctx, domain, p, ForgetOptions{DryRun: dryRun})
}

// ErrNoBypass is matched by the error of a forget asked to bypass the
// governance mode of a repository that has none (bad usage).
var ErrNoBypass = errors.New("--bypass-governance")

// ForgetOptions are Forget's options.
type ForgetOptions struct {
	DryRun bool
	// BypassGovernance forgets backups inside their Object Lock window
	// too (governance mode; the credentials need the
	// s3:BypassGovernanceRetention permission), removing every version
	// of their manifests.
	BypassGovernance bool
}

// ForgetWith is Forget with options. In a repository with S3 Object
// Lock, a backup the policy forgets that is still inside its window is
// kept (reason "object-lock"), and the error, a *WindowError, names
// each with its window's end; the others are forgotten.
func (r *Repo) ForgetWith(ctx context.Context, domain string, p Policy, o ForgetOptions) ([]ForgetResult, error) {
	dryRun := o.DryRun
	if err := p.Validate(); err != nil {
		return nil, err
	}
	if o.BypassGovernance {
		switch lc := r.cfg.ObjectLock; {
		case lc == nil:
			return nil, fmt.Errorf("%w: %s has no S3 Object Lock", ErrNoBypass, r.Location())
		case lc.Mode != "governance":
			return nil, fmt.Errorf("%w: %s has S3 Object Lock in %s mode, which nobody can bypass", ErrNoBypass, r.Location(), lc.Mode)
		}
	}
	var held *lock.Lock
	if !dryRun {
		l, lctx, err := r.Lock(ctx, lock.Shared, "forget", nil)
		if err != nil {
			return nil, err
		}
		defer l.Release()
		held, ctx = l, lctx
	}
	ms, skipped, err := r.Backups(ctx, domain)
	if err != nil {
		return nil, err
	}
	if domain != "" && len(ms) == 0 && len(skipped) == 0 {
		return nil, fmt.Errorf("domain %s in %s: %w (nbdmover list shows the domains)", domain, r.Location(), ErrNoBackup)
	}
	protected, err := r.protectedIDs(ctx, domain)
	if err != nil {
		return nil, err
	}
	byDomain := map[string][]*Manifest{}
	for _, m := range ms {
		byDomain[m.Domain] = append(byDomain[m.Domain], m)
	}
	for _, s := range skipped {
		d, _, _ := strings.Cut(s.Backup, "/")
		if _, ok := byDomain[d]; !ok {
			byDomain[d] = nil
		}
	}
	var names []string
	for d := range byDomain {
		names = append(names, d)
	}
	sort.Strings(names)
	var out []ForgetResult
	windows := &WindowError{}
	if lc := r.cfg.ObjectLock; lc != nil {
		windows.Mode = lc.Mode
	}
	for _, d := range names {
		res := ForgetResult{Domain: d, Decisions: p.Apply(byDomain[d], protected[d])}
		byID := map[string]*Manifest{}
		for _, m := range byDomain[d] {
			byID[m.ID] = m
		}
		for _, s := range skipped {
			if strings.HasPrefix(s.Backup, d+"/") {
				res.Skipped = append(res.Skipped, s)
			}
		}
		for i, dec := range res.Decisions {
			if dec.Keep {
				res.Kept++
				continue
			}
			if m := byID[dec.ID]; m != nil && r.inWindow(m) && !o.BypassGovernance {
				res.Decisions[i].Keep, res.Decisions[i].Reason = true, "object-lock"
				res.Kept++
				windows.Backups = append(windows.Backups, LockedBackup{Backup: d + "/" + dec.ID, ProtectedUntil: m.ObjectLock.ProtectedUntil})
				continue
			}
			if !dryRun {
				if err := r.forgetOne(ctx, held, d, dec.ID, o.BypassGovernance); err != nil {
					if errors.Is(err, errProtected) {
						res.Decisions[i].Keep, res.Decisions[i].Reason = true, "protected"
						res.Kept++
						continue
					}
					return append(out, res), err
				}
			}
			res.Forgotten++
		}
		out = append(out, res)
	}
	if len(windows.Backups) > 0 {
		return out, windows
	}
	return out, nil
}

var errProtected = errors.New("protected")

// forgetOne deletes a backup's manifest unless it is protected. A protect
// that races it (the marker written after the first look) is seen by a
// second look after the deletion, and the manifest is put back, byte for
// byte: under forget's shared lock (checked first, like a commit) no gc
// has swept meanwhile.
//
// bypass (a repository with Object Lock in governance mode) removes every
// version of the manifest, with the governance bypass; otherwise, in a
// repository with Object Lock, the delete leaves a delete marker and gc
// removes the versions once their locks end.
func (r *Repo) forgetOne(ctx context.Context, held *lock.Lock, domain, id string, bypass bool) error {
	protected := func() (bool, error) {
		_, err := r.store.Stat(ctx, protectKey(domain, id))
		if isNotFound(err) {
			return r.held(ctx, domain, id)
		}
		return err == nil, err
	}
	if p, err := protected(); err != nil || p {
		if err == nil {
			err = errProtected
		}
		return err
	}
	key := ManifestKey(domain, id)
	blob, err := r.get(ctx, key, nil)
	if isNotFound(err) {
		return nil // forgotten meanwhile
	}
	if err != nil {
		return err
	}
	del := r.store.Delete
	if bypass {
		del = r.deleteManifestBypass
	}
	if err := del(ctx, key); err != nil {
		return err
	}
	p, err := protected()
	if !p && err == nil {
		return nil
	}
	deadline, cerr := held.Check(ctx)
	if cerr == nil {
		cctx, cancel := lock.WithDeadline(ctx, deadline)
		cerr = r.store.Create(cctx, key, blob)
		cancel()
	}
	if cerr != nil && !errors.Is(cerr, sink.ErrExists) {
		return fmt.Errorf("backup %s/%s was protected while it was being forgotten, but putting its manifest back failed, so it is forgotten (its objects stay until the next gc): %w", domain, id, cerr)
	}
	if err != nil {
		return err
	}
	return errProtected
}

// Protection markers: protected/<domain>/<rank>-<id>, a meta blob of
// JSON. A protected backup is kept by every policy.
func protectKey(domain, id string) string {
	return "protected/" + strings.TrimPrefix(ManifestKey(domain, id), "manifests/")
}

type protection struct {
	Version   int       `json:"version"`
	Domain    string    `json:"domain"`
	ID        string    `json:"id"`
	Protected time.Time `json:"protected"`
}

// Protect marks a committed backup as protected (or, with on false,
// removes the mark). Protecting a backup that is not committed fails.
func (r *Repo) Protect(ctx context.Context, domain, id string, on bool) error {
	if _, err := r.Backup(ctx, domain, id); err != nil {
		return err
	}
	key := protectKey(domain, id)
	if !on {
		return r.store.Delete(ctx, key)
	}
	return r.mark(ctx, domain, id, key, protection{Version: formatVersion, Domain: domain, ID: id, Protected: time.Now().UTC()})
}

// Holds: holds/<domain>/<rank>-<id>/<holder>, a meta blob of JSON, one
// object per holder. A held backup is kept by every policy, as a
// protected one is, while something needs it (an instant restore, until
// its disks are home); holders never share an object, so one's release
// never drops another's hold, and an operator's protection is never
// touched.
func holdPrefix(domain, id string) string {
	return "holds/" + strings.TrimPrefix(ManifestKey(domain, id), "manifests/") + "/"
}

type holdMarker struct {
	protection
	Holder string `json:"holder"`
}

// Hold holds a committed backup for holder (a name: letters, digits, '.',
// '_', '-'), or with on false releases that hold (releasing one that is
// not there is no error).
func (r *Repo) Hold(ctx context.Context, domain, id, holder string, on bool) error {
	for _, err := range []error{ValidName("domain", domain), ValidName("holder", holder), ValidBackupID(id)} {
		if err != nil {
			return err
		}
	}
	key := holdPrefix(domain, id) + holder
	if !on {
		err := r.store.Delete(ctx, key)
		if isNotFound(err) {
			return nil
		}
		return err
	}
	if _, err := r.Backup(ctx, domain, id); err != nil {
		return err
	}
	return r.mark(ctx, domain, id, key, holdMarker{protection{Version: formatVersion, Domain: domain, ID: id, Protected: time.Now().UTC()}, holder})
}

// mark writes a protection marker or a hold at key and checks the backup
// is still there.
func (r *Repo) mark(ctx context.Context, domain, id, key string, v any) error {
	if err := r.putMeta(ctx, key, v); err != nil {
		return err
	}
	// A forget may have deleted the manifest between the check and the
	// mark: then the mark protects nothing, and saying so is the truth
	// (a forget that sees the mark after its deletion puts the manifest
	// back: then this fails and the backup stays, unprotected).
	if _, err := r.store.Stat(ctx, ManifestKey(domain, id)); err != nil {
		r.store.Delete(ctx, key)
		if isNotFound(err) {
			return fmt.Errorf("backup %s/%s was forgotten meanwhile: %w", domain, id, ErrNoBackup)
		}
		return err
	}
	return nil
}

// held says whether a backup has a hold.
func (r *Repo) held(ctx context.Context, domain, id string) (bool, error) {
	found := false
	err := r.store.List(ctx, holdPrefix(domain, id), func(sink.ObjectInfo) error {
		found = true
		return errStopList
	})
	if errors.Is(err, errStopList) {
		err = nil
	}
	return found, err
}

var errStopList = errors.New("stop listing")

// protectedIDs returns the protected or held backup ids of domain
// (every domain when ""), by domain.
func (r *Repo) protectedIDs(ctx context.Context, domain string) (map[string]map[string]bool, error) {
	out := map[string]map[string]bool{}
	for _, kind := range []string{"protected/", "holds/"} {
		prefix := kind
		if domain != "" {
			prefix += domain + "/"
		}
		err := r.store.List(ctx, prefix, func(o sink.ObjectInfo) error {
			rest := strings.TrimPrefix(o.Key, kind)
			if kind == "holds/" {
				rest = rest[:max(0, strings.LastIndexByte(rest, '/'))]
			}
			d, id, ok := parseManifestKey("manifests/" + rest)
			if ok {
				if out[d] == nil {
					out[d] = map[string]bool{}
				}
				out[d][id] = true
			}
			return nil
		})
		if err != nil {
			return out, err
		}
	}
	return out, nil
}

// Protected returns the protected or held backups of domain (every
// domain when ""), as "domain/id".
func (r *Repo) Protected(ctx context.Context, domain string) (map[string]bool, error) {
	ids, err := r.protectedIDs(ctx, domain)
	out := map[string]bool{}
	for d, m := range ids {
		for id := range m {
			out[d+"/"+id] = true
		}
	}
	return out, err
}
