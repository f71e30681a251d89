// Command nbdmover backs up libvirt/QEMU virtual machines over NBD into a
// content-addressed repository. See README.md.
package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"github.com/nbdmover/nbdmover/repo/lock"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"runtime"
	"runtime/debug"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"unicode/utf8"

	"github.com/nbdmover/nbdmover/daemon"
	"github.com/nbdmover/nbdmover/export"
	"github.com/nbdmover/nbdmover/files"
	"github.com/nbdmover/nbdmover/instant"
	"github.com/nbdmover/nbdmover/internal/listen"
	"github.com/nbdmover/nbdmover/mover"
	"github.com/nbdmover/nbdmover/mover/domain"
	"github.com/nbdmover/nbdmover/nbdclient"
	"github.com/nbdmover/nbdmover/repo"
	"github.com/nbdmover/nbdmover/restore"
	"github.com/urfave/cli/v2"
)

// usageError marks bad usage: exit status 2.
type usageError struct{ error }

func usagef(format string, args ...any) error { return usageError{fmt.Errorf(format, args...)} }

func main() {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var got atomic.Value // the signal that ended the run
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, os.Interrupt, syscall.SIGTERM)
	go func() {
		s := <-sigs
		got.Store(s)
		cancel()
		signal.Stop(sigs) // a second ^C kills at once
	}()
	args := normalizeArgs(os.Args)
	err := newApp().RunContext(ctx, args)
	if err == nil {
		return
	}
	sig, _ := got.Load().(os.Signal)
	code, kind := exitStatus(err, sig)
	fmt.Fprintln(os.Stderr, "nbdmover:", terminalSafe(err.Error()))
	if wantsJSON(args) && !printedJSON.Load() { // a result already printed (verify's) says it all
		printJSON(os.Stdout, struct {
			Version int    `json:"version"`
			Error   string `json:"error"`
			Kind    string `json:"kind"`
			Exit    int    `json:"exit"`
		}{jsonVersion, err.Error(), kind, code})
	}
	os.Exit(code)
}

// Exit statuses (README, "Exit status").
const (
	exitFailure      = 1
	exitUsage        = 2
	exitUnchecked    = 3 // verify could not check
	exitNoRepository = 10
	exitLocked       = 11
	exitKey          = 12
	exitInterrupted  = 130 // SIGINT
	exitTerminated   = 143 // SIGTERM
)

// exitStatus is the exit status for a command's error, and its kind (in
// the JSON error document): a signal that ended the run first, then bad
// usage (flags, and option values the library calls invalid), no
// repository, a lock or a busy name, a wrong password or key, a verify
// that could not check, and 1 for every other failure.
func exitStatus(err error, sig os.Signal) (int, string) {
	var ue usageError
	var ce checkError
	switch {
	case sig == os.Interrupt:
		return exitInterrupted, "interrupted"
	case sig == syscall.SIGTERM:
		return exitTerminated, "terminated"
	case errors.As(err, &ue), errors.Is(err, mover.ErrInvalid), errors.Is(err, restore.ErrInvalid), errors.Is(err, daemon.ErrInvalid),
		errors.Is(err, export.ErrInvalid), errors.Is(err, listen.ErrInvalid), errors.Is(err, instant.ErrInvalid),
		errors.Is(err, files.ErrInvalid), errors.Is(err, repo.ErrCopyMismatch), errors.Is(err, repo.ErrNoBypass):
		return exitUsage, "usage"
	case errors.Is(err, repo.ErrNoRepository):
		return exitNoRepository, "no-repository"
	case errors.Is(err, lock.ErrLocked), errors.Is(err, mover.ErrBusy):
		return exitLocked, "locked"
	case errors.Is(err, repo.ErrWrongPassword), errors.Is(err, repo.ErrKeyNeeded), errors.Is(err, repo.ErrNotEncrypted), errors.Is(err, repo.ErrKeyMismatch):
		return exitKey, "key"
	case errors.As(err, &ce):
		return exitUnchecked, "could-not-check"
	}
	return exitFailure, "failure"
}

// terminalSafe escapes, line by line, what a terminal would act on: an
// error may carry a name from a guest's filesystem or a repository
// written by someone else.
func terminalSafe(s string) string {
	lines := strings.Split(s, "\n")
	for i, l := range lines {
		if !utf8.ValidString(l) || strings.ContainsFunc(l, func(r rune) bool { return r < 0x20 && r != '\t' || r >= 0x7f && r < 0xa0 }) {
			q := strconv.Quote(l)
			lines[i] = q[1 : len(q)-1]
		}
	}
	return strings.Join(lines, "\n")
}

// wantsJSON reports whether the command line asks for --json.
func wantsJSON(args []string) bool {
	for _, a := range args[1:] {
		if a == "--" {
			return false
		}
		if a == "--json" || a == "-json" || a == "--json=true" {
			return true
		}
	}
	return false
}

// checkError marks a verify that could not check the repository (exit
// status 3), as opposed to one that found problems (1).
type checkError struct{ error }

func (e checkError) Unwrap() error { return e.error }

// buildCommit is set by make build (-ldflags -X), where the build has no
// version control information of its own.
var buildCommit = "unknown"

// version is what --version prints: the module's version and commit, and
// the versions of Go, libnbd and libvirt this binary runs with.
func version() string {
	v, commit := "(devel)", buildCommit
	if bi, ok := debug.ReadBuildInfo(); ok {
		v = bi.Main.Version
		for _, s := range bi.Settings {
			switch s.Key {
			case "vcs.revision":
				commit = s.Value
			case "vcs.modified":
				if s.Value == "true" {
					commit += " (modified)"
				}
			}
		}
	}
	return fmt.Sprintf("%s\ncommit %s\n%s\nlibnbd %s\nlibvirt %s", v, commit, runtime.Version(), nbdclient.LibraryVersion(), domain.LibvirtVersion())
}

