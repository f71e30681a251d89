package domain

import (
	"context"
	"errors"
	"fmt"
	"github.com/nbdmover/nbdmover/mover"
	"log/slog"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/nbdmover/nbdmover/repo"
	"libvirt.org/go/libvirt"
	"libvirt.org/go/libvirtxml"
)

var eventLoop sync.Once

// connectLibvirt opens a libvirt connection with the event loop running
// (job-completed events need it).
func connectLibvirt(uri string) (*libvirt.Connect, error) {
	var loopErr error
	eventLoop.Do(func() {
		if loopErr = libvirt.EventRegisterDefaultImpl(); loopErr == nil {
			go func() {
				for libvirt.EventRunDefaultImpl() == nil {
				}
			}()
		}
	})
	if loopErr != nil {
		return nil, fmt.Errorf("libvirt event loop: %w", loopErr)
	}
	conn, err := libvirt.NewConnect(uri)
	if err != nil {
		return nil, fmt.Errorf("connect to libvirt at %s: %w (is libvirtd running?)", uri, err)
	}
	return conn, nil
}

func libvirtCode(err error) libvirt.ErrorNumber {
	var lerr libvirt.Error
	if errors.As(err, &lerr) {
		return lerr.Code
	}
	return libvirt.ERR_OK
}

// ErrNoDomain is matched by the error for a domain libvirt does not know.
var ErrNoDomain = errors.New("no such domain")

// Disks returns how many disks a backup of the domain (of only
// those disks, when given) reads: an error matching ErrNoDomain when
// libvirt at uri does not know it, mover.ErrInvalid when it lacks a disk asked
// for, or why libvirt could not be asked.
func Disks(uri, name string, only []string) (int, error) {
	if uri == "" {
		uri = "qemu:///system"
	}
	conn, err := connectLibvirt(uri)
	if err != nil {
		return 0, err
	}
	defer conn.Close()
	dom, err := lookupDomain(conn, name, uri)
	if err != nil {
		return 0, err
	}
	defer dom.Free()
	def, err := liveDefinition(dom)
	if err != nil {
		return 0, fmt.Errorf("domain %s: %w", name, err)
	}
	disks, _, err := diskSelection(def, only)
	return len(disks), err
}

// liveDefinition reads the domain's live definition.
func liveDefinition(dom *libvirt.Domain) (*libvirtxml.Domain, error) {
	x, err := dom.GetXMLDesc(0)
	if err != nil {
		return nil, err
	}
	var def libvirtxml.Domain
	if err := def.Unmarshal(x); err != nil {
		return nil, fmt.Errorf("domain XML: %w", err)
	}
	return &def, nil
}

// lookupDomain finds a domain by name.
func lookupDomain(conn *libvirt.Connect, name, uri string) (*libvirt.Domain, error) {
	dom, err := conn.LookupDomainByName(name)
	if libvirtCode(err) == libvirt.ERR_NO_DOMAIN {
		return nil, fmt.Errorf("domain %s not found on %s (virsh -c %s list --all shows the domains): %w", name, uri, uri, ErrNoDomain)
	}
	if err != nil {
		return nil, fmt.Errorf("domain %s: %w", name, err)
	}
	return dom, nil
}

// lookupRunning finds the domain and checks that it runs.
func lookupRunning(conn *libvirt.Connect, name, uri string) (*libvirt.Domain, error) {
	dom, err := lookupDomain(conn, name, uri)
	if err != nil {
		return nil, err
	}
	state, _, err := dom.GetState()
	if err != nil {
		dom.Free()
		return nil, fmt.Errorf("domain %s: %w", name, err)
	}
	switch state {
	case libvirt.DOMAIN_RUNNING, libvirt.DOMAIN_PAUSED, libvirt.DOMAIN_BLOCKED:
		return dom, nil
	}
	dom.Free()
	return nil, fmt.Errorf("domain %s is %s: live backups need a running domain; "+
		"back up a stopped domain's disks with qemu-nbd and nbdmover backup --nbd", name, stateName(state))
}

