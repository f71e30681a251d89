package sink_test

import (
	"context"
	"fmt"
	"io"
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nbdmover/nbdmover/sink"
	"github.com/nbdmover/nbdmover/sink/sinktest"
)

// countingProxy forwards TCP connections to addr and counts the bytes
// clients send; it samples the count every 50 ms.
type countingProxy struct {
	addr    string
	sent    atomic.Int64
	mu      sync.Mutex
	samples []sample
}

type sample struct {
	at    time.Time
	bytes int64
}

func newCountingProxy(t *testing.T, to string) *countingProxy {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := &countingProxy{addr: l.Addr().String()}
	done := make(chan struct{})
	t.Cleanup(func() { close(done); l.Close() })
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				s, err := net.Dial("tcp", to)
				if err != nil {
					return
				}
				defer s.Close()
				go func() { io.Copy(c, s); c.Close() }()
				buf := make([]byte, 32<<10)
				for {
					n, err := c.Read(buf)
					p.sent.Add(int64(n))
					if n > 0 {
						if _, werr := s.Write(buf[:n]); werr != nil {
							return
						}
					}
					if err != nil {
						return
					}
				}
			}()
		}
	}()
	go func() {
		tk := time.NewTicker(50 * time.Millisecond)
		defer tk.Stop()
		for {
			select {
			case <-done:
				return
			case now := <-tk.C:
				p.mu.Lock()
				p.samples = append(p.samples, sample{now, p.sent.Load()})
				p.mu.Unlock()
			}
		}
	}()
	return p
}

// worst is the most bytes sent over any window of at least d, beyond
// rate x window.
func (p *countingProxy) worst(d time.Duration, rate float64) (excess float64, window time.Duration) {
	p.mu.Lock()
	defer p.mu.Unlock()
	excess = -1e18
	for i := range p.samples {
		for j := i + 1; j < len(p.samples); j++ {
			w := p.samples[j].at.Sub(p.samples[i].at)
			if w < d {
				continue
			}
			if e := float64(p.samples[j].bytes-p.samples[i].bytes) - rate*w.Seconds(); e > excess {
				excess, window = e, w
			}
		}
	}
	return excess, window
}

