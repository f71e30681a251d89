package restore

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"github.com/nbdmover/nbdmover/repo/lock"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/nbdmover/nbdmover/diskview"
	"github.com/nbdmover/nbdmover/internal/childenv"
	"github.com/nbdmover/nbdmover/internal/hold"
	"github.com/nbdmover/nbdmover/internal/progress"
	"github.com/nbdmover/nbdmover/internal/safedir"
	"github.com/nbdmover/nbdmover/nbdclient"
	"github.com/nbdmover/nbdmover/repo"
	"golang.org/x/sys/unix"
)

// Options say what to restore where.
type Options struct {
	Repo   repo.Options
	Domain string
	Backup string // id, or "" / "latest"
	// Disk selects one disk, written to the file Output. Without it every
	// disk is written into the directory Output as <disk>.<format>.
	Disk     string
	Output   string
	Format   string // "raw" (default) or "qcow2"
	Parallel int    // chunks fetched at once (default 8; from S3, 32 MiB of chunks, at least 8)
	// NoLock reads without the repository's shared lock (a read-only
	// repository): a gc running elsewhere may then delete what is read.
	NoLock bool
	Log    *slog.Logger
	// Progress, if set, is given every disk's counter before the first is
	// written (phase waiting, write, done): bytes of data chunks written
	// of those the manifest counts.
	Progress func(*progress.Counter) `json:"-"`
}

// Disk is one file a restore wrote.
type Disk struct {
	Name    string  `json:"name"`
	Path    string  `json:"path"`
	Size    int64   `json:"size"`
	Seconds float64 `json:"seconds"`
}

// ErrInvalid is matched by the errors for options that can never work.
var ErrInvalid = errors.New("invalid restore option")

type invalidError struct{ error }

func (invalidError) Is(target error) bool { return target == ErrInvalid }

// ValidFormat says why format is not an output format, or returns nil.
func ValidFormat(format string) error {
	if format != "" && format != "raw" && format != "qcow2" {
		return invalidError{fmt.Errorf("restore format %q: want raw or qcow2", format)}
	}
	return nil
}

// Restore writes disks of a backup to new files. It never overwrites: an
// existing output file is an error. Each image is written in a private
// directory <output>.partial and linked to its name only once complete
// and synced, so a failed or killed restore never leaves a file that
// looks whole (a failed one removes its .partial; a killed one leaves it,
// which the next restore to the same output reports). Nothing is opened
// by a name someone else could change (see place).
func Restore(ctx context.Context, o Options) (*repo.Manifest, []Disk, error) {
	if o.Format == "" {
		o.Format = "raw"
	}
	if err := ValidFormat(o.Format); err != nil {
		return nil, nil, err
	}
	if o.Output == "" {
		return nil, nil, invalidError{errors.New("restore: no --output given")}
	}
	if b := filepath.Base(o.Output); o.Disk != "" && (strings.HasSuffix(o.Output, "/") || b == "." || b == "..") {
		return nil, nil, invalidError{fmt.Errorf("restore --disk: --output %s names a directory; give the image file's name", o.Output)}
	}
	if err := repo.ValidName("domain", o.Domain); err != nil {
		return nil, nil, invalidError{err}
	}
	r, err := o.Repo.Open(ctx)
	if err != nil {
		return nil, nil, err
	}

	// The shared lock keeps a gc from deleting the backup's objects while
	// they are read (should it be forgotten meanwhile).
	if !o.NoLock {
		held, lctx, err := r.Lock(ctx, lock.Shared, "restore "+o.Domain, o.Log)
		if err != nil {
			return nil, nil, lock.NoLockHint(err)
		}
		defer held.Release()
		ctx = lctx
	}
	m, err := r.Backup(ctx, o.Domain, o.Backup)
	if err != nil {
		return nil, nil, err
	}
	// The output's directory is opened once, following no link another
	// user could change, and every image goes into it by its descriptor.
	var todo []Disk
	dir, create := o.Output, true // every disk into the directory Output
	if o.Disk != "" {
		d, err := m.Disk(o.Disk)
		if err != nil {
			return nil, nil, err
		}
		todo = append(todo, Disk{Name: d.Name, Path: o.Output, Size: d.Size})
		dir, create = filepath.Dir(o.Output), false
	} else {
		for _, d := range m.Disks {
			todo = append(todo, Disk{Name: d.Name, Path: filepath.Join(o.Output, d.Name+"."+o.Format), Size: d.Size})
		}
	}
	out, err := safedir.Open(dir, safedir.Options{Create: create, Perm: 0o700})
	if err != nil {
		return nil, nil, fmt.Errorf("restore: the output's directory: %w", err)
	}
	defer out.Close()
	write := restoreRaw
	if o.Format == "qcow2" {
		write = restoreQcow2
	}
	counters := make([]*progress.Counter, len(todo))
	for i, d := range todo {
		counters[i] = progress.NewCounter(d.Name, "waiting", dataBytes(m, d.Name, r.Config().ChunkSize))
		if o.Progress != nil {
			o.Progress(counters[i])
		}
	}
	var done []Disk
	for i, d := range todo {
		start := time.Now()
		c := counters[i]
		c.Begin("write")
		if err := restoreFile(out, d, func(p *place) error { return write(ctx, r, m, d, p, o.Parallel, c) }); err != nil {
			return m, done, fmt.Errorf("restore %s/%s disk %s to %s: %w", m.Domain, m.ID, d.Name, d.Path, err)
		}
		c.Total.Store(c.Done.Load())
		c.SetPhase(progress.PhaseDone)
		d.Seconds = time.Since(start).Seconds()
		done = append(done, d)
	}
	return m, done, nil
}

