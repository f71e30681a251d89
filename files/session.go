// Package files reads the files of a backup without restoring a disk: a
// Session serves the backup's disks over NBD (package export) to a
// libguestfs appliance (package guestfs), which parses the guest's
// partitions, LVM and filesystems in its own kernel, read-only; the host
// kernel never sees them. On that it lists directories, streams files,
// extracts trees under a directory they cannot leave, and compares two
// backups.
//
// Words: a filesystem's Name is how nbdmover shows it: "vda1" (disk vda,
// partition 1), "vda" (a filesystem on the whole disk), "vg0/root" (an
// LVM logical volume), "vda2:/home" (a btrfs subvolume). A guest path is
// absolute, in the guest's view: with an operating system found, its
// mount points are mounted where its fstab says; otherwise the one
// filesystem (or the one --fs names) is mounted at "/".
//
// Everything that comes from the guest (names, link targets, sizes) is
// hostile input: names are checked, links never followed on the host,
// extraction stays beneath its directory (os.Root).
package files

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nbdmover/nbdmover/export"
	"github.com/nbdmover/nbdmover/guestfs"
	"github.com/nbdmover/nbdmover/repo"
)

// Options say which backup to open and how.
type Options struct {
	Repo       repo.Options
	Repository *repo.Repo // an open repository to use instead of Repo (the daemon's)
	Domain     string
	Backup     string   // id, or "" / "latest"
	Disks      []string // the disks to give the appliance (default: all)
	// RunDir holds the export's socket, in a private directory.
	RunDir string
	// MemoryMiB is the appliance's memory (default 512).
	MemoryMiB int
	// Accel is "auto" (KVM, falling back to TCG when its launch fails),
	// "kvm" or "tcg".
	Accel      string
	CacheBytes int64 // the export's chunk cache (default 32 MiB: the appliance caches too)
	NoLock     bool
	Log        *slog.Logger
}

// DefaultMemoryMiB is an appliance's memory when none is given.
const DefaultMemoryMiB = 512

// ErrInvalid is matched by errors for options or paths that can never work.
var ErrInvalid = errors.New("invalid files option")

// ErrNotFound is matched by the error for a path the backup does not have.
var ErrNotFound = errors.New("no such file in the backup")

// ErrNoFilesystem is matched when there is nothing to mount, or more than
// one candidate and no --fs.
var ErrNoFilesystem = errors.New("no filesystem to read")

type invalidError struct{ error }

func (invalidError) Is(target error) bool { return target == ErrInvalid }

func invalidf(format string, args ...any) error { return invalidError{fmt.Errorf(format, args...)} }

// Filesystem is one filesystem the appliance found.
type Filesystem struct {
	Name       string `json:"name"`
	Device     string `json:"device"` // in the appliance (/dev/sda1, btrfsvol:…)
	Type       string `json:"type"`
	Size       int64  `json:"size,omitempty"` // of its device
	Label      string `json:"label,omitempty"`
	UUID       string `json:"uuid,omitempty"`
	Mountpoint string `json:"mountpoint,omitempty"` // where the guest mounts it (inspection), or "/" for --fs
	Mounted    bool   `json:"mounted"`
	Note       string `json:"note,omitempty"` // why it is not readable, when not

	subvol string // a btrfs subvolume's path
}

// Session is an open backup: its export, its appliance, its mounts. Its
// methods may be called concurrently (the appliance serializes them).
type Session struct {
	Domain, Backup string
	Accel          string        // "kvm" or "tcg": how the appliance runs
	Launch         time.Duration // the appliance's launch (with a failed KVM try)
	Inspect        time.Duration // finding the filesystems and operating systems
	OS             string        // the operating system found, if any

	mu      sync.RWMutex // held by callers of Use (read) and while remounting (write)
	current string       // what Use last mounted
	fss     []Filesystem
	roots   []string // inspected operating systems' roots
	// missing are the guest's mount points not mounted (their device is
	// not among the disks, or its mount failed), with why: a path beneath
	// one would read as an empty directory.
	missing map[string]string

	cacheMu  sync.Mutex
	dirCache []dirNames // the last directories listed, newest last

	log  *slog.Logger
	e    *export.Export
	h    *guestfs.Handle
	dir  string
	used atomic.Int64 // unix nanoseconds of the last use
}

// kvmFailed remembers, for the process, that a KVM launch failed here:
// later sessions go straight to TCG instead of paying for it again. The
// file kvmFailedFile in the run directory (a tmpfs: until the next boot)
// remembers it for later processes.
var kvmFailed atomic.Bool

