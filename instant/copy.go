package instant

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"time"

	"github.com/nbdmover/nbdmover/internal/childenv"
	"libvirt.org/go/libvirt"
	"libvirt.org/go/libvirtxml"
)

// maxRestarts bounds how often one disk's block job is restarted after
// failing (an export outage, say) before the copy gives up.
const maxRestarts = 8

// maxPivots bounds the attempts to pivot a ready copy (two minutes).
const maxPivots = 240

// testHookStart, when set by a test, may hold a disk's next job back.
var testHookStart func(disk, job string) bool

// pollEvery is how often the copy looks at the block jobs.
var pollEvery = 500 * time.Millisecond

// copyHome copies every disk home (live when the domain runs, with
// qemu-img when it is off), rewrites the persistent definition and ends
// the export.
func (rs *restore) copyHome(ctx context.Context) (*Result, error) {
	start := time.Now()
	active, err := rs.dom.IsActive()
	if err != nil {
		return nil, err
	}
	switch {
	case rs.e == nil: // every disk home already (Resume)
	case active:
		err = rs.copyLive(ctx)
	default:
		rs.offline = true
		err = rs.copyOffline(ctx)
	}
	if err != nil {
		if ctx.Err() != nil {
			err = context.Cause(ctx)
		}
		return nil, fmt.Errorf("the copy of %s's disks home stopped: %w; the domain keeps what it has and its writes: "+
			"nbdmover instant-restore --resume %s continues the copy", rs.o.As, err, rs.o.As)
	}
	if err := rs.finish(ctx); err != nil {
		return nil, err
	}
	rs.res.CopySeconds = time.Since(start).Seconds()
	return &rs.res, nil
}

type diskJob struct {
	ds          *diskState
	phase       string
	done, total int64
	hadJob      bool // a job ran (or was started) at the last look
	gone        int  // looks in a row with neither a job nor the end
	restarts    int
	pivots      int // attempts to pivot that failed
}

// copyLive runs the block jobs until every disk is self-contained at its
// final image: a pull from the export into the overlay, then with format
// raw a copy to the raw image and a pivot. A job that fails is started
// again (a pull does not read again what the overlay holds); a guest
// paused by a read error is resumed.
func (rs *restore) copyLive(ctx context.Context) error {
	jobs := make([]*diskJob, len(rs.st.Disks))
	for i := range rs.st.Disks {
		jobs[i] = &diskJob{ds: &rs.st.Disks[i], total: rs.st.Disks[i].Size}
	}
	started := time.Now()
	t := time.NewTicker(pollEvery)
	defer t.Stop()
	lastReport := time.Time{}
	var lastResume time.Time
	for {
		def, err := rs.current(0)
		if err != nil {
			return err
		}
		all := true
		for _, j := range jobs {
			if err := rs.step(def, j); err != nil {
				return err
			}
			all = all && j.phase == "done"
		}
		if st, reason, err := rs.dom.GetState(); err == nil && st == libvirt.DOMAIN_PAUSED &&
			libvirt.DomainPausedReason(reason) == libvirt.DOMAIN_PAUSED_IOERROR && time.Since(lastResume) > 5*time.Second {
			lastResume = time.Now()
			rs.log.Warn("the guest was paused by a read error (the export was unreachable); resuming it", "domain", rs.o.As)
			if err := rs.dom.Resume(); err != nil {
				rs.log.Warn("resume the guest", "domain", rs.o.As, "err", libvirtMessage(err))
			}
		}
		if rs.o.Progress != nil && (all || time.Since(lastReport) >= time.Second) {
			lastReport = time.Now()
			rs.o.Progress(progress(jobs, time.Since(started)))
		}
		if all {
			return nil
		}
		select {
		case <-ctx.Done():
			return context.Cause(ctx)
		case <-rs.e.Done():
			return fmt.Errorf("the export ended: %w", rs.e.Err())
		case <-t.C:
		}
	}
}

