package main

import (
	"encoding/json"
	"fmt"
	"io"
	"os"
	"strings"
	"sync"
	"text/tabwriter"
	"time"
	"unicode/utf8"

	"github.com/nbdmover/nbdmover/files"
	"github.com/nbdmover/nbdmover/internal/progress"
	"github.com/nbdmover/nbdmover/mover"
	"github.com/nbdmover/nbdmover/repo"
	"github.com/urfave/cli/v2"
)

// filesCommand is file-level restore: the files of a backup, read by a
// libguestfs appliance from its NBD export (package files).
func filesCommand() *cli.Command {
	return &cli.Command{
		Name:  "files",
		Usage: "list, fetch and compare the files of a backup without restoring a disk (a libguestfs appliance reads them)",
		Subcommands: []*cli.Command{{
			Name:      "fs",
			Usage:     "list the filesystems of a backup: partitions, LVM volumes, btrfs subvolumes, where the guest mounts them",
			ArgsUsage: " ",
			Flags:     filesFlags(true, false),
			Action:    filesFS,
		}, {
			Name:      "ls",
			Usage:     "list a directory of a backup (default /): name, type, size, mode, owner, mtime, link target",
			ArgsUsage: "[PATH]",
			Flags: append(filesFlags(true, true),
				&cli.BoolFlag{Name: "long", Aliases: []string{"l"}, Usage: "type, mode, owner, size, mtime and link target too"}),
			Action: filesLs,
		}, {
			Name: "get",
			Usage: "restore files and directories of a backup into a directory (--output) or as a tar stream (--tar): " +
				"modes, times, symlinks as links, numeric owners",
			ArgsUsage: "PATH...",
			Flags: append(filesFlags(true, true),
				&cli.StringFlag{Name: "output", Aliases: []string{"o"}, Usage: "directory to restore into (made if missing; guest paths beneath it, never outside)"},
				&cli.StringFlag{Name: "tar", Usage: "write a tar stream to this new file, or - for stdout"}),
			Action: filesGet,
		}, {
			Name:      "diff",
			Usage:     "list what was added, removed or changed under PATH (default /) between two backups",
			ArgsUsage: "[PATH]",
			Flags: append(filesFlags(false, true),
				&cli.StringFlag{Name: "from", Usage: "the older backup's id (required)"},
				&cli.StringFlag{Name: "to", Value: "latest", Usage: "the newer backup's id, or latest"},
				&cli.BoolFlag{Name: "content", Usage: "also compare files of equal size by content (reads both)"}),
			Action: filesDiff,
		}},
	}
}

func filesFlags(backup, fs bool) []cli.Flag {
	fl := append(repoFlags(),
		&cli.StringFlag{Name: "domain", Usage: "domain whose backup to read (required)"},
		&cli.StringSliceFlag{Name: "disk", Usage: "give the appliance only this disk (repeatable)", DefaultText: "every disk"},
		&cli.StringFlag{Name: "appliance-memory", Value: "512MiB", Usage: "the libguestfs appliance's memory (at least 256MiB)"},
		&cli.StringFlag{Name: "accel", Value: "auto", Usage: "the appliance's accelerator: auto (KVM, falling back to TCG when its launch fails), kvm or tcg"},
		&cli.StringFlag{Name: "cache-size", Value: "32MiB", Usage: "decoded chunks kept in memory for the appliance's reads"},
		&cli.StringFlag{Name: "run-dir", Value: mover.DefaultRunDir, Usage: "directory for the backup's private NBD socket"},
		asOfFlag(), noLockFlag(), jsonFlag())
	if backup {
		fl = append(fl, &cli.StringFlag{Name: "backup", Value: "latest", Usage: "backup id, or latest"})
	}
	if fs {
		fl = append(fl, &cli.StringFlag{Name: "fs", Usage: "read this filesystem (a NAME from files fs) at /, instead of the guest's operating system as it mounts it"})
	}
	return fl
}

// filesBoolFlags are the files commands' flags that take no value: their
// paths may follow or precede flags (normalizeArgs).
var filesBoolFlags = []string{"long", "l", "json", "no-lock", "content", "s3-path-style", "help", "h"}

