package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/nbdmover/nbdmover/internal/qemutest"
	"github.com/urfave/cli/v2"
)

// What a new operator trips over on the first day, tried as one would.

type backupOut struct {
	ID, Mode, Fallback, Checkpoint string
	RepositoryID                   string `json:"repository_id"`
	CreatedRepository              bool   `json:"created_repository"`
}

func parseBackup(t *testing.T, out string) backupOut {
	t.Helper()
	var b backupOut
	if err := json.Unmarshal([]byte(out), &b); err != nil || b.ID == "" {
		t.Fatalf("backup --json: %v: %q", err, out)
	}
	return b
}

// One domain backed up to a local repository, a MinIO repository and an
// encrypted local repository, interleaved, with a Ctrl-C'd full into a
// fresh repository, a SIGKILLed one into another, a cleanup and a daemon
// start-up in between: every backup after each repository's first is
// incremental, each repository's checkpoints are its own, and every
// backup restores bit-exact.
func TestSeveralRepositories(t *testing.T) {
	qemutest.Need(t, "qemu-img", "qemu-io")
	dom := qemutest.NewDomain(t, false, qemutest.DiskSpec{Dev: "vda", Format: "qcow2", Size: 32 << 20})
	dom.Write("vda", "write -P 0x11 0 8M")
	pw := filepath.Join(t.TempDir(), "pw")
	os.WriteFile(pw, []byte("a password"), 0o600)
	repos := map[string][]string{
		"local":     {"--repo", filepath.Join(t.TempDir(), "local")},
		"minio":     s3RepoArgs(t),
		"encrypted": {"--repo", filepath.Join(t.TempDir(), "enc"), "--password-file", pw},
	}
	for name, args := range repos {
		init := append([]string{"init"}, args...)
		if name == "encrypted" {
			init = append(init, "--encryption")
		}
		if _, stderr, code := nbdmover(t, init...); code != 0 {
			t.Fatalf("init %s: %s", name, stderr)
		}
	}
	type point struct {
		repo, id string
		refs     map[string]string
	}
	var points []point
	seen := map[string]bool{}
	backup := func(name string) {
		t.Helper()
		dom.Write("vda", fmt.Sprintf("write -P 0x%02x %dM 1M", len(points)+0x20, len(points)%24))
		out, stderr, code := nbdmover(t, append([]string{"backup", "--domain", dom.Name, "--json"}, repos[name]...)...)
		if code != 0 {
			t.Fatalf("backup to %s: %s", name, stderr)
		}
		b := parseBackup(t, out)
		want := "incremental"
		if !seen[name] {
			want = "full"
		}
		if b.Mode != want {
			t.Fatalf("backup %d, to %s: %s (%s), want %s", len(points), name, b.Mode, b.Fallback, want)
		}
		seen[name] = true
		points = append(points, point{name, b.ID, dom.Snapshot()})
		// Each repository's last checkpoint is there; nothing else of it.
		cps := dom.Checkpoints()
		if !slices.Contains(cps, b.Checkpoint) || !strings.Contains(b.Checkpoint, b.RepositoryID[:12]) {
			t.Fatalf("checkpoints %v after a backup whose checkpoint is %s", cps, b.Checkpoint)
		}
	}
	for _, name := range []string{"local", "minio", "local", "encrypted", "minio", "local", "encrypted"} {
		backup(name)
	}

	// A full into a fresh repository, interrupted with ^C before it
	// commits: exit 130, nothing committed, its checkpoint gone.
	holds := t.TempDir()
	fresh := filepath.Join(t.TempDir(), "fresh")
	reached := gate(t, holds, "backup-commit")
	p := start(t, holds, "backup", "--init", "--repo", fresh, "--domain", dom.Name)
	reached()
	p.cmd.Process.Signal(os.Interrupt)
	open(holds, "backup-commit")
	if _, stderr, code := p.wait(t); code != 130 {
		t.Fatalf("^C'd backup: exit %d: %s", code, stderr)
	}
	// One SIGKILLed: its job and checkpoint stay (a crash leaves them).
	killed := filepath.Join(t.TempDir(), "killed")
	reached = gate(t, holds, "backup-commit")
	p = start(t, holds, "backup", "--init", "--repo", killed, "--domain", dom.Name)
	reached()
	p.cmd.Process.Kill()
	p.wait(t)
	open(holds, "backup-commit")
	if len(dom.Checkpoints()) != 4 {
		t.Fatalf("checkpoints after a killed full into a fourth repository: %v", dom.Checkpoints())
	}
	// cleanup of the local repository ends the job, leaves the others'
	// checkpoints and says whose they are.
	out, stderr, code := nbdmover(t, append([]string{"cleanup", "--domain", dom.Name, "--json"}, repos["local"]...)...)
	if code != 0 {
		t.Fatalf("cleanup: %s", stderr)
	}
	var rep struct {
		Domains []struct {
			EndedJob           string `json:"ended_job"`
			DeletedCheckpoints []string
			KeptCheckpoints    []struct{ Name, Why string } `json:"kept_checkpoints"`
		}
	}
	if json.Unmarshal([]byte(out), &rep) != nil || len(rep.Domains) != 1 || rep.Domains[0].EndedJob == "" ||
		len(rep.Domains[0].DeletedCheckpoints) != 0 || len(rep.Domains[0].KeptCheckpoints) != 4 {
		t.Fatalf("cleanup --json: %s", out)
	}
	// A daemon's start-up with the MinIO repository does the same.
	sock := filepath.Join(t.TempDir(), "d.sock")
	d := start(t, t.TempDir(), append([]string{"serve", "--listen", "unix://" + sock}, repos["minio"]...)...)
	waitFor(t, "the daemon", func() bool { code, _ := healthOf(sock); return code == 200 })
	d.cmd.Process.Signal(syscall.SIGTERM)
	if _, stderr, code := d.wait(t); code != 0 {
		t.Fatalf("serve: %d %s", code, stderr)
	}
	for _, name := range []string{"local", "encrypted", "minio", "local"} {
		backup(name)
	}
	// The killed run's repository is retired: its checkpoint goes, the
	// three others stay.
	var cfg struct{ ID string }
	b, _ := os.ReadFile(filepath.Join(killed, "config"))
	if json.Unmarshal(b, &cfg) != nil || cfg.ID == "" {
		t.Fatalf("the killed run's repository: %q", b)
	}
	if _, stderr, code := nbdmover(t, append([]string{"cleanup", "--domain", dom.Name, "--forget-repository", cfg.ID}, repos["local"]...)...); code != 0 {
		t.Fatalf("cleanup --forget-repository: %s", stderr)
	}
	if cps := dom.Checkpoints(); len(cps) != 3 || slices.ContainsFunc(cps, func(c string) bool { return strings.Contains(c, cfg.ID[:12]) }) {
		t.Fatalf("checkpoints after retiring the killed run's repository: %v", cps)
	}
	// Not the repository --repo names: its next backup starts there.
	b, _ = os.ReadFile(filepath.Join(repos["local"][1], "config"))
	json.Unmarshal(b, &cfg)
	if _, stderr, code := nbdmover(t, append([]string{"cleanup", "--domain", dom.Name, "--forget-repository", cfg.ID}, repos["local"]...)...); code != 2 {
		t.Fatalf("cleanup --forget-repository of --repo's own: exit %d: %s", code, stderr)
	}
	for _, p := range points {
		dest := filepath.Join(t.TempDir(), "vda.raw")
		if _, stderr, code := nbdmover(t, append([]string{"restore", "--domain", dom.Name, "--backup", p.id, "--disk", "vda", "--output", dest}, repos[p.repo]...)...); code != 0 {
			t.Fatalf("restore %s from %s: %s", p.id, p.repo, stderr)
		}
		qemutest.Compare(t, p.refs["vda"], "raw", dest, "raw")
	}
}