// step looks at one disk and starts or finishes what it needs.
func (rs *restore) step(def *libvirtxml.Domain, j *diskJob) error {
	name := j.ds.Name
	d := findDisk(def, name)
	if d == nil {
		return fmt.Errorf("the domain has no disk %s any more", name)
	}
	info, err := rs.dom.GetBlockJobInfo(name, 0)
	if err != nil {
		return fmt.Errorf("disk %s: %v", name, libvirtMessage(err))
	}
	hasJob := info.Type != libvirt.DOMAIN_BLOCK_JOB_TYPE_UNKNOWN
	backed := hasBackingStore(d)
	src := diskSource(d)
	ours := backed && info.Type == libvirt.DOMAIN_BLOCK_JOB_TYPE_PULL ||
		!backed && info.Type == libvirt.DOMAIN_BLOCK_JOB_TYPE_COPY && d.Mirror != nil && d.Mirror.Source != nil &&
			d.Mirror.Source.File != nil && d.Mirror.Source.File.File == j.ds.Image
	switch {
	case hasJob && !ours:
		// Someone else's job (a backup, say): wait for it to end.
		j.phase, j.hadJob = "waiting", false
		return nil
	case hasJob && info.Type == libvirt.DOMAIN_BLOCK_JOB_TYPE_COPY && info.End > 0 && info.Cur == info.End:
		j.phase, j.done = "pivot", j.total
		if err := rs.dom.BlockJobAbort(name, libvirt.DOMAIN_BLOCK_JOB_ABORT_PIVOT); err != nil {
			// Not ready yet (libvirt waits for QEMU's event): a while.
			if j.pivots++; j.pivots > maxPivots {
				return fmt.Errorf("disk %s: the pivot to %s failed %d times: %v", name, j.ds.Image, maxPivots, libvirtMessage(err))
			}
			rs.log.Debug("pivot not yet", "disk", name, "err", libvirtMessage(err))
		}
	case hasJob:
		j.phase = "pull"
		if info.Type == libvirt.DOMAIN_BLOCK_JOB_TYPE_COPY {
			j.phase = "copy"
		}
		j.done, j.total, j.gone = int64(info.Cur), int64(info.End), 0
	case backed || rs.st.Format == "raw" && src == j.ds.Overlay:
		// No job and not home: start one. A job of the same kind that
		// has just ended failed, unless libvirt has yet to update the
		// definition (it does after the job is gone): look twice.
		next := "copy"
		if backed {
			next = "pull"
		}
		if j.hadJob && j.phase == next {
			if j.gone < 2 {
				j.gone++
				return nil
			}
			if j.restarts++; j.restarts > maxRestarts {
				return fmt.Errorf("disk %s: its block %s failed %d times (see /var/log/libvirt/qemu/%s.log)", name, next, maxRestarts, rs.o.As)
			}
			rs.log.Warn("a block job ended before the disk was home; starting it again", "disk", name, "job", next)
		}
		if testHookStart != nil && !testHookStart(name, next) {
			j.phase = "waiting"
			return nil
		}
		if backed {
			err = rs.dom.BlockPull(name, uint64(rs.o.Bandwidth), libvirt.DOMAIN_BLOCK_PULL_BANDWIDTH_BYTES)
		} else {
			err = rs.startCopy(j.ds)
		}
		if err != nil {
			return fmt.Errorf("disk %s: start the block %s: %v", name, next, libvirtMessage(err))
		}
		j.phase, j.done, j.hadJob, j.gone = next, 0, true, 0
		return nil
	case src == j.ds.Image:
		j.phase, j.done, j.total = "done", j.ds.Size, j.ds.Size
	default:
		return fmt.Errorf("disk %s is %s now, neither its overlay nor its image: changed by someone else; nothing more is done", name, src)
	}
	j.hadJob = hasJob
	return nil
}

// startCopy starts the block copy of a self-contained overlay to the raw
// image (made by libvirt; a partial one of an earlier try is removed,
// once the disk is seen on its overlay again just before).
func (rs *restore) startCopy(ds *diskState) error {
	def, err := rs.current(0)
	if err != nil {
		return err
	}
	if d := findDisk(def, ds.Name); d == nil || diskSource(d) != ds.Overlay {
		return fmt.Errorf("its source changed meanwhile")
	}
	if err := os.Remove(ds.Image); err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	dest := libvirtxml.DomainDisk{
		Driver: &libvirtxml.DomainDiskDriver{Type: "raw"},
		Source: &libvirtxml.DomainDiskSource{File: &libvirtxml.DomainDiskSourceFile{File: ds.Image}},
	}
	x, err := dest.Marshal()
	if err != nil {
		return err
	}
	p := &libvirt.DomainBlockCopyParameters{}
	if rs.o.Bandwidth > 0 {
		p.BandwidthSet, p.Bandwidth = true, uint64(rs.o.Bandwidth)
	}
	return rs.dom.BlockCopy(ds.Name, x, p, libvirt.DOMAIN_BLOCK_COPY_TRANSIENT_JOB)
}