// filesOptions checks the flags every files command has and makes the
// session's options; backup is the id to open.
func filesOptions(c *cli.Context, backup string) (files.Options, error) {
	if err := checkOptions(c); err != nil {
		return files.Options{}, err
	}
	if c.String("domain") == "" {
		return files.Options{}, usagef("files %s needs --domain NAME", c.Command.Name)
	}
	if backup != "latest" {
		if err := repo.ValidBackupID(backup); err != nil {
			return files.Options{}, usagef("backup %q: %v", backup, err)
		}
	}
	switch c.String("accel") {
	case "auto", "kvm", "tcg":
	default:
		return files.Options{}, usagef("--accel %q: want auto, kvm or tcg", c.String("accel"))
	}
	mem, err := parseSize(c.String("appliance-memory"))
	if err != nil {
		return files.Options{}, usagef("--appliance-memory: %v", err)
	}
	cache, err := parseSize(c.String("cache-size"))
	if err != nil || cache < 16<<20 {
		return files.Options{}, usagef("--cache-size %q: want a size of at least 16MiB", c.String("cache-size"))
	}
	if err := mover.CheckDir(c.String("run-dir")); err != nil {
		return files.Options{}, usagef("--run-dir: %v", err)
	}
	log, err := newLogger(c)
	if err != nil {
		return files.Options{}, err
	}
	return files.Options{Repo: repoOptions(c), Domain: c.String("domain"), Backup: backup, Disks: c.StringSlice("disk"),
		RunDir: c.String("run-dir"), MemoryMiB: int(mem >> 20), Accel: c.String("accel"), CacheBytes: cache,
		NoLock: c.Bool("no-lock"), Log: log}, nil
}

// openMounted opens a session with --fs (or the guest as it runs)
// mounted; Close ends both.
func openMounted(c *cli.Context, o files.Options) (*files.Session, error) {
	s, err := files.Open(c.Context, o)
	if err != nil {
		return nil, err
	}
	release, err := s.Use(c.String("fs"))
	if err != nil {
		s.Close()
		return nil, err
	}
	release() // the CLI is the session's only user: the mount stays
	return s, nil
}

// guestPath is a command's one PATH argument (default /).
func guestPath(c *cli.Context) (string, error) {
	switch c.Args().Len() {
	case 0:
		return "/", nil
	case 1:
		return c.Args().First(), nil
	}
	return "", usagef("files %s takes one PATH, got %d (%s)", c.Command.Name, c.Args().Len(), strings.Join(c.Args().Slice(), " "))
}

func filesFS(c *cli.Context) error {
	if c.Args().Len() > 0 {
		return usagef("files fs takes no PATH (got %q)", c.Args().First())
	}
	o, err := filesOptions(c, c.String("backup"))
	if err != nil {
		return err
	}
	s, err := files.Open(c.Context, o)
	if err != nil {
		return err
	}
	defer s.Close()
	// Mounting the guest as it runs fills in its mount points; with no
	// operating system (or several), the list says what there is.
	mounted := ""
	if release, err := s.Use(""); err == nil {
		release()
	} else {
		mounted = err.Error()
	}
	fss := s.Filesystems()
	if c.Bool("json") {
		return printJSON(c.App.Writer, map[string]any{"domain": s.Domain, "id": s.Backup, "accel": s.Accel,
			"launch_seconds": s.Launch.Seconds(), "inspect_seconds": s.Inspect.Seconds(), "os": s.OS, "filesystems": fss})
	}
	w := c.App.Writer
	fmt.Fprintf(w, "%s/%s: appliance %s (launched in %s, inspected in %s)\n", s.Domain, s.Backup, accelName(s.Accel),
		s.Launch.Round(100*time.Millisecond), s.Inspect.Round(100*time.Millisecond))
	if s.OS != "" {
		fmt.Fprintf(w, "operating system: %s\n", quoteName(s.OS))
	} else if mounted != "" {
		fmt.Fprintf(w, "%s\n", mounted)
	}
	tw := tabwriter.NewWriter(w, 2, 8, 2, ' ', 0)
	fmt.Fprintln(tw, "NAME\tTYPE\tSIZE\tLABEL\tMOUNTED AT\tNOTE")
	for _, f := range fss {
		at := ""
		if f.Mounted {
			at = f.Mountpoint
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\n", quoteName(f.Name), quoteName(f.Type), progress.Bytes(f.Size), quoteName(f.Label),
			quoteName(at), quoteName(f.Note))
	}
	return tw.Flush()
}

func accelName(a string) string {
	if a == "tcg" {
		return "under TCG (no KVM: slower)"
	}
	return "with KVM"
}

