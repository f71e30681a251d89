package nbdclient

import (
	"context"
	"fmt"
	"iter"
	"strings"
	"syscall"
)

// Flags describe an extent.
type Flags uint8

const (
	// Hole: not allocated in the image (base:allocation NBD_STATE_HOLE).
	Hole Flags = 1 << iota
	// Zero: reads as zeroes (base:allocation NBD_STATE_ZERO).
	Zero
	// Dirty: set in the dirty bitmap. Only reported when Config.Bitmap is set.
	Dirty
)

func (f Flags) String() string {
	var parts []string
	for _, x := range []struct {
		f Flags
		s string
	}{{Hole, "hole"}, {Zero, "zero"}, {Dirty, "dirty"}} {
		if f&x.f != 0 {
			parts = append(parts, x.s)
		}
	}
	if len(parts) == 0 {
		return "data"
	}
	return strings.Join(parts, ",")
}

// Extent is a range of the export whose bytes all share Flags.
type Extent struct {
	Offset int64
	Length int64
	Flags  Flags
}

// End is the offset just past the extent.
func (e Extent) End() int64 { return e.Offset + e.Length }

// span is one (length, flags) entry of a block status reply.
type span struct {
	Length int64
	Flags  uint32
}

// NBD block status flags of the two contexts we read.
const (
	stateHole  = 1 << 0 // base:allocation
	stateZero  = 1 << 1 // base:allocation
	stateDirty = 1 << 0 // qemu:dirty-bitmap:*
)

// mergeWindow joins the replies of the allocation and dirty contexts for the
// window [start, end) into one ordered list of extents. Both replies describe
// bytes from start on; each may stop short of end, have different
// boundaries, or run past end. A nil reply means the context is not in use:
// no allocation context reads as all data, no dirty context as all clean.
// The result covers [start, next), where next is the first offset either
// in-use reply leaves undescribed (at most end); adjacent extents with the
// same flags are joined. A reply that describes no bytes is a protocol error.
func mergeWindow(start, end int64, alloc, dirty []span) ([]Extent, int64, error) {
	next := end
	for _, r := range [][]span{alloc, dirty} {
		if r == nil {
			continue
		}
		var covered int64
		for _, s := range r {
			covered += s.Length
			if start+covered >= next {
				break
			}
		}
		next = min(next, start+covered)
	}
	if next <= start {
		return nil, start, fmt.Errorf("the server described no bytes at offset %d", start)
	}

	var out []Extent
	ai, di := 0, 0
	var aUsed, dUsed int64 // bytes of alloc[ai], dirty[di] already consumed
	for pos := start; pos < next; {
		stop := next
		var f Flags
		if alloc != nil {
			for alloc[ai].Length-aUsed <= 0 { // skip zero-length entries
				ai, aUsed = ai+1, 0
			}
			stop = min(stop, pos+alloc[ai].Length-aUsed)
			if alloc[ai].Flags&stateHole != 0 {
				f |= Hole
			}
			if alloc[ai].Flags&stateZero != 0 {
				f |= Zero
			}
		}
		if dirty != nil {
			for dirty[di].Length-dUsed <= 0 {
				di, dUsed = di+1, 0
			}
			stop = min(stop, pos+dirty[di].Length-dUsed)
			if dirty[di].Flags&stateDirty != 0 {
				f |= Dirty
			}
		}
		n := stop - pos
		if alloc != nil {
			aUsed += n
		}
		if dirty != nil {
			dUsed += n
		}
		if k := len(out) - 1; k >= 0 && out[k].Flags == f {
			out[k].Length += n
		} else {
			out = append(out, Extent{Offset: pos, Length: n, Flags: f})
		}
		pos = stop
	}
	return out, next, nil
}

// Extents returns the extents of [off, off+length) in order, asking the
// server one window (Config.ExtentWindow) at a time, so memory and the delay
// before the first extent do not grow with the export. Adjacent extents with
// the same flags are joined, also across windows. The sequence stops at the
// first error, which it yields with a zero Extent.
func (c *Conn) Extents(ctx context.Context, off, length int64) iter.Seq2[Extent, error] {
	return walkExtents(ctx, c.cfg, c.info, off, length, c.blockStatus)
}

// maxWindow is the largest block status request: NBD counts are 32-bit.
const maxWindow = 1<<32 - 1<<16

type blockStatusFunc func(ctx context.Context, off, n int64) (alloc, dirty []span, err error)

func walkExtents(ctx context.Context, cfg Config, info Info, off, length int64, bs blockStatusFunc) iter.Seq2[Extent, error] {
	return func(yield func(Extent, error) bool) {
		end := off + length
		if off < 0 || length < 0 || end > info.Size {
			yield(Extent{}, &Error{Op: "block status", Target: cfg.target(), Offset: off, Length: length,
				Errno: syscall.EINVAL, Msg: fmt.Sprintf("range is outside the export (size %d)", info.Size)})
			return
		}
		useAlloc := info.HasContext(ContextAllocation)
		useDirty := cfg.Bitmap != "" && info.HasContext(BitmapContext(cfg.Bitmap))
		var pending Extent
		// A window that came back as one extent doubles the next (up to
		// the largest count NBD carries), so a walk's requests grow with
		// what the export holds, not with its size: a 1 PiB export of
		// nothing takes 2^18 requests, not 2^20.
		window := cfg.ExtentWindow
		for pos := off; pos < end; {
			n := min(end-pos, window)
			var alloc, dirty []span
			if useAlloc || useDirty {
				var err error
				alloc, dirty, err = bs(ctx, pos, n)
				if err != nil {
					yield(Extent{}, err)
					return
				}
			}
			exts, next, err := mergeWindow(pos, pos+n, alloc, dirty)
			if err != nil {
				yield(Extent{}, &Error{Op: "block status", Target: cfg.target(), Offset: pos, Length: n,
					Errno: syscall.EPROTO, Msg: err.Error()})
				return
			}
			if len(exts) == 1 && next == pos+n {
				window = min(2*window, maxWindow)
			} else {
				window = cfg.ExtentWindow
			}
			for _, e := range exts {
				if pending.Length > 0 && pending.Flags == e.Flags {
					pending.Length += e.Length
					continue
				}
				if pending.Length > 0 && !yield(pending, nil) {
					return
				}
				pending = e
			}
			pos = next
		}
		if pending.Length > 0 {
			yield(pending, nil)
		}
	}
}
