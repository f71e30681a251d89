package instant

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"encoding/xml"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"regexp"
	"strconv"
	"time"

	"github.com/nbdmover/nbdmover/export"
	"github.com/nbdmover/nbdmover/internal/childenv"
	"github.com/nbdmover/nbdmover/internal/listen"
	"github.com/nbdmover/nbdmover/internal/safedir"
	"github.com/nbdmover/nbdmover/mover"
	"github.com/nbdmover/nbdmover/repo"
	"golang.org/x/sys/unix"
	"libvirt.org/go/libvirt"
	"libvirt.org/go/libvirtxml"
)

// XMLNS is the namespace of the state instant restore keeps in the new
// domain's metadata until its disks are home.
const XMLNS = "https://github.com/nbdmover/nbdmover/xmlns/instant-restore/1"

// ReconnectDelay is how long QEMU's NBD client waits for a lost export
// before failing reads, where libvirt can say so (libvirt 9.2 and later).
const ReconnectDelay = 60

// Options say what to restore as what.
type Options struct {
	Repo repo.Options
	// Repository is an open repository to use instead of opening Repo
	// (the daemon's).
	Repository *repo.Repo
	Domain     string // whose backup
	Backup     string // id, or "" / "latest"
	As         string // the new domain's name
	// ImageDir holds the new domain's images: <as>-<disk>.qcow2 (the
	// overlays, and the final images with format qcow2) and, with format
	// raw, <as>-<disk>.raw. It must exist and be one only root can change.
	ImageDir string
	Format   string // of the final images: qcow2 (default) or raw
	// NoStart defines the domain without starting it; the disks are
	// then copied home with qemu-img while it is off.
	NoStart bool
	// KeepNetwork leaves the interfaces connected (they get new MAC
	// addresses either way).
	KeepNetwork bool
	// XML is a domain definition to use instead of the backup's (a backup
	// of an NBD export has none).
	XML []byte
	// Connect is the libvirt URI (default qemu:///system).
	Connect string
	// RunDir holds the export's socket (default mover.DefaultRunDir).
	RunDir string
	// CacheBytes is the export's cache (default export.DefaultCacheBytes).
	CacheBytes int64
	// Bandwidth limits each disk's copy, in bytes per second (0: none).
	Bandwidth int64
	// QEMUUser is the user QEMU runs as, given the export's socket
	// (default: qemu.conf's user, else libvirt-qemu).
	QEMUUser string
	Log      *slog.Logger
	// Progress, when set, is called about every second while copying.
	Progress func(Progress)
	// Running, when set, is called once the domain runs (or, with
	// NoStart, is defined).
	Running func(Result)
}

// ErrInvalid is matched by the errors for options that can never work.
var ErrInvalid = errors.New("invalid instant-restore option")

type invalidError struct{ error }

func (invalidError) Is(target error) bool { return target == ErrInvalid }

func invalidf(format string, args ...any) error { return invalidError{fmt.Errorf(format, args...)} }

// Result says what was restored.
type Result struct {
	Domain string       `json:"domain"` // the new domain
	From   string       `json:"from"`   // domain/backup id
	Disks  []DiskResult `json:"disks"`
	// Started is when the restore began; RunningAfter how long after it
	// the domain ran (was defined, with NoStart); CopySeconds how long
	// the copy home took (0 until it is done).
	Started      time.Time `json:"started"`
	RunningAfter float64   `json:"running_after_seconds"`
	CopySeconds  float64   `json:"copy_seconds"`
	// Reconnect says whether QEMU's NBD client was given a reconnect
	// delay (libvirt 9.2 and later); without it an export outage pauses
	// the guest instead.
	Reconnect bool   `json:"reconnect_delay"`
	Socket    string `json:"socket"`
	// Dropped names what of the saved definition the new domain goes
	// without (host devices and files, a disk the backup does not hold).
	Dropped []string `json:"dropped,omitempty"`
}

// DiskResult is one disk of the new domain.
type DiskResult struct {
	Name   string `json:"name"`
	Size   int64  `json:"size"`
	Image  string `json:"image"`  // its final image
	Format string `json:"format"` // of that image
}