func filesLs(c *cli.Context) error {
	p, err := guestPath(c)
	if err != nil {
		return err
	}
	o, err := filesOptions(c, c.String("backup"))
	if err != nil {
		return err
	}
	s, err := openMounted(c, o)
	if err != nil {
		return err
	}
	defer s.Close()
	w := c.App.Writer
	if c.Bool("json") {
		js := newJSONStream(w, map[string]any{"domain": s.Domain, "id": s.Backup, "path": p, "fs": c.String("fs")}, "entries")
		if err := s.Each(c.Context, p, func(e files.Entry) error { return js.item(e) }); err != nil {
			return err
		}
		return js.end()
	}
	long := c.Bool("long")
	tw := tabwriter.NewWriter(w, 1, 8, 1, ' ', tabwriter.AlignRight)
	n := 0
	err = s.Each(c.Context, p, func(e files.Entry) error {
		if !long {
			_, err := fmt.Fprintln(w, quoteName(e.Name))
			return err
		}
		name := quoteName(e.Name)
		if e.Type == "symlink" {
			name += " -> " + quoteName(e.Target)
		}
		fmt.Fprintf(tw, "%s\t%d\t%d\t%d\t%s\t %s\n", modeString(e), e.UID, e.GID, e.Size, e.Mtime.Local().Format("2006-01-02 15:04"), name)
		// Flush now and then: a huge directory streams, and the columns
		// stay aligned within each block.
		if n++; n%1000 == 0 {
			return tw.Flush()
		}
		return nil
	})
	if err != nil {
		return err
	}
	return tw.Flush()
}

// modeString is ls -l's first column: type letter and permissions.
func modeString(e files.Entry) string {
	t := map[string]byte{"dir": 'd', "symlink": 'l', "fifo": 'p', "socket": 's', "block": 'b', "char": 'c'}[e.Type]
	if t == 0 {
		t = '-'
	}
	var m uint32
	fmt.Sscanf(e.Mode, "%o", &m)
	b := []byte{t}
	for i, c := range "rwxrwxrwx" {
		if m&(1<<(8-i)) != 0 {
			b = append(b, byte(c))
		} else {
			b = append(b, '-')
		}
	}
	for _, s := range []struct {
		bit  uint32
		at   int
		x, n byte
	}{{0o4000, 3, 's', 'S'}, {0o2000, 6, 's', 'S'}, {0o1000, 9, 't', 'T'}} {
		if m&s.bit != 0 {
			if b[s.at] == 'x' {
				b[s.at] = s.x
			} else {
				b[s.at] = s.n
			}
		}
	}
	return string(b)
}

// quoteName shows a name from the guest: as it is when printable, else
// quoted Go-style (a newline or an escape sequence in a name must not
// reach the terminal).
func quoteName(s string) string {
	if !utf8.ValidString(s) || strings.ContainsFunc(s, func(r rune) bool { return r < 0x20 || r == 0x7f || (r >= 0x80 && r < 0xa0) }) ||
		strings.HasPrefix(s, `"`) {
		return fmt.Sprintf("%q", s)
	}
	return s
}

