package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"text/tabwriter"
	"time"

	"github.com/nbdmover/nbdmover/internal/childenv"
	"github.com/nbdmover/nbdmover/repo"
	"github.com/urfave/cli/v2"
	"golang.org/x/sys/unix"
)

// Secrets never come from a flag's value (ps would show them): a password
// comes from NBDMOVER_PASSWORD, a file or a command's output; a key file
// is named by its path.
const (
	passwordEnv    = "NBDMOVER_PASSWORD"
	newPasswordEnv = "NBDMOVER_NEW_PASSWORD"
)

func keyFlags() []cli.Flag {
	return []cli.Flag{
		&cli.StringFlag{Name: "password-file", EnvVars: []string{"NBDMOVER_PASSWORD_FILE"},
			Usage: "read an encrypted repository's password from this file (or set " + passwordEnv + ")"},
		&cli.StringFlag{Name: "password-command", EnvVars: []string{"NBDMOVER_PASSWORD_COMMAND"},
			Usage: "run this shell command and use its output as the password (e.g. a secret manager's)"},
		&cli.StringFlag{Name: "key-file", EnvVars: []string{"NBDMOVER_KEY_FILE"},
			Usage: "open an encrypted repository with this key file (nbdmover key add --new-key-file makes one)"},
		&cli.StringFlag{Name: "key-id", EnvVars: []string{repo.KeyIDEnv},
			Usage: "with a password: try only this key (nbdmover key list shows the ids; default: the few that cost least)"},
	}
}

// newPasswordFlags are where key add and key passwd read the new password.
func newPasswordFlags() []cli.Flag {
	return []cli.Flag{
		&cli.StringFlag{Name: "new-password-file", Usage: "read the new password from this file (or set " + newPasswordEnv + ")"},
		&cli.StringFlag{Name: "new-password-command", Usage: "run this shell command and use its output as the new password"},
	}
}

// resolveKeys reads the secret that opens an encrypted repository, once
// per process, from exactly one source; nil when none was given.
func resolveKeys(c *cli.Context) (*repo.Keys, error) {
	if k, ok := c.App.Metadata["keys"].(*repo.Keys); ok {
		return k, nil
	}
	s, err := readSecret(c, "", passwordEnv)
	if err != nil {
		return nil, err
	}
	keys, err := s.keys()
	s.wipe()
	if err != nil {
		return nil, err
	}
	if c.App.Metadata == nil {
		c.App.Metadata = map[string]any{}
	}
	c.App.Metadata["keys"] = keys
	return keys, nil
}

// secret is what opens an encrypted repository, as given: a password or
// a key file's bytes, and the key id to try.
type secret struct {
	password, keyFile []byte
	keyFileFlag       string // with its path, for errors
	keyID             string
	flag              string // the key id's flag, for errors
}

// readSecret reads the secret that the flags prefix+password-file,
// prefix+password-command, prefix+key-file, prefix+key-id and the
// environment variable env give (nil when none), from exactly one source.
func readSecret(c *cli.Context, prefix, env string) (*secret, error) {
	keyFile, pwFile, pwCommand := prefix+"key-file", prefix+"password-file", prefix+"password-command"
	if c.IsSet(keyFile) && (c.IsSet(pwFile) || c.IsSet(pwCommand) || os.Getenv(env) != "") {
		return nil, usagef("give either a password (%s, --%s, --%s) or --%s, not both", env, pwFile, pwCommand, keyFile)
	}
	s := &secret{keyID: c.String(prefix + "key-id"), flag: "--" + prefix + "key-id"}
	if path := c.String(keyFile); path != "" {
		b, err := readSecretFile(c, "--"+keyFile, path)
		if err != nil {
			return nil, err
		}
		s.keyFile, s.keyFileFlag = b, "--"+keyFile+" "+path
	} else {
		pw, err := readPassword(c, env, pwFile, pwCommand)
		if err == nil && pw == nil && s.keyID != "" {
			err = usagef("%s names the key of a password: give the password too (%s, --%s or --%s)", s.flag, env, pwFile, pwCommand)
		}
		if err != nil || pw == nil {
			return nil, err
		}
		s.password = pw
	}
	noCoreDumps()
	return s, nil
}

// wipe clears the secret's bytes (what Go lets one clear).
func (s *secret) wipe() {
	if s != nil {
		clear(s.password)
		clear(s.keyFile)
	}
}

