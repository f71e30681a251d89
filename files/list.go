package files

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path"
	"slices"
	"strings"
	"time"
	"unicode/utf8"

	"github.com/nbdmover/nbdmover/guestfs"
)

// Entry is one file of a backup.
type Entry struct {
	Name string `json:"name"`
	// NameBase64 is the name's bytes in base64 when they are not UTF-8
	// (JSON cannot carry them; Name then has U+FFFD in their place).
	NameBase64 []byte    `json:"name_base64,omitempty"`
	Path       string    `json:"-"`
	Type       string    `json:"type"` // file, dir, symlink, fifo, socket, block, char
	Size       int64     `json:"size"`
	Mode       string    `json:"mode"` // permission bits in octal, with setuid, setgid, sticky (e.g. "4755")
	UID        int64     `json:"uid"`
	GID        int64     `json:"gid"`
	Nlink      int64     `json:"nlink"`
	Mtime      time.Time `json:"mtime"`
	Target     string    `json:"target,omitempty"` // a symlink's, as stored (never followed)

	stat guestfs.Stat
}

// batch is how many names one lstat or readlink round trip carries
// (libguestfs's messages are bounded).
const batch = 1000

func typeOf(mode uint32) string {
	switch mode & 0o170000 {
	case 0o100000:
		return "file"
	case 0o040000:
		return "dir"
	case 0o120000:
		return "symlink"
	case 0o010000:
		return "fifo"
	case 0o140000:
		return "socket"
	case 0o060000:
		return "block"
	case 0o020000:
		return "char"
	}
	return "unknown"
}

// jsonTime is t within the years JSON's time format has (0 to 9999): a
// guest's filesystem may hold any.
func jsonTime(t time.Time) time.Time {
	if lo := time.Date(0, 1, 1, 0, 0, 0, 0, time.UTC); t.Before(lo) {
		return lo
	}
	if hi := time.Date(9999, 12, 31, 23, 59, 59, 0, time.UTC); t.After(hi) {
		return hi
	}
	return t.UTC()
}

func entry(dir, name string, st guestfs.Stat) Entry {
	e := Entry{Name: name, Path: path.Join(dir, name), Type: typeOf(st.Mode), Size: st.Size,
		Mode: fmt.Sprintf("%04o", st.Mode&0o7777), UID: st.UID, GID: st.GID, Nlink: st.Nlink, Mtime: jsonTime(st.Mtime), stat: st}
	if !utf8.ValidString(name) {
		e.NameBase64 = []byte(name)
	}
	return e
}

// notFound turns libguestfs's ENOENT into ErrNotFound, naming the path.
func notFound(p string, err error) error {
	var ge *guestfs.Error
	if errors.As(err, &ge) && ge.NotFound() {
		return fmt.Errorf("%w: %s", ErrNotFound, printable(p))
	}
	return err
}

// Stat is one path's entry (a final symlink is not followed).
func (s *Session) Stat(p string) (Entry, error) {
	s.touch()
	p, err := cleanPath(p)
	if err != nil {
		return Entry{}, err
	}
	if err := s.mounted(p); err != nil {
		return Entry{}, err
	}
	st, err := s.h.Lstat(p)
	if err != nil {
		return Entry{}, notFound(p, err)
	}
	e := entry(path.Dir(p), path.Base(p), st)
	if e.Type == "symlink" {
		l, err := s.h.ReadlinkList(path.Dir(p), []string{path.Base(p)})
		if err != nil {
			return Entry{}, err
		}
		e.Target = l[0]
	}
	return e, nil
}

