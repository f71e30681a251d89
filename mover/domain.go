package mover

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/nbdmover/nbdmover/nbdclient"
	"github.com/nbdmover/nbdmover/repo"
	"libvirt.org/go/libvirt"
	"libvirt.org/go/libvirtxml"
)

// Default directories: RunDir holds the per-domain locks and each job's
// private socket directory; ScratchDir the job's scratch images.
const (
	DefaultRunDir     = "/run/nbdmover"
	DefaultScratchDir = "/var/lib/nbdmover/scratch"
)

// lockDomain takes the host-wide lock of a domain's backups. Holding it
// proves that no other nbdmover on this host works on the domain, so a
// backup job or files found on it were left by a crashed run.
func lockDomain(runDir, domain string) (*os.File, error) {
	if err := traversableDir(runDir); err != nil {
		return nil, err
	}
	dir := filepath.Join(runDir, "locks")
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, err
	}
	f, err := os.OpenFile(filepath.Join(dir, domain+".lock"), os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, err
	}
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); err != nil {
		f.Close()
		if errors.Is(err, syscall.EWOULDBLOCK) {
			return nil, fmt.Errorf("domain %s: another nbdmover backup of this domain is running", domain)
		}
		return nil, err
	}
	return f, nil
}

// jobDir makes a directory private to root and QEMU (mode 0700, owned by
// QEMU's user when it is not root) for the job's socket or scratch files.
// Stale directories of the same domain from crashed runs are removed first.
func jobDir(parent, domain, id string, uid, gid int) (string, error) {
	if err := traversableDir(parent); err != nil {
		return "", err
	}
	stale, _ := filepath.Glob(filepath.Join(parent, "job-"+domain+"-*"))
	for _, s := range stale {
		os.RemoveAll(s)
	}
	dir := filepath.Join(parent, "job-"+domain+"-"+id)
	if err := os.Mkdir(dir, 0o700); err != nil {
		return "", err
	}
	if uid >= 0 {
		if err := os.Chown(dir, uid, gid); err != nil {
			os.RemoveAll(dir)
			return "", err
		}
	}
	return dir, nil
}

// traversableDir creates dir (and missing parents) with mode 0711, so that
// QEMU, running as another user, can reach the private directories inside
// it without listing them.
func traversableDir(dir string) error {
	if err := os.MkdirAll(dir, 0o711); err != nil {
		return err
	}
	return os.Chmod(dir, 0o711)
}

// domainPlan is what one domain backup will do.
type domainPlan struct {
	disks      []domainDisk
	incr       map[string]bool // disks read incrementally from base
	base       string          // checkpoint the incrementals start from
	fallback   string
	checkpoint string // the checkpoint this backup creates, "" when none
}

