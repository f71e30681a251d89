package nbdclient

import (
	"context"
	"errors"
	"iter"

	"golang.org/x/sync/errgroup"
)

// Pool is N connections to one export for parallel readers. Its methods may
// be called from any number of goroutines; each call borrows a free
// connection for its duration, so at most N requests run at once.
type Pool struct {
	cfg   Config
	conns []*Conn
	free  chan *Conn
}

// DialPool opens n connections to the export in parallel. When the server
// does not advertise multi-conn, it opens one: without multi-conn the server
// promises no consistency between connections.
func DialPool(ctx context.Context, cfg Config, n int) (*Pool, error) {
	cfg = cfg.withDefaults()
	first, err := Dial(ctx, cfg)
	if err != nil {
		return nil, err
	}
	if !first.Info().CanMultiConn {
		n = 1
	}
	conns := make([]*Conn, max(n, 1))
	conns[0] = first
	g, gctx := errgroup.WithContext(ctx)
	for i := 1; i < len(conns); i++ {
		g.Go(func() error {
			c, err := Dial(gctx, cfg)
			conns[i] = c
			return err
		})
	}
	if err := g.Wait(); err != nil {
		for _, c := range conns {
			if c != nil {
				c.Close()
			}
		}
		return nil, err
	}
	p := &Pool{cfg: cfg, conns: conns, free: make(chan *Conn, len(conns))}
	for _, c := range conns {
		p.free <- c
	}
	return p, nil
}

// Len is the number of connections.
func (p *Pool) Len() int { return len(p.conns) }

// Info is the export as the first connection saw it.
func (p *Pool) Info() Info { return p.conns[0].Info() }

// with runs f on a free connection.
func (p *Pool) with(ctx context.Context, f func(*Conn) error) error {
	select {
	case c := <-p.free:
		defer func() { p.free <- c }()
		return f(c)
	case <-ctx.Done():
		return context.Cause(ctx)
	}
}

// ReadAt reads len(p) bytes at off into buf on a free connection; see
// Conn.ReadAt.
func (p *Pool) ReadAt(ctx context.Context, buf []byte, off int64) error {
	return p.with(ctx, func(c *Conn) error { return c.ReadAt(ctx, buf, off) })
}

// ReadSegments reads scattered ranges into buf on a free connection; see
// Conn.ReadSegments.
func (p *Pool) ReadSegments(ctx context.Context, buf []byte, segs []Segment) error {
	return p.with(ctx, func(c *Conn) error { return c.ReadSegments(ctx, buf, segs) })
}

// WriteAt writes buf at off on a free connection; see Conn.WriteAt.
func (p *Pool) WriteAt(ctx context.Context, buf []byte, off int64) error {
	return p.with(ctx, func(c *Conn) error { return c.WriteAt(ctx, buf, off) })
}

// Flush flushes every connection: with multi-conn a flush on one would do,
// but flushing all is correct for any server.
func (p *Pool) Flush(ctx context.Context) error {
	for _, c := range p.conns {
		if err := c.Flush(ctx); err != nil {
			return err
		}
	}
	return nil
}

// Extents walks the export's extents like Conn.Extents, borrowing a free
// connection for each window only, so reads can go on between windows.
func (p *Pool) Extents(ctx context.Context, off, length int64) iter.Seq2[Extent, error] {
	return walkExtents(ctx, p.cfg, p.Info(), off, length, func(ctx context.Context, off, n int64) (alloc, dirty []span, err error) {
		err = p.with(ctx, func(c *Conn) error {
			alloc, dirty, err = c.blockStatus(ctx, off, n)
			return err
		})
		return alloc, dirty, err
	})
}

// Close closes every connection, interrupting calls in progress. It is
// idempotent.
func (p *Pool) Close() error {
	var errs []error
	for _, c := range p.conns {
		errs = append(errs, c.Close())
	}
	return errors.Join(errs...)
}