func stateName(s libvirt.DomainState) string {
	switch s {
	case libvirt.DOMAIN_SHUTOFF:
		return "shut off"
	case libvirt.DOMAIN_SHUTDOWN:
		return "shutting down"
	case libvirt.DOMAIN_CRASHED:
		return "crashed"
	case libvirt.DOMAIN_PMSUSPENDED:
		return "suspended"
	}
	return fmt.Sprintf("in state %d", s)
}

// backupJob returns the definition of the domain's running backup job, or
// nil when none runs. (The backup's XML is the reliable sign: job
// statistics of a pull-mode backup can fail with "backup job data
// missing".)
func backupJob(dom *libvirt.Domain) (*libvirtxml.DomainBackup, error) {
	x, err := dom.BackupGetXMLDesc(0)
	switch libvirtCode(err) {
	case libvirt.ERR_OK:
	case libvirt.ERR_NO_DOMAIN_BACKUP:
		return nil, nil
	default:
		return nil, fmt.Errorf("backup job XML: %w", err)
	}
	var b libvirtxml.DomainBackup
	if err := b.Unmarshal(x); err != nil {
		return nil, fmt.Errorf("backup job XML: %w", err)
	}
	return &b, nil
}

// jobSocket is the NBD socket of a pull-mode backup job, "" for others.
func jobSocket(b *libvirtxml.DomainBackup) string {
	if b.Pull != nil && b.Pull.Server != nil && b.Pull.Server.UNIX != nil {
		return b.Pull.Server.UNIX.Socket
	}
	return ""
}

// foreignJobError is the error for a backup job nbdmover did not start.
func foreignJobError(domain string, b *libvirtxml.DomainBackup) error {
	what := "a push-mode backup job"
	if sock := jobSocket(b); sock != "" {
		what = "a pull-mode backup job serving NBD on " + sock
	} else if b.Pull != nil {
		what = "a pull-mode backup job"
	}
	return fmt.Errorf("domain %s runs %s that nbdmover did not start; it is left alone: "+
		"when its owner is done, end it with virsh domjobabort %s and back up again", domain, what, domain)
}

// endBackupJob ends the domain's pull-mode backup job that serves on sock
// (virDomainAbortJob: there is no public BackupEnd) and waits until
// libvirt reports it gone. A job serving elsewhere is not ours and is left
// alone; no job is nothing to do.
func endBackupJob(ctx context.Context, conn *libvirt.Connect, dom *libvirt.Domain, sock string) error {
	gone := func() (bool, error) {
		job, err := backupJob(dom)
		return job == nil || jobSocket(job) != sock, err
	}
	if done, err := gone(); err != nil || done {
		return err
	}
	completed := make(chan struct{}, 1)
	id, err := conn.DomainEventJobCompletedRegister(dom, func(*libvirt.Connect, *libvirt.Domain, *libvirt.DomainEventJobCompleted) {
		select {
		case completed <- struct{}{}:
		default:
		}
	})
	if err == nil {
		defer conn.DomainEventDeregister(id)
	}
	if err := dom.AbortJob(); err != nil && libvirtCode(err) != libvirt.ERR_OPERATION_INVALID {
		return fmt.Errorf("end backup job: %w", err)
	}
	// The event usually arrives at once; polling covers a lost event.
	deadline := time.After(2 * time.Minute)
	tick := time.NewTicker(200 * time.Millisecond)
	defer tick.Stop()
	for {
		select {
		case <-completed:
		case <-tick.C:
		case <-deadline:
			return errors.New("the backup job did not end within 2 minutes of being aborted")
		case <-ctx.Done():
			return context.Cause(ctx)
		}
		if done, err := gone(); err == nil && done {
			return nil
		}
	}
}

// checkpointPrefix marks the checkpoints nbdmover creates; no other
// checkpoint is ever touched.
const checkpointPrefix = "nbdmover-"

