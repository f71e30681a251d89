package restore

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"syscall"
	"time"

	"github.com/nbdmover/nbdmover/nbdclient"
	"github.com/nbdmover/nbdmover/repo"
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
	Parallel int    // chunks in flight (default 8)
}

// Disk is one file a restore wrote.
type Disk struct {
	Name string `json:"name"`
	Path string `json:"path"`
	Size int64  `json:"size"`
}

// Restore writes disks of a backup to new files. It never overwrites: an
// existing output file is an error. A restore that fails removes the file
// it was writing, so no partial image is left looking whole.
func Restore(ctx context.Context, o Options) (*repo.Manifest, []Disk, error) {
	if o.Format == "" {
		o.Format = "raw"
	}
	if o.Format != "raw" && o.Format != "qcow2" {
		return nil, nil, fmt.Errorf("restore format %q: want raw or qcow2", o.Format)
	}
	if o.Output == "" {
		return nil, nil, errors.New("restore: no --output given")
	}
	if o.Parallel <= 0 {
		o.Parallel = 8
	}
	r, err := o.Repo.Open(ctx)
	if err != nil {
		return nil, nil, err
	}
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
	var done []Disk
	for _, d := range todo {
		restore := restoreRaw
		if o.Format == "qcow2" {
			restore = restoreQcow2
		}
		if err := restore(ctx, r, m, d, o.Parallel); err != nil {
			return m, done, fmt.Errorf("restore %s/%s disk %s to %s: %w", m.Domain, m.ID, d.Name, d.Path, err)
		}
		done = append(done, d)
	}
	return m, done, nil
}

// createExclusive creates path, failing if it exists.
func createExclusive(path string) (*os.File, error) {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if errors.Is(err, os.ErrExist) {
		return nil, fmt.Errorf("%s exists; remove it or choose another output", path)
	}
	return f, err
}

type fileTarget struct{ f *os.File }

func (t fileTarget) WriteAt(_ context.Context, p []byte, off int64) error {
	_, err := t.f.WriteAt(p, off)
	return err
}

func restoreRaw(ctx context.Context, r *repo.Repo, m *repo.Manifest, d Disk, parallel int) (err error) {
	f, err := createExclusive(d.Path)
	if err != nil {
		return err
	}
	defer func() {
		if cerr := f.Close(); err == nil {
			err = cerr
		}
		if err != nil {
			os.Remove(d.Path)
		}
	}()
	if err := f.Truncate(d.Size); err != nil {
		return err
	}
	if err := r.RestoreDisk(ctx, m, d.Name, fileTarget{f}, parallel); err != nil {
		return err
	}
	return f.Sync()
}

type poolTarget struct{ p *nbdclient.Pool }

func (t poolTarget) WriteAt(ctx context.Context, p []byte, off int64) error {
	return t.p.WriteAt(ctx, p, off)
}

// restoreQcow2 creates a qcow2 image with qemu-img, serves it with qemu-nbd
// on a private socket and writes the disk through NBD.
func restoreQcow2(ctx context.Context, r *repo.Repo, m *repo.Manifest, d Disk, parallel int) (err error) {
	f, err := createExclusive(d.Path)
	if err != nil {
		return err
	}
	f.Close()
	defer func() {
		if err != nil {
			os.Remove(d.Path)
		}
	}()
	if out, err := exec.CommandContext(ctx, "qemu-img", "create", "-q", "-f", "qcow2", d.Path, strconv.FormatInt(d.Size, 10)).CombinedOutput(); err != nil {
		return fmt.Errorf("qemu-img create: %v: %s", err, bytes.TrimSpace(out))
	}
	srv, err := startQemuNBD(ctx, d.Path, parallel+1)
	if err != nil {
		return err
	}
	defer func() {
		if serr := srv.stop(); err == nil {
			err = serr
		}
	}()
	pool, err := nbdclient.DialPool(ctx, nbdclient.Config{Socket: srv.sock}, parallel)
	if err != nil {
		return err
	}
	defer pool.Close()
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

func startQemuNBD(ctx context.Context, image string, conns int) (*qemuNBD, error) {
	dir, err := os.MkdirTemp("", "nbdmover-restore-") // mode 0700
	if err != nil {
		return nil, err
	}
	s := &qemuNBD{dir: dir, sock: filepath.Join(dir, "nbd.sock"), exited: make(chan struct{})}
	s.cmd = exec.Command("qemu-nbd", "-f", "qcow2", "--cache=writeback", "-e", strconv.Itoa(conns), "-k", s.sock, image)
	s.cmd.Stderr = &s.stderr
	if err := s.cmd.Start(); err != nil {
		os.RemoveAll(dir)
		return nil, fmt.Errorf("qemu-nbd: %w", err)
	}
	go func() { s.cmd.Wait(); close(s.exited) }()
	for {
		if _, err := os.Stat(s.sock); err == nil {
			return s, nil
		}
		select {
		case <-s.exited:
			os.RemoveAll(dir)
			return nil, fmt.Errorf("qemu-nbd exited: %s", bytes.TrimSpace(s.stderr.Bytes()))
		case <-ctx.Done():
			s.stop()
			return nil, context.Cause(ctx)
		case <-time.After(20 * time.Millisecond):
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
