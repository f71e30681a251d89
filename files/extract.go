package files

import (
	"archive/tar"
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path"
	"strings"
	"syscall"
	"time"
)

// Result counts what an extraction wrote.
type Result struct {
	Files, Dirs, Symlinks, Hardlinks int
	Bytes                            int64
	// Skipped are the entries not extracted, with why: devices, FIFOs,
	// sockets (never created from a guest's say-so), names that cannot be
	// made safely.
	Skipped []string
}

// item is one entry of a tree being copied out of the backup.
type item struct {
	path         string // guest path
	typ          string // file, dir, symlink, hardlink, or another type (skipped)
	perm         uint32 // permission bits with setuid, setgid, sticky
	uid, gid     int64
	mtime, atime time.Time
	size         int64
	target       string // a symlink's target, as stored
	linkTo       string // a hard link's: the guest path of its first copy
	// body writes a regular file's bytes, checking their count.
	body func(io.Writer) (int64, error)
}

// tree calls fn for the guest path p and everything beneath it, parents
// before children. A directory comes as one tar stream that GNU tar makes
// in the appliance (one call for the whole tree: reading files one call
// each costs a round trip each, about 150 ms under TCG); anything else
// from its lstat and, for a file, its bytes (pread). fn must not use the
// session (the stream holds the appliance).
func (s *Session) tree(ctx context.Context, p string, fn func(item) error) error {
	p, err := cleanPath(p)
	if err != nil {
		return err
	}
	e, err := s.Stat(p)
	if err != nil {
		return err
	}
	if e.Type != "dir" {
		it := item{path: e.Path, typ: e.Type, perm: e.stat.Mode & 0o7777, uid: e.UID, gid: e.GID, mtime: e.Mtime, atime: e.stat.Atime,
			size: e.Size, target: e.Target}
		if e.Type == "file" {
			it.body = func(w io.Writer) (int64, error) { return s.read(ctx, e, w) }
		}
		return fn(it)
	}
	return s.tarOut(ctx, p, fn)
}

// tarOut streams dir's tree from the appliance's tar through a pipe.
func (s *Session) tarOut(ctx context.Context, dir string, fn func(item) error) error {
	err := s.stream(ctx, func(local string) error { return s.h.TarOut(dir, local) }, func(r io.Reader) error {
		return s.readTar(dir, tar.NewReader(r), fn)
	})
	var fe *fnError
	if errors.As(err, &fe) {
		return fe.err
	}
	if err != nil {
		return fmt.Errorf("tar of %s from the appliance: %w", printable(dir), err)
	}
	return nil
}

func (s *Session) readTar(dir string, tr *tar.Reader, fn func(item) error) error {
	for {
		h, err := tr.Next()
		if err == io.EOF {
			return nil
		}
		if err != nil {
			return err
		}
		p, ok := tarPath(dir, h.Name)
		if !ok {
			return fmt.Errorf("an impossible name %q", h.Name)
		}
		it := item{path: p, perm: uint32(h.Mode) & 0o7777, uid: int64(h.Uid), gid: int64(h.Gid), mtime: h.ModTime,
			atime: h.AccessTime, size: h.Size}
		if it.atime.IsZero() {
			it.atime = it.mtime
		}
		switch h.Typeflag {
		case tar.TypeReg, tar.TypeRegA:
			it.typ = "file"
			size := h.Size
			it.body = func(w io.Writer) (int64, error) {
				n, err := io.Copy(w, tr)
				if err == nil && n != size {
					err = fmt.Errorf("%d bytes, but its size is %d", n, size)
				}
				if err != nil {
					return n, fmt.Errorf("read %s: %w", printable(p), err)
				}
				return n, nil
			}
		case tar.TypeDir:
			it.typ = "dir"
		case tar.TypeSymlink:
			it.typ, it.target = "symlink", h.Linkname
		case tar.TypeLink:
			to, ok := tarPath(dir, h.Linkname)
			if !ok || to == dir {
				return fmt.Errorf("hard link %s to an impossible name %q", printable(p), h.Linkname)
			}
			it.typ, it.linkTo = "hardlink", to
		case tar.TypeFifo:
			it.typ = "fifo"
		case tar.TypeChar:
			it.typ = "char"
		case tar.TypeBlock:
			it.typ = "block"
		default:
			it.typ = fmt.Sprintf("tar type %q", h.Typeflag)
		}
		if err := fn(it); err != nil {
			return &fnError{err}
		}
	}
}

