package nbdserver

import (
	"context"
	"encoding/binary"
	"fmt"
	"io"
	"net"
	"strings"
	"sync"
	"time"
)

// request is one transmission-phase request.
type request struct {
	flags, typ uint16
	handle     uint64
	off        uint64
	length     uint32
}

// parseRequest reads a request's 28-byte header.
func parseRequest(b []byte) (request, error) {
	if len(b) != 28 {
		return request{}, breach("request header of %d bytes", len(b))
	}
	if binary.BigEndian.Uint32(b) != magicRequest {
		return request{}, breach("bad request magic %#x", binary.BigEndian.Uint32(b))
	}
	return request{flags: binary.BigEndian.Uint16(b[4:]), typ: binary.BigEndian.Uint16(b[6:]),
		handle: binary.BigEndian.Uint64(b[8:]), off: binary.BigEndian.Uint64(b[16:]), length: binary.BigEndian.Uint32(b[24:])}, nil
}

// perConn bounds the requests of one connection being answered at once.
const perConn = 16

// transmit serves requests until the client disconnects (NBD_CMD_DISC)
// or breaks the protocol. Requests are answered concurrently (replies
// carry their handle), each reply written whole under c.wmu.
func (c *conn) transmit(ctx context.Context) error {
	ctx, cancel := context.WithCancel(ctx)
	var wg sync.WaitGroup
	err := c.requests(ctx, &wg)
	if err != nil {
		cancel() // a client gone or in breach: its reads in progress stop
	}
	wg.Wait() // NBD_CMD_DISC: the replies in flight are sent first
	cancel()
	return err
}

// requests reads requests and starts their answers, until NBD_CMD_DISC
// (nil) or an error.
func (c *conn) requests(ctx context.Context, wg *sync.WaitGroup) error {
	slots := make(chan struct{}, perConn)
	var hdr [28]byte
	for {
		if c.s.o.Idle > 0 {
			c.nc.SetReadDeadline(time.Now().Add(c.s.o.Idle))
		} else {
			c.nc.SetReadDeadline(time.Time{})
		}
		if _, err := io.ReadFull(c.nc, hdr[:]); err != nil {
			return err
		}
		c.nc.SetReadDeadline(time.Now().Add(c.s.o.Timeout)) // the rest of the request comes at once
		r, err := parseRequest(hdr[:])
		if err != nil {
			return err
		}
		switch r.typ {
		case cmdDisc:
			return nil
		case cmdWrite:
			// The payload follows; a read-only export takes none of it,
			// but it must be read to find the next request.
			if int(r.length) > c.s.o.MaxBlock {
				return breach("a write of %d bytes", r.length)
			}
			if _, err := io.CopyN(io.Discard, c.nc, int64(r.length)); err != nil {
				return err
			}
		}
		select {
		case slots <- struct{}{}:
		case <-ctx.Done():
			return ctx.Err()
		}
		wg.Add(1)
		go func() {
			defer func() { <-slots; wg.Done() }()
			if err := c.handle(ctx, r); err != nil {
				c.log.Debug("NBD reply failed: closing", "error", err)
				c.raw.Close() // the request loop then ends, and cancels the others
			}
		}()
	}
}

