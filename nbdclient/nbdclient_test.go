package nbdclient

import (
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/nbdmover/nbdmover/internal/qemutest"
	"golang.org/x/sync/errgroup"
)

const (
	KiB = 1 << 10
	MiB = 1 << 20
)

// patternImage makes a qcow2 image with many small and large extents of
// data, zeroes and holes, and a dirty bitmap "b0" that saw only the second
// half of the writes, so the two contexts have different boundaries.
func patternImage(t testing.TB, size int64, seed uint64) string {
	img := newImage(t, t.TempDir(), size)
	r := rand.New(rand.NewPCG(seed, seed))
	ops := func(n int) []string {
		var cmds []string
		for range n {
			length := int64(512) << r.IntN(14) // 512 B .. 4 MiB
			if r.IntN(4) == 0 {
				length += int64(r.IntN(64)) * 512
			}
			off := r.Int64N((size-length)/512) * 512
			switch r.IntN(6) {
			case 0:
				cmds = append(cmds, fmt.Sprintf("write -z %d %d", off, length))
			case 1:
				cmds = append(cmds, fmt.Sprintf("discard %d %d", off, length))
			default:
				cmds = append(cmds, fmt.Sprintf("write -P 0x%02x %d %d", 1+r.IntN(254), off, length))
			}
		}
		return cmds
	}
	qemuIO(t, img, ops(150)...)
	run(t, "qemu-img", "bitmap", "--add", img, "b0")
	qemuIO(t, img, ops(100)...)
	return img
}

