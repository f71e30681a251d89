package nbdserver

import (
	"context"
	"crypto/tls"
	"encoding/binary"
	"errors"
	"io"
	"log/slog"
	"net"
	"sync"
	"time"

	"golang.org/x/sync/semaphore"
)

// conn is one client's connection.
type conn struct {
	s   *Server
	raw net.Conn // as accepted: what Server.Close closes
	nc  net.Conn // raw, or TLS over it (written by this connection's goroutine only)
	log *slog.Logger

	// negotiated during the handshake
	tls        bool
	structured bool
	allocation bool // base:allocation selected (for metaExport)
	metaExport string
	noZeroes   bool

	name   string // the export transmitted
	export Export
	flags  uint16

	wmu sync.Mutex          // one reply at a time on the wire
	mem *semaphore.Weighted // this connection's share of the server's bytes in flight
}

// serve runs the handshake, then the transmission phase, and closes the
// connection.
func (c *conn) serve(ctx context.Context) {
	defer func() { c.nc.Close() }() // c.nc as it is then: TLS sends its close_notify
	err := c.handshake()
	if err == nil && c.export != nil {
		c.s.enter()
		err = c.transmit(ctx)
		c.s.leave()
	}
	if err != nil && !errors.Is(err, io.EOF) && !errors.Is(err, net.ErrClosed) {
		c.log.Debug("NBD connection ended", "error", err)
	}
}

// handshake runs the fixed newstyle negotiation until the client picks an
// export (c.export) or leaves (c.export nil), within one Timeout.
func (c *conn) handshake() error {
	c.nc.SetDeadline(time.Now().Add(c.s.o.Timeout))
	var hello [18]byte
	binary.BigEndian.PutUint64(hello[0:], magicNBD)
	binary.BigEndian.PutUint64(hello[8:], magicOpt)
	binary.BigEndian.PutUint16(hello[16:], flagFixedNewstyle|flagNoZeroes)
	if _, err := c.nc.Write(hello[:]); err != nil {
		return err
	}
	var cf [4]byte
	if _, err := io.ReadFull(c.nc, cf[:]); err != nil {
		return err
	}
	flags := binary.BigEndian.Uint32(cf[:])
	if flags&^(flagFixedNewstyle|flagNoZeroes) != 0 {
		return breach("client flags %#x", flags)
	}
	c.noZeroes = flags&flagNoZeroes != 0
	for n := 0; ; n++ {
		if n == maxOptionsPerConn {
			return breach("more than %d options", maxOptionsPerConn)
		}
		var h [16]byte
		if _, err := io.ReadFull(c.nc, h[:]); err != nil {
			return err
		}
		if binary.BigEndian.Uint64(h[0:]) != magicOpt {
			return breach("bad option magic")
		}
		opt, length := binary.BigEndian.Uint32(h[8:]), binary.BigEndian.Uint32(h[12:])
		if length > maxOptionLen {
			return breach("option %d of %d bytes", opt, length)
		}
		data := make([]byte, length)
		if _, err := io.ReadFull(c.nc, data); err != nil {
			return err
		}
		done, err := c.option(opt, data)
		if err != nil || done {
			return err
		}
	}
}

// option answers one option; done says the handshake is over (an export
// chosen, or the client leaving).
func (c *conn) option(opt uint32, data []byte) (done bool, err error) {
	if c.s.o.RequireTLS && !c.tls && opt != optStartTLS && opt != optAbort {
		if opt == optExportName {
			return true, breach("NBD_OPT_EXPORT_NAME before TLS")
		}
		return false, c.optReply(opt, repErrTLSReqd, []byte("TLS is required: NBD_OPT_STARTTLS first"))
	}
	switch opt {
	case optAbort:
		c.optReply(opt, repAck, nil)
		return true, nil
	case optExportName:
		return true, c.exportName(string(data))
	case optList:
		if len(data) != 0 {
			return false, c.optReply(opt, repErrInvalid, []byte("NBD_OPT_LIST takes no data"))
		}
		for _, name := range c.s.names {
			if err := c.optReply(opt, repServer, appendString32(nil, name)); err != nil {
				return false, err
			}
		}
		return false, c.optReply(opt, repAck, nil)
	case optStartTLS:
		return false, c.startTLS(data)
	case optStructuredReply:
		if len(data) != 0 {
			return false, c.optReply(opt, repErrInvalid, []byte("NBD_OPT_STRUCTURED_REPLY takes no data"))
		}
		c.structured = true
		return false, c.optReply(opt, repAck, nil)
	case optInfo, optGo:
		return c.infoGo(opt, data)
	case optListMetaContext, optSetMetaContext:
		return false, c.metaContext(opt, data)
	}
	return false, c.optReply(opt, repErrUnsup, []byte("option not supported"))
}