// Progress is the copy home, as a whole and by disk.
type Progress struct {
	Done       int64          `json:"bytes_done"`
	Total      int64          `json:"bytes_total"`
	Rate       float64        `json:"bytes_per_second"`
	ETASeconds float64        `json:"eta_seconds"`
	Disks      []DiskProgress `json:"disks"`
}

// DiskProgress is one disk's copy: Phase is pull (from the export into
// the overlay), copy (the overlay to the raw image), pivot, or done.
type DiskProgress struct {
	Name  string `json:"name"`
	Phase string `json:"phase"`
	Done  int64  `json:"bytes_done"`
	Total int64  `json:"bytes_total"`
}

// state is what a restore keeps in the new domain's metadata.
type state struct {
	RepoID   string      `json:"repo_id"`
	Location string      `json:"location"`
	Domain   string      `json:"domain"`
	Backup   string      `json:"backup"`
	Socket   string      `json:"socket"`
	Format   string      `json:"format"`
	Disks    []diskState `json:"disks"`
	// Holder names the restore's hold on the backup (repo.Hold), which
	// keeps every retention from forgetting it until the disks are home.
	Holder string `json:"holder,omitempty"`
}

type diskState struct {
	Name    string `json:"name"` // target dev, and the export's name
	Size    int64  `json:"size"`
	Overlay string `json:"overlay"`
	Image   string `json:"image"` // the overlay itself with format qcow2
	// The driver's error policies before the restore set them to stop.
	ErrorPolicy  string `json:"error_policy,omitempty"`
	RErrorPolicy string `json:"rerror_policy,omitempty"`
}

// result is what a restore in state st restores as the domain as, before
// it is done.
func (st *state) result(as string) Result {
	res := Result{Domain: as, From: st.Domain + "/" + st.Backup, Socket: st.Socket}
	for _, d := range st.Disks {
		res.Disks = append(res.Disks, DiskResult{Name: d.Name, Size: d.Size, Image: d.Image, Format: st.Format})
	}
	return res
}

// restore is one restore being carried out.
type restore struct {
	o       Options
	log     *slog.Logger
	conn    *libvirt.Connect
	r       *repo.Repo
	st      state
	e       *export.Export
	res     Result
	def     *libvirtxml.Domain // the new domain's, until defined
	dom     *libvirt.Domain
	offline bool          // the disks were copied while the domain was off
	qemu    *listen.Owner // QEMU's user, given the export's socket
	// networkExists says whether this host has a libvirt network, and
	// it is active (a domain on an inactive one does not start).
	networkExists func(name string) bool
}

// Run restores o.Domain's backup as the domain o.As and copies its disks
// home. It returns when every disk is self-contained and the export has
// ended, or with the error that stopped it: before the domain was defined
// nothing is left behind; after, the domain runs on what it has and Resume
// continues the copy.
func Run(ctx context.Context, o Options) (*Result, error) {
	started := time.Now()
	if err := o.check(); err != nil {
		return nil, err
	}
	rs, err := prepare(ctx, o)
	if err != nil {
		return nil, err
	}
	defer rs.close()
	rs.res.Started = started
	if err := rs.create(ctx); err != nil {
		return nil, err
	}
	rs.res.RunningAfter = time.Since(started).Seconds()
	if o.Running != nil {
		o.Running(rs.res)
	}
	return rs.copyHome(ctx)
}