// dataBytes is about how many bytes of data chunks a disk of m has (its
// manifest counts chunks, not the short last one's length): a restore's
// total for progress.
func dataBytes(m *repo.Manifest, disk string, chunkSize int64) int64 {
	d, err := m.Disk(disk)
	if err != nil {
		return -1
	}
	return min(d.Size, max(0, d.Chunks-d.ZeroChunks)*chunkSize)
}

// place is where one image is written. The output's directory may belong
// to someone else (root restoring into a VM owner's directory), who can
// rename and replace its entries at any moment: so the image is made in
// a private directory, <output>.partial (mode 0700, ours, checked after
// it was opened without following links), and reached only through
// descriptors, never by a name in the output directory: the raw image is
// written through the descriptor of its exclusive create, the qcow2 tools
// get the private directory as their file descriptor 3
// (/proc/self/fd/3/image, a name that no user's output name can make
// them misparse), and the finished image is linked from the private
// directory to the output's name, which fails if anything is there.
type place struct {
	out     *os.File // the output's directory
	name    string   // the output's name in it
	partial string   // the private directory's name in it
	priv    *os.File // the private directory
}

// imageName is the image's name in the private directory.
const imageName = "image"

// restoreFile makes the private directory, has write fill the image in
// it, and links it to the output's name when write succeeds; on failure
// the private directory is removed.
func restoreFile(out *os.File, d Disk, write func(p *place) error) error {
	p, err := newPlace(out, d.Path)
	if err != nil {
		return err
	}
	defer p.close()
	if err := write(p); err != nil {
		p.remove()
		return err
	}
	// A link never replaces an existing file: an output created meanwhile
	// is not overwritten.
	err = unix.Linkat(int(p.priv.Fd()), imageName, int(p.out.Fd()), p.name, 0)
	p.remove()
	if errors.Is(err, unix.EEXIST) {
		return fmt.Errorf("%s exists; remove it or choose another output", d.Path)
	}
	if err != nil {
		return fmt.Errorf("link the finished image to %s: %w", d.Path, err)
	}
	return p.out.Sync()
}

