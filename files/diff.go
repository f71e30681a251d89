package files

import (
	"context"
	"errors"
	"fmt"
)

// Change is one difference between two backups.
type Change struct {
	Path string `json:"-"`
	Op   string `json:"op"` // added, removed, changed
	// What changed: type, size, mtime, mode, owner, target, content.
	What []string `json:"what,omitempty"`
	Old  *Entry   `json:"old,omitempty"`
	New  *Entry   `json:"new,omitempty"`
}

// Diff compares p and everything beneath it in from and to, calling fn
// for each path added, removed or changed, in bytewise path order
// (everything beneath an added or removed directory is reported too).
// Files differ by type, size, mtime, mode, owner or link target; with
// content, files of equal size are also compared by SHA-256 (computed in
// each appliance). A directory is reported only for its mode or owner
// (its mtime follows its contents, which are reported themselves). Memory:
// one directory's entries per level, on each side.
func Diff(ctx context.Context, from, to *Session, p string, content bool, fn func(Change) error) error {
	p, err := cleanPath(p)
	if err != nil {
		return err
	}
	a, aerr := from.Stat(p)
	b, berr := to.Stat(p)
	switch {
	case aerr != nil && !errors.Is(aerr, ErrNotFound):
		return aerr
	case berr != nil && !errors.Is(berr, ErrNotFound):
		return berr
	case aerr != nil && berr != nil:
		return fmt.Errorf("%w (in neither backup)", aerr)
	case aerr != nil:
		return reportAll(ctx, to, b, "added", fn)
	case berr != nil:
		return reportAll(ctx, from, a, "removed", fn)
	}
	d := differ{ctx: ctx, from: from, to: to, content: content, fn: fn}
	return d.compare(a, b)
}

type differ struct {
	ctx      context.Context
	from, to *Session
	content  bool
	fn       func(Change) error
}

// reportAll reports e and everything beneath it as added or removed.
func reportAll(ctx context.Context, s *Session, e Entry, op string, fn func(Change) error) error {
	return s.walk(ctx, e, func(c Entry) error {
		ch := Change{Path: c.Path, Op: op}
		if op == "added" {
			ch.New = &c
		} else {
			ch.Old = &c
		}
		return fn(ch)
	})
}

func (d *differ) compare(a, b Entry) error {
	if err := d.ctx.Err(); err != nil {
		return err
	}
	if a.Type != b.Type {
		if err := d.fn(Change{Path: a.Path, Op: "changed", What: []string{"type"}, Old: &a, New: &b}); err != nil {
			return err
		}
		if a.Type == "dir" {
			if err := d.children(d.from, a, "removed"); err != nil {
				return err
			}
		}
		if b.Type == "dir" {
			return d.children(d.to, b, "added")
		}
		return nil
	}
	var what []string
	if a.Mode != b.Mode {
		what = append(what, "mode")
	}
	if a.UID != b.UID || a.GID != b.GID {
		what = append(what, "owner")
	}
	switch a.Type {
	case "file":
		if a.Size != b.Size {
			what = append(what, "size")
		}
		if !a.Mtime.Equal(b.Mtime) {
			what = append(what, "mtime")
		}
		if d.content && a.Size == b.Size {
			ca, err := d.from.Checksum(a.Path)
			if err != nil {
				return err
			}
			cb, err := d.to.Checksum(b.Path)
			if err != nil {
				return err
			}
			if ca != cb {
				what = append(what, "content")
			}
		}
	case "symlink":
		if a.Target != b.Target {
			what = append(what, "target")
		}
	}
	if len(what) > 0 {
		if err := d.fn(Change{Path: a.Path, Op: "changed", What: what, Old: &a, New: &b}); err != nil {
			return err
		}
	}
	if a.Type == "dir" {
		return d.dirs(a, b)
	}
	return nil
}

// children reports what is beneath dir e (not e) as op.
func (d *differ) children(s *Session, e Entry, op string) error {
	es, err := d.list(s, e.Path)
	if err != nil {
		return err
	}
	for _, c := range es {
		if err := reportAll(d.ctx, s, c, op, d.fn); err != nil {
			return err
		}
	}
	return nil
}

// dirs merges two directories' entries (sorted by name).
func (d *differ) dirs(a, b Entry) error {
	ea, err := d.list(d.from, a.Path)
	if err != nil {
		return err
	}
	eb, err := d.list(d.to, b.Path)
	if err != nil {
		return err
	}
	for len(ea) > 0 || len(eb) > 0 {
		switch {
		case len(eb) == 0 || len(ea) > 0 && ea[0].Name < eb[0].Name:
			err = reportAll(d.ctx, d.from, ea[0], "removed", d.fn)
			ea = ea[1:]
		case len(ea) == 0 || eb[0].Name < ea[0].Name:
			err = reportAll(d.ctx, d.to, eb[0], "added", d.fn)
			eb = eb[1:]
		default:
			err = d.compare(ea[0], eb[0])
			ea, eb = ea[1:], eb[1:]
		}
		if err != nil {
			return err
		}
	}
	return nil
}

// list is a directory's entries, sorted by name.
func (d *differ) list(s *Session, dir string) ([]Entry, error) {
	names, err := s.names(d.ctx, dir)
	if err != nil {
		return nil, err
	}
	return s.entries(dir, names)
}
