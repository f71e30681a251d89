package restore

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"sync"
	"syscall"
	"time"

	"github.com/nbdmover/nbdmover/nbdclient"
	"github.com/nbdmover/nbdmover/repo"
	"github.com/nbdmover/nbdmover/sink"
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
	Log      *slog.Logger
}

// Disk is one file a restore wrote.
type Disk struct {
	Name string `json:"name"`
	Path string `json:"path"`
	Size int64  `json:"size"`
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
// existing output file is an error. Each image is written as
// <output>.partial and linked to its name only once complete, so a failed
// or killed restore never leaves a file that looks whole (a failed one
// removes its .partial; a killed one leaves it, which the next restore to
// the same output reports).
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
	if err := repo.ValidName("domain", o.Domain); err != nil {
		return nil, nil, invalidError{err}
	}
	r, err := o.Repo.Open(ctx)
	if err != nil {
		return nil, nil, err
	}
	if o.Parallel <= 0 {
		o.Parallel = 8
		if sink.Remote(r.Store()) { // a fetch waits a round trip: 32 MiB of chunks in flight
			o.Parallel = int(max(8, (32<<20)/r.Config().ChunkSize))
		}
	}
	// The shared lock keeps a gc from deleting the backup's objects while
	// they are read (should it be forgotten meanwhile).
	lock, ctx, err := r.Lock(ctx, repo.LockShared, "restore "+o.Domain, o.Log)
	if err != nil {
		return nil, nil, err
	}
	defer lock.Release()
	m, err := r.Backup(ctx, o.Domain, o.Backup)
	if err != nil {
		return nil, nil, err
	}
	var todo []Disk
	if o.Disk != "" {
		d, err := m.Disk(o.Disk)
		if err != nil {
			return nil, nil, err
		}
		todo = append(todo, Disk{Name: d.Name, Path: o.Output, Size: d.Size})
	} else {
		if err := os.MkdirAll(o.Output, 0o700); err != nil {
			return nil, nil, fmt.Errorf("restore: %w", err)
		}
		for _, d := range m.Disks {
			todo = append(todo, Disk{Name: d.Name, Path: filepath.Join(o.Output, d.Name+"."+o.Format), Size: d.Size})
		}
	}
	write := restoreRaw
	if o.Format == "qcow2" {
		write = restoreQcow2
	}
	var done []Disk
	for _, d := range todo {
		if err := restoreFile(d, func(tmp string) error { return write(ctx, r, m, d, tmp, o.Parallel) }); err != nil {
			return m, done, fmt.Errorf("restore %s/%s disk %s to %s: %w", m.Domain, m.ID, d.Name, d.Path, err)
		}
		done = append(done, d)
	}
	return m, done, nil
}

// restoreFile has write fill a new <path>.partial and links it to path
// when write succeeds; on failure the partial file is removed.
func restoreFile(d Disk, write func(tmp string) error) error {
	if _, err := os.Lstat(d.Path); err == nil {
		return fmt.Errorf("%s exists; remove it or choose another output", d.Path)
	}
	tmp := d.Path + ".partial"
	f, err := os.OpenFile(tmp, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if errors.Is(err, os.ErrExist) {
		return fmt.Errorf("%s exists: another restore is writing it, or one was killed (remove it)", tmp)
	}
	if err != nil {
		return err
	}
	f.Close()
	if err := write(tmp); err != nil {
		os.Remove(tmp)
		return err
	}
	// A link never replaces an existing file: an output created meanwhile
	// is not overwritten.
	if err := os.Link(tmp, d.Path); err != nil {
		os.Remove(tmp)
		if errors.Is(err, os.ErrExist) {
			return fmt.Errorf("%s exists; remove it or choose another output", d.Path)
		}
		return err
	}
	os.Remove(tmp)
	return syncDir(filepath.Dir(d.Path))
}

func syncDir(dir string) error {
	f, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer f.Close()
	return f.Sync()
}

// fileTarget writes a raw image file, one write at a time: a buffered
// write holds the file's inode lock, and the decoders' concurrent writes
// spun on it in the kernel (8% of a restore's cycles, 2.5 s of system time
// of 7.5 s for a 4 GiB disk; docs/performance.md, 2026-12-03).
type fileTarget struct {
	f  *os.File
	mu *sync.Mutex
}

func (t fileTarget) WriteAt(_ context.Context, p []byte, off int64) error {
	t.mu.Lock()
	defer t.mu.Unlock()
	_, err := t.f.WriteAt(p, off)
	return err
}

// restoreRaw writes the disk into the (empty) file tmp as a sparse raw
// image.
func restoreRaw(ctx context.Context, r *repo.Repo, m *repo.Manifest, d Disk, tmp string, parallel int) (err error) {
	f, err := os.OpenFile(tmp, os.O_WRONLY, 0)
	if err != nil {
		return err
	}
	defer func() {
		if cerr := f.Close(); err == nil {
			err = cerr
		}
	}()
	if err := f.Truncate(d.Size); err != nil {
		return err
	}
	if err := r.RestoreDisk(ctx, m, d.Name, fileTarget{f, new(sync.Mutex)}, parallel); err != nil {
		return err
	}
	return f.Sync()
}

type poolTarget struct{ p *nbdclient.Pool }

func (t poolTarget) WriteAt(ctx context.Context, p []byte, off int64) error {
	return t.p.WriteAt(ctx, p, off)
}

// restoreQcow2 makes tmp a qcow2 image with qemu-img, serves it with
// qemu-nbd on a private socket and writes the disk through NBD.
func restoreQcow2(ctx context.Context, r *repo.Repo, m *repo.Manifest, d Disk, tmp string, parallel int) (err error) {
	if out, err := exec.CommandContext(ctx, "qemu-img", "create", "-q", "-f", "qcow2", tmp, strconv.FormatInt(d.Size, 10)).CombinedOutput(); err != nil {
		return fmt.Errorf("qemu-img create: %v: %s", err, bytes.TrimSpace(out))
	}
	srv, pool, err := startQemuNBD(ctx, tmp, parallel)
	if err != nil {
		return err
	}
	defer func() {
		pool.Close()
		if serr := srv.stop(); err == nil {
			err = serr
		}
	}()
	if err := r.RestoreDisk(ctx, m, d.Name, poolTarget{pool}, parallel); err != nil {
		return err
	}
	return pool.Flush(ctx)
}

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
func startQemuNBD(ctx context.Context, image string, conns int) (*qemuNBD, *nbdclient.Pool, error) {
	dir, err := os.MkdirTemp("", "nbdmover-restore-") // mode 0700
	if err != nil {
		return nil, nil, err
	}
	s := &qemuNBD{dir: dir, sock: filepath.Join(dir, "nbd.sock"), exited: make(chan struct{})}
	s.cmd = exec.Command("qemu-nbd", "-f", "qcow2", "--cache=writeback", "-e", strconv.Itoa(conns+1), "-k", s.sock, image)
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