// newPlace makes the private directory for the image at path in the
// output's directory out.
func newPlace(out *os.File, path string) (*place, error) {
	p := &place{out: out, name: filepath.Base(path), partial: filepath.Base(path) + ".partial"}
	dfd := int(out.Fd())
	var st unix.Stat_t
	if unix.Fstatat(dfd, p.name, &st, unix.AT_SYMLINK_NOFOLLOW) == nil {
		return nil, fmt.Errorf("%s exists; remove it or choose another output", path)
	}
	if err := unix.Mkdirat(dfd, p.partial, 0o700); err != nil {
		if errors.Is(err, unix.EEXIST) {
			return nil, fmt.Errorf("%s.partial exists: another restore is writing it, or one was killed (remove it)", path)
		}
		return nil, fmt.Errorf("make %s.partial: %w", path, err)
	}
	hold.At("restore-partial")
	fd, err := unix.Openat(dfd, p.partial, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if err == nil {
		// Ours and private, or someone swapped it between the mkdir
		// and the open: only root could make such a directory.
		if err = unix.Fstat(fd, &st); err == nil && (st.Uid != uint32(os.Geteuid()) || st.Mode&0o077 != 0) {
			err = fmt.Errorf("it is not the private directory this restore made (owner %d, mode %o): someone replaced it, "+
				"or the file system does not keep owners and modes (FAT, some CIFS or NFS mounts): restore elsewhere", st.Uid, st.Mode&0o7777)
		}
		if err != nil {
			unix.Close(fd)
		}
	}
	if errors.Is(err, unix.ELOOP) || errors.Is(err, unix.ENOTDIR) {
		err = errors.New("it was replaced by a link or a file (by someone who can write its directory)")
	}
	if err != nil {
		unix.Unlinkat(dfd, p.partial, unix.AT_REMOVEDIR) // ours, if empty; another's, only if empty too
		return nil, fmt.Errorf("open %s.partial, the restore's private directory: %w", path, err)
	}
	p.priv = os.NewFile(uintptr(fd), path+".partial")
	return p, nil
}

// remove removes the image and the private directory (by its name: what
// someone put there instead is removed only if it is an empty directory).
func (p *place) remove() {
	unix.Unlinkat(int(p.priv.Fd()), imageName, 0)
	unix.Unlinkat(int(p.out.Fd()), p.partial, unix.AT_REMOVEDIR)
}

func (p *place) close() {
	p.priv.Close()
}

// fileTarget writes a raw image file, one write at a time: a buffered
// write holds the file's inode lock, and the decoders' concurrent writes
// spun on it in the kernel (8% of a restore's cycles, 2.5 s of system time
// of 7.5 s for a 4 GiB disk; docs/performance.md, 2026-12-03).
type fileTarget struct {
	f       *os.File
	mu      *sync.Mutex
	written *atomic.Int64
}

func (t fileTarget) WriteAt(_ context.Context, p []byte, off int64) error {
	t.mu.Lock()
	defer t.mu.Unlock()
	n, err := t.f.WriteAt(p, off)
	t.written.Add(int64(n))
	return err
}

// restoreRaw writes the disk as a sparse raw image, through the
// descriptor of the image's exclusive create.
func restoreRaw(ctx context.Context, r *repo.Repo, m *repo.Manifest, d Disk, p *place, parallel int, c *progress.Counter) (err error) {
	fd, err := unix.Openat(int(p.priv.Fd()), imageName, unix.O_WRONLY|unix.O_CREAT|unix.O_EXCL|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0o600)
	if err != nil {
		return fmt.Errorf("create the image: %w", err)
	}
	f := os.NewFile(uintptr(fd), imageName)
	defer func() {
		if cerr := f.Close(); err == nil {
			err = cerr
		}
	}()
	hold.At("restore-writing")
	if err := f.Truncate(d.Size); err != nil {
		return err
	}
	if err := copyDisk(ctx, r, m, d.Name, fileTarget{f, new(sync.Mutex), &c.Written}, parallel, c); err != nil {
		return err
	}
	c.SetPhase("sync")
	return f.Sync()
}

// copyDisk copies disk of backup m to t through a view of it, with
// parallel chunks fetched ahead, counting in c.
func copyDisk(ctx context.Context, r *repo.Repo, m *repo.Manifest, disk string, t diskview.Target, parallel int, c *progress.Counter) error {
	v, err := diskview.Open(ctx, r, m, disk, diskview.Options{ReadAhead: parallel})
	if err != nil {
		return err
	}
	defer v.Close()
	return v.Copy(ctx, t, func(n int64) { c.Read.Add(n); c.Done.Add(n) })
}

type poolTarget struct {
	p       *nbdclient.Pool
	written *atomic.Int64
}

func (t poolTarget) WriteAt(ctx context.Context, p []byte, off int64) error {
	if err := t.p.WriteAt(ctx, p, off); err != nil {
		return err
	}
	t.written.Add(int64(len(p)))
	return nil
}

// restoreQcow2 makes the image with qemu-img, serves it with qemu-nbd on
// a private socket and writes the disk through NBD. Both tools reach the
// image through the private directory, their file descriptor 3.
func restoreQcow2(ctx context.Context, r *repo.Repo, m *repo.Manifest, d Disk, p *place, parallel int, c *progress.Counter) (err error) {
	cmd := exec.CommandContext(ctx, "qemu-img", "create", "-q", "-f", "qcow2", "--", imagePath, strconv.FormatInt(d.Size, 10))
	cmd.ExtraFiles, cmd.Env = []*os.File{p.priv}, childenv.Env()
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("qemu-img create: %v: %s", err, bytes.TrimSpace(out))
	}
	hold.At("restore-writing")
	srv, pool, err := startQemuNBD(ctx, p.priv, parallel)
	if err != nil {
		return err
	}
	defer func() {
		pool.Close()
		if serr := srv.stop(); err == nil {
			err = serr
		}
	}()
	if err := copyDisk(ctx, r, m, d.Name, poolTarget{pool, &c.Written}, parallel, c); err != nil {
		return err
	}
	c.SetPhase("sync")
	return pool.Flush(ctx)
}