// A mistyped --repo is exit 10 and creates nothing: no repository, no
// lock file, no checkpoint, no job.
func TestMistypedRepository(t *testing.T) {
	dom := qemutest.NewDomain(t, false, qemutest.DiskSpec{Dev: "vda", Format: "qcow2", Size: 16 << 20})
	typo := filepath.Join(t.TempDir(), "rpeo")
	_, stderr, code := nbdmover(t, "backup", "--domain", dom.Name, "--repo", typo)
	if code != 10 || !strings.Contains(stderr, "nbdmover init") || !strings.Contains(stderr, "--init") {
		t.Fatalf("backup to a mistyped repository: exit %d: %s", code, stderr)
	}
	if _, err := os.Stat(typo); !os.IsNotExist(err) {
		t.Fatalf("the mistyped repository was created: %v", err)
	}
	if len(dom.Checkpoints()) != 0 || dom.JobActive() {
		t.Fatalf("checkpoints %v, job %v", dom.Checkpoints(), dom.JobActive())
	}
	// --init creates it, and says so.
	out, stderr, code := nbdmover(t, "backup", "--domain", dom.Name, "--repo", typo, "--init", "--json")
	if b := parseBackup(t, out); code != 0 || !b.CreatedRepository || b.Mode != "full" {
		t.Fatalf("backup --init: %d %s", code, stderr)
	}
	// A domain libvirt does not know: no lock file is left for its name.
	name := fmt.Sprintf("no-such-domain-%d", time.Now().UnixNano())
	if _, _, code := nbdmover(t, "backup", "--domain", name, "--repo", typo); code != 1 {
		t.Fatalf("backup of an unknown domain: exit %d", code)
	}
	if _, err := os.Stat(filepath.Join("/run/nbdmover/locks", name+".lock")); !os.IsNotExist(err) {
		t.Fatalf("a lock file was left for a domain that does not exist: %v", err)
	}
}

