package sink_test

import (
	"bytes"
	"context"
	"errors"
	"net"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/nbdmover/nbdmover/sink"
	"github.com/nbdmover/nbdmover/sink/sinktest"
	"golang.org/x/sync/errgroup"
)

func newLocal(t *testing.T) sink.Store {
	s, err := sink.NewLocal(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func TestLocalConformance(t *testing.T) { sinktest.TestStore(t, newLocal) }

func TestS3Conformance(t *testing.T) {
	sinktest.TestStore(t, func(t *testing.T) sink.Store { return sinktest.NewS3(t, "") })
}

func TestS3PrefixConformance(t *testing.T) {
	sinktest.TestStore(t, func(t *testing.T) sink.Store { return sinktest.NewS3(t, "site-a/repo/") })
}

func TestWrappedConformance(t *testing.T) {
	sinktest.TestStore(t, func(t *testing.T) sink.Store {
		return sink.Retry(sink.Limit(newLocal(t), 4), sink.DefaultRetry)
	})
}

func TestLocalHidesCrashLeftovers(t *testing.T) {
	dir := t.TempDir()
	s, _ := sink.NewLocal(dir)
	if err := s.Put(t.Context(), "chunks/ab/good", []byte("x")); err != nil {
		t.Fatal(err)
	}
	// What a crash between CreateTemp and rename leaves behind.
	os.WriteFile(filepath.Join(dir, "chunks/ab/.tmp-123456"), []byte("partial"), 0o600)
	var keys []string
	s.List(t.Context(), "", func(o sink.ObjectInfo) error { keys = append(keys, o.Key); return nil })
	if strings.Join(keys, ",") != "chunks/ab/good" {
		t.Fatalf("listed %v", keys)
	}
	if _, err := s.Get(t.Context(), "chunks/ab/.tmp-123456", nil, 1<<30); err == nil {
		t.Fatal("a temporary file is readable as an object")
	}
	// RemoveTemp (through the wrappers Open adds) removes leftovers older
	// than the age it is given, never younger ones (writes in progress).
	wrapped, _ := sink.Open(dir, sink.Options{})
	old := filepath.Join(dir, "chunks/ab/.tmp-123456")
	if n, err := sink.RemoveTemp(t.Context(), wrapped, time.Hour); err != nil || n != 0 {
		t.Fatalf("removed %d fresh temporary files: %v", n, err)
	}
	os.Chtimes(old, time.Now().Add(-2*time.Hour), time.Now().Add(-2*time.Hour))
	if n, err := sink.RemoveTemp(t.Context(), wrapped, time.Hour); err != nil || n != 1 {
		t.Fatalf("removed %d old temporary files: %v", n, err)
	}
	if _, err := os.Stat(old); err == nil {
		t.Fatal("the old temporary file is still there")
	}
}

func TestLocalFullDisk(t *testing.T) {
	dir := t.TempDir()
	if out, err := exec.Command("mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", dir).CombinedOutput(); err != nil {
		t.Skipf("cannot mount a small tmpfs here (needs root): %v %s", err, out)
	}
	defer exec.Command("umount", dir).Run()
	s, _ := sink.NewLocal(dir)
	ctx := t.Context()
	if err := s.Put(ctx, "backups/vm/manifest.json", []byte("old")); err != nil {
		t.Fatal(err)
	}
	err := s.Put(ctx, "backups/vm/manifest.json", make([]byte, 2<<20))
	if err == nil || !strings.Contains(err.Error(), "no space left on device") ||
		!strings.Contains(err.Error(), "backups/vm/manifest.json") || sink.IsTransient(err) {
		t.Fatalf("got %v, want a permanent ENOSPC error naming the key", err)
	}
	t.Log(err)
	if got, _ := s.Get(ctx, "backups/vm/manifest.json", nil, 1<<30); string(got) != "old" {
		t.Fatalf("the old object was damaged: %q", got)
	}
	ents, _ := os.ReadDir(filepath.Join(dir, "backups/vm"))
	if len(ents) != 1 {
		t.Fatalf("a failed put left %d files", len(ents))
	}
}

func TestS3Errors(t *testing.T) {
	ep := sinktest.S3Endpoint(t)
	good := sinktest.NewS3(t, "")
	bucket := strings.TrimPrefix(strings.Fields(good.Location())[0], "s3://")
	bucket = strings.TrimSuffix(bucket, "/")
	secret := os.Getenv("AWS_SECRET_ACCESS_KEY")
	ctx := t.Context()

	t.Run("wrong credentials", func(t *testing.T) {
		s, _ := sink.NewS3(sink.S3Options{Endpoint: ep, Bucket: bucket, AccessKey: os.Getenv("AWS_ACCESS_KEY_ID"), SecretKey: "wrong-secret-1234"})
		err := s.Put(ctx, "config", []byte("x"))
		t.Log(err)
		if err == nil || sink.IsTransient(err) || !strings.Contains(err.Error(), "AWS_SECRET_ACCESS_KEY") ||
			!strings.Contains(err.Error(), bucket) || !strings.Contains(err.Error(), ep) {
			t.Fatalf("got %v, want a permanent error naming the endpoint and bucket", err)
		}
		if strings.Contains(err.Error(), "wrong-secret-1234") || (secret != "" && strings.Contains(err.Error(), secret)) {
			t.Fatal("the error contains a secret")
		}
	})
	t.Run("missing bucket", func(t *testing.T) {
		s, _ := sink.NewS3(sink.S3Options{Endpoint: ep, Bucket: "no-such-bucket-nbdmover"})
		err := s.Put(ctx, "config", []byte("x"))
		t.Log(err)
		if err == nil || sink.IsTransient(err) || !strings.Contains(err.Error(), "no-such-bucket-nbdmover") || !errors.Is(err, sink.ErrNoBucket) {
			t.Fatalf("got %v", err)
		}
	})
	t.Run("unreachable", func(t *testing.T) {
		l, _ := net.Listen("tcp", "127.0.0.1:0")
		addr := l.Addr().String()
		l.Close() // nothing listens there now
		s, _ := sink.NewS3(sink.S3Options{Endpoint: "http://" + addr, Bucket: "bkt"})
		err := s.Put(ctx, "config", []byte("x"))
		if !sink.IsTransient(err) {
			t.Fatalf("connection refused should be transient: %v", err)
		}
		r := sink.Retry(s, sink.RetryPolicy{Attempts: 3, Base: time.Millisecond, Cap: time.Millisecond})
		err = r.Put(ctx, "config", []byte("x"))
		t.Log(err)
		if err == nil || !strings.Contains(err.Error(), "gave up after 3 attempts") || !strings.Contains(err.Error(), addr) {
			t.Fatalf("got %v", err)
		}
	})
	t.Run("credentials in the endpoint URL", func(t *testing.T) {
		_, err := sink.NewS3(sink.S3Options{Endpoint: "http://user:hunter2@127.0.0.1:9000", Bucket: "b"})
		if err == nil || strings.Contains(err.Error(), "hunter2") {
			t.Fatalf("got %v", err)
		}
	})
}

func TestRetry(t *testing.T) {
	var slept []time.Duration
	var mu sync.Mutex
	policy := sink.RetryPolicy{Attempts: 4, Base: 100 * time.Millisecond, Cap: 300 * time.Millisecond,
		Sleep: func(ctx context.Context, d time.Duration) error {
			mu.Lock()
			slept = append(slept, d)
			mu.Unlock()
			return ctx.Err()
		}}
	ctx := t.Context()

	t.Run("transient then success", func(t *testing.T) {
		slept = nil
		f := &sinktest.Faulty{Store: newLocal(t), Fail: func(op, key string, n int) error {
			if n <= 3 {
				return sinktest.Transient(op, key)
			}
			return nil
		}}
		if err := sink.Retry(f, policy).Put(ctx, "k", []byte("v")); err != nil {
			t.Fatal(err)
		}
		if f.Calls("put", "k") != 4 || len(slept) != 3 {
			t.Fatalf("%d calls, %d sleeps", f.Calls("put", "k"), len(slept))
		}
		for i, d := range slept {
			want := min(300*time.Millisecond, 100*time.Millisecond<<i)
			if d < want/2 || d > want {
				t.Errorf("backoff %d = %v, want within [%v, %v]", i, d, want/2, want)
			}
		}
	})
	t.Run("gives up", func(t *testing.T) {
		f := &sinktest.Faulty{Store: newLocal(t), Fail: func(op, key string, n int) error { return sinktest.Transient(op, key) }}
		err := sink.Retry(f, policy).Put(ctx, "k", []byte("v"))
		if !sink.IsTransient(err) || !strings.Contains(err.Error(), "after 4 attempts") || f.Calls("put", "k") != 4 {
			t.Fatalf("%v after %d calls", err, f.Calls("put", "k"))
		}
	})
	t.Run("permanent fails fast", func(t *testing.T) {
		f := &sinktest.Faulty{Store: newLocal(t), Fail: func(op, key string, n int) error { return sinktest.Permanent(op, key) }}
		if err := sink.Retry(f, policy).Put(ctx, "k", []byte("v")); err == nil || f.Calls("put", "k") != 1 {
			t.Fatalf("%v after %d calls", err, f.Calls("put", "k"))
		}
	})
	t.Run("not found is final", func(t *testing.T) {
		f := &sinktest.Faulty{Store: newLocal(t)}
		if _, err := sink.Retry(f, policy).Get(ctx, "k", nil, 1<<30); !errors.Is(err, sink.ErrNotFound) || f.Calls("get", "k") != 1 {
			t.Fatalf("%v after %d calls", err, f.Calls("get", "k"))
		}
	})
	t.Run("cancel during backoff", func(t *testing.T) {
		f := &sinktest.Faulty{Store: newLocal(t), Fail: func(op, key string, n int) error { return sinktest.Transient(op, key) }}
		cctx, cancel := context.WithCancel(ctx)
		go func() { time.Sleep(100 * time.Millisecond); cancel() }()
		start := time.Now()
		err := sink.Retry(f, sink.RetryPolicy{Attempts: 100, Base: time.Hour, Cap: time.Hour}).Put(cctx, "k", nil)
		if err == nil || time.Since(start) > 10*time.Second {
			t.Fatalf("%v after %v", err, time.Since(start))
		}
	})
	t.Run("list retried only before the first object", func(t *testing.T) {
		base := newLocal(t)
		base.Put(ctx, "a/1", nil)
		f := &sinktest.Faulty{Store: base, Fail: func(op, key string, n int) error {
			if n == 1 {
				return sinktest.Transient(op, key)
			}
			return nil
		}}
		n := 0
		if err := sink.Retry(f, policy).List(ctx, "a/", func(sink.ObjectInfo) error { n++; return nil }); err != nil || n != 1 {
			t.Fatalf("%v, %d objects", err, n)
		}
	})
}

func TestLimit(t *testing.T) {
	var inFlight, peak atomic.Int32
	f := &sinktest.Faulty{Store: newLocal(t), Fail: func(op, key string, n int) error {
		v := inFlight.Add(1)
		for {
			p := peak.Load()
			if v <= p || peak.CompareAndSwap(p, v) {
				break
			}
		}
		time.Sleep(30 * time.Millisecond)
		inFlight.Add(-1)
		return nil
	}}
	s := sink.Limit(f, 3)
	g, ctx := errgroup.WithContext(t.Context())
	for i := range 12 {
		g.Go(func() error { return s.Put(ctx, "k"+string(rune('a'+i)), []byte("x")) })
	}
	if err := g.Wait(); err != nil {
		t.Fatal(err)
	}
	if peak.Load() != 3 {
		t.Fatalf("peak concurrency %d, want 3", peak.Load())
	}
}

func TestOpen(t *testing.T) {
	dir := t.TempDir()
	for _, tt := range []struct {
		loc, endpoint, want string // want: substring of Location, or "error"
	}{
		{dir, "", dir},
		{"file://" + dir, "", dir},
		{"file://host/x", "", "error"},
		{"s3://bucket/pre/fix", "http://127.0.0.1:9", "s3://bucket/pre/fix/ at http://127.0.0.1:9"},
		{"s3://bucket", "", "error"},
		{"s3://", "http://127.0.0.1:9", "error"},
		{"s3://b/../x", "http://127.0.0.1:9", "error"},
		{"http://x/y", "", "error"},
		{"null:", "", "null:"},
	} {
		s, err := sink.Open(tt.loc, sink.Options{S3Endpoint: tt.endpoint})
		switch {
		case tt.want == "error" && err == nil:
			t.Errorf("%q: accepted as %s", tt.loc, s.Location())
		case tt.want != "error" && (err != nil || !strings.Contains(s.Location(), tt.want)):
			t.Errorf("%q: %v %v", tt.loc, s, err)
		}
	}
}

func TestNull(t *testing.T) {
	n := sink.NewNull()
	ctx := t.Context()
	n.Put(ctx, "chunks/ab/x", make([]byte, 100))
	n.Put(ctx, "config", []byte("c"))
	if _, err := n.Get(ctx, "chunks/ab/x", nil, 1<<30); !errors.Is(err, sink.ErrNotFound) || n.Discarded.Load() != 100 {
		t.Fatal("chunks must be discarded and counted")
	}
	if got, _ := n.Get(ctx, "config", nil, 1<<30); !bytes.Equal(got, []byte("c")) {
		t.Fatal("metadata must be kept")
	}
	// Create refuses a key that is taken; Put replaces it.
	if err := n.Create(ctx, "config", []byte("d")); !errors.Is(err, sink.ErrExists) {
		t.Fatalf("create over existing metadata: %v", err)
	}
	if err := n.Create(ctx, "manifests/x", []byte("m")); err != nil {
		t.Fatalf("create: %v", err)
	}
	n.Put(ctx, "config", []byte("e"))
	if got, _ := n.Get(ctx, "config", nil, 1<<30); !bytes.Equal(got, []byte("e")) {
		t.Fatalf("put did not replace: %q", got)
	}
}

// TestLocalDeferredPuts checks, in the system calls of a real run under
// strace, what PutDeferred and Sync promise: each object's data is synced
// before its name appears; its directory is not synced per object but
// once by Sync; a plain Put still syncs its directory before it returns.
// renameArg is a directory descriptor and a name in strace -y's output.
var renameArg = regexp.MustCompile(`\d+<([^>]+)>, "([^"]+)"`)

func TestLocalDeferredPuts(t *testing.T) {
	if dir := os.Getenv("NBDMOVER_TEST_DEFERRED_DIR"); dir != "" {
		deferredPuts(t, dir)
		return
	}
	strace, err := exec.LookPath("strace")
	if err != nil {
		if sinktest.RequirePeers() {
			t.Fatal("strace is missing (scripts/install-deps.sh installs it)")
		}
		t.Skip("strace is missing")
	}
	dir, _ := filepath.EvalSymlinks(t.TempDir())
	trace := filepath.Join(t.TempDir(), "trace")
	cmd := exec.Command(strace, "-f", "-qq", "-y", "-o", trace, "-e", "trace=fsync,fdatasync,rename,renameat,renameat2,faccessat,faccessat2",
		os.Args[0], "-test.run", "^TestLocalDeferredPuts$")
	cmd.Env = append(os.Environ(), "NBDMOVER_TEST_DEFERRED_DIR="+dir)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("%v: %s", err, out)
	}
	b, err := os.ReadFile(trace)
	if err != nil {
		t.Fatal(err)
	}
	synced := map[string]bool{} // files and directories fsynced so far
	dirSyncs := map[string][]string{}
	phase := "puts"
	renames := 0
	for _, line := range strings.Split(string(b), "\n") {
		switch {
		case strings.Contains(line, "/marker-sync"):
			phase = "sync"
		case strings.Contains(line, "/marker-done"):
			phase = "done"
		case strings.Contains(line, "fsync(") && strings.Contains(line, "<"): // "= 0", or "<unfinished ...>" while another thread's call prints
			path := line[strings.Index(line, "<")+1 : strings.Index(line, ">")]
			synced[path] = true
			dirSyncs[path] = append(dirSyncs[path], phase)
		case strings.Contains(line, "rename") && strings.Contains(line, dir):
			// renameat(5</dir/chunks/0a>, ".tmp-…", 5</dir/chunks/0a>, "name")
			var paths []string
			for _, m := range renameArg.FindAllStringSubmatch(line, -1) {
				paths = append(paths, m[1]+"/"+m[2])
			}
			if len(paths) != 2 {
				t.Fatalf("cannot read %q", line)
			}
			if !synced[paths[0]] {
				t.Errorf("%s was renamed into place before its data was synced", paths[1])
			}
			renames++
		}
	}
	if renames != 42 {
		t.Fatalf("saw %d renames, want 42:\n%s", renames, b)
	}
	for _, d := range []string{"chunks/0a", "chunks/0b", "indexes/cd", "chunks/0c"} {
		if got := strings.Join(dirSyncs[filepath.Join(dir, d)], ","); got != "sync" {
			t.Errorf("directory %s synced in phases [%s], want once, in Sync", d, got)
		}
	}
	if got := strings.Join(dirSyncs[filepath.Join(dir, "manifests/vm")], ","); got != "puts" {
		t.Errorf("a Put's directory synced in phases [%s], want once, by the Put", got)
	}
}

// deferredPuts is TestLocalDeferredPuts's traced child: 40 deferred puts
// into three directories, one Put, one deferred put by another store
// instance that this one relies on (SyncLater), then Sync between two
// markers.
func deferredPuts(t *testing.T, dir string) {
	s, err := sink.Open(dir, sink.Options{})
	if err != nil {
		t.Fatal(err)
	}
	ctx := t.Context()
	for i := range 40 {
		key := []string{"chunks/0a/", "chunks/0b/", "indexes/cd/"}[i%3] + strings.Repeat("x", i+1)
		if err := sink.PutDeferred(ctx, s, key, []byte(key)); err != nil {
			t.Fatal(err)
		}
		if got, err := s.Get(ctx, key, nil, 1<<30); err != nil || string(got) != key {
			t.Fatalf("a deferred put reads back as %q, %v", got, err)
		}
	}
	if err := s.Put(ctx, "manifests/vm/m", []byte("m")); err != nil {
		t.Fatal(err)
	}
	// An object another writer put deferred, which this one relies on.
	other, _ := sink.NewLocal(dir)
	if err := other.PutDeferred(ctx, "chunks/0c/theirs", []byte("theirs")); err != nil {
		t.Fatal(err)
	}
	sink.SyncLater(s, "chunks/0c/theirs")
	syscall.Access(filepath.Join(dir, "marker-sync"), 0)
	if err := sink.Sync(ctx, s); err != nil {
		t.Fatal(err)
	}
	syscall.Access(filepath.Join(dir, "marker-done"), 0)
	if err := sink.Sync(ctx, s); err != nil { // nothing left: no more syncs
		t.Fatal(err)
	}
}

// TestLocalDeferredSyncFails: a directory that cannot be synced fails Sync
// with its key prefix named, and a later Sync tries it again; a directory
// that is gone fails once.
func TestLocalDeferredSyncFails(t *testing.T) {
	dir := t.TempDir()
	s, _ := sink.NewLocal(dir)
	ctx := t.Context()
	for _, key := range []string{"chunks/ab/x", "chunks/cd/y"} {
		if err := s.PutDeferred(ctx, key, []byte("x")); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.RemoveAll(filepath.Join(dir, "chunks/cd")); err != nil {
		t.Fatal(err)
	}
	err := s.Sync(ctx)
	if err == nil || !strings.Contains(err.Error(), "chunks/cd/") {
		t.Fatalf("Sync with a directory gone: %v", err)
	}
	if err := s.Sync(ctx); err != nil {
		t.Fatalf("a gone directory failed the next Sync too: %v", err)
	}
	// A Sync that does not get to a directory (cancelled) leaves it for the
	// next one: it fails again while cancelled, and then passes.
	if err := s.PutDeferred(ctx, "chunks/ef/z", []byte("z")); err != nil {
		t.Fatal(err)
	}
	cancelled, cancel := context.WithCancel(ctx)
	cancel()
	for range 2 {
		if err := s.Sync(cancelled); err == nil {
			t.Fatal("a cancelled Sync with a directory to sync passed")
		}
	}
	if err := s.Sync(ctx); err != nil {
		t.Fatal(err)
	}
	if err := s.Sync(cancelled); err != nil {
		t.Fatalf("a Sync with nothing left failed: %v", err)
	}
	// A directory that may not be opened fails every Sync until it can be
	// (not as root, who opens every directory).
	if os.Geteuid() == 0 {
		return
	}
	if err := s.PutDeferred(ctx, "chunks/ef/w", []byte("w")); err != nil {
		t.Fatal(err)
	}
	os.Chmod(filepath.Join(dir, "chunks/ef"), 0o300)
	defer os.Chmod(filepath.Join(dir, "chunks/ef"), 0o700)
	for range 2 {
		if err := s.Sync(ctx); err == nil {
			t.Fatal("Sync of an unreadable directory passed")
		}
	}
	os.Chmod(filepath.Join(dir, "chunks/ef"), 0o700)
	if err := s.Sync(ctx); err != nil {
		t.Fatal(err)
	}
}

// An S3 read is one GET whose Content-Length gives the size; an answer
// without one (a chunked answer: some S3-compatible servers and proxies
// send them) is read up to the bound, not taken for a damaged object.
// MinIO always sends a length: a proxy in front of it drops it.
func TestS3ChunkedAnswers(t *testing.T) {
	ep := sinktest.S3Endpoint(t)
	direct := sinktest.NewS3(t, "")
	bucket := strings.TrimSuffix(strings.TrimPrefix(strings.Fields(direct.Location())[0], "s3://"), "/")
	target, err := url.Parse(ep)
	if err != nil {
		t.Fatal(err)
	}
	rp := httputil.NewSingleHostReverseProxy(target)
	rp.ModifyResponse = func(r *http.Response) error {
		if r.Request.Method == http.MethodGet {
			r.Header.Del("Content-Length")
			r.ContentLength = -1
		}
		return nil
	}
	srv := httptest.NewServer(rp)
	t.Cleanup(srv.Close)
	s, err := sink.NewS3(sink.S3Options{Endpoint: srv.URL, Bucket: bucket})
	if err != nil {
		t.Fatal(err)
	}
	ctx := t.Context()
	data := bytes.Repeat([]byte("chunked "), 5000)
	if err := direct.Put(ctx, "chunks/ab/x", data); err != nil {
		t.Fatal(err)
	}
	if got, err := s.Get(ctx, "chunks/ab/x", nil, int64(len(data))); err != nil || !bytes.Equal(got, data) {
		t.Fatalf("a chunked answer at the bound: %d bytes, %v", len(got), err)
	}
	if _, err := s.Get(ctx, "chunks/ab/x", nil, int64(len(data))-1); !errors.Is(err, sink.ErrDamaged) {
		t.Fatalf("a chunked answer past the bound: %v", err)
	}
	if _, err := s.Get(ctx, "chunks/ab/none", nil, 100); !errors.Is(err, sink.ErrNotFound) {
		t.Fatalf("a missing object through the proxy: %v", err)
	}
}

// A local store made where its parents do not exist makes them 0711 and
// itself 0700: a parent such as /var/lib/nbdmover (the default
// repository's) also holds the backups' scratch directories, which QEMU
// must traverse; made 0700, every backup of a domain failed opening its
// scratch image.
func TestLocalParentModes(t *testing.T) {
	base := t.TempDir()
	root := filepath.Join(base, "state", "repo")
	s, err := sink.NewLocal(root)
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Put(t.Context(), "config", []byte("x")); err != nil {
		t.Fatal(err)
	}
	for dir, want := range map[string]os.FileMode{filepath.Join(base, "state"): 0o711, root: 0o700} {
		st, err := os.Stat(dir)
		if err != nil || st.Mode().Perm() != want {
			t.Errorf("%s: %v, want %v (%v)", dir, st.Mode().Perm(), want, err)
		}
	}
}