// Resume continues the copy of a restore that stopped (the command
// killed, the host restarted, the export lost): o.As names the domain;
// o.Repo must be the repository it was restored from. The domain is
// started if it is off (unless o.NoStart: then copied while off).
func Resume(ctx context.Context, o Options) (*Result, error) {
	if err := repo.ValidName("domain", o.As); err != nil {
		return nil, invalidError{err}
	}
	o.defaults()
	rs := &restore{o: o, log: o.Log}
	ok := false
	defer func() {
		if !ok {
			rs.close()
		}
	}()
	var err error
	if rs.conn, err = libvirt.NewConnect(o.Connect); err != nil {
		return nil, fmt.Errorf("connect to libvirt at %s: %w (is libvirtd running?)", o.Connect, err)
	}
	if rs.dom, err = rs.conn.LookupDomainByName(o.As); err != nil {
		return nil, invalidf("domain %s: %v", o.As, libvirtMessage(err))
	}
	meta, err := rs.dom.GetMetadata(libvirt.DOMAIN_METADATA_ELEMENT, XMLNS, libvirt.DOMAIN_AFFECT_CONFIG)
	if err != nil {
		return nil, invalidf("domain %s has no instant restore to resume (none was started, or its copy finished): %v", o.As, libvirtMessage(err))
	}
	if rs.st, err = parseState(meta); err != nil {
		return nil, fmt.Errorf("domain %s: %w", o.As, err)
	}
	if err := rs.checkState(); err != nil {
		return nil, fmt.Errorf("domain %s: its instant restore state: %w", o.As, err)
	}
	if rs.r, err = o.repository(ctx); err != nil {
		return nil, err
	}
	if id := rs.r.Config().ID; id != rs.st.RepoID {
		return nil, invalidf("domain %s was restored from repository %s (at %s), not %s: give that one with --repo",
			o.As, rs.st.RepoID, rs.st.Location, id)
	}
	rs.res = rs.st.result(o.As)
	rs.res.Started = time.Now()
	// Disks home already (a stop between the definition's rewrite and
	// the state's removal) need no export: the backup may be gone.
	if home, err := rs.allHome(); err != nil {
		return nil, err
	} else if !home {
		if err := rs.startExport(ctx); err != nil {
			return nil, err
		}
	}
	ok = true
	defer rs.close()
	active, err := rs.dom.IsActive()
	if err != nil {
		return nil, err
	}
	if !active && !o.NoStart {
		if err := rs.dom.Create(); err != nil {
			return nil, fmt.Errorf("start domain %s: %v", o.As, libvirtMessage(err))
		}
	}
	if o.Running != nil {
		o.Running(rs.res)
	}
	return rs.copyHome(ctx)
}

func (o *Options) repository(ctx context.Context) (*repo.Repo, error) {
	if o.Repository != nil {
		return o.Repository, o.Repository.Recheck(ctx) // kept open: still the repository it was?
	}
	return o.Repo.Open(ctx)
}

func (o *Options) defaults() {
	if o.Log == nil {
		o.Log = slog.New(slog.DiscardHandler)
	}
	if o.Connect == "" {
		o.Connect = "qemu:///system"
	}
	if o.RunDir == "" {
		o.RunDir = mover.DefaultRunDir
	}
	if o.Format == "" {
		o.Format = "qcow2"
	}
}

// PendingRestore is a domain carrying an unfinished instant restore's
// state.
type PendingRestore struct {
	RepoID string // the repository it is from
	Active bool   // the domain runs
}

// Pending lists the domains libvirt at uri knows that carry an
// unfinished instant restore's state.
func Pending(uri string) (map[string]PendingRestore, error) {
	if uri == "" {
		uri = "qemu:///system"
	}
	conn, err := libvirt.NewConnect(uri)
	if err != nil {
		return nil, fmt.Errorf("connect to libvirt at %s: %w", uri, err)
	}
	defer conn.Close()
	doms, err := conn.ListAllDomains(0)
	if err != nil {
		return nil, err
	}
	out := map[string]PendingRestore{}
	for _, d := range doms {
		if meta, err := d.GetMetadata(libvirt.DOMAIN_METADATA_ELEMENT, XMLNS, libvirt.DOMAIN_AFFECT_CONFIG); err == nil {
			if st, err := parseState(meta); err == nil {
				name, err := d.GetName()
				active, aerr := d.IsActive()
				if err == nil && aerr == nil {
					out[name] = PendingRestore{RepoID: st.RepoID, Active: active}
				}
			}
		}
		d.Free()
	}
	return out, nil
}

// Validate refuses options that can never work (errors matching
// ErrInvalid), without touching anything.
func (o Options) Validate() error { return o.check() }