func progress(jobs []*diskJob, elapsed time.Duration) Progress {
	var p Progress
	for _, j := range jobs {
		phase := j.phase
		if phase == "" {
			phase = "waiting"
		}
		p.Disks = append(p.Disks, DiskProgress{Name: j.ds.Name, Phase: phase, Done: j.done, Total: j.total})
		p.Done += j.done
		p.Total += j.total
	}
	if s := elapsed.Seconds(); s > 0 {
		p.Rate = float64(p.Done) / s
	}
	if p.Rate > 0 {
		p.ETASeconds = float64(p.Total-p.Done) / p.Rate
	}
	return p
}

// copyOffline makes each overlay self-contained with qemu-img while the
// domain is off (the image's lock keeps QEMU from starting on it
// meanwhile), then with format raw converts it to the raw image. What a
// disk needs is read from the definition, never from which files exist:
// a disk whose source is its image already (pivoted, then written to by
// the guest) is not touched; overlays are removed only by finish, once
// the definition no longer names them.
func (rs *restore) copyOffline(ctx context.Context) error {
	_, disks, err := rs.persistentDisks()
	if err != nil {
		return err
	}
	for i := range rs.st.Disks {
		ds := &rs.st.Disks[i]
		switch src := diskSource(disks[i]); {
		case src == ds.Image && ds.Image != ds.Overlay:
			continue // home, and perhaps written to since
		case src != ds.Overlay:
			return fmt.Errorf("disk %s is %s now, neither its overlay nor its image: changed by someone else; nothing more is done", ds.Name, src)
		}
		if rs.o.Progress != nil {
			rs.o.Progress(rs.offlineProgress(i))
		}
		backed, err := hasBacking(ctx, ds.Overlay)
		if err != nil {
			return fmt.Errorf("disk %s: %w", ds.Name, err)
		}
		if backed {
			if err := qemuImg(ctx, "rebase", "-q", "-f", "qcow2", "-b", "", ds.Overlay); err != nil {
				return fmt.Errorf("disk %s: %w", ds.Name, err)
			}
		}
		if ds.Image != ds.Overlay {
			tmp := ds.Image + ".partial"
			os.Remove(tmp)
			if err := qemuImg(ctx, "convert", "-q", "-f", "qcow2", "-O", "raw", "-S", "64k", ds.Overlay, tmp); err != nil {
				os.Remove(tmp)
				return fmt.Errorf("disk %s: %w", ds.Name, err)
			}
			if active, err := rs.dom.IsActive(); err != nil || active {
				os.Remove(tmp)
				return fmt.Errorf("disk %s: the domain was started during the copy; nothing more is done while it is off (--resume continues live)", ds.Name)
			}
			if err := os.Rename(tmp, ds.Image); err != nil {
				return err
			}
		}
	}
	return nil
}

// offlineProgress is the progress of an offline copy working on disk i
// (qemu-img reports none within a disk).
func (rs *restore) offlineProgress(i int) Progress {
	var p Progress
	for k, ds := range rs.st.Disks {
		dp := DiskProgress{Name: ds.Name, Phase: "waiting", Total: ds.Size}
		switch {
		case k < i:
			dp.Phase, dp.Done = "done", ds.Size
		case k == i:
			dp.Phase = "pull"
		}
		p.Disks = append(p.Disks, dp)
		p.Done += dp.Done
		p.Total += dp.Total
	}
	return p
}

func diskSource(d *libvirtxml.DomainDisk) string {
	if d.Source != nil && d.Source.File != nil {
		return d.Source.File.File
	}
	return ""
}

// hasBacking says whether a qcow2 image still has a backing file.
func hasBacking(ctx context.Context, img string) (bool, error) {
	cmd := exec.CommandContext(ctx, "qemu-img", "info", "-U", "--output=json", "-f", "qcow2", img)
	cmd.Env = childenv.Env()
	out, err := cmd.Output()
	if err != nil {
		return false, fmt.Errorf("qemu-img info %s: %w", img, err)
	}
	var info struct {
		Backing string `json:"backing-filename"`
	}
	if err := json.Unmarshal(out, &info); err != nil {
		return false, err
	}
	return info.Backing != "", nil
}