const kvmFailedFile = "files-kvm-failed"

// Open serves the backup and launches an appliance on it, then inspects
// and mounts. It takes as long as an appliance's boot (seconds with KVM,
// tens of seconds under TCG).
func Open(ctx context.Context, o Options) (_ *Session, err error) {
	if o.Log == nil {
		o.Log = slog.New(slog.DiscardHandler)
	}
	switch o.Accel {
	case "":
		o.Accel = "auto"
	case "auto", "kvm", "tcg":
	default:
		return nil, invalidf("appliance acceleration %q: want auto, kvm or tcg", o.Accel)
	}
	if o.MemoryMiB == 0 {
		o.MemoryMiB = DefaultMemoryMiB
	}
	if o.MemoryMiB < 256 {
		return nil, invalidf("appliance memory %d MiB: at least 256 MiB", o.MemoryMiB)
	}
	if o.CacheBytes == 0 {
		o.CacheBytes = 32 << 20
	}
	if err := os.MkdirAll(o.RunDir, 0o755); err != nil {
		return nil, fmt.Errorf("run directory: %w", err)
	}
	dir, err := os.MkdirTemp(o.RunDir, "files-")
	if err != nil {
		return nil, fmt.Errorf("run directory: %w", err)
	}
	s := &Session{log: o.Log, dir: dir}
	defer func() {
		if err != nil {
			s.Close()
		}
	}()
	s.e, err = export.Start(ctx, export.Options{Repo: o.Repo, Repository: o.Repository, Domain: o.Domain, Backup: o.Backup,
		Disks: o.Disks, Listen: "unix://" + filepath.Join(dir, "nbd.sock"), CacheBytes: o.CacheBytes, NoLock: o.NoLock, Log: o.Log})
	if err != nil {
		if errors.Is(err, export.ErrInvalid) {
			return nil, invalidError{err}
		}
		return nil, err
	}
	s.Domain, s.Backup = s.e.Domain, s.e.Backup
	start := time.Now()
	if err := s.launch(ctx, o); err != nil {
		return nil, err
	}
	s.Launch = time.Since(start)
	start = time.Now()
	if err := s.discover(); err != nil {
		return nil, err
	}
	s.Inspect = time.Since(start)
	s.current = "\x00"
	s.touch()
	o.Log.Info("files session open", "domain", s.Domain, "id", s.Backup, "accel", s.Accel,
		"launch", s.Launch.Round(time.Millisecond), "inspect", s.Inspect.Round(time.Millisecond), "os", s.OS)
	return s, nil
}

// launch starts the appliance: with KVM first where /dev/kvm is usable
// (unless told otherwise), under TCG when that fails.
func (s *Session) launch(ctx context.Context, o Options) error {
	try := []string{"kvm", "tcg"}
	marker := filepath.Join(o.RunDir, kvmFailedFile)
	switch {
	case o.Accel == "tcg", o.Accel == "auto" && (kvmFailed.Load() || !kvmUsable()):
		try = []string{"tcg"}
	case o.Accel == "kvm":
		try = []string{"kvm"}
	default:
		if why, err := os.ReadFile(marker); err == nil {
			try = []string{"tcg"}
			o.Log.Warn("the file appliance runs under TCG (slower): its KVM launch failed earlier on this boot (--accel kvm tries again)",
				"reason", printable(strings.TrimSpace(string(why))))
		}
	}
	var errs []error
	for _, accel := range try {
		if err := ctx.Err(); err != nil {
			return err
		}
		h, err := s.start(accel, o)
		if err == nil {
			s.h, s.Accel = h, accel
			if accel == "kvm" {
				os.Remove(marker)
			}
			return nil
		}
		errs = append(errs, fmt.Errorf("%s: %w", accel, err))
		if accel == "kvm" && o.Accel == "auto" {
			kvmFailed.Store(true)
			o.Log.Warn("the file appliance failed to launch with KVM; using TCG (slower)", "reason", lastLine(err))
			os.WriteFile(marker, []byte(lastLine(err)+"\n"), 0o644)
		}
	}
	return launchError(errors.Join(errs...))
}

func (s *Session) start(accel string, o Options) (*guestfs.Handle, error) {
	h, err := guestfs.New(o.MemoryMiB)
	if err != nil {
		return nil, err
	}
	if accel == "tcg" {
		err = h.ForceTCG()
	}
	sock := filepath.Join(s.dir, "nbd.sock")
	for i := 0; err == nil && i < len(s.e.Disks); i++ {
		err = h.AddNBD(sock, s.e.Disks[i].Name)
	}
	if err == nil {
		err = h.Launch()
	}
	if err != nil {
		h.Close()
		return nil, err
	}
	return h, nil
}