// check refuses options that can never work, before anything is done.
func (o *Options) check() error {
	o.defaults()
	if err := repo.ValidName("domain", o.Domain); err != nil {
		return invalidError{err}
	}
	if err := repo.ValidName("domain", o.As); err != nil {
		return invalidError{fmt.Errorf("--as: %w", err)}
	}
	if o.Format != "qcow2" && o.Format != "raw" {
		return invalidf("--format %q: qcow2 or raw", o.Format)
	}
	if o.ImageDir == "" {
		return invalidf("instant-restore needs --image-dir DIR: the new domain's disks are made there")
	}
	if o.Bandwidth < 0 {
		return invalidf("--bandwidth must not be negative")
	}
	abs, err := filepath.Abs(o.ImageDir)
	if err != nil {
		return invalidError{err}
	}
	o.ImageDir = abs
	return nil
}

// prepare opens what the restore needs and checks everything that can be
// checked before a thing is made: the name is free, the backup has a
// definition, the image directory is there, safe, reachable by QEMU and
// big enough.
func prepare(ctx context.Context, o Options) (_ *restore, err error) {
	rs := &restore{o: o, log: o.Log}
	defer func() {
		if err != nil {
			rs.close()
		}
	}()
	dir, err := safedir.Open(o.ImageDir, safedir.Options{Chain: true})
	switch {
	case errors.Is(err, unix.ENOENT), errors.Is(err, unix.ENOTDIR):
		return nil, invalidf("--image-dir %s: not a directory; create it (the new domain's disks are made there)", o.ImageDir)
	case errors.Is(err, safedir.ErrUntrusted):
		return nil, invalidf("--image-dir: %v; give a directory only root can change", err)
	case err != nil:
		return nil, fmt.Errorf("--image-dir %s: %w", o.ImageDir, err)
	}
	err = safedir.Private(dir)
	dir.Close()
	if err != nil {
		return nil, invalidf("--image-dir: %v; give a directory only root can write", err)
	}
	if rs.conn, err = libvirt.NewConnect(o.Connect); err != nil {
		return nil, fmt.Errorf("connect to libvirt at %s: %w (is libvirtd running?)", o.Connect, err)
	}
	if d, err := rs.conn.LookupDomainByName(o.As); err == nil {
		d.Free()
		return nil, invalidf("a domain named %s is already defined: choose another --as, or undefine it", o.As)
	}
	if rs.r, err = o.repository(ctx); err != nil {
		return nil, err
	}
	m, err := rs.r.Backup(ctx, o.Domain, o.Backup)
	if err != nil {
		return nil, err
	}
	saved := o.XML
	if saved == nil {
		if _, ok := m.Files["domain.xml"]; !ok {
			return nil, invalidf("backup %s/%s has no domain definition (it was read from an NBD export, not libvirt): give one with --xml FILE",
				m.Domain, m.ID)
		}
		if saved, err = rs.r.ReadFile(ctx, m, "domain.xml"); err != nil {
			return nil, fmt.Errorf("backup %s/%s: its domain definition: %w", m.Domain, m.ID, err)
		}
	}
	rs.st = state{RepoID: rs.r.Config().ID, Location: rs.r.Location(), Domain: m.Domain, Backup: m.ID, Format: o.Format,
		Socket: socketPath(o.RunDir, o.As)}
	var need int64
	for _, d := range m.Disks {
		ds := diskState{Name: d.Name, Size: d.Size}
		ds.Overlay, ds.Image = images(o.ImageDir, o.As, d.Name, o.Format)
		for _, p := range []string{ds.Overlay, ds.Image} {
			if _, err := os.Lstat(p); !errors.Is(err, os.ErrNotExist) {
				return nil, invalidf("%s already exists: remove it, or choose another --as or --image-dir", p)
			}
		}
		rs.st.Disks = append(rs.st.Disks, ds)
		need += min(d.Size, (d.Chunks-d.ZeroChunks)*m.ChunkSize)
	}
	if o.Format == "raw" {
		need *= 2 // the overlays hold everything before the raw copies are made
	}
	var fs unix.Statfs_t
	if err := unix.Statfs(o.ImageDir, &fs); err != nil {
		return nil, fmt.Errorf("--image-dir %s: %w", o.ImageDir, err)
	}
	if free := int64(fs.Bavail) * fs.Bsize; free < need {
		return nil, fmt.Errorf("--image-dir %s has %d MiB free; the disks of backup %s/%s hold up to %d MiB: make room, or choose another --image-dir",
			o.ImageDir, free>>20, m.Domain, m.ID, need>>20)
	}
	qemu, err := qemuUser(o.QEMUUser)
	if err != nil {
		return nil, err
	}
	rs.qemu = qemu
	if err := reachable(o.ImageDir, qemu); err != nil {
		return nil, invalidf("--image-dir %s: %v: QEMU runs as uid %d and must reach its images", o.ImageDir, err, qemu.UID)
	}
	// The socket's directory is made (0711) if missing: what exists of
	// the way to it must be open to QEMU too.
	p := o.RunDir
	for _, err := os.Stat(p); errors.Is(err, os.ErrNotExist) && p != "/"; _, err = os.Stat(p) {
		p = filepath.Dir(p)
	}
	if err := reachable(p, qemu); err != nil {
		return nil, invalidf("--run-dir %s: %v: QEMU runs as uid %d and must reach the export's socket", o.RunDir, err, qemu.UID)
	}
	rs.networkExists = func(name string) bool {
		n, err := rs.conn.LookupNetworkByName(name)
		if err != nil {
			return false
		}
		defer n.Free()
		active, err := n.IsActive()
		return err == nil && active
	}
	rs.res = rs.st.result(o.As)
	if rs.def, err = rs.definition(saved); err != nil {
		return nil, err
	}
	return rs, nil
}

