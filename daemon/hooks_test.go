package daemon_test

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/nbdmover/nbdmover/daemon"
	"github.com/nbdmover/nbdmover/internal/backuptest"
	"github.com/nbdmover/nbdmover/internal/qemutest"
	"github.com/nbdmover/nbdmover/mover"
	"github.com/nbdmover/nbdmover/repo"
)

// Hooks by domain (serve --hooks-file): a listed domain's entry replaces
// the flags' hooks ("" turns one off), an unlisted one keeps them; the
// file is read at each job, so an edit holds for the next; a failing
// pre-hook of the file fails the job before anything starts. A hooks
// file others may write is refused at start.
func TestDaemonHooksFile(t *testing.T) {
	a := qemutest.NewDomain(t, false, qemutest.DiskSpec{Dev: "vda", Format: "qcow2", Size: 16 * backuptest.MiB})
	b := qemutest.NewDomain(t, false, qemutest.DiskSpec{Dev: "vda", Format: "qcow2", Size: 16 * backuptest.MiB})
	out := t.TempDir()
	dir := t.TempDir()
	file := filepath.Join(dir, "hooks.json")
	write := func(s string) {
		if err := os.WriteFile(file, []byte(s), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	log := func(name string) string { return fmt.Sprintf(`echo $NBDMOVER_DOMAIN >> %s/%s`, out, name) }
	write(fmt.Sprintf(`{"domains": {%q: {"pre_hook": %q, "post_hook": ""}}}`, a.Name, log("a-pre")))
	ro := repo.Options{Location: filepath.Join(t.TempDir(), "repo")}
	d := startDaemonWith(t, ro, 2, nil, func(o *daemon.RunnerOptions) {
		o.HooksFile = file
		o.Backup.Hooks = mover.Hooks{Pre: log("global-pre"), Post: log("global-post")}
	})
	backup := func(name string) daemon.JobView {
		t.Helper()
		id, code, msg := d.submit(fmt.Sprintf(`{"domain": %q}`, name))
		if code != 202 {
			t.Fatalf("submit: %d %s", code, msg)
		}
		return d.wait(id, daemon.JobSucceeded, daemon.JobFailed)
	}
	read := func(name string) string { b, _ := os.ReadFile(filepath.Join(out, name)); return string(b) }
	if v := backup(a.Name); v.State != daemon.JobSucceeded {
		t.Fatalf("backup of a: %+v", v)
	}
	if v := backup(b.Name); v.State != daemon.JobSucceeded {
		t.Fatalf("backup of b: %+v", v)
	}
	if read("a-pre") != a.Name+"\n" || read("global-pre") != b.Name+"\n" || read("global-post") != b.Name+"\n" {
		t.Fatalf("hooks ran: a-pre %q, global-pre %q, global-post %q", read("a-pre"), read("global-pre"), read("global-post"))
	}

	// Edited: a's pre-hook fails now; the job fails and commits nothing.
	write(fmt.Sprintf(`{"domains": {%q: {"pre_hook": "exit 3"}}}`, a.Name))
	v := backup(a.Name)
	if v.State != daemon.JobFailed || !strings.Contains(v.Error, "pre-hook") {
		t.Fatalf("a failing pre-hook from the file: %+v", v)
	}
	var backups struct{ Backups []map[string]any }
	if d.do("GET", "/v1/backups?domain="+a.Name, "", &backups); len(backups.Backups) != 1 {
		t.Fatalf("%d backups of a after a failed pre-hook", len(backups.Backups))
	}
	// A bad file: jobs are refused, saying why.
	for _, bad := range []string{`{"domains": {"../x": {}}}`, `{"domains": {}} {"domains": {"x": {"pre_hook": "true"}}}`} {
		write(bad)
		if _, code, msg := d.submit(fmt.Sprintf(`{"domain": %q}`, b.Name)); code != 503 || !strings.Contains(msg, "hooks file") {
			t.Fatalf("a bad hooks file %s: %d %s", bad, code, msg)
		}
	}
	// A directory above it that others may write, or a link swapped in.
	write(`{"domains": {}}`)
	os.Chmod(dir, 0o777)
	if _, code, msg := d.submit(fmt.Sprintf(`{"domain": %q}`, b.Name)); code != 503 || !strings.Contains(msg, "others may write it") {
		t.Fatalf("a hooks file in a directory others may write: %d %s", code, msg)
	}
	os.Chmod(dir, 0o700)

	// Writable by others: refused at start.
	write(`{"domains": {}}`)
	os.Chmod(file, 0o666)
	err := daemon.Serve(t.Context(), daemon.ServeOptions{Listen: "unix://" + filepath.Join(t.TempDir(), "s.sock"), Log: backuptest.Log(t),
		Runner: daemon.RunnerOptions{HooksFile: file, Backup: mover.Options{Repo: ro, RunDir: runDir}}})
	if err == nil || !strings.Contains(err.Error(), "others may write it") {
		t.Fatalf("a hooks file others may write: %v", err)
	}
}