// kvmUsable reports whether /dev/kvm can be opened.
func kvmUsable() bool {
	f, err := os.OpenFile("/dev/kvm", os.O_RDWR, 0)
	if err != nil {
		return false
	}
	f.Close()
	return true
}

// launchError says why no appliance started, with the last messages that
// explain it and what to check.
func launchError(err error) error {
	var le *guestfs.LaunchError
	detail := ""
	if errors.As(err, &le) {
		detail = "; its last messages:\n" + lastLines(le.Tail, 8)
	}
	return fmt.Errorf("the libguestfs appliance did not start: %w%s\n"+
		"check the set-up with libguestfs-test-tool; the appliance needs the Debian packages libguestfs0 and "+
		"linux-image-amd64 (supermin builds it from a kernel in /boot)", err, detail)
}

// lastLine is the reason for a failure in one line: for a launch, the
// last message that says "error" (QEMU's, typically), else the error.
func lastLine(err error) string {
	var le *guestfs.LaunchError
	if errors.As(err, &le) {
		lines := strings.Split(le.Tail, "\n")
		for i := len(lines) - 1; i >= 0; i-- {
			if strings.Contains(strings.ToLower(lines[i]), "error") {
				return printable(strings.TrimSpace(lines[i]))
			}
		}
	}
	return printable(err.Error())
}

// lastLines is the last n non-empty lines of s, each made printable.
func lastLines(s string, n int) string {
	var out []string
	lines := strings.Split(s, "\n")
	for i := len(lines) - 1; i >= 0 && len(out) < n; i-- {
		if l := strings.TrimSpace(lines[i]); l != "" {
			out = append(out, "  "+printable(l))
		}
	}
	slices.Reverse(out)
	return strings.Join(out, "\n")
}

// printable quotes a string that has control characters (C0 or C1) or
// is not UTF-8.
func printable(s string) string {
	for _, r := range s {
		if r < 0x20 || r >= 0x7f && r < 0xa0 || r == '\uFFFD' {
			q := strconv.Quote(s)
			return q[1 : len(q)-1]
		}
	}
	return s
}

var sdRe = regexp.MustCompile(`^/dev/sd([a-z]+)([0-9]*)$`)

// name is how a device is shown: vda1, vg0/root (a btrfs subvolume's,
// vda2:/home, is made in discover).
func (s *Session) name(dev string) string {
	if m := sdRe.FindStringSubmatch(dev); m != nil {
		if i, err := s.h.DeviceIndex("/dev/sd" + m[1]); err == nil && i >= 0 && i < len(s.e.Disks) {
			return s.e.Disks[i].Name + m[2]
		}
	}
	return strings.TrimPrefix(dev, "/dev/")
}

// unreadable is why a filesystem type is not mounted ("" if it may be).
func unreadable(typ string) string {
	switch typ {
	case "crypto_LUKS", "BitLocker":
		return "encrypted filesystem, not opened"
	case "swap":
		return "swap"
	case "unknown", "":
		return "no filesystem nbdmover can read"
	}
	return ""
}

// discover lists the filesystems the appliance finds, and the operating
// systems.
func (s *Session) discover() error {
	found, err := s.h.Filesystems()
	if err != nil {
		return err
	}
	for _, f := range found {
		if strings.HasPrefix(f[0], "btrfsvol:") {
			continue // listed below, from their filesystem
		}
		x := Filesystem{Name: s.name(f[0]), Device: f[0], Type: f[1], Note: unreadable(f[1])}
		x.Size, _ = s.h.Size(f[0])
		if x.Note == "" {
			x.Label, _ = s.h.Label(f[0])
			x.UUID, _ = s.h.UUID(f[0])
		}
		s.fss = append(s.fss, x)
	}
	// A btrfs filesystem's subvolumes are listed from it, named after it
	// (vdd:/home). libguestfs's own list names a subvolume's device as the
	// appliance's kernel enumerated the disks, which is not always the
	// order they were given in (SCSI scanning), so "btrfsvol:/dev/sdc/home"
	// can be a subvolume of sdd's filesystem.
	for _, f := range slices.Clone(s.fss) {
		if f.Type != "btrfs" {
			continue
		}
		subs, err := s.h.BtrfsSubvolumes(f.Device)
		if err != nil {
			s.log.Warn("the btrfs filesystem's subvolumes are not listed", "fs", f.Name, "error", err)
			continue
		}
		for _, p := range subs {
			s.fss = append(s.fss, Filesystem{Name: f.Name + ":/" + p, Device: "btrfsvol:" + f.Device + "/" + p, Type: "btrfs",
				Label: f.Label, UUID: f.UUID, subvol: p})
		}
	}
	// Encrypted volumes, which list_filesystems leaves out: listed, with
	// why they are not read.
	devs, err := s.h.Devices()
	if err != nil {
		return err
	}
	for _, d := range devs {
		if slices.ContainsFunc(s.fss, func(f Filesystem) bool { return f.Device == d }) {
			continue
		}
		if typ, err := s.h.VfsType(d); err == nil && (typ == "crypto_LUKS" || typ == "BitLocker") {
			size, _ := s.h.Size(d)
			s.fss = append(s.fss, Filesystem{Name: s.name(d), Device: d, Type: typ, Size: size, Note: unreadable(typ)})
		}
	}
	if s.roots, err = s.h.InspectOS(); err != nil {
		return err
	}
	if len(s.roots) == 1 {
		s.OS, _ = s.h.ProductName(s.roots[0])
	}
	return nil
}

