package nbdserver

import (
	"context"
	"encoding/binary"
	"io"
	"net"
	"testing"
	"time"

	"golang.org/x/sync/semaphore"
)

// The parsers of what clients send never panic, and what they accept is
// within the bounds they promise.
func FuzzParsers(f *testing.F) {
	f.Add(req(cmdRead, 1, 0, 512))
	f.Add(append(appendString32(nil, "vda"), 0, 1, 0, 3))
	f.Add(appendString32(binary.BigEndian.AppendUint32(appendString32(nil, "vda"), 1), "base:allocation"))
	f.Fuzz(func(t *testing.T, b []byte) {
		if r, err := parseRequest(b); err == nil && len(b) != 28 {
			t.Fatalf("request %+v from %d bytes", r, len(b))
		}
		if name, infos, err := parseInfoRequest(b); err == nil && (len(name) > maxStringLen || 4+len(name)+2+2*len(infos) != len(b)) {
			t.Fatalf("info request %q %v from %d bytes", name, infos, len(b))
		}
		if name, qs, err := parseMetaRequest(b); err == nil {
			n := 4 + len(name) + 4
			for _, q := range qs {
				n += 4 + len(q)
				if len(q) > maxStringLen {
					t.Fatalf("query of %d bytes", len(q))
				}
			}
			if n != len(b) {
				t.Fatalf("meta request %q %d queries: %d bytes accounted of %d", name, len(qs), n, len(b))
			}
		}
	})
}

// A connection fed any bytes ends (no panic, no hang) and writes only
// replies.
func FuzzConnection(f *testing.F) {
	hs := binary.BigEndian.AppendUint32(nil, flagFixedNewstyle|flagNoZeroes)
	meta := binary.BigEndian.AppendUint32(appendString32(nil, "vda"), 1)
	meta = appendString32(meta, "base:allocation")
	goVda := append(append([]byte{}, hs...), option(optStructuredReply, nil)...)
	goVda = append(goVda, option(optSetMetaContext, meta)...)
	goVda = append(goVda, option(optGo, append(appendString32(nil, "vda"), 0, 0))...)
	f.Add(hs)
	f.Add(append(append([]byte{}, hs...), option(optList, nil)...))
	f.Add(append(append([]byte{}, goVda...), req(cmdRead, 1, 0, 4096)...))
	f.Add(append(append([]byte{}, goVda...), req(cmdBlockStatus, 2, 0, 1<<20)...))
	f.Add(append(append([]byte{}, goVda...), req(cmdCache, 3, 4096, 1<<20)...))
	f.Add(append(append([]byte{}, goVda...), req(cmdWrite, 4, 0, 8)...))
	s := New(Options{Exports: map[string]Export{"vda": newMemExport(1<<20, 9)}, Timeout: 2 * time.Second})
	f.Fuzz(func(t *testing.T, in []byte) {
		client, server := net.Pipe()
		c := &conn{s: s, raw: server, nc: server, log: s.o.Log, mem: semaphore.NewWeighted(s.o.MaxInFlight / 4)}
		done := make(chan struct{})
		go func() { c.serve(context.Background()); close(done) }()
		go io.Copy(io.Discard, client) // replies
		client.SetWriteDeadline(time.Now().Add(2 * time.Second))
		client.Write(in)
		client.Close()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			t.Fatal("the connection did not end")
		}
	})
}