// The daemon refuses to start without a usable repository (missing: 10;
// no password or a wrong one: 12), and /healthz says 503 with the reason
// while its store is gone, 200 once it is back.
func TestDaemonHealth(t *testing.T) {
	dir := t.TempDir()
	repoDir := filepath.Join(dir, "repo")
	sock := filepath.Join(dir, "d.sock")
	serve := []string{"serve", "--listen", "unix://" + sock, "--run-dir", filepath.Join(dir, "run"), "--repo", repoDir}
	if _, stderr, code := nbdmover(t, serve...); code != 10 || !strings.Contains(stderr, "no nbdmover repository") {
		t.Fatalf("serve without a repository: %d %s", code, stderr)
	}
	pw := filepath.Join(dir, "pw")
	os.WriteFile(pw, []byte("the password"), 0o600)
	if _, stderr, code := nbdmover(t, "init", "--repo", repoDir, "--encryption", "--password-file", pw); code != 0 {
		t.Fatal(stderr)
	}
	if _, stderr, code := nbdmover(t, serve...); code != 12 || !strings.Contains(stderr, "encrypted") {
		t.Fatalf("serve without the password: %d %s", code, stderr)
	}
	if _, stderr, code := nbdmoverEnv(t, []string{"NBDMOVER_PASSWORD=wrong"}, serve...); code != 12 || !strings.Contains(stderr, "wrong password") {
		t.Fatalf("serve with a wrong password: %d %s", code, stderr)
	}
	d := start(t, t.TempDir(), append(serve, "--password-file", pw)...)
	health := func() (int, string) { return healthOf(sock) }
	waitFor(t, "the daemon", func() bool { code, _ := health(); return code == 200 })
	os.Rename(repoDir, repoDir+".away")
	waitFor(t, "503", func() bool { code, body := health(); return code == 503 && strings.Contains(body, "repository") })
	os.Rename(repoDir+".away", repoDir)
	last := ""
	for deadline := time.Now().Add(time.Minute); ; time.Sleep(50 * time.Millisecond) {
		code, body := health()
		if code == 200 {
			break
		}
		if last = body; time.Now().After(deadline) {
			t.Fatalf("the repository is back, /healthz still says %s", last)
		}
	}
	d.cmd.Process.Signal(syscall.SIGTERM)
	if _, stderr, code := d.wait(t); code != 0 {
		t.Fatalf("serve after SIGTERM: exit %d: %s", code, stderr)
	}
}

