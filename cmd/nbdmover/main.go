// Command nbdmover backs up libvirt/QEMU virtual machines over NBD into a
// content-addressed repository. See README.md.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"syscall"

	"github.com/nbdmover/nbdmover/daemon"
	"github.com/nbdmover/nbdmover/mover"
	"github.com/nbdmover/nbdmover/restore"
	"github.com/urfave/cli/v2"
)

// usageError marks bad usage: exit status 2.
type usageError struct{ error }

func usagef(format string, args ...any) error { return usageError{fmt.Errorf(format, args...)} }

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	err := newApp().RunContext(ctx, os.Args)
	if err == nil {
		return
	}
	fmt.Fprintln(os.Stderr, "nbdmover:", err)
	os.Exit(exitStatus(err))
}

// exitStatus is the exit status for a command's error: 2 for bad usage
// (flags, and option values the library calls invalid), 3 for a verify
// that could not check, 1 for every other failure.
func exitStatus(err error) int {
	var ue usageError
	var ce checkError
	switch {
	case errors.As(err, &ue), errors.Is(err, mover.ErrInvalid), errors.Is(err, restore.ErrInvalid), errors.Is(err, daemon.ErrInvalid):
		return 2
	case errors.As(err, &ce):
		return 3
	}
	return 1
}

// checkError marks a verify that could not check the repository (exit
// status 3), as opposed to one that found problems (1).
type checkError struct{ error }

func (e checkError) Unwrap() error { return e.error }

func newApp() *cli.App {
	app := &cli.App{
		Name:  "nbdmover",
		Usage: "back up libvirt/QEMU virtual machines over NBD into a deduplicating repository",
		Flags: []cli.Flag{
			&cli.StringFlag{Name: "log-level", Value: "info", Usage: "debug, info, warn or error"},
			&cli.StringFlag{Name: "log-format", Value: "text", Usage: "text or json (logs go to stderr)"},
			&cli.StringFlag{Name: "profile-dir", Usage: "write pprof profiles (cpu, allocs, heap, block, mutex) and an execution trace of the run into this directory", Hidden: true},
		},
		Before: func(c *cli.Context) error {
			if name := c.Args().First(); name != "" && c.App.Command(name) == nil {
				return usagef("unknown command %q (nbdmover --help lists them)", name)
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
			initCommand(), backupCommand(), listCommand(), restoreCommand(), verifyCommand(), forgetCommand(),
			protectCommand(true), protectCommand(false), gcCommand(), unlockCommand(), cleanupCommand(), migrateCommand(), serveCommand(),
			keyCommand(),
		},
		OnUsageError: func(_ *cli.Context, err error, _ bool) error { return usageError{err} },
		ExitErrHandler: func(*cli.Context, error) {
			// main prints errors and picks the exit status.
		},
	}
	for _, c := range app.Commands {
		c.OnUsageError = app.OnUsageError
	}
	return app
}

// newLogger builds the logger from the global flags.
func newLogger(c *cli.Context) (*slog.Logger, error) {
	var level slog.Level
	if err := level.UnmarshalText([]byte(c.String("log-level"))); err != nil {
		return nil, usagef("--log-level: %v", err)
	}
	opts := &slog.HandlerOptions{Level: level}
	switch c.String("log-format") {
	case "text":
		return slog.New(slog.NewTextHandler(os.Stderr, opts)), nil
	case "json":
		return slog.New(slog.NewJSONHandler(os.Stderr, opts)), nil
	}
	return nil, usagef("--log-format %q: want text or json", c.String("log-format"))
}

func printJSON(w io.Writer, v any) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
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