// backupDomain takes a pull-mode backup of a running libvirt domain; see
// docs/design.md for the steps and what each failure leaves behind.
func backupDomain(ctx context.Context, o BackupOptions) (res *BackupResult, err error) {
	start := time.Now()
	name := o.Domain
	if err := repo.ValidName("domain", name); err != nil {
		return nil, err
	}
	if o.Connect == "" {
		o.Connect = "qemu:///system"
	}
	if o.RunDir == "" {
		o.RunDir = DefaultRunDir
	}
	if o.ScratchDir == "" {
		o.ScratchDir = DefaultScratchDir
	}
	lock, err := lockDomain(o.RunDir, name)
	if err != nil {
		return nil, err
	}
	defer lock.Close()

	r, err := openForBackup(ctx, o)
	if err != nil {
		return nil, err
	}
	conn, err := connectLibvirt(o.Connect)
	if err != nil {
		return nil, err
	}
	defer conn.Close()
	dom, err := lookupRunning(conn, name, o.Connect)
	if err != nil {
		return nil, err
	}
	defer dom.Free()
	fail := func(format string, args ...any) error {
		return fmt.Errorf("backup of domain %s: %w", name, fmt.Errorf(format, args...))
	}
	phase := func(what string) { o.Log.Debug(what, "domain", name, "elapsed", time.Since(start)) }
	phase("connected to libvirt")

	// A backup job on the domain while we hold its lock was left by a
	// crashed run: end it.
	if active, err := activeBackupJob(dom); err != nil {
		return nil, fail("%w", err)
	} else if active {
		o.Log.Warn("ending a backup job left by an earlier run", "domain", name)
		if err := endBackupJob(ctx, conn, dom); err != nil {
			return nil, fail("leftover backup job: %w", err)
		}
	}

	xmlDesc, err := dom.GetXMLDesc(0)
	if err != nil {
		return nil, fail("%w", err)
	}
	var def libvirtxml.Domain
	if err := def.Unmarshal(xmlDesc); err != nil {
		return nil, fail("domain XML: %w", err)
	}
	disks, skipped, err := diskSelection(&def, o.Disks)
	if err != nil {
		return nil, err
	}
	for _, s := range skipped {
		o.Log.Info("skipping disk", "domain", name, "disk", s)
	}
	if len(disks) == 0 {
		return nil, fail("no disk to back up (skipped: %s)", strings.Join(skipped, ", "))
	}

	last, err := lastBackup(ctx, r, name)
	if err != nil {
		return nil, err
	}
	m := newManifest(r, o, name, "libvirt", last, start)
	id := m.ID
	plan, err := planDomain(ctx, r, dom, o, disks, last)
	if err != nil {
		return nil, fail("%w", err)
	}
	phase("planned")
	if plan.hasBitmaps() {
		plan.checkpoint = checkpointPrefix + id
	}

	uid, gid := qemuOwner(&def)
	runDir, err := jobDir(o.RunDir, name, id, uid, gid)
	if err != nil {
		return nil, fail("run directory: %w", err)
	}
	defer os.RemoveAll(runDir)
	scratchDir, err := jobDir(o.ScratchDir, name, id, uid, gid)
	if err != nil {
		return nil, fail("scratch directory: %w", err)
	}
	defer os.RemoveAll(scratchDir)
	sock := filepath.Join(runDir, "nbd.sock")

	consistency, err := beginBackup(ctx, conn, dom, o, plan, sock, scratchDir)
	if err != nil && len(plan.incr) > 0 && o.Mode == ModeAuto {
		// libvirt refuses an incremental whose bitmaps are missing or
		// broken: start over as a full backup from a fresh chain.
		o.Log.Warn("incremental backup refused, taking a full one", "domain", name, "error", err)
		deleteCheckpoint(dom, plan.base)
		plan.fallback = fmt.Sprintf("libvirt refused the incremental from checkpoint %s: %v", plan.base, err)
		plan.incr, plan.base = map[string]bool{}, ""
		consistency, err = beginBackup(ctx, conn, dom, o, plan, sock, scratchDir)
	}
	if err != nil {
		return nil, fail("%w", err)
	}
	phase("backup job started")
	// From here the job runs: end it on every path, and on failure drop
	// the checkpoint this uncommitted backup created (its changes merge
	// into the parent checkpoint, so the chain stays complete).
	cleanupCtx := context.WithoutCancel(ctx)
	committed := false
	defer func() {
		if jerr := endBackupJob(cleanupCtx, conn, dom); jerr != nil {
			if err == nil {
				o.Log.Error("backup committed, but ending the libvirt job failed", "domain", name, "error", jerr)
			} else {
				err = fmt.Errorf("%w; also: %v", err, jerr)
			}
		}
		if !committed && plan.checkpoint != "" {
			if cerr := deleteCheckpoint(dom, plan.checkpoint); cerr != nil {
				o.Log.Warn("could not delete the uncommitted checkpoint", "domain", name, "checkpoint", plan.checkpoint, "error", cerr)
			}
		}
	}()

	exports, err := backupExports(dom)
	if err != nil {
		return nil, fail("%w", err)
	}
	var sources []diskSource
	defer func() {
		for _, s := range sources {
			s.pool.Close()
		}
	}()
	for _, d := range plan.disks {
		ex := exports[d.name]
		cfg := nbdclient.Config{Socket: sock, Export: ex.ExportName}
		if cfg.Export == "" {
			cfg.Export = d.name
		}
		var parent *repo.Index
		if plan.incr[d.name] {
			cfg.Bitmap = ex.ExportBitmap
			if parent, err = r.LoadIndex(ctx, last, d.name); err != nil {
				return nil, fail("parent backup %s: %w", last.ID, err)
			}
		}
		pool, err := nbdclient.DialPool(ctx, cfg, o.Tuning.Readers)
		if err != nil {
			return nil, fail("disk %s: %w", d.name, err)
		}
		sources = append(sources, diskSource{name: d.name, pool: pool, parent: parent})
	}
	phase("connected to the exports")
	indexes, results, err := runDisks(ctx, o, r, sources)
	if err != nil {
		return nil, fail("%w", err)
	}
	phase("disks read")

	files := map[string][]byte{}
	if x, err := domainXML(dom); err == nil {
		files["domain.xml"] = []byte(x)
	} else {
		return nil, fail("domain XML: %w", err)
	}
	if plan.checkpoint != "" {
		cp, err := dom.CheckpointLookupByName(plan.checkpoint, 0)
		if err != nil {
			return nil, fail("checkpoint %s: %w", plan.checkpoint, err)
		}
		x, err := cp.GetXMLDesc(0)
		cp.Free()
		if err != nil {
			return nil, fail("checkpoint %s: %w", plan.checkpoint, err)
		}
		files["checkpoint.xml"] = []byte(x)
	}
	m.Consistency, m.Checkpoint, m.Fallback = consistency, plan.checkpoint, plan.fallback
	if len(plan.incr) > 0 {
		m.Mode, m.Parent = ModeIncremental, last.ID
	}
	res, err = commit(ctx, r, m, sources, indexes, results, files, start)
	if err != nil {
		return nil, err
	}
	committed = true
	phase("committed")
	// Checkpoints older than the one just committed are of no more use.
	deleteCheckpointsExcept(dom, plan.checkpoint, o.Log.With("domain", name))
	return res, nil
}