// Uploads to MinIO with --limit-upload, counted on the wire by a proxy in
// front of it: over any window of a second or more, no more than the rate
// allows plus one object and the requests' headers, with eight uploads at
// once. The limit only bounds: a slow machine cannot fail this test.
func TestThrottleUploadToMinIO(t *testing.T) {
	direct := sinktest.NewS3(t, "")
	ep := sinktest.S3Endpoint(t)
	proxy := newCountingProxy(t, strings.TrimPrefix(ep, "http://"))
	const rate, object, objects = 2 << 20, 256 << 10, 24
	bucket, _, _ := strings.Cut(strings.TrimPrefix(direct.Location(), "s3://"), "/")
	s, err := sink.Open("s3://"+bucket+"/t", sink.Options{S3Endpoint: "http://" + proxy.addr, Upload: sink.NewRate(rate)})
	if err != nil {
		t.Fatal(err)
	}
	data := make([]byte, object)
	for i := range data {
		data[i] = byte(i * 7)
	}
	start := time.Now()
	var wg sync.WaitGroup
	errs := make(chan error, objects)
	for w := range 8 {
		wg.Go(func() {
			for i := w; i < objects; i += 8 {
				if err := s.Put(t.Context(), fmt.Sprintf("o%02d", i), data); err != nil {
					errs <- err
				}
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	took := time.Since(start)
	time.Sleep(100 * time.Millisecond) // a last sample
	total := proxy.sent.Load()
	excess, window := proxy.worst(time.Second, rate)
	headers := float64(objects) * 2048 // each request's HTTP headers, at most
	t.Logf("%d objects of %d bytes in %v: %d bytes on the wire (%.2f MiB/s); worst window %v: %.0f bytes over the rate",
		objects, object, took.Round(time.Millisecond), total, float64(total)/took.Seconds()/(1<<20), window.Round(time.Millisecond), excess)
	if excess > object+headers {
		t.Errorf("over %v, %.0f bytes more than %d bytes/s allows (one object is %d)", window, excess, rate, object)
	}
	if min := time.Duration(float64(objects*object-object) / rate * float64(time.Second)); took < min {
		t.Errorf("%d bytes at %d bytes/s in %v: faster than the limit allows (%v)", objects*object, rate, took, min)
	}
}

// Reads from a local store with a download limit take at least what the
// limit allows.
func TestThrottleDownloadLocal(t *testing.T) {
	base, err := sink.NewLocal(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	const rate, object, objects = 4 << 20, 512 << 10, 16
	data := make([]byte, object)
	for i := range objects {
		if err := base.Put(t.Context(), fmt.Sprintf("o%02d", i), data); err != nil {
			t.Fatal(err)
		}
	}
	s := sink.Throttle(base, nil, sink.NewRate(rate))
	start := time.Now()
	var wg sync.WaitGroup
	for w := range 4 {
		wg.Go(func() {
			for i := w; i < objects; i += 4 {
				if _, err := s.Get(t.Context(), fmt.Sprintf("o%02d", i), nil, 1<<20); err != nil {
					t.Error(err)
				}
			}
		})
	}
	wg.Wait()
	took := time.Since(start)
	// The first read goes before any size is known; every byte after it
	// waits its turn.
	if min := time.Duration(float64(objects*object-object) / rate * float64(time.Second)); took < min {
		t.Errorf("%d bytes read at %d bytes/s in %v: faster than the limit allows (%v)", objects*object, rate, took, min)
	}
}

// A local store's chunks are put deferred (sink.PutDeferred): paced as
// any put. A lock's heartbeat is not: it never queues behind the chunks.
// A cancelled wait gives its time back.
func TestThrottleLocalUploads(t *testing.T) {
	const rate, object, objects = 2 << 20, 256 << 10, 16
	s, err := sink.Open(t.TempDir(), sink.Options{Upload: sink.NewRate(rate)})
	if err != nil {
		t.Fatal(err)
	}
	data := make([]byte, object)
	start := time.Now()
	var wg sync.WaitGroup
	for w := range 4 {
		wg.Go(func() {
			for i := w; i < objects; i += 4 {
				if err := sink.PutDeferred(t.Context(), s, fmt.Sprintf("chunks/o%02d", i), data); err != nil {
					t.Error(err)
				}
			}
		})
	}
	time.Sleep(200 * time.Millisecond) // the puts have queued up a second and more
	hb := time.Now()
	if err := s.Put(t.Context(), "locks/shared-test", []byte("heartbeat")); err != nil {
		t.Fatal(err)
	}
	heartbeat := time.Since(hb)
	wg.Wait()
	took := time.Since(start)
	if min := time.Duration(float64(objects*object-object) / rate * float64(time.Second)); took < min {
		t.Errorf("%d bytes put deferred at %d bytes/s in %v: faster than the limit allows (%v)", objects*object, rate, took, min)
	}
	if heartbeat > time.Second {
		t.Errorf("a lock's put waited %v behind the chunks", heartbeat)
	}

	// Cancelled waits give their time back: a put after them does not
	// wait for bytes that never went.
	r := sink.NewRate(64 << 10)
	ctx, cancel := context.WithCancel(t.Context())
	cancel()
	for range 8 {
		if err := r.Wait(ctx, 1<<20); err == nil {
			t.Fatal("a wait on a cancelled context went")
		}
	}
	w := time.Now()
	if err := r.Wait(t.Context(), 1024); err != nil || time.Since(w) > 2*time.Second {
		t.Errorf("a 1 KiB wait after cancelled ones took %v (%v)", time.Since(w), err)
	}
}