// fnError is tree's function's error, passed on as it is.
type fnError struct{ err error }

func (e *fnError) Error() string { return e.err.Error() }
func (e *fnError) Unwrap() error { return e.err }

// tarPath is the guest path of a name in the appliance's tar of dir
// ("./a/b", "./" for dir itself), and whether it is one: relative, no
// "." or ".." or empty components, no NUL.
func tarPath(dir, name string) (string, bool) {
	name = strings.TrimSuffix(name, "/")
	if name == "." {
		return dir, true
	}
	rest, ok := strings.CutPrefix(name, "./")
	if !ok || rest == "" || strings.IndexByte(rest, 0) >= 0 {
		return "", false
	}
	for _, c := range strings.Split(rest, "/") {
		if c == "" || c == "." || c == ".." {
			return "", false
		}
	}
	return path.Join(dir, rest), true
}

// CheckPaths checks the paths to copy: absolute, none beneath another or
// twice (the copy would hold it twice), and none beneath a guest symlink
// (a tar reader would write through the link the stream made earlier);
// each exists. It returns them cleaned.
func (s *Session) CheckPaths(paths []string) ([]string, error) {
	out := make([]string, len(paths))
	for i, p := range paths {
		c, err := cleanPath(p)
		if err != nil {
			return nil, err
		}
		out[i] = c
	}
	for i, a := range out {
		for j, b := range out {
			if i != j && (a == b || a == "/" || strings.HasPrefix(b, a+"/")) {
				return nil, invalidf("%s is within %s: give each path once", printable(b), printable(a))
			}
		}
		if _, err := s.Stat(a); err != nil {
			return nil, err
		}
		for d := path.Dir(a); d != "/"; d = path.Dir(d) {
			e, err := s.Stat(d)
			if err != nil {
				return nil, err
			}
			if e.Type != "dir" {
				return nil, invalidf("%s: %s is a %s in the guest, not a directory: give the path it points to", printable(a), printable(d), e.Type)
			}
		}
	}
	return out, nil
}

// rel is a guest path relative to the output: "/etc/x" is "etc/x".
func rel(p string) string {
	if p == "/" {
		return "."
	}
	return strings.TrimPrefix(p, "/")
}

// Extract copies the guest paths (files, symlinks as symlinks, directories
// with everything beneath) under dir, at their guest paths ("/etc/hosts"
// becomes dir/etc/hosts), with modes (less setuid and setgid: the guest
// does not give the host setuid programs), times and, as root, numeric
// ownership. Hard links within what is copied stay hard links. Nothing is
// written outside dir: every file is made through an os.Root on it, links
// are created but never followed, and an existing file is never
// overwritten (the error names it). dir is made (0700) if missing.
func (s *Session) Extract(ctx context.Context, paths []string, dir string) (Result, error) {
	var res Result
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return res, fmt.Errorf("output directory: %w", err)
	}
	root, err := os.OpenRoot(dir)
	if err != nil {
		return res, fmt.Errorf("output directory: %w", err)
	}
	defer root.Close()
	x := &extractor{root: root, res: &res, made: map[uint64]bool{}, asRoot: os.Geteuid() == 0}
	paths, err = s.CheckPaths(paths)
	if err != nil {
		return res, err
	}
	for _, p := range paths {
		if d := parent(rel(p)); d != "" {
			if err := root.MkdirAll(d, 0o755); err != nil {
				return res, fmt.Errorf("output %s: %w", printable(d), err)
			}
		}
		x.dirs = x.dirs[:0]
		res.Skipped = append(res.Skipped, s.unreadableBeneath(p)...)
		if err := s.tree(ctx, p, x.make); err != nil {
			return res, err
		}
		// Directories' modes and times last, deepest first: their
		// contents' creation would change their times.
		for i := len(x.dirs) - 1; i >= 0; i-- {
			if err := x.attrs(x.dirs[i], rel(x.dirs[i].path)); err != nil {
				return res, err
			}
		}
	}
	return res, nil
}