// holderName is the restore's hold on its backup: this host's name and
// the new domain's, within a name's 128 characters.
func holderName(as string) string {
	host, _ := os.Hostname()
	b := []byte("instant." + host)
	for i, c := range b {
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '.' || c == '-' || c == '_') {
			b[i] = '-'
		}
	}
	h := string(b[:min(len(b), 127-len(as))])
	return h + "." + as
}

// socketPath is the export's socket in <run dir>/instant: named after the
// domain, short enough for any name (a socket's path is at most 107 bytes).
func socketPath(runDir, as string) string {
	h := sha256.Sum256([]byte(as))
	return filepath.Join(runDir, "instant", hex.EncodeToString(h[:8])+".sock")
}

// images are a disk's overlay and final image in dir.
func images(dir, as, disk, format string) (overlay, image string) {
	overlay = filepath.Join(dir, as+"-"+disk+".qcow2")
	if format == "raw" {
		return overlay, filepath.Join(dir, as+"-"+disk+".raw")
	}
	return overlay, overlay
}

// checkState checks a resumed restore's state against what this run
// would make of it: only root (libvirt's clients with write access) can
// change a domain's metadata, but no path from it is used that the name,
// the run directory and one image directory do not give.
func (rs *restore) checkState() error {
	st := &rs.st
	if want := socketPath(rs.o.RunDir, rs.o.As); st.Socket != want {
		return invalidf("its export's socket was %s, not %s: give the --run-dir it was restored with", st.Socket, want)
	}
	if st.Format != "qcow2" && st.Format != "raw" {
		return fmt.Errorf("format %q", st.Format)
	}
	dir := filepath.Dir(st.Disks[0].Overlay)
	for _, d := range st.Disks {
		if o, i := images(dir, rs.o.As, d.Name, st.Format); d.Overlay != o || d.Image != i {
			return fmt.Errorf("disk %s: images %s and %s are not the restore's own", d.Name, d.Overlay, d.Image)
		}
		for _, p := range []string{d.ErrorPolicy, d.RErrorPolicy} {
			if !knownPolicy(p) {
				return fmt.Errorf("disk %s: error policy %q", d.Name, p)
			}
		}
	}
	f, err := safedir.Open(dir, safedir.Options{Chain: true})
	if err == nil {
		err = safedir.Private(f)
		f.Close()
	}
	if err != nil {
		return fmt.Errorf("its image directory: %w", err)
	}
	rs.o.ImageDir = dir
	return nil
}