// names returns a directory's names, sorted bytewise, checked. The last
// directories listed are kept (a backup never changes): the pages of a
// huge directory list it once.
func (s *Session) names(ctx context.Context, dir string) ([]string, error) {
	key := s.current + "\x00" + dir
	s.cacheMu.Lock()
	for _, c := range s.dirCache {
		if c.key == key {
			s.cacheMu.Unlock()
			return c.names, nil
		}
	}
	s.cacheMu.Unlock()
	var out []string
	err := s.stream(ctx, func(local string) error { return s.h.Ls0(dir, local) }, func(r io.Reader) error {
		br := bufio.NewReaderSize(r, 64<<10)
		for {
			name, err := br.ReadString(0)
			if err == io.EOF && name == "" {
				return nil
			}
			if err != nil {
				return fmt.Errorf("directory %s: %w", printable(dir), err)
			}
			name = name[:len(name)-1]
			if name == "" || name == "." || name == ".." || strings.IndexByte(name, '/') >= 0 {
				return fmt.Errorf("directory %s: the appliance returned an impossible name %q", printable(dir), name)
			}
			out = append(out, name)
		}
	})
	if err != nil {
		return nil, notFound(dir, err)
	}
	slices.Sort(out)
	s.cacheMu.Lock()
	s.dirCache = append(s.dirCache, dirNames{key, out})
	if len(s.dirCache) > 4 {
		s.dirCache = s.dirCache[1:]
	}
	s.cacheMu.Unlock()
	return out, nil
}

// dirNames is a directory listing kept for the next page.
type dirNames struct {
	key   string // the mount, and the directory
	names []string
}

// entries stats names of dir, in batches.
func (s *Session) entries(dir string, names []string) ([]Entry, error) {
	out := make([]Entry, 0, len(names))
	for len(names) > 0 {
		n := names[:min(len(names), batch)]
		names = names[len(n):]
		sts, err := s.h.LstatList(dir, n)
		if err != nil {
			return nil, err
		}
		var links []int
		for i, st := range sts {
			if st.Ino == -1 {
				// libguestfs's answer for a name whose lstat failed: the
				// error, asked for alone, rather than a file that
				// silently is not there.
				_, err := s.h.Lstat(path.Join(dir, n[i]))
				if err == nil {
					err = errors.New("lstat failed")
				}
				return nil, fmt.Errorf("%s: %w", printable(path.Join(dir, n[i])), err)
			}
			out = append(out, entry(dir, n[i], st))
			if out[len(out)-1].Type == "symlink" {
				links = append(links, len(out)-1)
			}
		}
		if len(links) > 0 {
			ln := make([]string, len(links))
			for i, j := range links {
				ln[i] = out[j].Name
			}
			ts, err := s.h.ReadlinkList(dir, ln)
			if err != nil {
				return nil, err
			}
			for i, j := range links {
				out[j].Target = ts[i]
			}
		}
	}
	return out, nil
}

// List lists a directory (or one non-directory) a page at a time: the
// entries whose names sort after after, at most limit of them (0: 1000),
// and whether more follow. Memory: the directory's names, and one page.
func (s *Session) List(ctx context.Context, p, after string, limit int) ([]Entry, bool, error) {
	s.touch()
	if limit <= 0 {
		limit = 1000
	}
	e, err := s.Stat(p)
	if err != nil {
		return nil, false, err
	}
	if e.Type != "dir" {
		return []Entry{e}, false, nil
	}
	names, err := s.names(ctx, e.Path)
	if err != nil {
		return nil, false, err
	}
	i, _ := slices.BinarySearch(names, after)
	if after != "" && i < len(names) && names[i] == after {
		i++
	}
	names = names[i:]
	more := len(names) > limit
	names = names[:min(len(names), limit)]
	if err := ctx.Err(); err != nil {
		return nil, false, err
	}
	out, err := s.entries(e.Path, names)
	return out, more, err
}

// Each calls fn for each entry of directory p in name order (for p
// itself when it is not a directory), a batch at a time: memory is the
// directory's names and one batch, whatever its size.
func (s *Session) Each(ctx context.Context, p string, fn func(Entry) error) error {
	top, err := s.Stat(p)
	if err != nil {
		return err
	}
	if top.Type != "dir" {
		return fn(top)
	}
	return s.walk(ctx, top, func(e Entry) error {
		if e.Path == top.Path {
			return nil
		}
		if err := fn(e); err != nil {
			return err
		}
		return SkipDir
	})
}

