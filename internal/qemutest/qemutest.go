// Package qemutest drives the real peers the tests use: qemu-img, qemu-io
// and qemu-nbd. It is imported by tests only.
package qemutest

import (
	"bytes"
	"encoding/json"
	"net"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// Need fails the test when a command is missing.
func Need(tb testing.TB, cmds ...string) {
	tb.Helper()
	for _, c := range cmds {
		if _, err := exec.LookPath(c); err != nil {
			tb.Fatalf("%s is not installed: run scripts/install-deps.sh (make test does)", c)
		}
	}
}

// Run runs a command and returns its combined output, failing on error.
func Run(tb testing.TB, name string, args ...string) string {
	tb.Helper()
	out, err := exec.Command(name, args...).CombinedOutput()
	if err != nil {
		tb.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return string(out)
}

// NewImage creates an empty qcow2 image of size bytes in dir.
func NewImage(tb testing.TB, dir string, size int64) string {
	tb.Helper()
	Need(tb, "qemu-img", "qemu-io", "qemu-nbd")
	img := filepath.Join(dir, "disk.qcow2")
	Run(tb, "qemu-img", "create", "-q", "-f", "qcow2", img, strconv.FormatInt(size, 10))
	return img
}

// IO runs qemu-io commands (e.g. "write -P 0x5a 1M 2M") on a qcow2 image.
func IO(tb testing.TB, img string, cmds ...string) {
	tb.Helper()
	args := []string{"-f", "qcow2"}
	for _, c := range cmds {
		args = append(args, "-c", c)
	}
	Run(tb, "qemu-io", append(args, img)...)
}

// RawCopy converts a qcow2 image to a raw file in a new temporary
// directory and returns its path: the reference copy of that moment.
func RawCopy(tb testing.TB, img string) string {
	tb.Helper()
	raw := filepath.Join(tb.TempDir(), "copy.raw")
	Run(tb, "qemu-img", "convert", "-U", "-f", "qcow2", "-O", "raw", img, raw)
	return raw
}

// Compare fails the test unless the two images have the same virtual size
// and the same contents (qemu-img compare; allocation may differ).
func Compare(tb testing.TB, a, afmt, b, bfmt string) {
	tb.Helper()
	if sa, sb := VirtualSize(tb, a, afmt), VirtualSize(tb, b, bfmt); sa != sb {
		tb.Fatalf("%s is %d bytes, %s is %d", a, sa, b, sb)
	}
	out, err := exec.Command("qemu-img", "compare", "-U", "-f", afmt, "-F", bfmt, a, b).CombinedOutput()
	if err != nil {
		tb.Fatalf("qemu-img compare %s %s: %v: %s", a, b, err, bytes.TrimSpace(out))
	}
}

// VirtualSize is the image's size as qemu-img info reports it.
func VirtualSize(tb testing.TB, img, format string) int64 {
	tb.Helper()
	var info struct {
		VirtualSize int64 `json:"virtual-size"`
	}
	if err := json.Unmarshal([]byte(Run(tb, "qemu-img", "info", "-U", "--output=json", "-f", format, img)), &info); err != nil {
		tb.Fatal(err)
	}
	return info.VirtualSize
}

// Server is a qemu-nbd serving one image on a unix socket.
type Server struct {
	Cmd  *exec.Cmd
	Sock string
	URI  string
}

// Serve starts qemu-nbd on img (qcow2) with extra arguments (e.g. "-r",
// "-B", "b0") and waits until it accepts connections (it serves
// persistently, -t, so the probe does not end it). It is killed when the
// test ends.
func Serve(tb testing.TB, img string, extra ...string) *Server {
	tb.Helper()
	sock := filepath.Join(tb.TempDir(), "nbd.sock")
	args := append([]string{"-t", "-e", "16", "-f", "qcow2", "-k", sock}, extra...)
	cmd := exec.Command("qemu-nbd", append(args, img)...)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		tb.Fatal(err)
	}
	s := &Server{Cmd: cmd, Sock: sock, URI: "nbd+unix:///?socket=" + sock}
	tb.Cleanup(s.Kill)
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		// Ready when it accepts a connection: the socket file appears
		// when qemu-nbd binds, before it listens.
		if c, err := net.Dial("unix", sock); err == nil {
			c.Close()
			return s
		}
		if time.Now().After(deadline) {
			tb.Fatalf("qemu-nbd did not create %s: %s", sock, stderr.String())
		}
	}
}

// Kill stops the server (also a stopped one) and waits for it. It may be
// called more than once.
func (s *Server) Kill() {
	if s.Cmd.ProcessState != nil {
		return
	}
	s.Cmd.Process.Signal(syscall.SIGCONT)
	s.Cmd.Process.Kill()
	s.Cmd.Wait()
}