func dial(t testing.TB, cfg Config) *Conn {
	t.Helper()
	c, err := Dial(t.Context(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

func collect(t testing.TB, seq func(func(Extent, error) bool)) []Extent {
	t.Helper()
	var exts []Extent
	for e, err := range seq {
		if err != nil {
			t.Fatal(err)
		}
		exts = append(exts, e)
	}
	return exts
}

func checkCovers(t testing.TB, exts []Extent, off, end int64) {
	t.Helper()
	pos := off
	for i, e := range exts {
		if e.Offset != pos || e.Length <= 0 {
			t.Fatalf("extent %d = %+v, want it to start at %d with a positive length", i, e, pos)
		}
		if i > 0 && exts[i-1].Flags == e.Flags {
			t.Fatalf("extents %d and %d have the same flags and were not joined", i-1, i)
		}
		pos = e.End()
	}
	if pos != end {
		t.Fatalf("extents end at %d, want %d", pos, end)
	}
}

func TestExtentsMatchNbdinfo(t *testing.T) {
	const size = 256*MiB + 192*KiB
	img := patternImage(t, size, 1)
	srv := serve(t, img, "-B", "b0")
	wantAlloc := nbdinfoMap(t, srv.URI, ContextAllocation)
	wantDirty := nbdinfoMap(t, srv.URI, BitmapContext("b0"))
	if len(wantAlloc) < 50 || len(wantDirty) < 50 {
		t.Fatalf("test image too simple: %d allocation and %d dirty extents", len(wantAlloc), len(wantDirty))
	}

	for _, window := range []int64{DefaultExtentWindow, 3*MiB + 64*KiB, 64 * KiB} {
		t.Run(fmt.Sprintf("window=%d", window), func(t *testing.T) {
			c := dial(t, Config{URI: srv.URI, Bitmap: "b0", ExtentWindow: window})
			if !c.Info().HasContext(ContextAllocation) || !c.Info().HasContext(BitmapContext("b0")) {
				t.Fatalf("contexts granted: %v", c.Info().Contexts)
			}
			got := collect(t, c.Extents(t.Context(), 0, size))
			checkCovers(t, got, 0, size)
			compareExtents(t, "base:allocation", project(got, true), wantAlloc)
			compareExtents(t, "dirty bitmap", project(got, false), wantDirty)
		})
	}

	t.Run("pool/allocation-only/sub-range", func(t *testing.T) {
		p, err := DialPool(t.Context(), Config{URI: srv.URI, ExtentWindow: 5 * MiB}, 3)
		if err != nil {
			t.Fatal(err)
		}
		defer p.Close()
		off, end := int64(7*MiB+4096), int64(200*MiB+512)
		got := collect(t, p.Extents(t.Context(), off, end-off))
		checkCovers(t, got, off, end)
		for _, e := range got {
			if e.Flags&Dirty != 0 {
				t.Fatalf("dirty flag without a bitmap: %+v", e)
			}
		}
		compareExtents(t, "base:allocation", project(got, true), clip(wantAlloc, off, end))
	})
}

func clip(exts []Extent, off, end int64) []Extent {
	var out []Extent
	for _, e := range exts {
		s, x := max(e.Offset, off), min(e.End(), end)
		if s < x {
			out = append(out, Extent{Offset: s, Length: x - s, Flags: e.Flags})
		}
	}
	return out
}

func compareExtents(t testing.TB, what string, got, want []Extent) {
	t.Helper()
	for i := range max(len(got), len(want)) {
		if i >= len(got) || i >= len(want) || got[i] != want[i] {
			var g, w Extent
			if i < len(got) {
				g = got[i]
			}
			if i < len(want) {
				w = want[i]
			}
			t.Fatalf("%s extent %d: got %+v, nbdinfo says %+v (%d vs %d extents)", what, i, g, w, len(got), len(want))
		}
	}
}

func TestReadAtReturnsExactBytes(t *testing.T) {
	const size = 64*MiB + 3*512
	img := patternImage(t, size, 2)
	want := rawCopy(t, img)
	srv := serve(t, img)
	c := dial(t, Config{URI: srv.URI, RequestSize: 64 * KiB, MaxInFlight: 8})

	got := make([]byte, size)
	if err := c.ReadAt(t.Context(), got, 0); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, want) {
		t.Fatal("whole-export read differs from qemu-img convert's copy")
	}
	for _, r := range []struct{ off, n int64 }{{0, 1}, {12345, 1000000}, {size - 700, 700}, {5 * MiB, 4 * MiB}} {
		buf := make([]byte, r.n)
		if err := c.ReadAt(t.Context(), buf, r.off); err != nil {
			t.Fatalf("read %d+%d: %v", r.off, r.n, err)
		}
		if !bytes.Equal(buf, want[r.off:r.off+r.n]) {
			t.Fatalf("read %d+%d differs", r.off, r.n)
		}
	}
	// Scattered segments land where asked; the gaps are left alone.
	buf := bytes.Repeat([]byte{0xee}, 3*MiB)
	segs := []Segment{{BufOffset: 0, Offset: 100, Length: 4096}, {BufOffset: MiB, Offset: 40 * MiB, Length: MiB + 7},
		{BufOffset: 2*MiB + 100, Offset: size - 1000, Length: 1000}, {BufOffset: 5, Offset: 5, Length: 0}}
	if err := c.ReadSegments(t.Context(), buf, segs); err != nil {
		t.Fatal(err)
	}
	for _, sg := range segs {
		if !bytes.Equal(buf[sg.BufOffset:sg.BufOffset+sg.Length], want[sg.Offset:sg.Offset+sg.Length]) {
			t.Fatalf("segment %+v differs", sg)
		}
	}
	if buf[4096] != 0xee || buf[2*MiB+99] != 0xee {
		t.Fatal("ReadSegments wrote outside its segments")
	}
	if err := c.ReadSegments(t.Context(), buf[:10], []Segment{{BufOffset: 5, Offset: 0, Length: 6}}); !errors.Is(err, syscall.EINVAL) {
		t.Errorf("segment past the buffer: %v", err)
	}
	for _, r := range []struct{ off, n int64 }{{size - 100, 200}, {-1, 10}, {size, 1}} {
		err := c.ReadAt(t.Context(), make([]byte, r.n), r.off)
		var nerr *Error
		if !errors.As(err, &nerr) || !errors.Is(err, syscall.EINVAL) || !strings.Contains(err.Error(), "outside the export") {
			t.Errorf("read %d+%d past the end: got %v, want an EINVAL *Error", r.off, r.n, err)
		}
	}
}

func TestReadSplitsAboveServerMaximum(t *testing.T) {
	const size = 48 * MiB
	img := newImage(t, t.TempDir(), size)
	qemuIO(t, img, "write -P 0x11 0 16M", "write -P 0x22 16M 16M", "write -P 0x33 32M 16M")
	want := rawCopy(t, img)
	srv := serve(t, img)
	c := dial(t, Config{URI: srv.URI, RequestSize: 64 * MiB})
	if c.Info().MaxBlock != 32*MiB {
		t.Fatalf("qemu-nbd's maximum block size: got %d, want 32 MiB", c.Info().MaxBlock)
	}
	got := make([]byte, 40*MiB)
	if err := c.ReadAt(t.Context(), got, 4*MiB); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, want[4*MiB:44*MiB]) {
		t.Fatal("a 40 MiB read differs")
	}
}

func TestWriteAtThenFlush(t *testing.T) {
	const size = 40*MiB + 512
	dir := t.TempDir()
	img := newImage(t, dir, size)
	srv := qemutest.Serve(t, img, "--cache=writeback")
	p, err := DialPool(t.Context(), Config{URI: srv.URI, RequestSize: 256 * KiB}, 3)
	if err != nil {
		t.Fatal(err)
	}
	want := make([]byte, size)
	r := rand.New(rand.NewPCG(7, 7))
	for off := int64(0); off < size; off += 3 * MiB {
		n := min(2*MiB+512, size-off) // leaves gaps of zeroes
		chunk := want[off : off+n]
		for i := range chunk {
			chunk[i] = byte(r.Uint32())
		}
		if err := p.WriteAt(t.Context(), chunk, off); err != nil {
			t.Fatal(err)
		}
	}
	if err := p.Flush(t.Context()); err != nil {
		t.Fatal(err)
	}
	if err := p.WriteAt(t.Context(), make([]byte, 1024), size-512); !errors.Is(err, syscall.EINVAL) {
		t.Errorf("write past the end: got %v, want EINVAL", err)
	}
	p.Close()
	srv.Kill()
	if got := rawCopy(t, img); !bytes.Equal(got, want) {
		t.Fatal("the image does not hold the bytes written")
	}
}

func TestPoolReadersReproduceImage(t *testing.T) {
	const size = 96*MiB + 5*512
	const chunk = 4 * MiB
	img := patternImage(t, size, 3)
	want := sha256.Sum256(rawCopy(t, img))
	srv := serve(t, img)
	p, err := DialPool(t.Context(), Config{URI: srv.URI}, 4)
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	if p.Len() != 4 {
		t.Fatalf("pool has %d connections, want 4 (qemu-nbd advertises multi-conn)", p.Len())
	}

	got := make([]byte, size)
	offs := make(chan int64)
	g, ctx := errgroup.WithContext(t.Context())
	g.Go(func() error {
		defer close(offs)
		for off := int64(0); off < size; off += chunk {
			select {
			case offs <- off:
			case <-ctx.Done():
				return ctx.Err()
			}
		}
		return nil
	})
	for range 8 {
		g.Go(func() error {
			for off := range offs {
				if err := p.ReadAt(ctx, got[off:min(off+chunk, size)], off); err != nil {
					return err
				}
			}
			return nil
		})
	}
	if err := g.Wait(); err != nil {
		t.Fatal(err)
	}
	if sha256.Sum256(got) != want {
		t.Fatal("parallel readers did not reproduce the image")
	}
}

func TestDialErrors(t *testing.T) {
	img := newImage(t, t.TempDir(), 8*MiB)
	run(t, "qemu-img", "bitmap", "--add", img, "b0")
	srv := serve(t, img, "-x", "vda", "-B", "b0")
	missing := t.TempDir() + "/no.sock"

	tests := []struct {
		name string
		cfg  Config
		is   error    // errors.Is target, if any
		says []string // the message names these
	}{
		{"no address", Config{}, nil, []string{"no NBD URI or socket"}},
		{"bad scheme", Config{URI: "http://127.0.0.1/x"}, nil, []string{"http://127.0.0.1/x"}},
		{"missing socket", Config{URI: "nbd+unix:///vda?socket=" + missing}, os.ErrNotExist, []string{missing}},
		{"missing socket by path", Config{Socket: missing, Export: "vda"}, os.ErrNotExist, []string{missing}},
		{"missing export", Config{URI: "nbd+unix:///vdb?socket=" + srv.Sock}, nil, []string{"vdb"}},
		{"missing bitmap", Config{Socket: srv.Sock, Export: "vda", Bitmap: "nope"}, ErrNoContext,
			[]string{`"nope"`, "qemu:dirty-bitmap:nope"}},
	}
	before := openFDs(t)
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c, err := Dial(t.Context(), tt.cfg)
			if err == nil {
				c.Close()
				t.Fatal("Dial succeeded")
			}
			t.Log(err)
			var nerr *Error
			if !errors.As(err, &nerr) || nerr.Op != "connect" {
				t.Fatalf("got %T %v, want a connect *Error", err, err)
			}
			if tt.is != nil && !errors.Is(err, tt.is) {
				t.Errorf("error does not match %v", tt.is)
			}
			for _, s := range tt.says {
				if !strings.Contains(err.Error(), s) {
					t.Errorf("error does not say %q", s)
				}
			}
		})
	}
	// The export and bitmap that do exist work, and failed dials leaked nothing.
	c := dial(t, Config{Socket: srv.Sock, Export: "vda", Bitmap: "b0"})
	c.Close()
	if after := openFDs(t); after != before {
		t.Errorf("open file descriptors: %d before, %d after", before, after)
	}
}