// optReply sends one reply to an option.
func (c *conn) optReply(opt, typ uint32, data []byte) error {
	b := make([]byte, 20, 20+len(data))
	binary.BigEndian.PutUint64(b[0:], magicOptReply)
	binary.BigEndian.PutUint32(b[8:], opt)
	binary.BigEndian.PutUint32(b[12:], typ)
	binary.BigEndian.PutUint32(b[16:], uint32(len(data)))
	_, err := c.nc.Write(append(b, data...))
	return err
}

func appendString32(b []byte, s string) []byte {
	b = binary.BigEndian.AppendUint32(b, uint32(len(s)))
	return append(b, s...)
}

// exportName is NBD_OPT_EXPORT_NAME: the export, or a hard disconnect.
func (c *conn) exportName(name string) error {
	e, full, ok := c.s.export(name)
	if !ok || len(name) > maxStringLen {
		return breach("no export %q", name)
	}
	c.choose(full, e)
	b := binary.BigEndian.AppendUint64(nil, uint64(e.Size()))
	b = binary.BigEndian.AppendUint16(b, c.flags)
	if !c.noZeroes {
		b = append(b, make([]byte, 124)...)
	}
	_, err := c.nc.Write(b)
	return err
}

func (c *conn) choose(name string, e Export) {
	c.name, c.export, c.flags = name, e, c.transmissionFlags()
	if c.metaExport != name && c.metaExport != "" {
		c.allocation = false // negotiated for another export
	}
}

// transmissionFlags are the export's flags: read-only, multi-conn, cache
// and flush; DF only with structured replies.
func (c *conn) transmissionFlags() uint16 {
	f := uint16(tflagHasFlags | tflagReadOnly | tflagSendFlush | tflagCanMultiConn | tflagSendCache)
	if c.structured {
		f |= tflagSendDF
	}
	return f
}

// infoGo is NBD_OPT_INFO and NBD_OPT_GO: the export's size, flags and
// block sizes (and name, when asked); GO then starts transmission.
func (c *conn) infoGo(opt uint32, data []byte) (bool, error) {
	name, infos, err := parseInfoRequest(data)
	if err != nil {
		return false, c.optReply(opt, repErrInvalid, []byte(err.Error()))
	}
	e, full, ok := c.s.export(name)
	if !ok {
		return false, c.optReply(opt, repErrUnknown, []byte("no such export (NBD_OPT_LIST lists them)"))
	}
	b := binary.BigEndian.AppendUint16(nil, infoExport)
	b = binary.BigEndian.AppendUint64(b, uint64(e.Size()))
	b = binary.BigEndian.AppendUint16(b, c.transmissionFlags())
	if err := c.optReply(opt, repInfo, b); err != nil {
		return false, err
	}
	// Any alignment is served (minimum 1); 4 KiB is what pays.
	b = binary.BigEndian.AppendUint16(nil, infoBlockSize)
	b = binary.BigEndian.AppendUint32(b, 1)
	b = binary.BigEndian.AppendUint32(b, uint32(min(4096, c.s.o.MaxBlock)))
	b = binary.BigEndian.AppendUint32(b, uint32(c.s.o.MaxBlock))
	if err := c.optReply(opt, repInfo, b); err != nil {
		return false, err
	}
	for _, t := range infos {
		if t == infoName {
			b = binary.BigEndian.AppendUint16(nil, infoName)
			if err := c.optReply(opt, repInfo, append(b, full...)); err != nil {
				return false, err
			}
		}
	}
	if err := c.optReply(opt, repAck, nil); err != nil {
		return false, err
	}
	if opt == optGo {
		c.choose(full, e)
		return true, nil
	}
	return false, nil
}