func (p *domainPlan) hasBitmaps() bool {
	for _, d := range p.disks {
		if d.format == "qcow2" {
			return true
		}
	}
	return false
}

// planDomain decides which disks go incremental, from which checkpoint. The
// base is always the checkpoint of the last committed backup, never
// libvirt's newest; checkpoints of ours that are not it (left by runs that
// did not commit) are deleted first, which merges their changes into it.
func planDomain(ctx context.Context, r *repo.Repo, dom *libvirt.Domain, o BackupOptions, disks []domainDisk, last *repo.Manifest) (*domainPlan, error) {
	plan := &domainPlan{disks: disks, incr: map[string]bool{}}
	keep := ""
	if last != nil {
		keep = last.Checkpoint
	}
	deleteCheckpointsExcept(dom, keep, o.Log.With("domain", o.Domain))
	if o.Mode == ModeFull {
		return plan, nil
	}
	reason := ""
	switch {
	case last == nil:
		if o.Mode == ModeIncremental {
			return nil, errors.New("cannot take an incremental: no committed backup in the repository")
		}
		return plan, nil
	case last.Checkpoint == "":
		reason = fmt.Sprintf("the last backup (%s) has no checkpoint", last.ID)
	default:
		reason = ensureCheckpoint(ctx, r, dom, last, o)
	}
	if reason == "" {
		tracked, err := checkpointDisks(dom, last.Checkpoint)
		if err != nil {
			reason = fmt.Sprintf("checkpoint %s: %v", last.Checkpoint, err)
		} else {
			// Disks without bitmaps (raw) are read in full every time;
			// a qcow2 disk new since the last backup gets a full.
			var notIncr []string
			for _, d := range disks {
				_, notInLast := last.Disk(d.name)
				switch {
				case d.format != "qcow2":
				case tracked[d.name] && notInLast == nil:
					plan.incr[d.name] = true
				default:
					notIncr = append(notIncr, d.name)
				}
			}
			if len(notIncr) > 0 && o.Mode == ModeIncremental {
				return nil, fmt.Errorf("cannot take an incremental of disks %s (new, or not in checkpoint %s); "+
					"leave them out with --disk or use --mode auto", strings.Join(notIncr, ", "), last.Checkpoint)
			}
			if len(plan.incr) > 0 {
				plan.base = last.Checkpoint
				return plan, nil
			}
			reason = "no disk can be read incrementally"
		}
	}
	if o.Mode == ModeIncremental {
		return nil, fmt.Errorf("cannot take an incremental: %s", reason)
	}
	o.Log.Info("taking a full backup", "domain", o.Domain, "reason", reason)
	plan.fallback = reason
	plan.incr = map[string]bool{}
	return plan, nil
}

// ensureCheckpoint makes sure libvirt has the last backup's checkpoint,
// redefining it from the repository's copy when libvirt lost it. It returns
// why an incremental is impossible, or "".
func ensureCheckpoint(ctx context.Context, r *repo.Repo, dom *libvirt.Domain, last *repo.Manifest, o BackupOptions) string {
	cp, err := dom.CheckpointLookupByName(last.Checkpoint, 0)
	if err == nil {
		cp.Free()
		return ""
	}
	if libvirtCode(err) != libvirt.ERR_NO_DOMAIN_CHECKPOINT {
		return fmt.Sprintf("checkpoint %s: %v", last.Checkpoint, err)
	}
	x, err := r.ReadFile(ctx, last, "checkpoint.xml")
	if err != nil {
		return fmt.Sprintf("libvirt lost checkpoint %s and the repository's copy is unreadable: %v", last.Checkpoint, err)
	}
	if err := redefineCheckpoint(dom, x); err != nil {
		return fmt.Sprintf("libvirt lost checkpoint %s and it could not be redefined: %v", last.Checkpoint, err)
	}
	o.Log.Info("redefined a checkpoint libvirt had lost", "domain", o.Domain, "checkpoint", last.Checkpoint)
	return ""
}