func TestNoHandleLeaks(t *testing.T) {
	img := patternImage(t, 16*MiB, 4)
	srv := serve(t, img, "-B", "b0")
	before := openFDs(t)
	buf := make([]byte, MiB)
	for range 20 {
		p, err := DialPool(t.Context(), Config{URI: srv.URI, Bitmap: "b0"}, 3)
		if err != nil {
			t.Fatal(err)
		}
		collect(t, p.Extents(t.Context(), 0, 16*MiB))
		if err := p.ReadAt(t.Context(), buf, 3*MiB); err != nil {
			t.Fatal(err)
		}
		p.Close()
		p.Close() // idempotent
	}
	if after := openFDs(t); after != before {
		t.Errorf("open file descriptors: %d before, %d after 20 pools", before, after)
	}
}

// A Conn used after Close touches no descriptor: a pipe opened since,
// which got the number of the Conn's old eventfd, loses no byte to a
// later ReadAt (which returns ErrClosed).
func TestUseAfterCloseTouchesNoDescriptor(t *testing.T) {
	img := patternImage(t, 16*MiB, 5)
	srv := serve(t, img)
	c := dial(t, Config{URI: srv.URI})
	old := c.efd
	c.Close()
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	defer w.Close()
	if int(r.Fd()) != old {
		t.Skipf("the pipe got descriptor %d, not the eventfd's old %d", r.Fd(), old)
	}
	w.Write([]byte("8 bytes!"))
	buf := make([]byte, 4096)
	for range 3 {
		if err := c.ReadAt(t.Context(), buf, 0); !errors.Is(err, ErrClosed) {
			t.Fatalf("ReadAt after Close: %v", err)
		}
	}
	w.Close()
	got := make([]byte, 16)
	r.SetReadDeadline(time.Now().Add(2 * time.Second))
	n, _ := r.Read(got)
	if string(got[:n]) != "8 bytes!" {
		t.Fatalf("the pipe holds %q: a closed Conn read from it", got[:n])
	}
}