func knownPolicy(p string) bool {
	switch p {
	case "", "stop", "report", "ignore", "enospace":
		return true
	}
	return false
}

// startExport serves the backup's disks on the state's socket, given to
// QEMU's user.
func (rs *restore) startExport(ctx context.Context) error {
	var err error
	if rs.qemu == nil { // a resume: prepare did not look it up
		if rs.qemu, err = qemuUser(rs.o.QEMUUser); err != nil {
			return err
		}
	}
	var names []string
	for _, d := range rs.st.Disks {
		names = append(names, d.Name)
	}
	rs.e, err = export.Start(ctx, export.Options{Repository: rs.r, Domain: rs.st.Domain, Backup: rs.st.Backup, Disks: names,
		Listen: "unix://" + rs.st.Socket, SocketOwner: rs.qemu, CacheBytes: rs.o.CacheBytes, Log: rs.log})
	return err
}

// create starts the export, makes the overlays, defines the domain and
// starts it; on an error it removes everything it made.
func (rs *restore) create(ctx context.Context) (err error) {
	if err := rs.startExport(ctx); err != nil {
		return err
	}
	var made []string
	defer func() {
		if err != nil {
			if rs.dom != nil {
				rs.dom.Destroy()
				if uerr := rs.dom.UndefineFlags(libvirt.DOMAIN_UNDEFINE_NVRAM | libvirt.DOMAIN_UNDEFINE_MANAGED_SAVE |
					libvirt.DOMAIN_UNDEFINE_SNAPSHOTS_METADATA | libvirt.DOMAIN_UNDEFINE_CHECKPOINTS_METADATA); uerr != nil {
					err = fmt.Errorf("%w; and undefining %s failed: %v: undefine it by hand", err, rs.o.As, libvirtMessage(uerr))
				}
				rs.dom.Free()
				rs.dom = nil
			}
			if rs.st.Holder != "" {
				rs.r.Hold(context.WithoutCancel(ctx), rs.st.Domain, rs.st.Backup, rs.st.Holder, false)
			}
			for _, p := range made {
				os.Remove(p)
			}
		}
	}()
	for i, d := range rs.st.Disks {
		f, err := os.OpenFile(d.Overlay, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
		if err != nil {
			return fmt.Errorf("disk %s: %w", d.Name, err)
		}
		f.Close()
		made = append(made, d.Overlay)
		if err := qemuImg(ctx, "create", "-q", "-f", "qcow2", "-u", "-b", rs.e.Disks[i].URI, "-F", "raw", d.Overlay, strconv.FormatInt(d.Size, 10)); err != nil {
			return fmt.Errorf("disk %s: the overlay: %w", d.Name, err)
		}
	}
	// Until its disks are home the new domain needs the backup: a hold
	// of its own keeps retention from forgetting it.
	holder := holderName(rs.o.As)
	if err := rs.r.Hold(ctx, rs.st.Domain, rs.st.Backup, holder, true); err != nil {
		return fmt.Errorf("hold backup %s/%s while the restore needs it: %w", rs.st.Domain, rs.st.Backup, err)
	}
	rs.st.Holder = holder
	x, err := rs.def.Marshal()
	if err != nil {
		return err
	}
	if rs.dom, err = rs.conn.DomainDefineXML(x); err != nil {
		return fmt.Errorf("define domain %s: %v", rs.o.As, libvirtMessage(err))
	}
	meta, _ := json.Marshal(rs.st)
	if err := rs.dom.SetMetadata(libvirt.DOMAIN_METADATA_ELEMENT, "<restore>"+xmlEscape(string(meta))+"</restore>",
		"nbdmover", XMLNS, libvirt.DOMAIN_AFFECT_CONFIG); err != nil {
		return fmt.Errorf("domain %s: keep the restore's state: %v", rs.o.As, libvirtMessage(err))
	}
	rs.res.Reconnect = rs.keptReconnect()
	if rs.o.NoStart {
		return nil
	}
	if err := rs.dom.Create(); err != nil {
		return fmt.Errorf("start domain %s: %v", rs.o.As, libvirtMessage(err))
	}
	return nil
}

// keptReconnect says whether libvirt kept the disks' reconnect delay.
func (rs *restore) keptReconnect() bool {
	def, err := rs.current(libvirt.DOMAIN_XML_INACTIVE)
	if err != nil || def.Devices == nil {
		return false
	}
	for _, d := range def.Devices.Disks {
		if b := d.BackingStore; b != nil && b.Source != nil && b.Source.Network != nil && b.Source.Network.Reconnect != nil {
			return true
		}
	}
	return false
}

func (rs *restore) close() {
	if rs.e != nil {
		rs.e.Close()
	}
	if rs.dom != nil {
		rs.dom.Free()
	}
	if rs.conn != nil {
		rs.conn.Close()
	}
}

// qemuImg runs qemu-img without nbdmover's secrets in its environment.
func qemuImg(ctx context.Context, args ...string) error {
	cmd := exec.CommandContext(ctx, "qemu-img", args...)
	cmd.Env = childenv.Env()
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("qemu-img %s: %w: %s", args[0], err, out)
	}
	return nil
}