// handle answers one request; an error is a reply that could not be
// written (the connection is then closed).
func (c *conn) handle(ctx context.Context, r request) error {
	size := uint64(c.export.Size())
	end := r.off + uint64(r.length)
	switch {
	case r.typ == cmdWrite || r.typ == cmdTrim || r.typ == cmdWriteZeroes:
		return c.errorReply(r, errPerm, "the export is read-only")
	case r.typ == cmdFlush:
		return c.simpleReply(r, 0)
	case r.typ != cmdRead && r.typ != cmdCache && r.typ != cmdBlockStatus:
		return c.errorReply(r, errInval, "unknown command")
	case r.flags&^knownFlags[r.typ] != 0:
		return c.errorReply(r, errInval, fmt.Sprintf("flags %#x not known for this command", r.flags))
	case end < r.off || end > size:
		return c.errorReply(r, errInval, fmt.Sprintf("%d bytes at %d: past the end of the export (%d bytes)", r.length, r.off, size))
	case r.typ == cmdCache:
		c.export.Prefetch(int64(r.off), int64(r.length))
		return c.simpleReply(r, 0)
	case r.typ == cmdBlockStatus:
		return c.blockStatus(r)
	case r.length == 0:
		return c.errorReply(r, errInval, "a read of no bytes")
	case int(r.length) > c.s.o.MaxBlock:
		return c.errorReply(r, errOverflow, fmt.Sprintf("a read of %d bytes: the most is %d", r.length, c.s.o.MaxBlock))
	}
	return c.read(ctx, r)
}

// knownFlags are the command flags each served command takes.
var knownFlags = map[uint16]uint16{cmdRead: cmdFlagDF, cmdBlockStatus: cmdFlagReqOne, cmdCache: 0}

// piece is part of a read's reply: data, or n bytes of zeroes.
type piece struct {
	off  int64
	data []byte
	n    int64
}

// read answers NBD_CMD_READ: the export's pieces are gathered first
// (fetches can take a round trip each; no reply waits for them on the
// wire), then sent, holes as holes in structured replies.
func (c *conn) read(ctx context.Context, r request) error {
	// This connection's share first, then the server's: a client that
	// reads none of its replies holds at most its share.
	if err := c.mem.Acquire(ctx, int64(r.length)); err != nil {
		return err
	}
	defer c.mem.Release(int64(r.length))
	if err := c.s.mem.Acquire(ctx, int64(r.length)); err != nil {
		return err
	}
	defer c.s.mem.Release(int64(r.length))
	var pieces []piece
	err := c.export.Read(ctx, int64(r.off), int64(r.length), func(off int64, data []byte, n int64) error {
		pieces = append(pieces, piece{off, data, n})
		return nil
	})
	if err != nil {
		if ctx.Err() != nil {
			return ctx.Err()
		}
		c.log.Warn("NBD read failed", "export", c.name, "offset", r.off, "length", r.length, "error", err)
		// The cause stays in the server's log (it names the repository).
		return c.errorReply(r, errIO, "the export could not read these bytes (the server's log says why)")
	}
	if c.s.o.OnRead != nil {
		c.s.o.OnRead(c.name, int64(r.length))
	}
	c.wmu.Lock()
	defer c.wmu.Unlock()
	c.nc.SetWriteDeadline(time.Now().Add(c.s.o.Timeout))
	if !c.structured {
		bufs := net.Buffers{simpleHeader(r.handle, 0)}
		for _, p := range pieces {
			bufs = append(bufs, piecesBytes(p)...)
		}
		_, err := bufs.WriteTo(c.nc)
		return err
	}
	if r.flags&cmdFlagDF != 0 { // one chunk of data, zeroes included
		bufs := net.Buffers{structuredHeader(replyFlagDone, replyOffsetData, r.handle, 8+int(r.length)), binary.BigEndian.AppendUint64(nil, r.off)}
		for _, p := range pieces {
			bufs = append(bufs, piecesBytes(p)...)
		}
		_, err := bufs.WriteTo(c.nc)
		return err
	}
	var bufs net.Buffers
	for i, p := range pieces {
		flags := uint16(0)
		if i == len(pieces)-1 {
			flags = replyFlagDone
		}
		if p.data == nil {
			b := structuredHeader(flags, replyOffsetHole, r.handle, 12)
			b = binary.BigEndian.AppendUint64(b, uint64(p.off))
			bufs = append(bufs, binary.BigEndian.AppendUint32(b, uint32(p.n)))
			continue
		}
		b := structuredHeader(flags, replyOffsetData, r.handle, 8+len(p.data))
		bufs = append(bufs, binary.BigEndian.AppendUint64(b, uint64(p.off)), p.data)
	}
	_, err = bufs.WriteTo(c.nc)
	return err
}