// readUntilError reads the export in a loop and returns the first error and
// when it came.
func readUntilError(ctx context.Context, c *Conn, started chan<- struct{}) (error, time.Time) {
	buf := make([]byte, 8*MiB)
	size := c.Info().Size
	var once sync.Once
	for off := int64(0); ; off = (off + int64(len(buf))) % size {
		if err := c.ReadAt(ctx, buf[:min(int64(len(buf)), size-off)], off); err != nil {
			return err, time.Now()
		}
		once.Do(func() { close(started) })
	}
}

func TestServerFailuresEndReads(t *testing.T) {
	img := patternImage(t, 64*MiB, 5)
	// Bounds below are generous: they separate "returns" from "hangs",
	// not fast from slow.
	const bound = 30 * time.Second

	t.Run("killed", func(t *testing.T) {
		srv := serve(t, img)
		c := dial(t, Config{URI: srv.URI, IOTimeout: 5 * time.Second})
		started := make(chan struct{})
		done := make(chan error, 1)
		go func() { err, _ := readUntilError(t.Context(), c, started); done <- err }()
		<-started
		srv.Cmd.Process.Kill()
		select {
		case err := <-done:
			t.Log(err)
			var nerr *Error
			if !errors.As(err, &nerr) || nerr.Op != "read" {
				t.Fatalf("got %v, want a read *Error", err)
			}
		case <-time.After(bound):
			t.Fatal("read hangs after qemu-nbd was killed")
		}
		if err := c.ReadAt(t.Context(), make([]byte, 4096), 0); err == nil {
			t.Fatal("read on a dead connection succeeded")
		}
	})

	// A stopped server keeps its socket open and answers nothing.
	stalled := func(t *testing.T, cfg Config, interrupt func(*Conn), want error) {
		srv := serve(t, img)
		cfg.URI = srv.URI
		c := dial(t, cfg)
		started := make(chan struct{})
		type result struct {
			err error
			at  time.Time
		}
		done := make(chan result, 1)
		go func() { err, at := readUntilError(t.Context(), c, started); done <- result{err, at} }()
		<-started
		srv.Cmd.Process.Signal(syscall.SIGSTOP)
		time.Sleep(200 * time.Millisecond)
		t0 := time.Now()
		interrupt(c)
		select {
		case r := <-done:
			t.Logf("%v after %v", r.err, r.at.Sub(t0))
			if !errors.Is(r.err, want) {
				t.Fatalf("got %v, want %v", r.err, want)
			}
		case <-time.After(bound):
			t.Fatal("read hangs on a stopped server")
		}
	}
	t.Run("stalled/timeout", func(t *testing.T) {
		stalled(t, Config{IOTimeout: time.Second}, func(*Conn) {}, ErrTimeout)
	})
	t.Run("stalled/close", func(t *testing.T) {
		stalled(t, Config{IOTimeout: time.Hour}, func(c *Conn) { c.Close(); c.Close() }, ErrClosed)
	})
}

