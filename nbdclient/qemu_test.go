package nbdclient

import (
	"bufio"
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// Helpers that drive the real peers: qemu-img, qemu-io, qemu-nbd, nbdinfo.

func need(tb testing.TB, cmds ...string) {
	tb.Helper()
	for _, c := range cmds {
		if _, err := exec.LookPath(c); err != nil {
			tb.Fatalf("%s is not installed: run scripts/install-deps.sh (make test does)", c)
		}
	}
}

func run(tb testing.TB, name string, args ...string) string {
	tb.Helper()
	out, err := exec.Command(name, args...).CombinedOutput()
	if err != nil {
		tb.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return string(out)
}

// newImage creates a qcow2 image of size bytes in dir.
func newImage(tb testing.TB, dir string, size int64) string {
	tb.Helper()
	need(tb, "qemu-img", "qemu-io", "qemu-nbd", "nbdinfo")
	img := filepath.Join(dir, "disk.qcow2")
	run(tb, "qemu-img", "create", "-q", "-f", "qcow2", img, strconv.FormatInt(size, 10))
	return img
}

// qemuIO runs qemu-io commands (e.g. "write -P 0x5a 1M 2M") on an image.
func qemuIO(tb testing.TB, img string, cmds ...string) {
	tb.Helper()
	args := []string{"-f", "qcow2"}
	for _, c := range cmds {
		args = append(args, "-c", c)
	}
	run(tb, "qemu-io", append(args, img)...)
}

// server is a qemu-nbd serving one image on a unix socket.
type server struct {
	cmd  *exec.Cmd
	sock string
	uri  string
}

// serve starts qemu-nbd read-only on img with the given extra arguments and
// waits until it accepts connections. It is killed when the test ends.
func serve(tb testing.TB, img string, extra ...string) *server {
	tb.Helper()
	return serveArgs(tb, img, append([]string{"-r"}, extra...))
}

func serveArgs(tb testing.TB, img string, extra []string) *server {
	tb.Helper()
	sock := filepath.Join(tb.TempDir(), "nbd.sock")
	args := append([]string{"-t", "-e", "16", "-f", "qcow2", "-k", sock}, extra...)
	cmd := exec.Command("qemu-nbd", append(args, img)...)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		tb.Fatal(err)
	}
	s := &server{cmd: cmd, sock: sock, uri: "nbd+unix:///?socket=" + sock}
	tb.Cleanup(s.kill)
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		if _, err := os.Stat(sock); err == nil {
			return s
		}
		if time.Now().After(deadline) {
			tb.Fatalf("qemu-nbd did not create %s: %s", sock, stderr.String())
		}
	}
}

func (s *server) kill() {
	s.cmd.Process.Signal(syscall.SIGCONT)
	s.cmd.Process.Kill()
	s.cmd.Wait()
}

// nbdinfoMap runs nbdinfo --map for one context and returns its extents
// with the type number as Flags, joined where adjacent types are equal.
func nbdinfoMap(tb testing.TB, uri, context string) []Extent {
	tb.Helper()
	out := run(tb, "nbdinfo", "--map="+context, uri)
	var exts []Extent
	sc := bufio.NewScanner(strings.NewReader(out))
	for sc.Scan() {
		var e Extent
		var typ int
		if _, err := fmt.Sscan(sc.Text(), &e.Offset, &e.Length, &typ); err != nil {
			tb.Fatalf("nbdinfo line %q: %v", sc.Text(), err)
		}
		e.Flags = Flags(typ)
		exts = appendJoined(exts, e)
	}
	return exts
}

func appendJoined(exts []Extent, e Extent) []Extent {
	if k := len(exts) - 1; k >= 0 && exts[k].Flags == e.Flags && exts[k].End() == e.Offset {
		exts[k].Length += e.Length
		return exts
	}
	return append(exts, e)
}

// project keeps only the flags in mask, mapped back to one context's NBD
// type numbers, and joins adjacent extents that become equal.
func project(exts []Extent, allocation bool) []Extent {
	var out []Extent
	for _, e := range exts {
		var t Flags
		if allocation {
			if e.Flags&Hole != 0 {
				t |= stateHole
			}
			if e.Flags&Zero != 0 {
				t |= stateZero
			}
		} else if e.Flags&Dirty != 0 {
			t = stateDirty
		}
		out = appendJoined(out, Extent{Offset: e.Offset, Length: e.Length, Flags: t})
	}
	return out
}

// rawCopy converts img to a raw file and returns its bytes.
func rawCopy(tb testing.TB, img string) []byte {
	tb.Helper()
	raw := filepath.Join(tb.TempDir(), "copy.raw")
	run(tb, "qemu-img", "convert", "-U", "-f", "qcow2", "-O", "raw", img, raw)
	b, err := os.ReadFile(raw)
	if err != nil {
		tb.Fatal(err)
	}
	return b
}

func openFDs(tb testing.TB) int {
	tb.Helper()
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		tb.Fatal(err)
	}
	return len(ents)
}