var zeroes = make([]byte, 1<<20)

// piecesBytes is a piece as bytes on the wire: its data, or zeroes.
func piecesBytes(p piece) [][]byte {
	if p.data != nil {
		return [][]byte{p.data}
	}
	var out [][]byte
	for n := p.n; n > 0; n -= int64(len(zeroes)) {
		out = append(out, zeroes[:min(n, int64(len(zeroes)))])
	}
	return out
}

// blockStatus answers NBD_CMD_BLOCK_STATUS for base:allocation: zero
// chunks are holes that read as zeroes, data chunks plain data.
func (c *conn) blockStatus(r request) error {
	if !c.structured || !c.allocation {
		return c.errorReply(r, errInval, "no meta context negotiated (NBD_OPT_SET_META_CONTEXT base:allocation)")
	}
	if r.length == 0 {
		return c.errorReply(r, errInval, "block status of no bytes")
	}
	max := maxReplyDescriptor
	if r.flags&cmdFlagReqOne != 0 {
		max = 1
	}
	runs := c.export.Allocation(int64(r.off), int64(r.length), max)
	b := binary.BigEndian.AppendUint32(nil, contextAllocID)
	descs := 0
	for _, run := range runs {
		flags := uint32(0)
		if run.Zero {
			flags = stateHole | stateZero
		}
		for n := run.Length; n > 0 && descs < max; descs++ { // a descriptor's length is 32-bit
			d := min(n, 1<<32-1<<16)
			b = binary.BigEndian.AppendUint32(b, uint32(d))
			b = binary.BigEndian.AppendUint32(b, flags)
			n -= d
		}
	}
	c.wmu.Lock()
	defer c.wmu.Unlock()
	c.nc.SetWriteDeadline(time.Now().Add(c.s.o.Timeout))
	_, err := c.nc.Write(append(structuredHeader(replyFlagDone, replyBlockStatus, r.handle, len(b)), b...))
	return err
}

func simpleHeader(handle uint64, errno uint32) []byte {
	b := binary.BigEndian.AppendUint32(nil, magicSimple)
	b = binary.BigEndian.AppendUint32(b, errno)
	return binary.BigEndian.AppendUint64(b, handle)
}

func structuredHeader(flags, typ uint16, handle uint64, length int) []byte {
	b := binary.BigEndian.AppendUint32(make([]byte, 0, 20+8), magicStructure)
	b = binary.BigEndian.AppendUint16(b, flags)
	b = binary.BigEndian.AppendUint16(b, typ)
	b = binary.BigEndian.AppendUint64(b, handle)
	return binary.BigEndian.AppendUint32(b, uint32(length))
}

// simpleReply answers with an error number (0: success) and no data.
func (c *conn) simpleReply(r request, errno uint32) error {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	c.nc.SetWriteDeadline(time.Now().Add(c.s.o.Timeout))
	_, err := c.nc.Write(simpleHeader(r.handle, errno))
	return err
}

// errorReply answers with an error: with a message in a structured
// reply, a bare number in a simple one.
func (c *conn) errorReply(r request, errno uint32, msg string) error {
	if !c.structured {
		return c.simpleReply(r, errno)
	}
	if len(msg) > 4096 {
		msg = strings.ToValidUTF8(msg[:4096], "")
	}
	b := binary.BigEndian.AppendUint32(nil, errno)
	b = binary.BigEndian.AppendUint16(b, uint16(len(msg)))
	b = append(b, msg...)
	c.wmu.Lock()
	defer c.wmu.Unlock()
	c.nc.SetWriteDeadline(time.Now().Add(c.s.o.Timeout))
	_, err := c.nc.Write(append(structuredHeader(replyFlagDone, replyError, r.handle, len(b)), b...))
	return err
}
