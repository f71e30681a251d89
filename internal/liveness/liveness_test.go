package liveness

import (
	"os"
	"os/exec"
	"strings"
	"testing"
)

// A process is gone only when that is provable.
func TestGone(t *testing.T) {
	self := Identity(os.Getpid())
	if self == "" || Gone(os.Getpid(), self) {
		t.Fatalf("this process: %q", self)
	}
	cmd := exec.Command("sleep", "10")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	pid := cmd.Process.Pid
	id := Identity(pid)
	if Gone(pid, id) {
		t.Fatal("a running process is gone")
	}
	cmd.Process.Kill()
	cmd.Wait()
	parts := strings.Split(id, "/")
	for _, c := range []struct {
		identity string
		gone     bool
	}{
		{id, os.Geteuid() == 0},                             // exited (only root trusts /proc)
		{"", false},                                         // unknown
		{"/" + parts[1] + "/" + parts[2], false},            // no boot id
		{parts[0] + "/pid:[1]/" + parts[2], false},          // another pid namespace
		{"another-boot/" + parts[1] + "/" + parts[2], true}, // rebooted since
	} {
		if got := Gone(pid, c.identity); got != c.gone && os.Geteuid() == 0 {
			t.Errorf("%q: gone %v, want %v", c.identity, got, c.gone)
		}
	}
	if Gone(os.Getpid(), parts[0]+"/"+parts[1]+"/1") != (os.Geteuid() == 0) {
		t.Error("a reused pid is not told apart")
	}
}
