package nbdserver

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"io"
	"math/rand/v2"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/nbdmover/nbdmover/nbdclient"
)

// memExport is an export of bytes in memory, zero where data is zero in
// blocks of 64 KiB (a stand-in for a backup's disk: the server is what is
// tested here; the exports of backups are tested in package export).
type memExport struct {
	data  []byte
	block int64
	fail  atomic.Bool // reads fail
	reads atomic.Int64
}

func newMemExport(size int64, seed uint64) *memExport {
	e := &memExport{data: make([]byte, size), block: 64 << 10}
	r := rand.New(rand.NewPCG(seed, 1))
	for off := int64(0); off < size; off += e.block {
		if r.IntN(3) == 0 {
			continue // a hole
		}
		for i := off; i < min(off+e.block, size); i++ {
			e.data[i] = byte(r.Uint32())
		}
	}
	return e
}

func (e *memExport) Size() int64 { return int64(len(e.data)) }

func (e *memExport) zero(b int64) bool {
	for _, c := range e.data[b*e.block : min((b+1)*e.block, e.Size())] {
		if c != 0 {
			return false
		}
	}
	return true
}

func (e *memExport) Read(_ context.Context, off, n int64, fn func(int64, []byte, int64) error) error {
	e.reads.Add(1)
	if e.fail.Load() {
		return errors.New("chunk xyz: corrupt")
	}
	for pos := off; pos < off+n; {
		b := pos / e.block
		m := min(off+n, (b+1)*e.block) - pos
		var data []byte
		if !e.zero(b) {
			data = e.data[pos : pos+m]
		}
		if err := fn(pos, data, m); err != nil {
			return err
		}
		pos += m
	}
	return nil
}

func (e *memExport) Allocation(off, n int64, max int) []Run {
	var runs []Run
	for pos := off; pos < off+n && len(runs) < max; {
		b := pos / e.block
		m := min(off+n, (b+1)*e.block) - pos
		z := e.zero(b)
		if len(runs) > 0 && runs[len(runs)-1].Zero == z {
			runs[len(runs)-1].Length += m
		} else {
			runs = append(runs, Run{Length: m, Zero: z})
		}
		pos += m
	}
	return runs
}

func (e *memExport) Prefetch(off, n int64) {}

// serve starts a server of exports on a unix socket and returns the socket.
func serve(t *testing.T, o Options) (string, *Server) {
	t.Helper()
	sock := filepath.Join(t.TempDir(), "nbd.sock")
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	s := New(o)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- s.Serve(ctx, l) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Serve: %v", err)
		}
	})
	return sock, s
}

