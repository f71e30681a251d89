package files

import (
	"archive/tar"
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"strings"
)

// Result counts what an extraction wrote.
type Result struct {
	Files, Dirs, Symlinks, Hardlinks int
	Bytes                            int64
	// Skipped are the entries not extracted: devices, FIFOs, sockets
	// (never created from a guest's say-so).
	Skipped []string
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
	x := &extractor{ctx: ctx, s: s, root: root, res: &res, links: map[int64]string{}, asRoot: os.Geteuid() == 0}
	for _, p := range paths {
		p, err := cleanPath(p)
		if err != nil {
			return res, err
		}
		e, err := s.Stat(p)
		if err != nil {
			return res, err
		}
		if d := parent(rel(p)); d != "" {
			if err := root.MkdirAll(d, 0o755); err != nil {
				return res, fmt.Errorf("output %s: %w", printable(d), err)
			}
		}
		x.dirs = x.dirs[:0]
		if err := s.walk(ctx, e, x.make); err != nil {
			return res, err
		}
		// Directories' modes and times last, deepest first: their
		// contents' creation would change their times.
		for i := len(x.dirs) - 1; i >= 0; i-- {
			if err := x.attrs(x.dirs[i], rel(x.dirs[i].Path)); err != nil {
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
	ctx    context.Context
	s      *Session
	dirs   []Entry // made, to get their modes and times at the end
	root   *os.Root
	res    *Result
	links  map[int64]string // inode -> the output path of its first copy
	asRoot bool
}

func (x *extractor) make(e Entry) error {
	r := rel(e.Path)
	switch e.Type {
	case "dir":
		if r == "." {
			return nil
		}
		if err := x.root.Mkdir(r, 0o700); err != nil && !(errors.Is(err, fs.ErrExist) && x.isDir(r)) {
			return fmt.Errorf("output %s: %w", printable(r), err)
		}
		x.res.Dirs++
		x.dirs = append(x.dirs, e)
		return nil
	case "symlink":
		if err := x.root.Symlink(e.Target, r); err != nil {
			return fmt.Errorf("output %s: %w", printable(r), err)
		}
		x.res.Symlinks++
		if x.asRoot {
			x.root.Lchown(r, int(e.UID), int(e.GID))
		}
		return nil
	case "file":
		if e.Nlink > 1 {
			if first, ok := x.links[e.stat.Ino]; ok {
				if err := x.root.Link(first, r); err != nil {
					return fmt.Errorf("output %s: link to %s: %w", printable(r), printable(first), err)
				}
				x.res.Hardlinks++
				return nil
			}
			x.links[e.stat.Ino] = r
		}
		return x.file(e, r)
	}
	x.res.Skipped = append(x.res.Skipped, e.Path+" ("+e.Type+")")
	return nil
}

func (x *extractor) isDir(r string) bool {
	fi, err := x.root.Lstat(r)
	return err == nil && fi.IsDir()
}

func (x *extractor) file(e Entry, r string) error {
	f, err := x.root.OpenFile(r, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return fmt.Errorf("output %s: %w", printable(r), err)
	}
	n, err := x.s.read(x.ctx, e, &sparseWriter{f: f})
	if err == nil {
		err = f.Truncate(n) // a sparse tail
	}
	if err == nil {
		err = f.Close()
	} else {
		f.Close()
	}
	if err != nil {
		return fmt.Errorf("output %s: %w", printable(r), err)
	}
	x.res.Files++
	x.res.Bytes += n
	return x.attrs(e, r)
}

// attrs sets ownership (as root), mode (no setuid or setgid) and times.
func (x *extractor) attrs(e Entry, r string) error {
	if x.asRoot {
		if err := x.root.Chown(r, int(e.UID), int(e.GID)); err != nil {
			return fmt.Errorf("output %s: %w", printable(r), err)
		}
	}
	mode := e.stat.FileMode() & (fs.ModePerm | fs.ModeSticky)
	if err := x.root.Chmod(r, mode); err != nil {
		return fmt.Errorf("output %s: %w", printable(r), err)
	}
	if err := x.root.Chtimes(r, e.stat.Atime, e.Mtime); err != nil {
		return fmt.Errorf("output %s: %w", printable(r), err)
	}
	return nil
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
// are the guest paths without the leading "/".
func (s *Session) Tar(ctx context.Context, paths []string, w io.Writer) (Result, error) {
	var res Result
	tw := tar.NewWriter(w)
	links := map[int64]string{}
	for _, p := range paths {
		p, err := cleanPath(p)
		if err != nil {
			return res, err
		}
		err = s.Walk(ctx, p, func(e Entry) error {
			name := rel(e.Path)
			if name == "." {
				return nil
			}
			h := &tar.Header{Name: name, Mode: int64(e.stat.Mode & 0o7777), Uid: int(e.UID), Gid: int(e.GID),
				ModTime: e.Mtime, AccessTime: e.stat.Atime, Format: tar.FormatPAX}
			switch e.Type {
			case "dir":
				h.Typeflag, h.Name = tar.TypeDir, name+"/"
				res.Dirs++
			case "symlink":
				h.Typeflag, h.Linkname = tar.TypeSymlink, e.Target
				res.Symlinks++
			case "file":
				if first, ok := links[e.stat.Ino]; ok && e.Nlink > 1 {
					h.Typeflag, h.Linkname = tar.TypeLink, first
					res.Hardlinks++
					break
				}
				if e.Nlink > 1 {
					links[e.stat.Ino] = name
				}
				h.Typeflag, h.Size = tar.TypeReg, e.Size
			default:
				res.Skipped = append(res.Skipped, e.Path+" ("+e.Type+")")
				return nil
			}
			if err := tw.WriteHeader(h); err != nil {
				return fmt.Errorf("tar %s: %w", printable(name), err)
			}
			if h.Typeflag == tar.TypeReg {
				n, err := s.read(ctx, e, tw)
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
