package main

import (
	"github.com/nbdmover/nbdmover/daemon"
	"github.com/nbdmover/nbdmover/mover"
	"github.com/nbdmover/nbdmover/pipeline"
	"github.com/urfave/cli/v2"
)

func serveCommand() *cli.Command {
	return &cli.Command{
		Name:  "serve",
		Usage: "run the host agent: an HTTP/JSON API for schedulers (see docs/api.md)",
		Flags: append(repoFlags(),
			&cli.StringFlag{Name: "listen", Value: daemon.DefaultListen, EnvVars: []string{"NBDMOVER_LISTEN"},
				Usage: "unix:///path (a 0600 socket) or host:port (TCP, needs --token)"},
			&cli.StringFlag{Name: "token", EnvVars: []string{"NBDMOVER_TOKEN"}, Usage: "bearer token clients must send (required on TCP)"},
			&cli.StringFlag{Name: "connect", Value: "qemu:///system", EnvVars: []string{"LIBVIRT_DEFAULT_URI"}, Usage: "libvirt URI"},
			&cli.IntFlag{Name: "max-jobs", Value: 2, Usage: "backup jobs running at once on this host; more queue"},
			&cli.IntFlag{Name: "readers", Value: 4, Usage: "NBD connections per disk (a job may ask for another number)"},
			&cli.StringFlag{Name: "scratch-dir", Value: mover.DefaultScratchDir, Usage: "directory for backup jobs' scratch files"},
			&cli.DurationFlag{Name: "keep-for", Value: 0, Usage: "keep finished jobs this long (default 24h)"},
			&cli.IntFlag{Name: "keep-max", Value: 0, Usage: "keep at most this many finished jobs (default 1000)"},
			&cli.DurationFlag{Name: "shutdown-timeout", Value: 0, Usage: "on SIGTERM, wait this long for jobs to end (default 2m)"},
		),
		Action: func(c *cli.Context) error {
			if err := noArgs(c); err != nil {
				return err
			}
			log, err := newLogger(c)
			if err != nil {
				return err
			}
			return daemon.Serve(c.Context, daemon.ServeOptions{
				Listen: c.String("listen"), Token: c.String("token"), Log: log,
				ShutdownTimeout: c.Duration("shutdown-timeout"),
				Runner: daemon.RunnerOptions{
					MaxJobs: c.Int("max-jobs"), KeepFor: c.Duration("keep-for"), KeepMax: c.Int("keep-max"),
					Backup: mover.Options{Repo: repoOptions(c), Tuning: pipeline.Tuning{Readers: c.Int("readers")}},
					Domain: mover.DomainOptions{Connect: c.String("connect"), ScratchDir: c.String("scratch-dir")},
				},
			})
		},
	}
}