// healthOf asks the daemon on the unix socket sock for /healthz.
func healthOf(sock string) (int, string) {
	client := &http.Client{Transport: &http.Transport{DisableKeepAlives: true, DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
		return (&net.Dialer{}).DialContext(ctx, "unix", sock)
	}}, Timeout: 20 * time.Second}
	resp, err := client.Get("http://x/healthz")
	if err != nil {
		return 0, err.Error()
	}
	defer resp.Body.Close()
	var b strings.Builder
	io.Copy(&b, resp.Body)
	return resp.StatusCode, b.String()
}

// Each exit status from a real failure, and the JSON error document.
func TestExitStatuses(t *testing.T) {
	qemutest.Need(t, "qemu-nbd", "qemu-img", "qemu-io")
	dir := t.TempDir()
	repoDir := filepath.Join(dir, "repo")
	img := qemutest.NewImage(t, t.TempDir(), 8<<20)
	qemutest.IO(t, img, "write -P 0x42 1M 2M")
	srv := qemutest.Serve(t, img, "-r")
	bk := []string{"backup", "--init", "--repo", repoDir, "--nbd", srv.URI, "--name", "vm"}
	if _, stderr, code := nbdmover(t, bk...); code != 0 {
		t.Fatal(stderr)
	}
	pw := filepath.Join(dir, "pw")
	os.WriteFile(pw, []byte("pw"), 0o600)
	encRepo := filepath.Join(dir, "enc")
	if _, stderr, code := nbdmover(t, "init", "--repo", encRepo, "--encryption", "--password-file", pw); code != 0 {
		t.Fatal(stderr)
	}
	holds := t.TempDir()
	for _, c := range []struct {
		code int
		kind string
		args []string
		env  []string
	}{
		{2, "usage", []string{"list", "--repo", repoDir, "--bogus"}, nil},
		{3, "could-not-check", []string{"verify", "--repo", "s3://b", "--s3-endpoint", "http://127.0.0.1:9"}, nil},
		{10, "no-repository", []string{"list", "--repo", filepath.Join(dir, "none")}, nil},
		{12, "key", []string{"list", "--repo", encRepo}, []string{"NBDMOVER_PASSWORD=wrong"}},
		{1, "failure", []string{"restore", "--repo", repoDir, "--domain", "vm", "--backup", "20200101T000000.000Z", "--output", filepath.Join(dir, "x")}, nil},
	} {
		out, stderr, code := nbdmoverEnv(t, c.env, append(c.args, "--json")...)
		var doc struct {
			Version int
			Error   string
			Kind    string
			Exit    int
		}
		if code != c.code || json.Unmarshal([]byte(out), &doc) != nil || doc.Version != 1 || doc.Kind != c.kind || doc.Exit != c.code ||
			doc.Error == "" || !strings.Contains(stderr, doc.Error) {
			t.Errorf("%v: exit %d, stdout %q, stderr %q; want %d (%s)", c.args, code, out, stderr, c.code, c.kind)
		}
	}
	// 11: the name is busy (another backup of it holds it, stopped at its
	// commit); 130 and 143: that backup, interrupted or terminated.
	for _, sig := range []os.Signal{os.Interrupt, syscall.SIGTERM} {
		reached := gate(t, holds, "backup-commit")
		p := start(t, holds, bk...)
		reached()
		if _, stderr, code := nbdmover(t, bk...); code != 11 || !strings.Contains(stderr, "another nbdmover") {
			t.Fatalf("a second backup of a busy name: %d %s", code, stderr)
		}
		p.cmd.Process.Signal(sig)
		open(holds, "backup-commit")
		want := map[os.Signal]int{os.Interrupt: 130, syscall.SIGTERM: 143}[sig]
		if _, stderr, code := p.wait(t); code != want {
			t.Fatalf("backup ended by %v: exit %d, want %d: %s", sig, code, want, stderr)
		}
	}
}