// CheckpointName is the name of the checkpoint a backup (id) of a domain
// into the repository whose id is repoID creates: nbdmover-<the first 12
// hex digits of the repository's id>-<backup id>. A domain backed up to
// several repositories keeps one chain per repository, and each
// repository's backups (and cleanups) delete only their own.
func CheckpointName(repoID, id string) string {
	return checkpointPrefix + repoTag(repoID) + "-" + id
}

func repoTag(repoID string) string { return repoID[:min(len(repoID), 12)] }

// checkpointOwner says whether the checkpoint name belongs to the
// repository r (for the domain's backups), and if not whose it is. Names
// from before checkpoints named their repository (nbdmover-<backup id>)
// are r's when r holds that backup of the domain: then r made it (ids are
// times to the millisecond; a backup of another repository of the same
// millisecond is not a risk worth a lost chain, and costs at most a full).
func checkpointOwner(ctx context.Context, r *repo.Repo, domain, name string) (ours bool, whose string) {
	rest, ok := strings.CutPrefix(name, checkpointPrefix)
	if !ok {
		return false, "not made by nbdmover"
	}
	if tag, id, found := strings.Cut(rest, "-"); found && repo.ValidBackupID(id) == nil {
		if r != nil && tag == repoTag(r.Config().ID) {
			return true, ""
		}
		return false, "repository " + tag + "…'s"
	}
	if repo.ValidBackupID(rest) != nil {
		return false, "not named as nbdmover names checkpoints"
	}
	if r != nil {
		if _, err := r.Backup(ctx, domain, rest); err == nil {
			return true, ""
		}
	}
	return false, "from before checkpoints named their repository, and not a backup in this repository"
}

// nbdmoverCheckpoints lists the names of the checkpoints on the domain
// whose names start with checkpointPrefix.
func nbdmoverCheckpoints(dom *libvirt.Domain) ([]string, error) {
	cps, err := dom.ListAllCheckpoints(0)
	if err != nil {
		return nil, err
	}
	var names []string
	for _, cp := range cps {
		if name, err := cp.GetName(); err == nil && strings.HasPrefix(name, checkpointPrefix) {
			names = append(names, name)
		}
		cp.Free()
	}
	return names, nil
}

// testHookDeleteCheckpoint, when set by a test, fails the deletion of a
// checkpoint's bitmaps with its error (a seam: real libvirt fails it only
// in states a test cannot produce, like a state lock timeout).
var testHookDeleteCheckpoint func(name string) error

// deleteCheckpoint deletes one of our checkpoints. libvirt merges the
// changes it recorded into its parent, so dirty tracking of the checkpoints
// that remain stays complete. Only when its bitmap is gone from the images
// is the metadata alone removed; any other failure leaves the checkpoint
// whole (a later run deletes it), never a recording bitmap without
// metadata.
func deleteCheckpoint(dom *libvirt.Domain, name string) error {
	if !strings.HasPrefix(name, checkpointPrefix) {
		return fmt.Errorf("checkpoint %s is not nbdmover's: left alone", name)
	}
	cp, err := dom.CheckpointLookupByName(name, 0)
	if libvirtCode(err) == libvirt.ERR_NO_DOMAIN_CHECKPOINT {
		return nil
	}
	if err != nil {
		return err
	}
	defer cp.Free()
	if testHookDeleteCheckpoint != nil {
		err = testHookDeleteCheckpoint(name)
	}
	if err == nil {
		err = cp.Delete(0)
	}
	if err == nil {
		return nil
	}
	if !bitmapMissing(err) {
		return fmt.Errorf("delete checkpoint %s: %w", name, err)
	}
	// libvirt deletes all of a checkpoint's bitmaps or none: when one disk
	// lost its bitmap, the others' stay in their images (a bitmap no
	// checkpoint names, which records writes but is never read).
	if merr := cp.Delete(libvirt.DOMAIN_CHECKPOINT_DELETE_METADATA_ONLY); merr != nil {
		return fmt.Errorf("delete checkpoint %s (a bitmap of it is gone): %w", name, merr)
	}
	return nil
}