// keys makes the keys of the secret (each call its own: keys open one
// repository); nil for no secret.
func (s *secret) keys() (*repo.Keys, error) {
	if s == nil {
		return nil, nil
	}
	var keys *repo.Keys
	var err error
	if s.keyFile != nil {
		if keys, err = repo.KeyFileKeys(s.keyFile); err != nil {
			return nil, usagef("%s: %v", s.keyFileFlag, err)
		}
	} else if keys, err = repo.PasswordKeys(bytes.Clone(s.password)); err != nil {
		return nil, usagef("%v", err)
	}
	if s.keyID != "" {
		if err := keys.OnlyKey(s.keyID); err != nil {
			return nil, usagef("%s: %v", s.flag, err)
		}
	}
	return keys, nil
}

// readPassword returns the password from the environment variable env or
// the file or command flags; nil when none is given, a usage error when
// more than one is.
func readPassword(c *cli.Context, env, fileFlag, commandFlag string) ([]byte, error) {
	fromEnv, envSet := os.LookupEnv(env)
	os.Unsetenv(env) // not inherited by the commands nbdmover runs
	n := 0
	for _, set := range []bool{envSet, c.IsSet(fileFlag), c.IsSet(commandFlag)} {
		if set {
			n++
		}
	}
	var pw []byte
	switch {
	case n > 1:
		return nil, usagef("give the password one way: %s, --%s or --%s", env, fileFlag, commandFlag)
	case envSet:
		pw = []byte(fromEnv)
	case c.IsSet(fileFlag):
		b, err := readSecretFile(c, "--"+fileFlag, c.String(fileFlag))
		if err != nil {
			return nil, err
		}
		pw = trimNewline(b)
	case c.IsSet(commandFlag):
		b, err := runPasswordCommand(c.Context, "--"+commandFlag, c.String(commandFlag))
		if err != nil {
			return nil, err
		}
		pw = trimNewline(b)
	default:
		return nil, nil
	}
	if len(pw) == 0 {
		return nil, usagef("the password (from %s) is empty", map[bool]string{true: env, false: "--" + fileFlag + "/--" + commandFlag}[envSet])
	}
	return pw, nil
}

// readSecretFile reads a password or key file, warning when others may
// read it too.
func readSecretFile(c *cli.Context, flag, path string) ([]byte, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, usagef("%s: %v", flag, err)
	}
	if st, err := os.Stat(path); err == nil && st.Mode().Perm()&0o077 != 0 {
		fmt.Fprintf(c.App.ErrWriter, "nbdmover: warning: %s %s can be read by others (mode %04o); chmod 600 it\n", flag, path, st.Mode().Perm())
	}
	return b, nil
}

// runPasswordCommand runs command with sh -c (in an environment without
// nbdmover's secrets) and returns its standard output. Its output never
// appears in an error. It takes at most a minute, and a second after the
// command ends: a process it left in the background that still holds its
// output is not waited for.
func runPasswordCommand(ctx context.Context, flag, command string) ([]byte, error) {
	ctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, "/bin/sh", "-c", command)
	cmd.Stderr, cmd.Env, cmd.WaitDelay = os.Stderr, childenv.Env(), time.Second
	out, err := cmd.Output()
	if errors.Is(err, exec.ErrWaitDelay) {
		err = nil // it succeeded; something it started keeps its output open
	}
	if err != nil {
		clear(out)
		return nil, fmt.Errorf("%s: the password command failed: %v", flag, err)
	}
	return out, nil
}

func trimNewline(b []byte) []byte {
	b = bytes.TrimSuffix(b, []byte("\n"))
	return bytes.TrimSuffix(b, []byte("\r"))
}

// noCoreDumps keeps a process that holds repository keys out of core
// dumps (and its memory from ptrace by other users).
func noCoreDumps() { unix.Prctl(unix.PR_SET_DUMPABLE, 0, 0, 0, 0) }

// readNewPassword is the new password of key add and key passwd.
func readNewPassword(c *cli.Context) ([]byte, error) {
	pw, err := readPassword(c, newPasswordEnv, "new-password-file", "new-password-command")
	if err == nil && pw == nil {
		err = usagef("give the new password in %s, --new-password-file or --new-password-command", newPasswordEnv)
	}
	return pw, err
}

