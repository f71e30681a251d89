package sink_test

import (
	"context"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nbdmover/nbdmover/sink"
	"github.com/nbdmover/nbdmover/sink/sinktest"
)

// Uploads to MinIO with --limit-upload, counted on the wire by a proxy in
// front of it: over any window of a second or more, no more than the rate
// allows plus one object and the requests' headers, with eight uploads at
// once. The limit only bounds: a slow machine cannot fail this test.
func TestThrottleUploadToMinIO(t *testing.T) {
	direct := sinktest.NewS3(t, "")
	ep := sinktest.S3Endpoint(t)
	proxy := sinktest.NewCountingProxy(t, strings.TrimPrefix(ep, "http://"))
	const rate, object, objects = 2 << 20, 256 << 10, 24
	bucket, _, _ := strings.Cut(strings.TrimPrefix(direct.Location(), "s3://"), "/")
	s, err := sink.Open("s3://"+bucket+"/t", sink.Options{S3Endpoint: "http://" + proxy.Addr, Upload: sink.NewRate(rate)})
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
	total := proxy.Sent.Load()
	excess, window := proxy.Worst(time.Second, rate)
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