// Use makes fs what the paths of the caller's next calls are in, until it
// calls release: "" is the guest as it runs (its operating system's
// filesystems where its fstab mounts them) or, with no operating system,
// its one filesystem; a Name (or device) mounts that one at "/". Calls
// with the same fs share the appliance; another fs waits for them.
func (s *Session) Use(fs string) (release func(), err error) {
	for {
		s.mu.RLock()
		if s.current == fs {
			return s.mu.RUnlock, nil
		}
		s.mu.RUnlock()
		if fs != "" && s.fsIndex(fs) < 0 {
			return nil, invalidf("filesystem %s: not among those of %s/%s (%s)", printable(fs), s.Domain, s.Backup, s.fsNames())
		}
		s.mu.Lock()
		if s.current != fs {
			s.current = "\x00" // nothing usable mounted, until this works
			if err := s.h.UmountAll(); err != nil {
				s.mu.Unlock()
				return nil, err
			}
			if err := s.mount(fs); err != nil {
				s.mu.Unlock()
				return nil, err
			}
			s.current = fs
		}
		s.mu.Unlock()
	}
}

// fsIndex is the index of the filesystem named (or with the device) fs,
// -1 if none.
func (s *Session) fsIndex(fs string) int {
	return slices.IndexFunc(s.fss, func(f Filesystem) bool { return f.Name == fs || f.Device == fs })
}

// Filesystems lists the filesystems found, and what is mounted now.
func (s *Session) Filesystems() []Filesystem {
	s.mu.RLock()
	defer s.mu.RUnlock()
	return slices.Clone(s.fss)
}

// mount mounts the guest's operating system, or its one filesystem, or
// fs at "/" (under the write lock).
func (s *Session) mount(fs string) error {
	s.missing = nil
	for i := range s.fss {
		s.fss[i].Mounted = false
		if strings.HasPrefix(s.fss[i].Note, "not mounted") {
			s.fss[i].Note = ""
		}
	}
	if fs != "" {
		i := s.fsIndex(fs) // one of them: Use checked
		if n := s.fss[i].Note; n != "" {
			return fmt.Errorf("%w: filesystem %s: %s", ErrNoFilesystem, fs, n)
		}
		return s.mountAt(i, "/")
	}
	if len(s.roots) > 1 {
		return fmt.Errorf("%w: %d operating systems found; choose a filesystem with --fs (%s)", ErrNoFilesystem, len(s.roots), s.fsNames())
	}
	if len(s.roots) == 1 {
		return s.mountOS(s.roots[0])
	}
	var can []int
	for i, f := range s.fss {
		if f.Note == "" {
			can = append(can, i)
		}
	}
	switch len(can) {
	case 0:
		if len(s.fss) == 0 {
			return fmt.Errorf("%w: the backup's disks hold no filesystem libguestfs recognises", ErrNoFilesystem)
		}
		return fmt.Errorf("%w: %s", ErrNoFilesystem, s.fsNames())
	case 1:
		return s.mountAt(can[0], "/")
	}
	return fmt.Errorf("%w: no operating system found and %d filesystems; choose one with --fs (%s)", ErrNoFilesystem, len(can), s.fsNames())
}

// fsNames lists the filesystems for an error message.
func (s *Session) fsNames() string {
	var l []string
	for _, f := range s.fss {
		d := f.Name + " " + f.Type
		if f.Note != "" {
			d += " (" + f.Note + ")"
		}
		l = append(l, d)
	}
	if len(l) == 0 {
		return "none"
	}
	return strings.Join(l, ", ")
}