func newApp() *cli.App {
	app := &cli.App{
		Name:  "nbdmover",
		Usage: "back up libvirt/QEMU virtual machines over NBD into a deduplicating repository",
		Flags: []cli.Flag{
			&cli.StringFlag{Name: "log-level", Value: "info", Usage: "debug, info, warn or error"},
			&cli.StringFlag{Name: "log-format", Value: "text", Usage: "text or json (logs go to stderr)"},
			&cli.StringFlag{Name: "profile-dir", Usage: "write pprof profiles (cpu, allocs, heap, block, mutex) and an execution trace of the run into this directory", Hidden: true},
		},
		Version: version(),
		Before: func(c *cli.Context) error {
			if name := c.Args().First(); name != "" && c.App.Command(name) == nil {
				return unknownCommand(c.App, name)
			}
			if dir := c.String("profile-dir"); dir != "" {
				p, err := startProfiles(dir)
				if err != nil {
					return fmt.Errorf("--profile-dir: %w", err)
				}
				c.App.Metadata = map[string]any{"profiler": p}
			}
			return nil
		},
		After: func(c *cli.Context) error {
			if p, ok := c.App.Metadata["profiler"].(*profiler); ok {
				return p.stop()
			}
			return nil
		},
		Commands: []*cli.Command{
			initCommand(), backupCommand(), listCommand(), restoreCommand(), copyCommand(), exportCommand(), instantRestoreCommand(), verifyCommand(), forgetCommand(), recoverCommand(),
			protectCommand(true), protectCommand(false), gcCommand(), unlockCommand(), cleanupCommand(), migrateCommand(), serveCommand(),
			keyCommand(), filesCommand(),
		},
		OnUsageError: func(c *cli.Context, err error, _ bool) error { return usageErrorOf(c, err) },
		ExitErrHandler: func(*cli.Context, error) {
			// main prints errors and picks the exit status.
		},
	}
	for _, c := range app.Commands {
		c.OnUsageError = app.OnUsageError
		for _, sub := range c.Subcommands {
			sub.OnUsageError = app.OnUsageError
		}
		if len(c.Subcommands) > 0 && c.Action == nil {
			parent := c
			c.Action = func(ctx *cli.Context) error { // no subcommand matched
				if ctx.Args().Len() == 0 {
					return cli.ShowSubcommandHelp(ctx)
				}
				return unknownSubcommand(parent, ctx.Args().First())
			}
		}
	}
	cli.VersionPrinter = func(c *cli.Context) { fmt.Fprintf(c.App.Writer, "nbdmover %s\n", c.App.Version) }
	return app
}

// newLogger builds the logger from the global flags.
func newLogger(c *cli.Context) (*slog.Logger, error) {
	var level slog.Level
	if err := level.UnmarshalText([]byte(c.String("log-level"))); err != nil {
		return nil, usagef("--log-level: %v", err)
	}
	opts := &slog.HandlerOptions{Level: level}
	format := c.String("log-format")
	if c.String("progress") == "json" && !c.IsSet("log-format") {
		format = "json" // every line on stderr a JSON object: events have "type", log records "level"
	}
	switch format {
	case "text":
		return slog.New(slog.NewTextHandler(os.Stderr, opts)), nil
	case "json":
		return slog.New(slog.NewJSONHandler(os.Stderr, opts)), nil
	}
	return nil, usagef("--log-format %q: want text or json", c.String("log-format"))
}

// printedJSON: the command printed its JSON document.
var printedJSON atomic.Bool

// jsonVersion is the version of the shape of every --json document, its
// first field: a consumer that knows version 1 can read every document
// of version 1 (fields may be added; none is removed or changes meaning
// without a new version; docs/api.md's changelog).
const jsonVersion = 1

// printJSON prints v, an object, as the command's one JSON document, with
// "version" first.
func printJSON(w io.Writer, v any) error {
	printedJSON.Store(true)
	b, err := versioned(v)
	if err != nil {
		return err
	}
	var out bytes.Buffer
	if err := json.Indent(&out, b, "", "  "); err != nil {
		return err
	}
	out.WriteByte('\n')
	_, err = w.Write(out.Bytes())
	return err
}

// printJSONLine prints v, an object, as one line of a command that emits
// a JSON document per event (its last is the result, or the error
// document).
func printJSONLine(w io.Writer, v any) error {
	b, err := versioned(v)
	if err != nil {
		return err
	}
	_, err = w.Write(append(b, '\n'))
	return err
}

// versioned is v, an object, in JSON with "version" first.
func versioned(v any) ([]byte, error) {
	b, err := json.Marshal(v)
	if err != nil {
		return nil, err
	}
	if len(b) >= 2 && b[0] == '{' && !bytes.HasPrefix(b, []byte(`{"version":`)) {
		head := fmt.Sprintf(`{"version":%d`, jsonVersion)
		if string(b) != "{}" {
			head += ","
		}
		b = append([]byte(head), b[1:]...)
	}
	return b, nil
}

func isTerminal(f *os.File) bool {
	st, err := f.Stat()
	return err == nil && st.Mode()&os.ModeCharDevice != 0
}

// noArgs rejects positional arguments: every input is a flag.
func noArgs(c *cli.Context) error {
	if c.Args().Len() > 0 {
		return usagef("%s: unexpected argument %q (options are flags, e.g. --domain NAME)", c.Command.Name, c.Args().First())
	}
	return nil
}