// bitmapMissing tells libvirt's refusal to delete a checkpoint whose
// bitmap is not in the images (libvirt 9: an internal error "bitmap '%s'
// not found in backing chain of '%s'").
func bitmapMissing(err error) bool {
	var lerr libvirt.Error
	return errors.As(err, &lerr) && lerr.Code == libvirt.ERR_INTERNAL_ERROR &&
		strings.Contains(lerr.Message, "not found in backing chain")
}

// bitmapRefused tells libvirt's refusal of an incremental backup because
// the checkpoint's bitmaps are missing or broken, or the checkpoint is
// gone: a full backup from a fresh chain is the way out. Any other
// failure (a guest agent, a lock, ...) has nothing to do with the chain.
func bitmapRefused(err error) bool {
	switch libvirtCode(err) {
	case libvirt.ERR_CHECKPOINT_INCONSISTENT, libvirt.ERR_NO_DOMAIN_CHECKPOINT:
		return true
	}
	return false
}

// KeptCheckpoint is a checkpoint a cleanup left alone, and why.
type KeptCheckpoint struct {
	Name string `json:"name"`
	Why  string `json:"why"`
}

// keptLast is why the last committed backup's checkpoint is kept.
const keptLast = "the last committed backup's: the next incremental starts there"

// pruned is what deleteOwnCheckpoints did.
type pruned struct {
	deleted []string
	kept    []KeptCheckpoint
	errs    []error
}

// deleteOwnCheckpoints deletes the repository r's checkpoints on the
// domain but keep (its last committed backup's), and keeps every other:
// those of other repositories, and those nbdmover did not make. With
// retire set, it deletes instead the checkpoints of the repository whose
// id starts with retire (nbdmover cleanup --forget-repository).
func deleteOwnCheckpoints(ctx context.Context, r *repo.Repo, dom *libvirt.Domain, domain, keep, retire string) pruned {
	var p pruned
	names, err := nbdmoverCheckpoints(dom)
	if err != nil {
		p.errs = append(p.errs, fmt.Errorf("list checkpoints: %w", err))
		return p
	}
	for _, n := range names {
		ours, whose := checkpointOwner(ctx, r, domain, n)
		if retire != "" {
			tag, _, _ := strings.Cut(strings.TrimPrefix(n, checkpointPrefix), "-")
			ours, whose = tag == repoTag(retire), "not of the repository being forgotten"
		}
		switch {
		case n == keep:
			p.kept = append(p.kept, KeptCheckpoint{n, keptLast})
			continue
		case !ours:
			p.kept = append(p.kept, KeptCheckpoint{n, whose})
			continue
		}
		if err := deleteCheckpoint(dom, n); err != nil {
			p.errs = append(p.errs, err)
			continue
		}
		p.deleted = append(p.deleted, n)
	}
	return p
}

// pruneCheckpoints is deleteOwnCheckpoints for a backup: a failure is
// logged, not fatal.
func pruneCheckpoints(ctx context.Context, r *repo.Repo, dom *libvirt.Domain, domain, keep string, log *slog.Logger) {
	for _, err := range deleteOwnCheckpoints(ctx, r, dom, domain, keep, "").errs {
		log.Warn("could not delete a checkpoint", "error", err)
	}
}

// checkpointDisks returns the disks a checkpoint tracks with a bitmap.
func checkpointDisks(dom *libvirt.Domain, name string) (map[string]bool, error) {
	cp, err := dom.CheckpointLookupByName(name, 0)
	if err != nil {
		return nil, err
	}
	defer cp.Free()
	x, err := cp.GetXMLDesc(libvirt.DOMAIN_CHECKPOINT_XML_NO_DOMAIN)
	if err != nil {
		return nil, err
	}
	var def libvirtxml.DomainCheckpoint
	if err := def.Unmarshal(x); err != nil {
		return nil, err
	}
	disks := map[string]bool{}
	if def.Disks != nil {
		for _, d := range def.Disks.Disks {
			if d.Checkpoint == "bitmap" {
				disks[d.Name] = true
			}
		}
	}
	return disks, nil
}