// Walk calls fn for p and, if it is a directory, everything beneath it,
// depth first, names in bytewise order; fn's error ends the walk (SkipDir
// for a directory skips its contents). Symlinks are never followed.
func (s *Session) Walk(ctx context.Context, p string, fn func(Entry) error) error {
	e, err := s.Stat(p)
	if err != nil {
		return err
	}
	return s.walk(ctx, e, fn)
}

// SkipDir, returned by a Walk function for a directory, skips its contents.
var SkipDir = errors.New("skip this directory")

func (s *Session) walk(ctx context.Context, e Entry, fn func(Entry) error) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	err := fn(e)
	if err == SkipDir {
		return nil
	}
	if err != nil || e.Type != "dir" {
		return err
	}
	names, err := s.names(ctx, e.Path)
	if err != nil {
		return err
	}
	for len(names) > 0 {
		n := names[:min(len(names), batch)]
		names = names[len(n):]
		es, err := s.entries(e.Path, n)
		if err != nil {
			return err
		}
		for _, c := range es {
			if err := s.walk(ctx, c, fn); err != nil {
				return err
			}
		}
	}
	return nil
}

// Read writes a regular file's bytes to w, checking their count against
// its size; it returns the count.
func (s *Session) Read(ctx context.Context, p string, w io.Writer) (int64, error) {
	e, err := s.Stat(p)
	if err != nil {
		return 0, err
	}
	if e.Type != "file" {
		return 0, fmt.Errorf("%s is a %s, not a file", printable(e.Path), e.Type)
	}
	return s.read(ctx, e, w)
}

// read writes e's bytes to w, 2 MiB a round trip (pread: about twice
// the rate of libguestfs's download, whose 8 KiB messages cost the
// appliance more than the bytes), checking their count against its size.
func (s *Session) read(ctx context.Context, e Entry, w io.Writer) (int64, error) {
	s.touch()
	buf := make([]byte, min(e.Size, guestfs.MaxPread))
	var off int64
	for off < e.Size {
		if err := ctx.Err(); err != nil {
			return off, err
		}
		n, err := s.h.Pread(e.Path, buf, off)
		if err != nil {
			return off, fmt.Errorf("read %s: %w", printable(e.Path), notFound(e.Path, err))
		}
		if n == 0 {
			return off, fmt.Errorf("read %s: %d bytes, but its size is %d", printable(e.Path), off, e.Size)
		}
		if _, err := w.Write(buf[:n]); err != nil {
			return off, err
		}
		off += int64(n)
	}
	return off, nil
}

// stream runs a libguestfs call that writes to a local file on the
// writing end of a pipe (/dev/fd/N), and consume on its reading end. When
// consume fails or the context ends, the reading end is closed: the
// call's writes fail (EPIPE) and it ends.
func (s *Session) stream(ctx context.Context, call func(local string) error, consume func(io.Reader) error) error {
	s.touch()
	pr, pw, err := os.Pipe()
	if err != nil {
		return err
	}
	done := make(chan error, 1)
	go func() {
		err := call(fmt.Sprintf("/dev/fd/%d", pw.Fd()))
		pw.Close()
		done <- err
	}()
	stop := context.AfterFunc(ctx, func() { pr.Close() })
	err = consume(ctxReader{ctx, pr})
	if err == nil {
		_, err = io.Copy(io.Discard, ctxReader{ctx, pr}) // what is left (a tar's padding)
	}
	stop()
	pr.Close()
	cerr := <-done
	if err != nil {
		if ctx.Err() != nil {
			return ctx.Err()
		}
		return err
	}
	return cerr
}

// ctxReader ends a read at the context's end.
type ctxReader struct {
	ctx context.Context
	r   io.Reader
}

func (c ctxReader) Read(p []byte) (int, error) {
	if err := c.ctx.Err(); err != nil {
		return 0, err
	}
	return c.r.Read(p)
}

// Checksum is a regular file's SHA-256, computed in the appliance.
func (s *Session) Checksum(p string) (string, error) {
	s.touch()
	return s.h.Checksum("sha256", p)
}