// mountOS mounts an inspected operating system's filesystems where its
// fstab says, shortest mount point first.
func (s *Session) mountOS(root string) error {
	mps, err := s.h.Mountpoints(root)
	if err != nil {
		return err
	}
	slices.SortFunc(mps, func(a, b [2]string) int { return cmp.Compare(len(a[0]), len(b[0])) })
	s.missing = map[string]string{}
	for _, mp := range mps {
		at := mp[0]
		if at != path.Clean(at) || !path.IsAbs(at) || slices.Contains(strings.Split(at, "/"), "..") {
			s.log.Warn("guest mount point skipped: not a clean absolute path", "at", printable(at))
			continue
		}
		i := s.mountable(mp[1])
		if i < 0 {
			s.missing[at] = "its filesystem " + printable(mp[1]) + " is not on the disks read (see --disk)"
			continue
		}
		s.fss[i].Mountpoint = at
		if err := s.mountAt(i, at); err != nil {
			if at == "/" {
				return err
			}
			s.fss[i].Note = "not mounted: " + lastLine(err)
			s.missing[at] = s.fss[i].Note
			s.log.Warn("guest filesystem not mounted", "fs", s.fss[i].Name, "at", at, "err", err)
		}
	}
	if _, ok := s.missing["/"]; ok {
		return fmt.Errorf("%w: the guest's root filesystem: %s", ErrNoFilesystem, s.missing["/"])
	}
	return nil
}

// unreadableBeneath names the guest's mount points beneath p that are
// not mounted, with why: a copy of p holds them as empty directories.
func (s *Session) unreadableBeneath(p string) []string {
	var out []string
	for at, why := range s.missing {
		if p == "/" && at != "/" || strings.HasPrefix(at, p+"/") {
			out = append(out, at+" (the guest mounts a filesystem here that cannot be read: "+why+"; copied as an empty directory)")
		}
	}
	slices.Sort(out)
	return out
}

// mountable is the index of the filesystem inspection names dev (-1 if
// none). A btrfs subvolume's name from libguestfs may carry another
// disk's device (see discover): it is matched by its subvolume path when
// one subvolume has it.
func (s *Session) mountable(dev string) int {
	if i := slices.IndexFunc(s.fss, func(f Filesystem) bool { return f.Device == dev }); i >= 0 || !strings.HasPrefix(dev, "btrfsvol:") {
		return i
	}
	found := -1
	for i, f := range s.fss {
		if f.subvol != "" && strings.HasSuffix(dev, "/"+f.subvol) {
			if found >= 0 {
				return -1 // two candidates: no guess
			}
			found = i
		}
	}
	return found
}

// mounted says why p cannot be read when it is at or beneath a mount
// point of the guest that is not mounted.
func (s *Session) mounted(p string) error {
	for at, why := range s.missing {
		if p == at || strings.HasPrefix(p, at+"/") {
			return fmt.Errorf("%w: %s is on the filesystem the guest mounts at %s, which cannot be read: %s", ErrNoFilesystem, printable(p), printable(at), why)
		}
	}
	return nil
}

func (s *Session) mountAt(i int, at string) error {
	f := &s.fss[i]
	opts := "ro"
	if f.Type == "xfs" {
		opts = "ro,nouuid"
	}
	if err := s.h.MountRO(opts, f.Device, at); err != nil {
		return fmt.Errorf("mount %s (%s) at %s: %w", f.Name, f.Type, at, err)
	}
	f.Mounted = true
	if f.Mountpoint == "" {
		f.Mountpoint = at
	}
	return nil
}

// touch records a use (for an idle timeout).
func (s *Session) touch() { s.used.Store(time.Now().UnixNano()) }

// LastUse is when the session was last used.
func (s *Session) LastUse() time.Time { return time.Unix(0, s.used.Load()) }

// Close ends the appliance and the export. Idempotent.
func (s *Session) Close() {
	if s.h != nil {
		s.h.Close()
	}
	if s.e != nil {
		s.e.Close()
	}
	os.RemoveAll(s.dir)
}

// cleanPath checks a guest path: absolute, no NUL; cleaned.
func cleanPath(p string) (string, error) {
	if !strings.HasPrefix(p, "/") {
		return "", invalidf("guest path %q: must be absolute (start with /)", p)
	}
	if strings.IndexByte(p, 0) >= 0 {
		return "", invalidf("guest path %q: has a NUL byte", p)
	}
	return path.Clean(p), nil
}