func TestContextCancelStopsRead(t *testing.T) {
	img := patternImage(t, 64*MiB, 6)
	srv := serve(t, img)
	c := dial(t, Config{URI: srv.URI, IOTimeout: time.Hour})
	ctx, cancel := context.WithCancel(t.Context())
	started := make(chan struct{})
	done := make(chan error, 1)
	go func() { err, _ := readUntilError(ctx, c, started); done <- err }()
	<-started
	srv.Cmd.Process.Signal(syscall.SIGSTOP)
	time.Sleep(200 * time.Millisecond)
	cancel()
	select {
	case err := <-done:
		t.Log(err)
		if !errors.Is(err, context.Canceled) {
			t.Fatalf("got %v, want context.Canceled", err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("read does not stop when its context is cancelled")
	}
	// A cancelled read abandons the connection: later calls fail fast.
	if err := c.ReadAt(t.Context(), make([]byte, 512), 0); !errors.Is(err, ErrClosed) {
		t.Fatalf("read after an abandoned call: got %v, want ErrClosed", err)
	}
}

// An export claiming 2^63 - 1 bytes (nbdkit null) is refused at connect,
// naming its size; one of 64 TiB holding nothing is walked in requests
// that grow with its extents, not its size.
func TestHugeExports(t *testing.T) {
	if _, err := exec.LookPath("nbdkit"); err != nil {
		if os.Getenv("NBDMOVER_TEST_REQUIRE_PEERS") != "" {
			t.Fatal("nbdkit is missing")
		}
		t.Skip("nbdkit is missing")
	}
	nbdkit := func(size string) string {
		sock := t.TempDir() + "/nbd.sock"
		cmd := exec.Command("nbdkit", "-f", "-U", sock, "null", "size="+size)
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
		for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(20 * time.Millisecond) {
			if _, err := os.Stat(sock); err == nil {
				return "nbd+unix:///?socket=" + sock
			}
			if time.Now().After(deadline) {
				t.Fatal("nbdkit did not start")
			}
		}
	}
	start := time.Now()
	_, err := Dial(t.Context(), Config{URI: nbdkit("9223372036854775807")})
	if err == nil || !strings.Contains(err.Error(), "9223372036854775807") || time.Since(start) > 5*time.Second {
		t.Fatalf("an export of 2^63-1 bytes: %v after %v", err, time.Since(start))
	}
	c := dial(t, Config{URI: nbdkit(fmt.Sprint(int64(64) << 40))})
	start = time.Now()
	exts := collect(t, c.Extents(t.Context(), 0, c.Info().Size))
	if len(exts) != 1 || exts[0].Length != 64<<40 || time.Since(start) > 20*time.Second {
		t.Fatalf("64 TiB of nothing: %d extents in %v", len(exts), time.Since(start))
	}
	t.Logf("64 TiB walked in %v", time.Since(start))
}