func parent(r string) string {
	if i := strings.LastIndexByte(r, '/'); i > 0 {
		return r[:i]
	}
	return ""
}

type extractor struct {
	dirs   []item // made, to get their modes and times at the end
	root   *os.Root
	res    *Result
	made   map[uint64]bool // inodes of the files this extraction made (hard links may only point at them)
	asRoot bool
}

func (x *extractor) make(it item) error {
	r := rel(it.path)
	switch it.typ {
	case "dir":
		if r == "." {
			return nil
		}
		if err := x.root.Mkdir(r, 0o700); err != nil {
			if errors.Is(err, fs.ErrExist) && x.isDir(r) {
				return nil // one that was there keeps its owner, mode and times
			}
			return fmt.Errorf("output %s: %w", printable(r), err)
		}
		x.res.Dirs++
		x.dirs = append(x.dirs, it)
		return nil
	case "symlink":
		if err := x.root.Symlink(it.target, r); err != nil {
			return fmt.Errorf("output %s: %w", printable(r), err)
		}
		x.res.Symlinks++
		if x.asRoot {
			x.root.Lchown(r, int(it.uid), int(it.gid))
		}
		return nil
	case "hardlink":
		first := rel(it.linkTo)
		fi, err := x.root.Lstat(first)
		if err != nil || !fi.Mode().IsRegular() || !x.made[inode(fi)] {
			x.res.Skipped = append(x.res.Skipped, it.path+" (a hard link to "+it.linkTo+", which this restore did not make)")
			return nil
		}
		if err := x.root.Link(first, r); err != nil {
			return fmt.Errorf("output %s: link to %s: %w", printable(r), printable(first), err)
		}
		x.res.Hardlinks++
		return nil
	case "file":
		return x.file(it, r)
	}
	x.res.Skipped = append(x.res.Skipped, it.path+" ("+it.typ+")")
	return nil
}

func inode(fi fs.FileInfo) uint64 {
	if st, ok := fi.Sys().(*syscall.Stat_t); ok {
		return st.Ino
	}
	return 0
}

func (x *extractor) isDir(r string) bool {
	fi, err := x.root.Lstat(r)
	return err == nil && fi.IsDir()
}

func (x *extractor) file(it item, r string) error {
	f, err := x.root.OpenFile(r, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return fmt.Errorf("output %s: %w", printable(r), err)
	}
	n, err := it.body(&sparseWriter{f: f})
	if err == nil {
		err = f.Truncate(n) // a sparse tail
	}
	if err == nil {
		err = x.fileAttrs(f, it)
	}
	if err == nil {
		var fi fs.FileInfo
		if fi, err = f.Stat(); err == nil {
			x.made[inode(fi)] = true
		}
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		x.root.Remove(r) // no partial file under the file's name
		return fmt.Errorf("output %s: %w", printable(r), err)
	}
	x.res.Files++
	x.res.Bytes += n
	return nil
}

// mode is what a restored file or directory gets: the guest's permission
// bits and sticky bit, never setuid or setgid.
func mode(it item) fs.FileMode {
	m := fs.FileMode(it.perm & 0o777)
	if it.perm&0o1000 != 0 {
		m |= fs.ModeSticky
	}
	return m
}