// finish points the persistent definition at the final images, drops the
// restore's state, removes the overlays a raw copy left and ends the
// export. Done again after a crash, it changes nothing more.
func (rs *restore) finish(ctx context.Context) error {
	if active, err := rs.dom.IsActive(); rs.offline && (err != nil || active) {
		return fmt.Errorf("%s was started during its offline copy: nothing more is done while it is off (--resume continues live)", rs.o.As)
	}
	def, disks, err := rs.persistentDisks()
	if err != nil {
		return err
	}
	for i := range rs.st.Disks {
		finalDisk(disks[i], &rs.st.Disks[i], rs.st.Format)
	}
	x, err := def.Marshal()
	if err != nil {
		return err
	}
	dom, err := rs.conn.DomainDefineXML(x)
	if err != nil {
		return fmt.Errorf("redefine %s with its disks home: %v", rs.o.As, libvirtMessage(err))
	}
	dom.Free()
	if rs.st.Holder != "" {
		if err := rs.r.Hold(context.WithoutCancel(ctx), rs.st.Domain, rs.st.Backup, rs.st.Holder, false); err != nil {
			return fmt.Errorf("release the hold on backup %s/%s: %w", rs.st.Domain, rs.st.Backup, err)
		}
	}
	flags := libvirt.DOMAIN_AFFECT_CONFIG
	if active, _ := rs.dom.IsActive(); active {
		flags |= libvirt.DOMAIN_AFFECT_LIVE
	}
	if err := rs.dom.SetMetadata(libvirt.DOMAIN_METADATA_ELEMENT, "", "", XMLNS, flags); err != nil {
		return fmt.Errorf("domain %s: drop the restore's state: %v", rs.o.As, libvirtMessage(err))
	}
	for _, ds := range rs.st.Disks {
		if ds.Image != ds.Overlay {
			os.Remove(ds.Overlay) // no definition names it now
		}
	}
	if rs.e != nil {
		rs.e.Close()
	}
	return nil
}

// current is the domain's definition now: live (flags 0) or persistent
// (libvirt.DOMAIN_XML_INACTIVE).
func (rs *restore) current(flags libvirt.DomainXMLFlags) (*libvirtxml.Domain, error) {
	x, err := rs.dom.GetXMLDesc(flags)
	if err != nil {
		return nil, fmt.Errorf("domain %s: %v", rs.o.As, libvirtMessage(err))
	}
	var def libvirtxml.Domain
	if err := def.Unmarshal(x); err != nil {
		return nil, err
	}
	return &def, nil
}

// hasBackingStore says whether a disk has a backing image: libvirt shows
// the end of a chain as an empty <backingStore/>.
func hasBackingStore(d *libvirtxml.DomainDisk) bool {
	b := d.BackingStore
	return b != nil && b.Source != nil && (b.Source.File != nil || b.Source.Block != nil || b.Source.Network != nil)
}

// allHome says whether every disk's persistent source is its final
// image with no backing.
func (rs *restore) allHome() (bool, error) {
	_, disks, err := rs.persistentDisks()
	if err != nil {
		return false, err
	}
	for i, ds := range rs.st.Disks {
		if diskSource(disks[i]) != ds.Image || hasBackingStore(disks[i]) {
			return false, nil
		}
	}
	return true, nil
}

// persistentDisks is the domain's persistent definition and, in the
// state's order, each restored disk in it.
func (rs *restore) persistentDisks() (*libvirtxml.Domain, []*libvirtxml.DomainDisk, error) {
	def, err := rs.current(libvirt.DOMAIN_XML_INACTIVE)
	if err != nil {
		return nil, nil, err
	}
	disks := make([]*libvirtxml.DomainDisk, len(rs.st.Disks))
	for i, ds := range rs.st.Disks {
		if disks[i] = findDisk(def, ds.Name); disks[i] == nil {
			return nil, nil, fmt.Errorf("the domain's definition has no disk %s any more", ds.Name)
		}
	}
	return def, disks, nil
}

func findDisk(def *libvirtxml.Domain, dev string) *libvirtxml.DomainDisk {
	if def.Devices == nil {
		return nil
	}
	for i := range def.Devices.Disks {
		if t := def.Devices.Disks[i].Target; t != nil && t.Dev == dev {
			return &def.Devices.Disks[i]
		}
	}
	return nil
}
