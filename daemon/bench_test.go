package daemon_test

import (
	"fmt"
	"io"
	"path/filepath"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nbdmover/nbdmover/daemon"
	"github.com/nbdmover/nbdmover/repo"
)

// BenchmarkDaemonStatusLoad runs the same full backup through the daemon
// with and without a client asking for the job's status 200 times a
// second, alternating, and reports the median wall time of each and their
// ratio (goal: the load slows the backup by at most 5%).
//
//	go test -run '^$' -bench DaemonStatusLoad -benchtime 5x ./daemon
func BenchmarkDaemonStatusLoad(b *testing.B) {
	dom := slowDomain(b)
	d := startDaemon(b, repo.Options{Location: filepath.Join(b.TempDir(), "repo")}, 1)
	run := func(load bool) (time.Duration, int64) {
		start := time.Now()
		id, code, msg := d.submit(fmt.Sprintf(`{"domain": %q, "mode": "full"%s}`, dom.Name, slowJob))
		if code != 202 {
			b.Fatalf("submit: %d %s", code, msg)
		}
		var requests atomic.Int64
		stop := make(chan struct{})
		done := make(chan struct{})
		if load {
			go func() {
				defer close(done)
				tick := time.NewTicker(5 * time.Millisecond) // 200/s, each request on its own
				defer tick.Stop()
				var wg sync.WaitGroup
				defer wg.Wait()
				for {
					select {
					case <-stop:
						return
					case <-tick.C:
						wg.Add(1)
						go func() {
							defer wg.Done()
							resp, err := d.client.Get(d.base + "/v1/jobs/" + id)
							if err == nil {
								io.Copy(io.Discard, resp.Body)
								resp.Body.Close()
								if resp.StatusCode == 200 {
									requests.Add(1)
								}
							}
						}()
					}
				}
			}()
		} else {
			close(done)
		}
		v := d.wait(id, daemon.JobSucceeded, daemon.JobFailed)
		close(stop)
		<-done
		if v.State != daemon.JobSucceeded {
			b.Fatalf("job: %+v", v)
		}
		return time.Since(start), requests.Load()
	}
	var quiet, loaded []time.Duration
	var reqs int64
	for b.Loop() {
		q, _ := run(false)
		l, n := run(true)
		quiet, loaded = append(quiet, q), append(loaded, l)
		reqs += n
		fmt.Printf("quiet %v, under load %v (%d status requests, %.0f/s)\n", q, l, n, float64(n)/l.Seconds())
	}
	slices.Sort(quiet)
	slices.Sort(loaded)
	mq, ml := quiet[len(quiet)/2], loaded[len(loaded)/2]
	b.ReportMetric(mq.Seconds(), "quiet-s")
	b.ReportMetric(ml.Seconds(), "loaded-s")
	b.ReportMetric(ml.Seconds()/mq.Seconds(), "ratio")
	fmt.Printf("ratio: status load 200/s: median %.2fs under load vs %.2fs quiet = %.3fx (%d runs each, %d status requests)\n",
		ml.Seconds(), mq.Seconds(), ml.Seconds()/mq.Seconds(), len(quiet), reqs)
}