// A forgiving command line: global options after the command, durations
// in days, --read-data 10%, suggestions, --version, and help texts whose
// defaults are true.
func TestForgivingCommandLine(t *testing.T) {
	repoDir := filepath.Join(t.TempDir(), "repo")
	if _, stderr, code := nbdmover(t, "init", "--repo", repoDir, "--log-format", "json", "--json"); code != 0 {
		t.Fatalf("a global option after the command: %s", stderr)
	}
	for _, args := range [][]string{
		{"gc", "--repo", repoDir, "--grace", "1d", "--dry-run"},
		{"forget", "--repo", repoDir, "--all", "--keep-within", "2w", "--dry-run"},
		{"verify", "--repo", repoDir, "--read-data", "10%"},
		{"verify", "--repo", repoDir, "--read-data=10%"},
		{"verify", "--repo", repoDir, "--read-data"},
	} {
		if _, stderr, code := nbdmover(t, args...); code != 0 {
			t.Errorf("%v: exit %d: %s", args, code, stderr)
		}
	}
	for _, c := range []struct {
		args []string
		says string
	}{
		{[]string{"backup", "--domian", "x"}, "did you mean --domain?"},
		{[]string{"bakcup"}, "did you mean backup?"},
		{[]string{"backup", "--domain", "x", "--readers", "0", "--repo", repoDir}, "--readers 0"},
		{[]string{"backup", "--nbd", "nbd://127.0.0.1:9", "--name", "x", "--max-memory", "1MiB", "--repo", repoDir}, "more than the limit"},
		{[]string{"gc", "--repo", repoDir, "--grace", "1 day"}, "d (days)"},
	} {
		if _, stderr, code := nbdmover(t, c.args...); code != 2 || !strings.Contains(stderr, c.says) {
			t.Errorf("%v: exit %d: %s (want 2 and %q)", c.args, code, stderr, c.says)
		}
	}
	// Messages that say what happened.
	pw := filepath.Join(t.TempDir(), "pw")
	os.WriteFile(pw, []byte("pw"), 0o600)
	for _, c := range []struct {
		code      int
		args      []string
		says, not string
	}{
		{2, []string{"protect", "--repo", repoDir, "--domain", "vm", "--backup", "latest"}, "name the backup by its id", "needs --domain"},
		{1, []string{"init", "--repo", repoDir, "--password-file", pw}, "already exists", "--encryption"},
		{12, []string{"list", "--repo", repoDir, "--password-file", pw}, "drop the password", "write to it in the clear"},
	} {
		_, stderr, code := nbdmover(t, c.args...)
		if code != c.code || !strings.Contains(stderr, c.says) || strings.Contains(stderr, c.not) {
			t.Errorf("%v: exit %d: %s", c.args, code, stderr)
		}
	}
	if out, _, code := nbdmover(t, "--version"); code != 0 || !strings.Contains(out, "libnbd") || !strings.Contains(out, "libvirt") || !strings.Contains(out, "go1.") {
		t.Errorf("--version: %q", out)
	}
	// No help text shows a default that its own words contradict.
	// (A usage text that names a default and "(default: ...)" after it
	// say two things; "(default: 0)" beside a text claiming another is
	// the case the first day met.)
	twoDefaults := regexp.MustCompile(`default[^\n]*\(default: `)
	for _, cmd := range newApp().Commands {
		for _, args := range helpArgs(cmd.Name, cmd.Subcommands) {
			out, _, _ := nbdmover(t, args...)
			for _, line := range strings.Split(out, "\n") {
				if twoDefaults.MatchString(line) {
					t.Errorf("nbdmover %s: %q", strings.Join(args, " "), strings.TrimSpace(line))
				}
			}
		}
	}
}

// helpArgs are the --help command lines of a command and its subcommands.
func helpArgs(name string, subs []*cli.Command) [][]string {
	if len(subs) == 0 {
		return [][]string{{name, "--help"}}
	}
	var out [][]string
	for _, s := range subs {
		out = append(out, []string{name, s.Name, "--help"})
	}
	return out
}

