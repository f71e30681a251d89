package main

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// A shared directory (mode 1777, as /tmp) given as --run-dir or
// --scratch-dir is refused before anything is touched, and keeps its mode.
func TestSharedRunDirRefused(t *testing.T) {
	shared := filepath.Join(t.TempDir(), "shared")
	os.Mkdir(shared, 0o755)
	if err := os.Chmod(shared, os.ModeSticky|0o777); err != nil {
		t.Fatal(err)
	}
	repo := filepath.Join(t.TempDir(), "repo")
	for _, args := range [][]string{
		{"serve", "--run-dir", shared, "--listen", "unix://" + filepath.Join(t.TempDir(), "s.sock"), "--repo", repo},
		{"serve", "--scratch-dir", shared, "--listen", "unix://" + filepath.Join(t.TempDir(), "s.sock"), "--repo", repo},
		{"backup", "--domain", "vm1", "--scratch-dir", shared, "--repo", repo},
	} {
		_, stderr, code := nbdmover(t, args...)
		if code != 2 || !strings.Contains(stderr, "written by others") || !strings.Contains(stderr, shared) {
			t.Errorf("%v: exit %d: %s", args, code, stderr)
		}
		if st, _ := os.Stat(shared); st.Mode()&os.ModePerm != 0o777 || st.Mode()&os.ModeSticky == 0 {
			t.Fatalf("%v changed the directory's mode to %v", args, st.Mode())
		}
	}
}

// A password command sees none of nbdmover's secrets (the daemon's token,
// a password in the environment, S3 secrets), and one that leaves a
// process in the background holding its output does not hold nbdmover.
func TestPasswordCommandEnvironmentAndWait(t *testing.T) {
	repo := filepath.Join(t.TempDir(), "repo")
	pw := filepath.Join(t.TempDir(), "pw")
	os.WriteFile(pw, []byte("the password"), 0o600)
	if _, stderr, code := nbdmover(t, "init", "--repo", repo, "--encryption", "--password-file", pw); code != 0 {
		t.Fatal(stderr)
	}
	envFile := filepath.Join(t.TempDir(), "env")
	secrets := []string{"NBDMOVER_TOKEN=token-sekrit", "AWS_SECRET_ACCESS_KEY=aws-sekrit", "AWS_SESSION_TOKEN=session-sekrit"}
	_, stderr, code := nbdmoverEnv(t, secrets, "list", "--repo", repo, "--password-command", "env > "+envFile+"; cat "+pw)
	if code != 0 {
		t.Fatal(stderr)
	}
	env, _ := os.ReadFile(envFile)
	for _, s := range []string{"token-sekrit", "aws-sekrit", "session-sekrit", "the password"} {
		if strings.Contains(string(env), s) {
			t.Errorf("the password command's environment holds %q", s)
		}
	}
	start := time.Now()
	// (its stderr elsewhere: it must not hold this test's pipe)
	_, stderr, code = nbdmover(t, "list", "--repo", repo, "--password-command", "cat "+pw+"; sleep 30 2>/dev/null &")
	if code != 0 || time.Since(start) > 10*time.Second {
		t.Fatalf("a password command leaving a process behind: exit %d after %v: %s", code, time.Since(start), stderr)
	}
}