// fileAttrs sets a file's ownership (as root), mode and times through
// its descriptor: nothing resolves a name again.
func (x *extractor) fileAttrs(f *os.File, it item) error {
	if x.asRoot {
		if err := f.Chown(int(it.uid), int(it.gid)); err != nil {
			return err
		}
	}
	if err := f.Chmod(mode(it)); err != nil {
		return err
	}
	return setTimes(f, it)
}

// attrs sets a directory's ownership (as root), mode and times, through
// a descriptor opened on it without following a symlink.
func (x *extractor) attrs(it item, r string) error {
	f, err := x.root.OpenFile(r, os.O_RDONLY|syscall.O_DIRECTORY|syscall.O_NOFOLLOW, 0)
	if err == nil {
		err = x.fileAttrs(f, it)
		f.Close()
	}
	if err != nil {
		return fmt.Errorf("output %s: %w", printable(r), err)
	}
	return nil
}

// setTimes sets f's access and modification times (futimens).
func setTimes(f *os.File, it item) error {
	ts := []syscall.Timespec{syscall.NsecToTimespec(it.atime.UnixNano()), syscall.NsecToTimespec(it.mtime.UnixNano())}
	return syscall.UtimesNano(fmt.Sprintf("/proc/self/fd/%d", f.Fd()), ts)
}

// sparseWriter writes a file, seeking over blocks of zeros (the file is
// truncated to its size at the end): sparse guest files stay sparse.
type sparseWriter struct {
	f   *os.File
	off int64
}

func (w *sparseWriter) Write(p []byte) (int, error) {
	const blk = 4096
	n := 0
	for len(p) > 0 {
		k := min(len(p), blk-int(w.off%blk))
		if !allZero(p[:k]) {
			if _, err := w.f.WriteAt(p[:k], w.off); err != nil {
				return n, err
			}
		}
		w.off += int64(k)
		n += k
		p = p[k:]
	}
	return n, nil
}

func allZero(b []byte) bool {
	for _, c := range b {
		if c != 0 {
			return false
		}
	}
	return true
}

// Tar writes the guest paths as a tar stream (PAX) to w: files,
// directories, symlinks, hard links within the stream, with modes
// (setuid included: the reader decides), numeric owners and times. Names
// are the guest paths without the leading "/". The appliance's own tar is
// not passed on: each entry is checked and written anew.
func (s *Session) Tar(ctx context.Context, paths []string, w io.Writer) (Result, error) {
	var res Result
	paths, err := s.CheckPaths(paths)
	if err != nil {
		return res, err
	}
	tw := tar.NewWriter(w)
	for _, p := range paths {
		res.Skipped = append(res.Skipped, s.unreadableBeneath(p)...)
		err := s.tree(ctx, p, func(it item) error {
			name := rel(it.path)
			if name == "." {
				return nil
			}
			h := &tar.Header{Name: name, Mode: int64(it.perm), Uid: int(it.uid), Gid: int(it.gid),
				ModTime: it.mtime, AccessTime: it.atime, Format: tar.FormatPAX}
			switch it.typ {
			case "dir":
				h.Typeflag, h.Name = tar.TypeDir, name+"/"
				res.Dirs++
			case "symlink":
				h.Typeflag, h.Linkname = tar.TypeSymlink, it.target
				res.Symlinks++
			case "hardlink":
				h.Typeflag, h.Linkname = tar.TypeLink, rel(it.linkTo)
				res.Hardlinks++
			case "file":
				h.Typeflag, h.Size = tar.TypeReg, it.size
			default:
				res.Skipped = append(res.Skipped, it.path+" ("+it.typ+")")
				return nil
			}
			if err := tw.WriteHeader(h); err != nil {
				return fmt.Errorf("tar %s: %w", printable(name), err)
			}
			if h.Typeflag == tar.TypeReg {
				n, err := it.body(tw)
				if err != nil {
					return err
				}
				res.Files++
				res.Bytes += n
			}
			return nil
		})
		if err != nil {
			return res, err
		}
	}
	return res, tw.Close()
}