// The systemd examples fail when a backup fails: no ExecStart line is
// prefixed with "-", the units alert OnFailure=, and their command lines,
// run as written (%i a domain), exit non-zero for a domain that fails and
// zero for one that does not.
func TestSystemdUnits(t *testing.T) {
	units, _ := filepath.Glob("../../docs/examples/*.service")
	if len(units) < 3 {
		t.Fatalf("units: %v", units)
	}
	repoDir := filepath.Join(t.TempDir(), "repo")
	if _, stderr, code := nbdmover(t, "init", "--repo", repoDir); code != 0 {
		t.Fatal(stderr)
	}
	dom := qemutest.NewDomain(t, false, qemutest.DiskSpec{Dev: "vda", Format: "qcow2", Size: 16 << 20})
	env := []string{"NBDMOVER_REPO=" + repoDir}
	for _, unit := range units {
		b, _ := os.ReadFile(unit)
		text := string(b)
		name := filepath.Base(unit)
		if strings.Contains(name, "backup@") || strings.Contains(name, "maintenance") {
			if !strings.Contains(text, "\nOnFailure=") {
				t.Errorf("%s has no OnFailure=", name)
			}
		}
		for _, line := range strings.Split(text, "\n") {
			cmdline, ok := strings.CutPrefix(line, "ExecStart=")
			if !ok {
				continue
			}
			if strings.HasPrefix(cmdline, "-") || strings.HasPrefix(cmdline, "@-") {
				t.Errorf("%s: %q: a failure would not fail the unit", name, line)
			}
			args := strings.Fields(cmdline)
			if args[0] != "/usr/local/bin/nbdmover" || slices.Contains(args, "serve") {
				continue
			}
			for _, domain := range []string{dom.Name, "no-such-domain"} {
				run := slices.Clone(args[1:])
				for i := range run {
					run[i] = strings.ReplaceAll(run[i], "%i", domain)
				}
				_, stderr, code := nbdmoverEnv(t, env, run...)
				failing := domain == "no-such-domain" && strings.Contains(cmdline, "%i")
				if (code != 0) != failing {
					t.Errorf("%s: %v: exit %d: %s", name, run, code, stderr)
				}
			}
		}
	}
}

// A read-only repository (a read-only bind mount): restore and verify say
// that --no-lock exists and what it risks; with it they work, and list
// works without it.
func TestReadOnlyRepository(t *testing.T) {
	qemutest.Need(t, "qemu-nbd", "qemu-img", "qemu-io")
	dir := t.TempDir()
	repoDir := filepath.Join(dir, "repo")
	img := qemutest.NewImage(t, t.TempDir(), 8<<20)
	qemutest.IO(t, img, "write -P 0x42 1M 2M")
	srv := qemutest.Serve(t, img, "-r")
	if _, stderr, code := nbdmover(t, "backup", "--init", "--repo", repoDir, "--nbd", srv.URI, "--name", "vm"); code != 0 {
		t.Fatal(stderr)
	}
	ro := filepath.Join(dir, "ro")
	os.Mkdir(ro, 0o700)
	if out, err := exec.Command("mount", "--bind", repoDir, ro).CombinedOutput(); err != nil {
		t.Skipf("cannot bind-mount here: %v %s", err, out)
	}
	defer exec.Command("umount", ro).Run()
	if out, err := exec.Command("mount", "-o", "remount,bind,ro", ro).CombinedOutput(); err != nil {
		t.Fatalf("remount read-only: %v %s", err, out)
	}
	if _, stderr, code := nbdmover(t, "list", "--repo", ro); code != 0 {
		t.Fatalf("list of a read-only repository: %s", stderr)
	}
	dest := filepath.Join(dir, "vm.raw")
	for _, args := range [][]string{{"restore", "--domain", "vm", "--output", dest + ".x", "--disk", "nbd"}, {"verify"}} {
		if _, stderr, code := nbdmover(t, append(args, "--repo", ro)...); code == 0 || !strings.Contains(stderr, "--no-lock") {
			t.Errorf("%v on a read-only repository: exit %d: %s", args, code, stderr)
		}
	}
	if _, stderr, code := nbdmover(t, "restore", "--repo", ro, "--domain", "vm", "--disk", "nbd", "--output", dest, "--no-lock"); code != 0 {
		t.Fatalf("restore --no-lock: %s", stderr)
	}
	qemutest.Compare(t, img, "qcow2", dest, "raw")
	if _, stderr, code := nbdmover(t, "verify", "--read-data", "--repo", ro, "--no-lock"); code != 0 {
		t.Fatalf("verify --read-data --no-lock: %s", stderr)
	}
}

