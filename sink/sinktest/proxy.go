package sinktest

import (
	"io"
	"net"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// CountingProxy forwards TCP connections to an address and counts the
// bytes clients send (what an upload puts on the wire); it samples the
// count every 50 ms.
type CountingProxy struct {
	Addr    string
	Sent    atomic.Int64
	mu      sync.Mutex
	samples []sample
}

type sample struct {
	at    time.Time
	bytes int64
}

// NewCountingProxy listens on 127.0.0.1 until the test ends.
func NewCountingProxy(t testing.TB, to string) *CountingProxy {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := &CountingProxy{Addr: l.Addr().String()}
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
					p.Sent.Add(int64(n))
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
				p.samples = append(p.samples, sample{now, p.Sent.Load()})
				p.mu.Unlock()
			}
		}
	}()
	return p
}

// Worst is the most bytes sent over any window of at least d, beyond
// rate x window, and that window.
func (p *CountingProxy) Worst(d time.Duration, rate float64) (excess float64, window time.Duration) {
	return p.WorstBetween(time.Time{}, time.Now(), d, rate)
}

// WorstBetween is Worst over the windows within [from, to].
func (p *CountingProxy) WorstBetween(from, to time.Time, d time.Duration, rate float64) (excess float64, window time.Duration) {
	p.mu.Lock()
	defer p.mu.Unlock()
	excess = -1e18
	for i := range p.samples {
		if p.samples[i].at.Before(from) {
			continue
		}
		for j := i + 1; j < len(p.samples) && !p.samples[j].at.After(to); j++ {
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

// SentBetween is how many bytes were sent between the samples nearest
// from and to.
func (p *CountingProxy) SentBetween(from, to time.Time) int64 {
	p.mu.Lock()
	defer p.mu.Unlock()
	var a, b int64 = -1, 0
	for _, s := range p.samples {
		if a < 0 && !s.at.Before(from) {
			a = s.bytes
		}
		if !s.at.After(to) {
			b = s.bytes
		}
	}
	return b - max(a, 0)
}