var confUser = regexp.MustCompile(`(?m)^\s*user\s*=\s*"([^"]+)"`)

// qemuUser is the user QEMU runs as: name, else qemu.conf's, else
// libvirt-qemu; with its primary group.
func qemuUser(name string) (*listen.Owner, error) {
	if name == "" {
		name = "libvirt-qemu"
		if b, err := os.ReadFile("/etc/libvirt/qemu.conf"); err == nil {
			if m := confUser.FindSubmatch(b); m != nil {
				name = string(m[1])
			}
		}
	}
	u, err := user.Lookup(name)
	if err != nil {
		u, err = user.LookupId(name)
	}
	if err != nil {
		return nil, fmt.Errorf("QEMU's user %s: %w (give it with --qemu-user)", name, err)
	}
	uid, _ := strconv.Atoi(u.Uid)
	gid, _ := strconv.Atoi(u.Gid)
	return &listen.Owner{UID: uid, GID: gid}, nil
}

// reachable says whether the user can walk to dir (search permission on
// it and every directory above).
func reachable(dir string, u *listen.Owner) error {
	if u.UID == 0 {
		return nil
	}
	for p := dir; ; p = filepath.Dir(p) {
		var st unix.Stat_t
		if err := unix.Stat(p, &st); err != nil {
			return err
		}
		ok := st.Mode&0o001 != 0 || int(st.Uid) == u.UID && st.Mode&0o100 != 0 || int(st.Gid) == u.GID && st.Mode&0o010 != 0
		if !ok {
			return fmt.Errorf("%s is not searchable by that user (chmod o+x, or choose another directory)", p)
		}
		if p == "/" {
			return nil
		}
	}
}

func libvirtMessage(err error) string {
	var le libvirt.Error
	if errors.As(err, &le) {
		return le.Message
	}
	return err.Error()
}

func parseState(meta string) (state, error) {
	var st state
	var x struct {
		Body string `xml:",chardata"`
	}
	if err := xml.Unmarshal([]byte(meta), &x); err != nil {
		return st, fmt.Errorf("its instant restore state: %w", err)
	}
	if err := json.Unmarshal([]byte(x.Body), &st); err != nil {
		return st, fmt.Errorf("its instant restore state: %w", err)
	}
	if err := repo.ValidName("domain", st.Domain); err != nil || len(st.Disks) == 0 || st.Socket == "" {
		return st, fmt.Errorf("its instant restore state is not one nbdmover wrote")
	}
	for _, d := range st.Disks {
		if err := repo.ValidName("disk", d.Name); err != nil {
			return st, fmt.Errorf("its instant restore state: %w", err)
		}
	}
	return st, nil
}