// beginBackup starts the pull-mode job, freezing the guest's filesystems
// around it when asked. It returns the consistency the backup will have.
func beginBackup(ctx context.Context, conn *libvirt.Connect, dom *libvirt.Domain, o BackupOptions, plan *domainPlan, sock, scratchDir string) (string, error) {
	backupXML, checkpointXML, err := jobXML(plan, sock, scratchDir)
	if err != nil {
		return "", err
	}
	consistency := "crash-consistent"
	if o.Quiesce || o.QuiesceOptional {
		if err := dom.FSFreeze(nil, 0); err != nil {
			if !o.QuiesceOptional {
				return "", fmt.Errorf("cannot freeze the guest's filesystems (is the QEMU guest agent installed and running?): %w; "+
					"use --quiesce-optional to continue crash-consistent", err)
			}
			o.Log.Warn("guest filesystems not frozen: the backup is crash-consistent", "domain", o.Domain, "error", err)
		} else {
			consistency = "quiesced"
			defer func() {
				if err := dom.FSThaw(nil, 0); err != nil {
					o.Log.Error("thawing the guest's filesystems failed", "domain", o.Domain, "error", err)
				}
			}()
		}
	}
	if err := dom.BackupBegin(backupXML, checkpointXML, 0); err != nil {
		return "", fmt.Errorf("start the pull-mode backup: %w", err)
	}
	return consistency, nil
}

// jobXML builds the backup and checkpoint definitions of the job.
func jobXML(plan *domainPlan, sock, scratchDir string) (backupXML, checkpointXML string, err error) {
	pull := &libvirtxml.DomainBackupPull{
		Server: &libvirtxml.DomainBackupPullServer{UNIX: &libvirtxml.DomainBackupPullServerUNIX{Socket: sock}},
		Disks:  &libvirtxml.DomainBackupPullDisks{},
	}
	cpDisks := &libvirtxml.DomainCheckpointDisks{}
	for _, d := range plan.disks {
		bd := libvirtxml.DomainBackupPullDisk{Name: d.name, Backup: "yes", BackupMode: "full", ExportName: d.name,
			Driver:  &libvirtxml.DomainBackupDiskDriver{Type: "qcow2"},
			Scratch: &libvirtxml.DomainDiskSource{File: &libvirtxml.DomainDiskSourceFile{File: filepath.Join(scratchDir, d.name+".scratch.qcow2")}}}
		if plan.incr[d.name] {
			bd.BackupMode, bd.Incremental = "incremental", plan.base
		}
		pull.Disks.Disks = append(pull.Disks.Disks, bd)
		mode := "no"
		if d.format == "qcow2" {
			mode = "bitmap"
		}
		cpDisks.Disks = append(cpDisks.Disks, libvirtxml.DomainCheckpointDisk{Name: d.name, Checkpoint: mode})
	}
	if backupXML, err = (&libvirtxml.DomainBackup{Pull: pull}).Marshal(); err != nil {
		return "", "", err
	}
	if plan.checkpoint != "" {
		cp := &libvirtxml.DomainCheckpoint{Name: plan.checkpoint, Description: "nbdmover backup", Disks: cpDisks}
		if checkpointXML, err = cp.Marshal(); err != nil {
			return "", "", err
		}
	}
	return backupXML, checkpointXML, nil
}

// backupExports reads the running job's export names and bitmaps by disk.
func backupExports(dom *libvirt.Domain) (map[string]libvirtxml.DomainBackupPullDisk, error) {
	x, err := dom.BackupGetXMLDesc(0)
	if err != nil {
		return nil, fmt.Errorf("backup job XML: %w", err)
	}
	var b libvirtxml.DomainBackup
	if err := b.Unmarshal(x); err != nil {
		return nil, fmt.Errorf("backup job XML: %w", err)
	}
	out := map[string]libvirtxml.DomainBackupPullDisk{}
	if b.Pull != nil && b.Pull.Disks != nil {
		for _, d := range b.Pull.Disks.Disks {
			out[d.Name] = d
		}
	}
	return out, nil
}

// domainXML is the definition to keep with the backup: the persistent one
// when there is one. Secrets are left out (no VIR_DOMAIN_XML_SECURE).
func domainXML(dom *libvirt.Domain) (string, error) {
	if persistent, err := dom.IsPersistent(); err == nil && persistent {
		return dom.GetXMLDesc(libvirt.DOMAIN_XML_INACTIVE)
	}
	return dom.GetXMLDesc(0)
}