func keyCommand() *cli.Command {
	open := func(c *cli.Context) (*repo.Repo, error) {
		if err := checkFlags(c); err != nil {
			return nil, err
		}
		return repoOptions(c).Open(c.Context)
	}
	return &cli.Command{
		Name:  "key",
		Usage: "manage the keys (passwords, key files) of an encrypted repository",
		Subcommands: []*cli.Command{{
			Name:  "list",
			Usage: "list the repository's keys",
			Flags: append(repoFlags(), jsonFlag()),
			Action: func(c *cli.Context) error {
				r, err := open(c)
				if err != nil {
					return err
				}
				keys, err := r.Keys(c.Context)
				if err != nil {
					return err
				}
				if c.Bool("json") {
					return printJSON(c.App.Writer, struct {
						Keys []repo.KeyInfo `json:"keys"`
					}{keys})
				}
				tw := tabwriter.NewWriter(c.App.Writer, 0, 4, 2, ' ', 0)
				fmt.Fprintln(tw, "ID\tKIND\tCREATED\tLABEL\t")
				for _, k := range keys {
					cur := ""
					if k.Current {
						cur = "(in use)"
					}
					if k.Damaged != "" {
						cur = "DAMAGED: " + k.Damaged
					}
					fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\n", k.ID, k.Kind, k.Created.Format(time.RFC3339), k.Label, cur)
				}
				return tw.Flush()
			},
		}, {
			Name:  "add",
			Usage: "add a password (" + newPasswordEnv + ", --new-password-file, --new-password-command) or a key file (--new-key-file)",
			Flags: append(append(repoFlags(), newPasswordFlags()...),
				&cli.StringFlag{Name: "new-key-file", Usage: "write a new key file here (mode 0600; it must not exist)"},
				&cli.StringFlag{Name: "label", Usage: "a note on whose key this is (stored in the clear)"}),
			Action: func(c *cli.Context) error {
				var pw []byte
				var out *os.File
				if path := c.String("new-key-file"); path != "" {
					if c.IsSet("new-password-file") || c.IsSet("new-password-command") || os.Getenv(newPasswordEnv) != "" {
						return usagef("key add makes a password key or a key file, not both")
					}
					f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
					if err != nil {
						return usagef("--new-key-file: %v", err)
					}
					defer f.Close()
					out = f
				} else {
					var err error
					if pw, err = readNewPassword(c); err != nil {
						return err
					}
				}
				r, err := open(c)
				if err != nil {
					if out != nil {
						os.Remove(out.Name())
					}
					return err
				}
				var info repo.KeyInfo
				if out != nil {
					var file []byte
					if info, file, err = r.AddKeyFile(c.Context, c.String("label")); err == nil {
						_, err = out.Write(file)
						clear(file)
						if err == nil {
							err = out.Sync()
						}
					}
					if err != nil {
						os.Remove(out.Name())
						if info.ID != "" {
							r.RemoveKey(c.Context, info.ID)
						}
						return err
					}
				} else if info, err = r.AddPasswordKey(c.Context, c.String("label"), pw); err != nil {
					return err
				}
				fmt.Fprintf(c.App.Writer, "added key %s (%s)\n", info.ID, info.Kind)
				return nil
			},
		}, {
			Name:      "remove",
			Usage:     "remove a key (not the one given to this command, so never the last)",
			ArgsUsage: "ID",
			Flags:     repoFlags(),
			Action: func(c *cli.Context) error {
				if c.Args().Len() != 1 {
					return usagef("key remove: give the key's ID (nbdmover key list shows them)")
				}
				id := c.Args().First()
				if err := repo.ValidKeyID(id); err != nil {
					return usagef("key remove: %v", err)
				}
				// checkFlags refuses positional arguments; its checks are
				// done here instead.
				if _, err := repoOptions(c).Store(); err != nil {
					return usagef("--repo: %v", err)
				}
				if _, err := resolveKeys(c); err != nil {
					return err
				}
				r, err := repoOptions(c).Open(c.Context)
				if err != nil {
					return err
				}
				if err := r.RemoveKey(c.Context, id); err != nil {
					return err
				}
				fmt.Fprintf(c.App.Writer, "removed key %s\n", id)
				return nil
			},
		}, {
			Name:  "passwd",
			Usage: "change the password given to this command (the new one from " + newPasswordEnv + ", --new-password-file or --new-password-command)",
			Flags: append(repoFlags(), newPasswordFlags()...),
			Action: func(c *cli.Context) error {
				pw, err := readNewPassword(c)
				if err != nil {
					return err
				}
				r, err := open(c)
				if err != nil {
					clear(pw)
					return err
				}
				info, err := r.ChangePassword(c.Context, pw)
				if err != nil {
					return err
				}
				fmt.Fprintf(c.App.Writer, "password changed (now key %s)\n", info.ID)
				return nil
			},
		}},
	}
}
