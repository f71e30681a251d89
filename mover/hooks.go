package mover

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"syscall"
	"time"

	"github.com/nbdmover/nbdmover/internal/childenv"
)

// Hooks are shell commands run around a backup (/bin/sh -c), with the
// process's environment less its secrets (internal/childenv) and:
//
//	NBDMOVER_HOOK        pre or post
//	NBDMOVER_DOMAIN      the name backed up (a domain's, or --name's)
//	NBDMOVER_MODE        the mode asked for (auto, full, incremental)
//	NBDMOVER_REPOSITORY  the repository's location (no credentials)
//
// and for the post-hook:
//
//	NBDMOVER_RESULT       success or failure
//	NBDMOVER_BACKUP_ID    the backup committed (on success)
//	NBDMOVER_RESULT_FILE  a file holding the result as backup --json prints it (on success)
//	NBDMOVER_ERROR        why it failed, one line (on failure)
//
// A hook past its timeout is killed with its process group; one that
// exits in time may leave processes running (they are its business).
// The pre-hook runs once the backup's checks have passed and its name's
// lock is held, before anything is made (no repository created, no
// libvirt job): one that fails, or outlasts Timeout, fails the backup.
// The post-hook runs after every backup whose pre-hook ran (whatever
// became of it, so that it can undo what the pre-hook did); its failure
// is reported (BackupResult.PostHookError, the log) and never turns a
// committed backup into a failed one.
type Hooks struct {
	Pre, Post string
	// Timeout bounds each hook (default DefaultHookTimeout); the hook's
	// process group is killed then.
	Timeout time.Duration
}

// DefaultHookTimeout bounds a hook when Hooks.Timeout is not set.
const DefaultHookTimeout = 10 * time.Minute

// hookOutput is how much of a hook's output is kept, its end, for the
// log and an error.
const hookOutput = 4 << 10

// runHook runs one hook with env added; its error says what it printed
// last.
func runHook(ctx context.Context, o Options, which, command string, env map[string]string) error {
	timeout := o.Hooks.Timeout
	if timeout <= 0 {
		timeout = DefaultHookTimeout
	}
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	cmd := exec.Command("/bin/sh", "-c", command)
	cmd.Env = childenv.Env()
	env["NBDMOVER_HOOK"] = which
	for k, v := range env {
		cmd.Env = append(cmd.Env, k+"="+v)
	}
	out := &tail{max: hookOutput}
	cmd.Stdout, cmd.Stderr = out, out // stdin: /dev/null
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	// A background child that keeps the hook's output open does not hold
	// the backup: a second after the hook exits, its output is cut.
	cmd.WaitDelay = time.Second
	start := time.Now()
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("%s-hook: %w", which, err)
	}
	// At the timeout or the backup's end the hook's whole process group is
	// killed. A hook that exits in time may leave a process running on
	// purpose (a database session its post-hook ends): it is left alone.
	stop := context.AfterFunc(ctx, func() { syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL) })
	err := cmd.Wait()
	stop()
	if errors.Is(err, exec.ErrWaitDelay) && ctx.Err() == nil {
		o.Log.Warn(which+"-hook exited, leaving a process that holds its output open (its output is cut)", "name", env["NBDMOVER_DOMAIN"])
		err = nil
	}
	took := time.Since(start).Round(time.Millisecond)
	printed := strings.TrimSpace(out.String())
	switch {
	case errors.Is(ctx.Err(), context.DeadlineExceeded):
		err = fmt.Errorf("%s-hook timed out after %s (--hook-timeout)", which, timeout)
	case ctx.Err() != nil:
		err = fmt.Errorf("%s-hook: %w", which, ctx.Err())
	case err != nil:
		err = fmt.Errorf("%s-hook failed (%v)", which, err)
	}
	if err != nil {
		if printed != "" {
			err = fmt.Errorf("%w; it printed: %s", err, lastLines(printed, 5))
		}
		return err
	}
	o.Log.Info(which+"-hook done", "name", env["NBDMOVER_DOMAIN"], "seconds", took.Seconds(), "output", lastLines(printed, 5))
	return nil
}

// postHook runs the post-hook after a backup that ended with res or err.
func postHook(ctx context.Context, o Options, env map[string]string, res *BackupResult, err error) error {
	env["NBDMOVER_RESULT"] = "success"
	if err != nil {
		env["NBDMOVER_RESULT"] = "failure"
		env["NBDMOVER_ERROR"] = strings.ReplaceAll(err.Error(), "\n", " ")
	}
	if res != nil {
		env["NBDMOVER_BACKUP_ID"] = res.ID
		f, ferr := os.CreateTemp(o.RunDir, "result-*.json")
		if ferr == nil {
			defer os.Remove(f.Name())
			b, _ := json.MarshalIndent(res, "", "  ")
			f.Write(append(b, '\n'))
			f.Close()
			env["NBDMOVER_RESULT_FILE"] = f.Name()
		}
	}
	// A backup cancelled still gets its post-hook, within the timeout.
	return runHook(context.WithoutCancel(ctx), o, "post", o.Hooks.Post, env)
}

// tail keeps the last max bytes written to it.
type tail struct {
	buf bytes.Buffer
	max int
}

func (t *tail) Write(p []byte) (int, error) {
	t.buf.Write(p)
	if over := t.buf.Len() - t.max; over > 0 {
		t.buf.Next(over)
	}
	return len(p), nil
}

func (t *tail) String() string { return t.buf.String() }

// lastLines is the last n lines of s, joined by " | ".
func lastLines(s string, n int) string {
	lines := strings.Split(s, "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, " | ")
}
