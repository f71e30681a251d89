package main

import (
	"fmt"
	"io"
	"os"
	"sync"

	"github.com/nbdmover/nbdmover/instant"
	"github.com/nbdmover/nbdmover/internal/progress"
	"github.com/nbdmover/nbdmover/mover"
	"github.com/urfave/cli/v2"
)

// maxXML bounds a --xml file: a domain definition is a few KiB.
const maxXML = 1 << 20

func instantRestoreCommand() *cli.Command {
	return &cli.Command{
		Name: "instant-restore",
		Usage: "run a backup as a new domain within seconds, from overlays on an export of it, and copy its disks home while it runs " +
			"(--resume NAME continues a copy that stopped)",
		Flags: append(append(repoFlags(),
			&cli.StringFlag{Name: "domain", Usage: "domain whose backup to restore"},
			&cli.StringFlag{Name: "backup", Value: "latest", Usage: "backup id, or latest"},
			&cli.StringFlag{Name: "as", Usage: "name of the new domain (required; a new UUID and MAC addresses too)"},
			&cli.StringFlag{Name: "image-dir", Usage: "existing directory, only root can change, for the new domain's images: AS-DISK.qcow2 (and AS-DISK.raw)"},
			&cli.StringFlag{Name: "format", Value: "qcow2", Usage: "of the final images: qcow2 (the overlay, pulled full) or raw (a block copy and a pivot)"},
			&cli.BoolFlag{Name: "no-start", Usage: "define the domain without starting it; copy its disks home while it is off"},
			&cli.BoolFlag{Name: "keep-network", Usage: "leave its interfaces connected (else their links are down, to keep it off the original's network)"},
			&cli.StringFlag{Name: "xml", Usage: "domain definition to use instead of the backup's (a backup of an NBD export has none)"},
			&cli.StringFlag{Name: "resume", Usage: "continue the copy of the instant restore NAME (the export is started again)"},
			&cli.StringFlag{Name: "bandwidth", Usage: "most each disk's copy reads per second, e.g. 100MiB (default: no limit)"},
			&cli.StringFlag{Name: "cache-size", Value: "512MiB", Usage: "the export's cache of decoded chunks"},
			&cli.StringFlag{Name: "qemu-user", Usage: "user QEMU runs as, given the export's socket", DefaultText: "qemu.conf's, else libvirt-qemu"},
			&cli.StringFlag{Name: "run-dir", Value: mover.DefaultRunDir, Usage: "directory for the export's socket (in instant/)"},
			connectFlag(),
			jsonFlag(),
		), progressFlags()...),
		Action: func(c *cli.Context) error {
			if err := checkFlags(c); err != nil {
				return err
			}
			o, err := instantOptions(c)
			if err != nil {
				return err
			}
			var mu sync.Mutex
			var latest *instant.Progress
			rep, err := progressReporter(c, "instant-restore", c.String("domain"), func() (string, []progress.Task) {
				mu.Lock()
				defer mu.Unlock()
				if latest == nil {
					return "start", nil
				}
				var tasks []progress.Task
				for _, d := range latest.Disks {
					tasks = append(tasks, progress.Task{Disk: d.Name, Phase: d.Phase, Done: d.Done, Total: d.Total, Written: d.Done})
				}
				return "copy", tasks
			})
			if err != nil {
				return err
			}
			asJSON := c.Bool("json")
			w := c.App.Writer
			o.Running = func(r instant.Result) {
				if asJSON {
					printJSONLine(w, map[string]any{"event": "running", "result": r})
					return
				}
				state := "running"
				if o.NoStart {
					state = "defined (not started)"
				}
				fmt.Fprintf(w, "%s is %s from backup %s after %.1fs; copying its disks home\n", r.Domain, state, r.From, r.RunningAfter)
				for _, d := range r.Dropped {
					fmt.Fprintf(w, "left out of the new domain: %s\n", d)
				}
				if !r.Reconnect {
					fmt.Fprintln(w, "note: this libvirt cannot give QEMU a reconnect delay: should the export stop, the guest pauses until it is back")
				}
			}
			o.Progress = func(p instant.Progress) {
				mu.Lock()
				latest = &p
				mu.Unlock()
				if asJSON {
					printJSONLine(w, map[string]any{"event": "progress", "progress": p})
				}
			}
			var res *instant.Result
			rep.Start(c.Context)
			if o.As != "" && c.IsSet("resume") {
				res, err = instant.Resume(c.Context, o)
			} else {
				res, err = instant.Run(c.Context, o)
			}
			rep.Finish(err)
			if err != nil {
				return err
			}
			if asJSON {
				printedJSON.Store(true)
				return printJSONLine(w, map[string]any{"event": "done", "result": res})
			}
			printInstantResult(w, res)
			return nil
		},
	}
}

// instantOptions maps the flags; --resume takes no source flags.
func instantOptions(c *cli.Context) (instant.Options, error) {
	o := instant.Options{Repo: repoOptions(c), Domain: c.String("domain"), Backup: c.String("backup"), As: c.String("as"),
		ImageDir: c.String("image-dir"), Format: c.String("format"), NoStart: c.Bool("no-start"), KeepNetwork: c.Bool("keep-network"),
		Connect: c.String("connect"), RunDir: c.String("run-dir"), QEMUUser: c.String("qemu-user")}
	log, err := newLogger(c)
	if err != nil {
		return o, err
	}
	o.Log = log
	if o.CacheBytes, err = parseSize(c.String("cache-size")); err != nil {
		return o, usagef("--cache-size: %v", err)
	}
	if c.IsSet("bandwidth") {
		if o.Bandwidth, err = parseSize(c.String("bandwidth")); err != nil || o.Bandwidth <= 0 {
			return o, usagef("--bandwidth %q: a size per second, like 100MiB", c.String("bandwidth"))
		}
	}
	if c.IsSet("resume") {
		for _, f := range []string{"domain", "backup", "as", "image-dir", "format", "keep-network", "xml"} {
			if c.IsSet(f) {
				return o, usagef("--resume NAME continues what the restore of NAME started: --%s is not for it", f)
			}
		}
		o.As = c.String("resume")
		return o, nil
	}
	switch {
	case o.Domain == "":
		return o, usagef("instant-restore needs --domain NAME (whose backup), or --resume NAME")
	case o.As == "":
		return o, usagef("instant-restore needs --as NEWNAME: the restored domain runs beside the original, under a new name")
	case o.ImageDir == "":
		return o, usagef("instant-restore needs --image-dir DIR: the new domain's disks are made there")
	}
	if f := c.String("xml"); f != "" {
		fh, err := os.Open(f)
		if err != nil {
			return o, usagef("--xml: %v", err)
		}
		defer fh.Close()
		if o.XML, err = io.ReadAll(io.LimitReader(fh, maxXML+1)); err != nil {
			return o, usagef("--xml: %v", err)
		}
		if len(o.XML) > maxXML {
			return o, usagef("--xml %s: larger than %d bytes; a domain definition is a few KiB", f, maxXML)
		}
	}
	return o, nil
}

func printInstantResult(w io.Writer, r *instant.Result) {
	fmt.Fprintf(w, "%s: every disk is home (copied in %.1fs); the export of %s has ended\n", r.Domain, r.CopySeconds, r.From)
	for _, d := range r.Disks {
		fmt.Fprintf(w, "  %s  %s  %s (%s)\n", d.Name, progress.Bytes(d.Size), d.Image, d.Format)
	}
}