func filesGet(c *cli.Context) error {
	if c.Args().Len() == 0 {
		return usagef("files get needs the PATHs to restore (e.g. /etc/hosts /home/alice)")
	}
	out, tarTo := c.String("output"), c.String("tar")
	if (out == "") == (tarTo == "") {
		return usagef("files get needs exactly one of --output DIR or --tar FILE (- for stdout)")
	}
	o, err := filesOptions(c, c.String("backup"))
	if err != nil {
		return err
	}
	var tw io.Writer
	done := false
	report := c.App.Writer
	if tarTo == "-" {
		if c.Bool("json") {
			return usagef("--tar - writes the tar to stdout: --json has no place there (the summary goes to stderr)")
		}
		if isTerminal(os.Stdout) {
			return usagef("--tar -: stdout is a terminal; redirect it or give a file")
		}
		tw, report = os.Stdout, c.App.ErrWriter
	} else if tarTo != "" {
		f, err := os.OpenFile(tarTo, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
		if err != nil {
			return fmt.Errorf("--tar: %w (give a new file)", err)
		}
		defer func() {
			if f.Close() != nil || !done {
				os.Remove(tarTo) // no partial tar left to be taken for a whole one
			}
		}()
		tw = f
	}
	s, err := openMounted(c, o)
	if err != nil {
		return err
	}
	defer s.Close()
	start := time.Now()
	var res files.Result
	if tw != nil {
		res, err = s.Tar(c.Context, c.Args().Slice(), tw)
		if f, ok := tw.(*os.File); ok && f != os.Stdout && err == nil {
			err = f.Sync()
		}
	} else {
		res, err = s.Extract(c.Context, c.Args().Slice(), out)
	}
	if err != nil {
		return err
	}
	done = true
	took := time.Since(start)
	if c.Bool("json") {
		return printJSON(report, map[string]any{"domain": s.Domain, "id": s.Backup, "output": out, "tar": tarTo, "files": res.Files,
			"dirs": res.Dirs, "symlinks": res.Symlinks, "hardlinks": res.Hardlinks, "bytes": res.Bytes, "skipped": res.Skipped,
			"seconds": took.Seconds()})
	}
	where := out
	if tarTo != "" {
		where = "tar " + tarTo
	}
	fmt.Fprintf(report, "restored %s, %s, %s, %s (%s) from %s/%s to %s in %s\n", count(res.Files, "file"), count(res.Dirs, "directory"),
		count(res.Symlinks, "symlink"), count(res.Hardlinks, "hard link"), progress.Bytes(res.Bytes), s.Domain, s.Backup, where,
		took.Round(100*time.Millisecond))
	for _, sk := range res.Skipped {
		fmt.Fprintf(report, "skipped %s\n", quoteName(sk))
	}
	return nil
}

func filesDiff(c *cli.Context) error {
	p, err := guestPath(c)
	if err != nil {
		return err
	}
	if c.String("from") == "" {
		return usagef("files diff needs --from ID (the older backup; nbdmover list shows the ids)")
	}
	var from, to files.Options
	if from, err = filesOptions(c, c.String("from")); err != nil {
		return err
	}
	if to, err = filesOptions(c, c.String("to")); err != nil {
		return err
	}
	// Both appliances boot at once: a diff waits for one boot, not two.
	var sa, sb *files.Session
	var ea, eb error
	var wg sync.WaitGroup
	wg.Go(func() { sa, ea = files.Open(c.Context, from) })
	wg.Go(func() { sb, eb = files.Open(c.Context, to) })
	wg.Wait()
	for _, s := range []*files.Session{sa, sb} {
		if s != nil {
			defer s.Close()
		}
	}
	if ea != nil {
		return fmt.Errorf("--from %s: %w", c.String("from"), ea)
	}
	if eb != nil {
		return fmt.Errorf("--to %s: %w", c.String("to"), eb)
	}
	for _, s := range []*files.Session{sa, sb} {
		release, err := s.Use(c.String("fs"))
		if err != nil {
			return fmt.Errorf("%s: %w", s.Backup, err)
		}
		defer release()
	}
	w := c.App.Writer
	if c.Bool("json") {
		js := newJSONStream(w, map[string]any{"domain": sa.Domain, "from": sa.Backup, "to": sb.Backup, "path": p, "content": c.Bool("content")}, "changes")
		err := files.Diff(c.Context, sa, sb, p, c.Bool("content"), func(ch files.Change) error {
			return js.item(struct {
				Path       string `json:"path"`
				PathBase64 []byte `json:"path_base64,omitempty"`
				files.Change
			}{ch.Path, base64IfBinary(ch.Path), ch})
		})
		if err != nil {
			return err
		}
		return js.end()
	}
	fmt.Fprintf(w, "%s: %s -> %s\n", sa.Domain, sa.Backup, sb.Backup)
	n := 0
	err = files.Diff(c.Context, sa, sb, p, c.Bool("content"), func(ch files.Change) error {
		n++
		mark := map[string]string{"added": "+", "removed": "-", "changed": "~"}[ch.Op]
		line := mark + " " + quoteName(ch.Path)
		if ch.New != nil && ch.New.Type == "dir" || ch.Old != nil && ch.Old.Type == "dir" && ch.New == nil {
			line += "/"
		}
		if len(ch.What) > 0 {
			line += " (" + strings.Join(ch.What, ", ") + ")"
		}
		_, err := fmt.Fprintln(w, line)
		return err
	})
	if err != nil {
		return err
	}
	if n == 0 {
		fmt.Fprintf(w, "no changes under %s\n", quoteName(p))
	}
	return nil
}

func base64IfBinary(s string) []byte {
	if utf8.ValidString(s) {
		return nil
	}
	return []byte(s)
}

// jsonStream writes one JSON document whose last member is an array, an
// item at a time: a listing of a huge directory never sits in memory.
type jsonStream struct {
	w     io.Writer
	n     int
	err   error
	array string
}

func newJSONStream(w io.Writer, head map[string]any, array string) *jsonStream {
	printedJSON.Store(true)
	b, err := versioned(head)
	js := &jsonStream{w: w, err: err, array: array}
	if err == nil {
		_, js.err = fmt.Fprintf(w, "%s,\n  %q: [", b[:len(b)-1], array)
	}
	return js
}

func (js *jsonStream) item(v any) error {
	if js.err != nil {
		return js.err
	}
	b, err := json.Marshal(v)
	if err != nil {
		js.err = err
		return err
	}
	sep := ",\n    "
	if js.n == 0 {
		sep = "\n    "
	}
	js.n++
	_, js.err = fmt.Fprintf(js.w, "%s%s", sep, b)
	return js.err
}

func (js *jsonStream) end() error {
	if js.err != nil {
		return js.err
	}
	tail := "\n  ]\n}\n"
	if js.n == 0 {
		tail = "]\n}\n"
	}
	_, err := io.WriteString(js.w, tail)
	return err
}