// Every --json document is an object whose first field is "version": 1.
func TestJSONDocumentsAreVersioned(t *testing.T) {
	qemutest.Need(t, "qemu-nbd", "qemu-img", "qemu-io")
	dir := t.TempDir()
	repoDir := filepath.Join(dir, "repo")
	img := qemutest.NewImage(t, t.TempDir(), 8<<20)
	qemutest.IO(t, img, "write -P 0x42 1M 2M")
	srv := qemutest.Serve(t, img, "-r")
	for _, args := range [][]string{
		{"init", "--repo", repoDir},
		{"backup", "--repo", repoDir, "--nbd", srv.URI, "--name", "vm"},
		{"list", "--repo", repoDir},
		{"verify", "--repo", repoDir},
		{"restore", "--repo", repoDir, "--domain", "vm", "--output", filepath.Join(dir, "out")},
		{"forget", "--repo", repoDir, "--all", "--keep-last", "1", "--dry-run"},
		{"gc", "--repo", repoDir, "--dry-run"},
		{"unlock", "--repo", repoDir},
	} {
		out, stderr, code := nbdmover(t, append(args, "--json")...)
		if code != 0 || !strings.HasPrefix(out, "{\n  \"version\": 1,") {
			t.Errorf("%v --json: exit %d: %q %s", args, code, out, stderr)
		}
	}
	var res struct {
		Bytes   int64
		Seconds float64
		Disks   []struct{ Seconds float64 }
	}
	out, _, _ := nbdmover(t, "restore", "--repo", repoDir, "--domain", "vm", "--output", filepath.Join(dir, "out2"), "--json")
	if json.Unmarshal([]byte(out), &res) != nil || res.Bytes != 8<<20 || res.Seconds <= 0 || len(res.Disks) != 1 {
		t.Errorf("restore --json: %s", out)
	}
}

func TestParseDuration(t *testing.T) {
	for in, want := range map[string]time.Duration{"90m": 90 * time.Minute, "36h": 36 * time.Hour, "7d": 7 * 24 * time.Hour,
		"2w": 14 * 24 * time.Hour, "1w2d": 9 * 24 * time.Hour, "1d12h": 36 * time.Hour, "1ms": time.Millisecond} {
		if got, err := parseDuration(in); err != nil || got != want {
			t.Errorf("%s: %v %v, want %v", in, got, err, want)
		}
	}
	for _, in := range []string{"", "1 day", "d", "1d-30h", "-1h", "100d2562047h", "99999999999w", "1x"} {
		if got, err := parseDuration(in); err == nil {
			t.Errorf("%q accepted as %v", in, got)
		}
	}
	for _, c := range []struct{ in, out []string }{
		{[]string{"nbdmover", "gc", "--log-level", "debug", "--repo", "x"}, []string{"nbdmover", "--log-level", "debug", "gc", "--repo", "x"}},
		{[]string{"nbdmover", "gc", "--log-level"}, []string{"nbdmover", "gc", "--log-level"}},
		{[]string{"nbdmover", "gc", "--log-level", "--repo", "x"}, []string{"nbdmover", "gc", "--log-level", "--repo", "x"}},
		{[]string{"nbdmover", "verify", "--read-data", "10%"}, []string{"nbdmover", "verify", "--read-data=10%"}},
		{[]string{"nbdmover", "list", "--", "--log-level", "x"}, []string{"nbdmover", "list", "--", "--log-level", "x"}},
	} {
		if got := normalizeArgs(c.in); !slices.Equal(got, c.out) {
			t.Errorf("%v: %v, want %v", c.in, got, c.out)
		}
	}
	if _, stderr, code := nbdmover(t, "gc", "--repo", t.TempDir(), "--log-level"); code != 2 {
		t.Errorf("a trailing --log-level: exit %d: %s", code, stderr)
	}
	if _, stderr, _ := nbdmover(t, "--bogus"); strings.Contains(stderr, "nbdmover nbdmover") {
		t.Errorf("%s", stderr)
	}
}