// imagePath is the image as qemu-img and qemu-nbd see it: in the private
// directory, handed to them as file descriptor 3.
const imagePath = "/proc/self/fd/3/" + imageName

// qemuNBD is a qemu-nbd serving one writable image on a private socket.
type qemuNBD struct {
	cmd    *exec.Cmd
	dir    string
	sock   string
	stderr bytes.Buffer
	exited chan struct{}
}

// startQemuNBD serves image and connects conns clients to it. qemu-nbd is
// killed if this process dies (PR_SET_PDEATHSIG), and it is ready when a
// connection succeeds: its socket file appears before it listens.
func startQemuNBD(ctx context.Context, priv *os.File, conns int) (*qemuNBD, *nbdclient.Pool, error) {
	dir, err := os.MkdirTemp("", "nbdmover-restore-") // mode 0700
	if err != nil {
		return nil, nil, err
	}
	s := &qemuNBD{dir: dir, sock: filepath.Join(dir, "nbd.sock"), exited: make(chan struct{})}
	s.cmd = exec.Command("qemu-nbd", "-f", "qcow2", "--cache=writeback", "-e", strconv.Itoa(conns+1), "-k", s.sock, "--", imagePath)
	s.cmd.ExtraFiles, s.cmd.Env = []*os.File{priv}, childenv.Env()
	s.cmd.Stderr = &s.stderr
	s.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := s.cmd.Start(); err != nil {
		os.RemoveAll(dir)
		return nil, nil, fmt.Errorf("qemu-nbd: %w", err)
	}
	go func() { s.cmd.Wait(); close(s.exited) }()
	deadline := time.Now().Add(30 * time.Second)
	for {
		pool, err := nbdclient.DialPool(ctx, nbdclient.Config{Socket: s.sock}, conns)
		if err == nil {
			return s, pool, nil
		}
		select {
		case <-s.exited:
			os.RemoveAll(dir)
			return nil, nil, fmt.Errorf("qemu-nbd exited: %s", bytes.TrimSpace(s.stderr.Bytes()))
		case <-ctx.Done():
			s.stop()
			return nil, nil, context.Cause(ctx)
		case <-time.After(20 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			s.stop()
			return nil, nil, fmt.Errorf("qemu-nbd did not accept connections within 30s: %w", err)
		}
	}
}

// stop ends qemu-nbd cleanly (SIGTERM makes it flush and close the image)
// and removes its directory.
func (s *qemuNBD) stop() error {
	defer os.RemoveAll(s.dir)
	s.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-s.exited:
	case <-time.After(30 * time.Second):
		s.cmd.Process.Kill()
		<-s.exited
		return fmt.Errorf("qemu-nbd did not exit after SIGTERM: %s", bytes.TrimSpace(s.stderr.Bytes()))
	}
	if st, ok := s.cmd.ProcessState.Sys().(syscall.WaitStatus); ok && st.Exited() && st.ExitStatus() != 0 {
		return fmt.Errorf("qemu-nbd failed: %s", bytes.TrimSpace(s.stderr.Bytes()))
	}
	return nil
}