// parseInfoRequest reads NBD_OPT_INFO/GO's data: a name, then the
// information types asked for.
func parseInfoRequest(data []byte) (name string, infos []uint16, err error) {
	name, rest, err := readString32(data)
	if err != nil {
		return "", nil, err
	}
	if len(rest) < 2 {
		return "", nil, errors.New("no count of information requests")
	}
	n := int(binary.BigEndian.Uint16(rest))
	rest = rest[2:]
	if len(rest) != 2*n {
		return "", nil, errors.New("the information requests do not fill the option")
	}
	for i := range n {
		infos = append(infos, binary.BigEndian.Uint16(rest[2*i:]))
	}
	return name, infos, nil
}

// readString32 reads a string prefixed by its 32-bit length.
func readString32(b []byte) (string, []byte, error) {
	if len(b) < 4 {
		return "", nil, errors.New("truncated string length")
	}
	n := binary.BigEndian.Uint32(b)
	if n > maxStringLen || uint64(n) > uint64(len(b)-4) {
		return "", nil, errors.New("string longer than the option, or than 4096 bytes")
	}
	return string(b[4 : 4+n]), b[4+n:], nil
}

// metaContext is NBD_OPT_LIST_META_CONTEXT and NBD_OPT_SET_META_CONTEXT:
// base:allocation is the one context served.
func (c *conn) metaContext(opt uint32, data []byte) error {
	if opt == optSetMetaContext {
		c.allocation, c.metaExport = false, "" // replaced, also by a failed one
		if !c.structured {
			return c.optReply(opt, repErrInvalid, []byte("NBD_OPT_SET_META_CONTEXT needs structured replies"))
		}
	}
	name, queries, err := parseMetaRequest(data)
	if err != nil {
		return c.optReply(opt, repErrInvalid, []byte(err.Error()))
	}
	if _, _, ok := c.s.export(name); !ok {
		return c.optReply(opt, repErrUnknown, []byte("no such export"))
	}
	match := false
	for _, q := range queries {
		if q == contextAllocation || opt == optListMetaContext && (q == "base:" || q == "base") {
			match = true
		}
	}
	if opt == optListMetaContext && len(queries) == 0 {
		match = true
	}
	if opt == optSetMetaContext {
		c.allocation, c.metaExport = match, name
		if name == "" {
			_, c.metaExport, _ = c.s.export("")
		}
	}
	if match {
		id := uint32(contextAllocID)
		if opt == optListMetaContext {
			id = 0 // ids are given by SET only
		}
		b := binary.BigEndian.AppendUint32(nil, id)
		if err := c.optReply(opt, repMetaContext, append(b, contextAllocation...)); err != nil {
			return err
		}
	}
	return c.optReply(opt, repAck, nil)
}

// parseMetaRequest reads the meta context options' data: an export name
// and the queries.
func parseMetaRequest(data []byte) (string, []string, error) {
	name, rest, err := readString32(data)
	if err != nil {
		return "", nil, err
	}
	if len(rest) < 4 {
		return "", nil, errors.New("no count of queries")
	}
	n := binary.BigEndian.Uint32(rest)
	rest = rest[4:]
	if uint64(n) > uint64(len(rest))/4 {
		return "", nil, errors.New("more queries than the option holds")
	}
	var queries []string
	for range n {
		var q string
		if q, rest, err = readString32(rest); err != nil {
			return "", nil, err
		}
		queries = append(queries, q)
	}
	if len(rest) != 0 {
		return "", nil, errors.New("trailing bytes after the queries")
	}
	return name, queries, nil
}

// startTLS is NBD_OPT_STARTTLS: TLS from here on, and what was
// negotiated before forgotten.
func (c *conn) startTLS(data []byte) error {
	switch {
	case len(data) != 0:
		return c.optReply(optStartTLS, repErrInvalid, []byte("NBD_OPT_STARTTLS takes no data"))
	case c.s.o.TLS == nil:
		return c.optReply(optStartTLS, repErrUnsup, []byte("TLS is not configured"))
	case c.tls:
		return c.optReply(optStartTLS, repErrInvalid, []byte("TLS is on already"))
	}
	if err := c.optReply(optStartTLS, repAck, nil); err != nil {
		return err
	}
	t := tls.Server(c.nc, c.s.o.TLS)
	if err := t.Handshake(); err != nil {
		return err
	}
	c.nc, c.tls = t, true
	c.structured, c.allocation, c.metaExport = false, false, ""
	return nil
}