func dial(t *testing.T, sock, name string, cfg nbdclient.Config) *nbdclient.Conn {
	t.Helper()
	cfg.Socket, cfg.Export = sock, name
	c, err := nbdclient.Dial(t.Context(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// libnbd (through nbdclient) reads what the export holds at any offset and
// length, 512-byte requests included, from several connections at once;
// its extents match the export's zero blocks; writes are refused.
func TestReadsAnyAlignment(t *testing.T) {
	e := newMemExport(8<<20+3*512+7, 1)
	sock, _ := serve(t, Options{Exports: map[string]Export{"vda": e}})
	var wg sync.WaitGroup
	for g, reqSize := range []int{512, 4096, 256 << 10, 32 << 20} {
		wg.Add(1)
		go func() {
			defer wg.Done()
			c := dial(t, sock, "vda", nbdclient.Config{RequestSize: reqSize})
			r := rand.New(rand.NewPCG(uint64(g), 2))
			for range 200 {
				n := 1 + r.Int64N(min(int64(3*reqSize), 4<<20))
				off := r.Int64N(e.Size() - n + 1)
				if r.IntN(2) == 0 {
					off &^= 511
				}
				got := make([]byte, n)
				if err := c.ReadAt(t.Context(), got, off); err != nil {
					t.Errorf("read %d+%d: %v", off, n, err)
					return
				}
				if !bytes.Equal(got, e.data[off:off+n]) {
					t.Errorf("read %d+%d (requests of %d): wrong bytes", off, n, reqSize)
					return
				}
			}
		}()
	}
	wg.Wait()

	c := dial(t, sock, "", nbdclient.Config{}) // "" is the only export
	if info := c.Info(); info.Size != e.Size() || !info.CanMultiConn || info.MaxBlock != 32<<20 || !info.HasContext("base:allocation") {
		t.Fatalf("info %+v", info)
	}
	pos := int64(0)
	for ext, err := range c.Extents(t.Context(), 0, e.Size()) {
		if err != nil {
			t.Fatal(err)
		}
		if ext.Offset != pos {
			t.Fatalf("extent at %d, want %d", ext.Offset, pos)
		}
		zero := ext.Flags&nbdclient.Zero != 0
		for b := ext.Offset / e.block; b*e.block < ext.End(); b++ {
			if e.zero(b) != zero {
				t.Fatalf("extent %+v: block %d zero=%v", ext, b, e.zero(b))
			}
		}
		pos = ext.End()
	}
	if pos != e.Size() {
		t.Fatalf("extents end at %d of %d", pos, e.Size())
	}
	if err := c.WriteAt(t.Context(), make([]byte, 512), 0); !errors.Is(err, syscall.EPERM) {
		t.Fatalf("write: %v, want EPERM", err)
	}
	past := make([]byte, 1024)
	if err := c.ReadAt(t.Context(), past, e.Size()-512); !errors.Is(err, syscall.EINVAL) {
		t.Fatalf("read past the end: %v, want EINVAL", err)
	}
	e.fail.Store(true)
	if err := c.ReadAt(t.Context(), past, 0); !errors.Is(err, syscall.EIO) {
		t.Fatalf("failing read: %v, want EIO", err)
	}
	e.fail.Store(false)
	if err := c.ReadAt(t.Context(), past, 0); err != nil {
		t.Fatalf("the connection after an EIO: %v", err)
	}
}

// nbdinfo and nbdcopy, the NBD project's and libnbd's tools, see what the
// export holds: the export list, the flags, the map, the bytes.
func TestRealClients(t *testing.T) {
	for _, tool := range []string{"nbdinfo", "nbdcopy"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Skipf("%s not installed", tool)
		}
	}
	a, b := newMemExport(4<<20, 3), newMemExport(1<<20+512, 4)
	sock, _ := serve(t, Options{Exports: map[string]Export{"a": a, "b": b}})
	out, err := exec.Command("nbdinfo", "--list", "nbd+unix:///?socket="+sock).CombinedOutput()
	if err != nil || !strings.Contains(string(out), `export="a"`) || !strings.Contains(string(out), `export="b"`) ||
		!strings.Contains(string(out), "is_read_only: true") || !strings.Contains(string(out), "can_multi_conn: true") {
		t.Fatalf("nbdinfo --list: %v\n%s", err, out)
	}
	out, err = exec.Command("nbdinfo", "--map", "nbd+unix:///b?socket="+sock).CombinedOutput()
	if err != nil || !strings.Contains(string(out), "hole,zero") || !strings.Contains(string(out), "data") {
		t.Fatalf("nbdinfo --map: %v\n%s", err, out)
	}
	dst := filepath.Join(t.TempDir(), "a.raw")
	if out, err := exec.Command("nbdcopy", "nbd+unix:///a?socket="+sock, dst).CombinedOutput(); err != nil {
		t.Fatalf("nbdcopy: %v\n%s", err, out)
	}
	if got, err := os.ReadFile(dst); err != nil || !bytes.Equal(got, a.data) {
		t.Fatalf("nbdcopy's copy differs (%v)", err)
	}
	if out, err := exec.Command("nbdinfo", "nbd+unix:///nope?socket="+sock).CombinedOutput(); err == nil {
		t.Fatalf("nbdinfo of an unknown export: %s", out)
	}
}

// raw is a hand-driven client, for what no real client sends.
type raw struct {
	t *testing.T
	c net.Conn
}

func rawDial(t *testing.T, sock string) *raw {
	t.Helper()
	c, err := net.Dial("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	c.SetDeadline(time.Now().Add(20 * time.Second))
	r := &raw{t, c}
	hello := r.read(18)
	if binary.BigEndian.Uint64(hello) != magicNBD {
		t.Fatalf("hello %x", hello)
	}
	r.write(binary.BigEndian.AppendUint32(nil, flagFixedNewstyle|flagNoZeroes))
	return r
}

func (r *raw) write(b []byte) {
	r.t.Helper()
	if _, err := r.c.Write(b); err != nil {
		r.t.Fatal(err)
	}
}

func (r *raw) read(n int) []byte {
	r.t.Helper()
	b := make([]byte, n)
	if _, err := io.ReadFull(r.c, b); err != nil {
		r.t.Fatalf("read %d bytes: %v", n, err)
	}
	return b
}

func option(opt uint32, data []byte) []byte {
	b := binary.BigEndian.AppendUint64(nil, magicOpt)
	b = binary.BigEndian.AppendUint32(b, opt)
	b = binary.BigEndian.AppendUint32(b, uint32(len(data)))
	return append(b, data...)
}

// optReply reads one option reply: its type and data.
func (r *raw) optReply() (uint32, []byte) {
	r.t.Helper()
	h := r.read(20)
	if binary.BigEndian.Uint64(h) != magicOptReply {
		r.t.Fatalf("option reply magic %x", h[:8])
	}
	return binary.BigEndian.Uint32(h[12:]), r.read(int(binary.BigEndian.Uint32(h[16:])))
}

// closed says whether the server closed the connection (within 10 s).
func (r *raw) closed() bool {
	r.c.SetReadDeadline(time.Now().Add(10 * time.Second))
	_, err := io.Copy(io.Discard, r.c)
	return err == nil || errors.Is(err, syscall.ECONNRESET) // EOF, or closed with our bytes unread
}

// goExport negotiates structured replies and picks the export.
func (r *raw) goExport(name string) {
	r.t.Helper()
	r.write(option(optStructuredReply, nil))
	if typ, _ := r.optReply(); typ != repAck {
		r.t.Fatalf("structured reply: %#x", typ)
	}
	r.write(option(optGo, append(appendString32(nil, name), 0, 0)))
	for {
		typ, data := r.optReply()
		if typ == repAck {
			return
		}
		if typ != repInfo {
			r.t.Fatalf("NBD_OPT_GO: %#x %s", typ, data)
		}
	}
}

func req(typ uint16, handle, off uint64, length uint32) []byte {
	b := binary.BigEndian.AppendUint32(nil, magicRequest)
	b = binary.BigEndian.AppendUint16(b, 0)
	b = binary.BigEndian.AppendUint16(b, typ)
	b = binary.BigEndian.AppendUint64(b, handle)
	b = binary.BigEndian.AppendUint64(b, off)
	return binary.BigEndian.AppendUint32(b, length)
}

// Hostile clients get the protocol's errors or lose their connection, and
// the server, and a well-behaved client beside them, carry on.
func TestHostileClients(t *testing.T) {
	e := newMemExport(64<<20, 5)
	sock, srv := serve(t, Options{Exports: map[string]Export{"vda": e}, Timeout: 2 * time.Second, MaxInFlight: 64 << 20})
	good := dial(t, sock, "vda", nbdclient.Config{})
	check := func(what string) {
		t.Helper()
		p := make([]byte, 1<<20)
		if err := good.ReadAt(t.Context(), p, 3<<20); err != nil || !bytes.Equal(p, e.data[3<<20:4<<20]) {
			t.Fatalf("after %s, a good client's read: %v", what, err)
		}
	}

	t.Run("bad client flags", func(t *testing.T) {
		c, _ := net.Dial("unix", sock)
		defer c.Close()
		r := &raw{t, c}
		r.read(18)
		r.write([]byte{0xff, 0xff, 0xff, 0xff})
		if !r.closed() {
			t.Fatal("not closed")
		}
	})
	t.Run("bad option magic", func(t *testing.T) {
		r := rawDial(t, sock)
		r.write(bytes.Repeat([]byte{0xa5}, 64))
		if !r.closed() {
			t.Fatal("not closed")
		}
	})
	t.Run("oversized option", func(t *testing.T) {
		r := rawDial(t, sock)
		b := binary.BigEndian.AppendUint64(nil, magicOpt)
		b = binary.BigEndian.AppendUint32(b, optGo)
		r.write(binary.BigEndian.AppendUint32(b, 0xffffffff)) // 4 GiB: never allocated
		if !r.closed() {
			t.Fatal("not closed")
		}
	})
	t.Run("malformed options", func(t *testing.T) {
		r := rawDial(t, sock)
		for _, o := range [][]byte{
			option(optGo, []byte{0, 0, 0, 200, 'a'}),                            // name longer than the option
			option(optInfo, append(appendString32(nil, "vda"), 0, 9, 0)),        // more info requests than bytes
			option(optSetMetaContext, append(appendString32(nil, "vda"), 0, 0)), // no structured replies yet
			option(optList, []byte("x")),
			option(99, nil),
		} {
			r.write(o)
			if typ, _ := r.optReply(); typ&repFlagError == 0 {
				t.Fatalf("option %x: reply %#x", o[8:12], typ)
			}
		}
		r.write(option(optGo, append(appendString32(nil, "nope"), 0, 0)))
		if typ, _ := r.optReply(); typ != repErrUnknown {
			t.Fatalf("unknown export: %#x", typ)
		}
		r.goExport("vda") // still usable
	})
	t.Run("option flood", func(t *testing.T) {
		r := rawDial(t, sock)
		go func() {
			for range maxOptionsPerConn + 10 {
				if _, err := r.c.Write(option(optStructuredReply, nil)); err != nil {
					return
				}
			}
		}()
		if !r.closed() {
			t.Fatal("not closed")
		}
	})
	t.Run("bad requests", func(t *testing.T) {
		r := rawDial(t, sock)
		r.goExport("vda")
		r.write(req(cmdRead, 1, uint64(e.Size()), 512))     // past the end
		r.write(req(cmdRead, 2, 1<<63, 1<<31))              // overflows
		r.write(req(cmdRead, 3, 0, 64<<20))                 // over the maximum block
		r.write(req(cmdBlockStatus, 4, 0, 4096))            // no meta context
		r.write(req(42, 5, 0, 0))                           // unknown
		r.write(append(req(cmdWrite, 6, 0, 4), 1, 2, 3, 4)) // read-only
		want := map[uint64]uint32{1: errInval, 2: errInval, 3: errOverflow, 4: errInval, 5: errInval, 6: errPerm}
		for range len(want) {
			h := r.read(20)
			if binary.BigEndian.Uint32(h) != magicStructure || binary.BigEndian.Uint16(h[6:]) != replyError {
				t.Fatalf("reply %x", h)
			}
			handle := binary.BigEndian.Uint64(h[8:])
			body := r.read(int(binary.BigEndian.Uint32(h[16:])))
			if got := binary.BigEndian.Uint32(body); got != want[handle] {
				t.Fatalf("request %d: error %d, want %d (%s)", handle, got, want[handle], body[6:])
			}
			delete(want, handle)
		}
		r.write(req(cmdWrite, 7, 0, 64<<20)) // a write payload over the maximum: closed
		if !r.closed() {
			t.Fatal("not closed")
		}
	})
	t.Run("bad request magic", func(t *testing.T) {
		r := rawDial(t, sock)
		r.goExport("vda")
		r.write(bytes.Repeat([]byte{1}, 28))
		if !r.closed() {
			t.Fatal("not closed")
		}
	})
	t.Run("never reads its replies", func(t *testing.T) {
		// 2 GiB of reads asked for, none read: the server stops at its
		// memory bound and its write deadline closes the connection.
		r := rawDial(t, sock)
		r.goExport("vda")
		go func() {
			for i := range 64 {
				if _, err := r.c.Write(req(cmdRead, uint64(i), 0, 32<<20)); err != nil {
					return
				}
			}
		}()
		time.Sleep(500 * time.Millisecond)
		check("a client that does not read") // not stuck behind it
		deadline := time.Now().Add(20 * time.Second)
		for srv.Active() > 1 {
			if time.Now().After(deadline) {
				t.Fatal("the connection that reads nothing was not closed")
			}
			time.Sleep(50 * time.Millisecond)
		}
	})
	t.Run("disconnects mid-reply", func(t *testing.T) {
		for range 20 {
			r := rawDial(t, sock)
			r.goExport("vda")
			r.write(req(cmdRead, 1, 0, 32<<20))
			r.read(1000)
			r.c.Close()
		}
	})
	t.Run("never finishes its handshake", func(t *testing.T) {
		c, _ := net.Dial("unix", sock)
		defer c.Close()
		r := &raw{t, c}
		r.read(18)
		if !r.closed() { // the handshake's deadline
			t.Fatal("not closed")
		}
	})
	check("all of them")
	deadline := time.Now().Add(10 * time.Second)
	for srv.Active() > 1 {
		if time.Now().After(deadline) {
			t.Fatalf("%d clients still active", srv.Active())
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// Clients that ask for 32 MiB reads on many connections and read none of
// the replies hold at most MaxInFlight of the server's memory: the other
// reads wait, unread.
func TestMemoryBound(t *testing.T) {
	e := newMemExport(64<<20, 6)
	sock, _ := serve(t, Options{Exports: map[string]Export{"vda": e}, MaxInFlight: 64 << 20, Timeout: 5 * time.Second})
	for range 8 {
		r := rawDial(t, sock)
		r.goExport("vda")
		for i := range perConn {
			r.write(req(cmdRead, uint64(i), 0, 32<<20))
		}
	}
	for deadline := time.Now().Add(10 * time.Second); e.reads.Load() == 0 && time.Now().Before(deadline); {
		time.Sleep(10 * time.Millisecond)
	}
	time.Sleep(500 * time.Millisecond) // long before the write deadline frees anything
	if n := e.reads.Load(); n < 1 || n > 2 {
		t.Fatalf("%d reads of 32 MiB gathered for replies no one reads, want at most 2 (MaxInFlight 64 MiB)", n)
	}
}

// Clients negotiating TLS-less options on a server that requires TLS get
// NBD_REP_ERR_TLS_REQD (and an NBD_OPT_EXPORT_NAME a closed connection).
func TestTLSRequired(t *testing.T) {
	sock, _ := serve(t, Options{Exports: map[string]Export{"vda": newMemExport(1<<20, 7)}, RequireTLS: true})
	r := rawDial(t, sock)
	r.write(option(optGo, append(appendString32(nil, "vda"), 0, 0)))
	if typ, _ := r.optReply(); typ != repErrTLSReqd {
		t.Fatalf("GO without TLS: %#x", typ)
	}
	r.write(option(optStartTLS, nil))
	if typ, data := r.optReply(); typ != repErrUnsup { // required but not configured: refused, never plain
		t.Fatalf("STARTTLS without a configuration: %#x %s", typ, data)
	}
	r.write(option(optExportName, []byte("vda")))
	if !r.closed() {
		t.Fatal("EXPORT_NAME without TLS: not closed")
	}
}

// zeroExport is a large export of zeroes (no memory).
type zeroExport struct{ size int64 }

func (z zeroExport) Size() int64 { return z.size }
func (z zeroExport) Read(_ context.Context, off, n int64, fn func(int64, []byte, int64) error) error {
	return fn(off, nil, n)
}
func (z zeroExport) Allocation(off, n int64, max int) []Run {
	return []Run{{Length: min(n, z.size-off), Zero: true}}
}
func (z zeroExport) Prefetch(off, n int64) {}

// blockingExport's reads wait until their context ends, and say so.
type blockingExport struct {
	zeroExport
	started, cancelled chan struct{}
}

func (b blockingExport) Read(ctx context.Context, off, n int64, fn func(int64, []byte, int64) error) error {
	b.started <- struct{}{}
	<-ctx.Done()
	b.cancelled <- struct{}{}
	return ctx.Err()
}

// replyHeader reads a structured reply's header: flags, type, handle,
// and its payload.
func (r *raw) reply() (flags, typ uint16, handle uint64, payload []byte) {
	r.t.Helper()
	h := r.read(20)
	if binary.BigEndian.Uint32(h) != magicStructure {
		r.t.Fatalf("reply magic %x", h[:4])
	}
	return binary.BigEndian.Uint16(h[4:]), binary.BigEndian.Uint16(h[6:]), binary.BigEndian.Uint64(h[8:]),
		r.read(int(binary.BigEndian.Uint32(h[16:])))
}

// What the protocol document asks of details: REQ_ONE gets exactly one
// descriptor (even for a run longer than a descriptor holds); DF is only
// advertised with structured replies; unknown command flags are refused;
// a failed SET_META_CONTEXT drops the earlier selection; LIST gives
// context id 0.
func TestProtocolDetails(t *testing.T) {
	sock, _ := serve(t, Options{Exports: map[string]Export{"big": zeroExport{8 << 30}}})

	r := rawDial(t, sock)
	r.write(option(optInfo, append(appendString32(nil, "big"), 0, 0)))
	typ, data := r.optReply()
	if typ != repInfo || binary.BigEndian.Uint16(data) != infoExport || binary.BigEndian.Uint16(data[10:])&tflagSendDF != 0 {
		t.Fatalf("NBD_OPT_INFO without structured replies: %#x %x (DF must be clear)", typ, data)
	}
	for typ != repAck {
		typ, _ = r.optReply()
	}
	meta := binary.BigEndian.AppendUint32(appendString32(nil, "big"), 1)
	meta = appendString32(meta, "base:allocation")
	r.write(option(optListMetaContext, meta))
	if typ, data := r.optReply(); typ != repMetaContext || binary.BigEndian.Uint32(data) != 0 {
		t.Fatalf("LIST_META_CONTEXT: %#x %x, want id 0", typ, data)
	}
	r.optReply()
	r.write(option(optStructuredReply, nil))
	r.optReply()
	r.write(option(optSetMetaContext, meta))
	if typ, data := r.optReply(); typ != repMetaContext || binary.BigEndian.Uint32(data) != contextAllocID {
		t.Fatalf("SET_META_CONTEXT: %#x %x", typ, data)
	}
	r.optReply()
	r.goExport("big")
	b := req(cmdBlockStatus, 1, 0, 0xffffffff)
	binary.BigEndian.PutUint16(b[4:], cmdFlagReqOne)
	r.write(b)
	if _, typ, _, p := r.reply(); typ != replyBlockStatus || len(p) != 4+8 {
		t.Fatalf("REQ_ONE over a run of 4 GiB: type %d, %d bytes, want one descriptor", typ, len(p))
	}
	b = req(cmdCache, 2, 0, 4096)
	binary.BigEndian.PutUint16(b[4:], 1<<9)
	r.write(b)
	if _, typ, _, p := r.reply(); typ != replyError || binary.BigEndian.Uint32(p) != errInval {
		t.Fatalf("CACHE with an unknown flag: type %d %x", typ, p)
	}

	// A failed SET_META_CONTEXT replaces the selection with none.
	r = rawDial(t, sock)
	r.write(option(optStructuredReply, nil))
	r.optReply()
	r.write(option(optSetMetaContext, meta))
	r.optReply()
	r.optReply()
	r.write(option(optSetMetaContext, appendString32(nil, "nope")))
	if typ, _ := r.optReply(); typ&repFlagError == 0 {
		t.Fatalf("SET_META_CONTEXT of a bad request: %#x", typ)
	}
	r.goExport("big")
	r.write(req(cmdBlockStatus, 1, 0, 4096))
	if _, typ, _, _ := r.reply(); typ != replyError {
		t.Fatalf("block status after a failed SET_META_CONTEXT: type %d, want an error", typ)
	}
}

// A client that hangs up with reads in progress has them cancelled (no
// fetch goes on for no one); one more connection than MaxConns is closed
// at once.
func TestHangUpsAndConnectionLimit(t *testing.T) {
	b := blockingExport{zeroExport{1 << 30}, make(chan struct{}, 16), make(chan struct{}, 16)}
	sock, _ := serve(t, Options{Exports: map[string]Export{"vda": b}, MaxConns: 3})
	r := rawDial(t, sock)
	r.goExport("vda")
	r.write(req(cmdRead, 1, 0, 4096))
	<-b.started
	r.c.Close()
	select {
	case <-b.cancelled:
	case <-time.After(10 * time.Second):
		t.Fatal("the read of a client that hung up was not cancelled")
	}

	var open []*raw
	for range 3 {
		open = append(open, rawDial(t, sock))
	}
	c, err := net.Dial("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetReadDeadline(time.Now().Add(10 * time.Second))
	if n, err := c.Read(make([]byte, 18)); err == nil || n != 0 {
		t.Fatalf("a connection over MaxConns: read %d bytes, %v", n, err)
	}
	open[0].c.Close()
	waitForActive := time.Now().Add(10 * time.Second)
	for {
		c, err := net.Dial("unix", sock)
		if err == nil {
			c.SetReadDeadline(time.Now().Add(time.Second))
			n, _ := io.ReadFull(c, make([]byte, 18))
			c.Close()
			if n == 18 {
				break
			}
		}
		if time.Now().After(waitForActive) {
			t.Fatal("no connection accepted after one closed")
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// Clients that ask for many 32 MiB reads and read none of the replies
// (with a write deadline far off) hold their share of the server's
// memory, not all of it: another client's read is answered at once.
func TestSlowReadersDoNotStarveOthers(t *testing.T) {
	e := newMemExport(64<<20, 8)
	sock, _ := serve(t, Options{Exports: map[string]Export{"vda": e}, Timeout: time.Minute})
	for range 3 {
		r := rawDial(t, sock)
		r.goExport("vda")
		for i := range perConn {
			r.write(req(cmdRead, uint64(i), 0, 32<<20))
		}
	}
	time.Sleep(500 * time.Millisecond)
	good := dial(t, sock, "vda", nbdclient.Config{})
	start := time.Now()
	p := make([]byte, 4096)
	if err := good.ReadAt(t.Context(), p, 0); err != nil || !bytes.Equal(p, e.data[:4096]) {
		t.Fatalf("read: %v", err)
	}
	if d := time.Since(start); d > 10*time.Second {
		t.Fatalf("a read waited %s behind clients that read nothing", d)
	}
}

// An accept that fails for want of descriptors (EMFILE: simulated by a
// listener, since exhausting the test process's descriptors would break
// the test itself) is retried; the server goes on.
func TestAcceptErrorsAreRetried(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "s")
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	fl := &failingListener{Listener: l, fails: 3}
	s := New(Options{Exports: map[string]Export{"vda": newMemExport(1<<20, 1)}})
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- s.Serve(ctx, fl) }()
	c := dial(t, sock, "vda", nbdclient.Config{})
	if err := c.ReadAt(t.Context(), make([]byte, 512), 0); err != nil {
		t.Fatal(err)
	}
	c.Close()
	cancel()
	if err := <-done; err != nil {
		t.Fatalf("Serve: %v", err)
	}
}

type failingListener struct {
	net.Listener
	fails int
}

func (f *failingListener) Accept() (net.Conn, error) {
	if f.fails > 0 {
		f.fails--
		return nil, &net.OpError{Op: "accept", Net: "unix", Err: os.NewSyscallError("accept4", syscall.EMFILE)}
	}
	return f.Listener.Accept()
}