// redefineCheckpoint recreates a checkpoint libvirt lost from the XML stored
// with the backup, validating that its bitmaps are still in the images. The
// parent link is dropped: older checkpoints are gone by design.
func redefineCheckpoint(dom *libvirt.Domain, xml []byte) error {
	var def libvirtxml.DomainCheckpoint
	if err := def.Unmarshal(string(xml)); err != nil {
		return fmt.Errorf("stored checkpoint XML: %w", err)
	}
	def.Parent = nil
	out, err := def.Marshal()
	if err != nil {
		return err
	}
	cp, err := dom.CreateCheckpointXML(out, libvirt.DOMAIN_CHECKPOINT_CREATE_REDEFINE|libvirt.DOMAIN_CHECKPOINT_CREATE_REDEFINE_VALIDATE)
	if err != nil {
		return err
	}
	cp.Free()
	return nil
}

// domainDisk is a disk of the domain definition.
type domainDisk struct {
	name   string // target dev, e.g. vda
	format string // driver type: qcow2, raw, ...
	source string
}

// diskSelection splits the domain's disks into those to back up and those
// skipped (with why).
func diskSelection(def *libvirtxml.Domain, only []string) (disks []domainDisk, skipped []string, err error) {
	want := map[string]bool{}
	for _, n := range only {
		want[n] = true
	}
	var all []string
	if def.Devices != nil {
		for _, d := range def.Devices.Disks {
			if d.Target == nil {
				continue
			}
			name := d.Target.Dev
			all = append(all, name)
			if len(want) > 0 && !want[name] {
				continue
			}
			delete(want, name)
			switch {
			case d.Device != "" && d.Device != "disk":
				skipped = append(skipped, fmt.Sprintf("%s (%s)", name, d.Device))
				continue
			case d.ReadOnly != nil:
				skipped = append(skipped, name+" (read-only)")
				continue
			case d.Shareable != nil:
				skipped = append(skipped, name+" (shareable)")
				continue
			case d.Source == nil:
				skipped = append(skipped, name+" (no medium)")
				continue
			}
			dd := domainDisk{name: name, format: "raw"}
			if d.Driver != nil && d.Driver.Type != "" {
				dd.format = d.Driver.Type
			}
			if d.Source.File != nil {
				dd.source = d.Source.File.File
			} else if d.Source.Block != nil {
				dd.source = d.Source.Block.Dev
			}
			disks = append(disks, dd)
		}
	}
	if len(want) > 0 {
		var missing []string
		for n := range want {
			missing = append(missing, n)
		}
		return nil, nil, mover.Invalidf("domain %s has no disk %s (it has %s)", def.Name, strings.Join(missing, ", "), strings.Join(all, ", "))
	}
	return disks, skipped, nil
}

// qemuOwner returns the uid and gid QEMU runs as (from the DAC security
// label of the live definition), or -1 when unknown.
func qemuOwner(def *libvirtxml.Domain) (uid, gid int) {
	for _, l := range def.SecLabel {
		if l.Model != "dac" || l.Label == "" {
			continue
		}
		u, g, ok := strings.Cut(l.Label, ":")
		if !ok {
			continue
		}
		uid, err1 := strconv.Atoi(strings.TrimPrefix(u, "+"))
		gid, err2 := strconv.Atoi(strings.TrimPrefix(g, "+"))
		if err1 == nil && err2 == nil {
			return uid, gid
		}
	}
	return -1, -1
}

// LibvirtVersion is the version of the libvirt library in use.
func LibvirtVersion() string {
	v, err := libvirt.GetVersion()
	if err != nil {
		return "unknown"
	}
	return fmt.Sprintf("%d.%d.%d", v/1000000, v/1000%1000, v%1000)
}
