// Command wanproxy is a TCP proxy on 127.0.0.1 that makes a local server
// look like one across a WAN: every byte is delayed by half the round trip
// in each direction, and each direction is one link of a bandwidth shared
// by every connection (bench/run.sh puts it in front of MinIO).
//
//	go run ./bench/wanproxy -listen 127.0.0.1:0 -to 127.0.0.1:9000 -rtt 50ms -rate 1000 [-ready FILE]
//
// It prints (and writes to -ready) the address it listens on, and runs
// until killed.
package main

import (
	"flag"
	"fmt"
	"log"
	"net"
	"os"
	"sync"
	"time"
)

func main() {
	listen := flag.String("listen", "127.0.0.1:0", "address to listen on")
	to := flag.String("to", "", "address to forward to")
	rtt := flag.Duration("rtt", 50*time.Millisecond, "round trip time to add")
	rate := flag.Float64("rate", 1000, "bandwidth of each direction, shared by the connections, Mbit/s")
	ready := flag.String("ready", "", "file to write the listening address to")
	flag.Parse()
	if *to == "" {
		log.Fatal("wanproxy: -to is required")
	}
	ln, err := net.Listen("tcp", *listen)
	if err != nil {
		log.Fatal(err)
	}
	addr := ln.Addr().String()
	fmt.Println(addr)
	if *ready != "" {
		if err := os.WriteFile(*ready, []byte(addr+"\n"), 0o644); err != nil {
			log.Fatal(err)
		}
	}
	up := &link{delay: *rtt / 2, bytesPerSec: *rate * 1e6 / 8}
	down := &link{delay: *rtt / 2, bytesPerSec: *rate * 1e6 / 8}
	for {
		c, err := ln.Accept()
		if err != nil {
			log.Fatal(err)
		}
		go serve(c, *to, up, down)
	}
}

// link is one direction: its delay, and its bandwidth, which the
// connections share.
type link struct {
	delay       time.Duration
	bytesPerSec float64
	mu          sync.Mutex
	free        time.Time // when the link is free to send the next byte
}

// send books n bytes on the link and returns when their last byte has
// left.
func (l *link) send(n int) time.Time {
	l.mu.Lock()
	defer l.mu.Unlock()
	if now := time.Now(); l.free.Before(now) {
		l.free = now
	}
	l.free = l.free.Add(time.Duration(float64(n) / l.bytesPerSec * float64(time.Second)))
	return l.free
}

func serve(c net.Conn, to string, up, down *link) {
	s, err := net.Dial("tcp", to)
	if err != nil {
		log.Print(err)
		c.Close()
		return
	}
	done := make(chan struct{}, 2)
	go func() { up.pump(s, c); done <- struct{}{} }()
	go func() { down.pump(c, s); done <- struct{}{} }()
	<-done
	<-done
	c.Close()
	s.Close()
}

// packet is bytes read at a time, due at the other end delay later.
type packet struct {
	buf *[]byte
	n   int
	due time.Time
}

// bufs holds the packets' buffers: 128 KiB, so that the proxy's own CPU
// (a read, a sleep and a write per packet, on the machine it measures)
// stays small: with fresh 32 KiB buffers it took a tenth of the machine's
// CPU during a restore.
var bufs = sync.Pool{New: func() any { b := make([]byte, 128<<10); return &b }}

// pump copies src to dst: a reader stamps what it reads with the time its
// last byte leaves at the bandwidth, a writer sends it half a round trip
// later. The queue between them is the bytes in flight on the link.
func (l *link) pump(dst, src net.Conn) {
	q := make(chan packet, 1024)
	go func() {
		defer close(q)
		for {
			buf := bufs.Get().(*[]byte)
			n, err := src.Read(*buf)
			if n > 0 {
				free := l.send(n)
				q <- packet{buf, n, free.Add(l.delay)}
				// Read no faster than the link sends (a few ms of
				// buffer): the sender feels the bandwidth as TCP
				// backpressure, as across a real link.
				if ahead := time.Until(free); ahead > 5*time.Millisecond {
					time.Sleep(ahead - 5*time.Millisecond)
				}
			}
			if err != nil {
				return
			}
		}
	}()
	for p := range q {
		time.Sleep(time.Until(p.due))
		_, err := dst.Write((*p.buf)[:p.n])
		bufs.Put(p.buf)
		if err != nil {
			break
		}
	}
	for p := range q { // drain: the reader may be blocked on a full queue
		bufs.Put(p.buf)
	}
	if tc, ok := dst.(*net.TCPConn); ok {
		tc.CloseWrite()
	}
}
