package main

import (
	"fmt"
	"os"
	"path/filepath"
	"runtime/debug"
	"time"

	"github.com/nbdmover/nbdmover/export"
	"github.com/nbdmover/nbdmover/internal/listen"
	"github.com/nbdmover/nbdmover/internal/progress"
	"github.com/nbdmover/nbdmover/mover"
	"github.com/urfave/cli/v2"
)

// exportOverhead is what an export holds beside its cache, for its soft
// memory limit: the fetches in flight, the replies being sent (at most
// 128 MiB, nbdserver's bound, mostly parts of cached chunks), the index.
const exportOverhead = 64 << 20

func exportCommand() *cli.Command {
	return &cli.Command{
		Name: "export",
		Usage: "serve the disks of a backup as read-only NBD exports (for nbdcopy, qemu-img, nbdinfo, a QEMU overlay), " +
			"until interrupted or, with --once, until the last client leaves",
		Flags: append(repoFlags(),
			&cli.StringFlag{Name: "domain", Usage: "domain whose backup to serve (required)"},
			asOfFlag(),
			&cli.StringFlag{Name: "backup", Value: "latest", Usage: "backup id, or latest"},
			&cli.StringSliceFlag{Name: "disk", Usage: "serve only this disk (repeatable)", DefaultText: "every disk"},
			&cli.StringFlag{Name: "listen", Usage: "unix:///path (a 0600 socket) or host:port (TCP: off loopback, TLS with client certificates)",
				DefaultText: "unix://" + mover.DefaultRunDir + "/export-DOMAIN.sock"},
			&cli.StringFlag{Name: "tls-cert", Usage: "PEM certificate to serve TCP with TLS (clients then must use it: nbds://)"},
			&cli.StringFlag{Name: "tls-key", Usage: "PEM key of --tls-cert"},
			&cli.StringFlag{Name: "tls-client-ca", Usage: "PEM CA certificates that client certificates must chain to (required off loopback: only clients with one read the disks)"},
			&cli.StringFlag{Name: "cache-size", Value: "512MiB", Usage: "decoded chunks kept in memory, for all disks together (at least 16MiB)"},
			&cli.BoolFlag{Name: "once", Usage: "stop when the last client disconnects (after the first has connected)"},
			noLockFlag(),
			jsonFlag(),
		),
		Action: func(c *cli.Context) error {
			if err := checkFlags(c); err != nil {
				return err
			}
			if c.String("domain") == "" {
				return usagef("export needs --domain NAME")
			}
			cache, err := parseSize(c.String("cache-size"))
			if err != nil {
				return usagef("--cache-size: %v", err)
			}
			log, err := newLogger(c)
			if err != nil {
				return err
			}
			// The cache is most of what an export holds: the collector
			// keeps the heap near it rather than at twice what is live.
			if os.Getenv("GOMEMLIMIT") == "" {
				debug.SetMemoryLimit(cache + exportOverhead)
			}
			addr := c.String("listen")
			if addr == "" {
				addr = "unix://" + filepath.Join(mover.DefaultRunDir, "export-"+c.String("domain")+".sock")
			}
			e, err := export.Start(c.Context, export.Options{Repo: repoOptions(c), Domain: c.String("domain"), Backup: c.String("backup"),
				Disks: c.StringSlice("disk"), Listen: addr, CacheBytes: cache, NoLock: c.Bool("no-lock"), Log: log,
				TLS: listen.TLS{Cert: c.String("tls-cert"), Key: c.String("tls-key"), ClientCA: c.String("tls-client-ca")}})
			if err != nil {
				return err
			}
			defer e.Close()
			if c.Bool("json") {
				err = printJSON(c.App.Writer, map[string]any{"domain": e.Domain, "id": e.Backup, "address": e.Address, "disks": e.Disks})
			} else {
				for _, d := range e.Disks {
					fmt.Fprintf(c.App.Writer, "serving %s/%s disk %s (%s) at %s\n", e.Domain, e.Backup, d.Name, progress.Bytes(d.Size), d.URI)
				}
				if _, addr, _ := listen.Split(addr); addr != "" && !c.IsSet("tls-cert") {
					fmt.Fprintln(c.App.Writer, "warning: plain TCP: every user of this host can read these disks")
				}
				until := "until interrupted"
				if c.Bool("once") {
					until = "until the last client disconnects"
				}
				fmt.Fprintf(c.App.Writer, "read-only; %s\n", until)
			}
			if err != nil {
				return err
			}
			var idle <-chan struct{}
			if c.Bool("once") {
				idle = e.Idle()
			}
			select {
			case <-c.Context.Done(): // interrupted: the normal end
			case <-idle:
			case <-e.Done():
			}
			e.Close()
			s := e.Stats()
			log.Info("export ended", "domain", e.Domain, "id", e.Backup, "reads", s.Reads, "bytes", s.BytesServed,
				"read_errors", s.ReadErrors, "cache_hits", s.CacheHits, "fetches", s.Fetches, "served_for", time.Since(e.Started).Round(time.Second))
			if err := e.Err(); err != nil {
				return fmt.Errorf("export of %s/%s stopped: %w", e.Domain, e.Backup, err)
			}
			return nil
		},
	}
}
