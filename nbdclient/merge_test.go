package nbdclient

import (
	"testing"
)

// decodeSpans turns fuzz bytes into a reply: each pair of bytes is a length
// (0..255, zero-length entries included on purpose) and flags.
func decodeSpans(b []byte) []span {
	if len(b) == 0 {
		return nil // context not in use
	}
	out := []span{}
	for i := 0; i+1 < len(b); i += 2 {
		out = append(out, span{Length: int64(b[i]), Flags: uint32(b[i+1]) & 3})
	}
	return out
}

// flagsAt is the oracle: the flags of byte pos according to one reply, and
// whether the reply describes pos at all.
func flagsAt(r []span, start, pos int64, alloc bool) (Flags, bool) {
	if r == nil {
		return 0, true
	}
	at := start
	for _, s := range r {
		if pos < at+s.Length {
			var f Flags
			switch {
			case alloc:
				if s.Flags&stateHole != 0 {
					f |= Hole
				}
				if s.Flags&stateZero != 0 {
					f |= Zero
				}
			case s.Flags&stateDirty != 0:
				f = Dirty
			}
			return f, true
		}
		at += s.Length
	}
	return 0, false
}

func checkMerge(t *testing.T, start int64, window int64, alloc, dirty []span) {
	end := start + window
	got, next, err := mergeWindow(start, end, alloc, dirty)

	// Expected coverage: the first byte either in-use reply leaves out.
	wantNext := end
	for pos := start; pos < end; pos++ {
		_, okA := flagsAt(alloc, start, pos, true)
		_, okD := flagsAt(dirty, start, pos, false)
		if !okA || !okD {
			wantNext = pos
			break
		}
	}
	if wantNext == start {
		if err == nil {
			t.Fatalf("no bytes described, but no error: %+v", got)
		}
		return
	}
	if err != nil {
		t.Fatalf("unexpected error: %v", err)
	}
	if next != wantNext {
		t.Fatalf("next = %d, want %d", next, wantNext)
	}
	pos := start
	for i, e := range got {
		if e.Offset != pos || e.Length <= 0 {
			t.Fatalf("extent %d %+v does not continue at %d", i, e, pos)
		}
		if i > 0 && got[i-1].Flags == e.Flags {
			t.Fatalf("extents %d and %d not joined", i-1, i)
		}
		for p := e.Offset; p < e.End(); p++ {
			fa, _ := flagsAt(alloc, start, p, true)
			fd, _ := flagsAt(dirty, start, p, false)
			if e.Flags != fa|fd {
				t.Fatalf("byte %d: flags %v, want %v", p, e.Flags, fa|fd)
			}
		}
		pos = e.End()
	}
	if pos != next {
		t.Fatalf("extents end at %d, next is %d", pos, next)
	}
}

func TestMergeWindow(t *testing.T) {
	tests := []struct {
		name         string
		start, win   int64
		alloc, dirty []span
	}{
		{"different boundaries", 100, 50,
			[]span{{10, 0}, {30, 3}, {10, 0}}, []span{{25, 1}, {25, 0}}},
		{"short reply", 0, 100, []span{{40, 0}}, []span{{70, 1}}},
		{"past the window", 0, 10, []span{{4, 3}, {100, 0}}, []span{{1000, 1}}},
		{"allocation only", 0, 10, []span{{5, 3}, {5, 3}}, nil},
		{"dirty only", 7, 10, nil, []span{{3, 0}, {3, 1}, {10, 0}}},
		{"zero-length entries", 0, 9, []span{{0, 3}, {4, 0}, {0, 1}, {5, 3}}, []span{{9, 1}}},
		{"empty reply", 0, 9, []span{}, []span{{9, 1}}},
		{"zero-length only", 0, 9, []span{{0, 0}}, nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) { checkMerge(t, tt.start, tt.win, tt.alloc, tt.dirty) })
	}
}

func FuzzMergeWindow(f *testing.F) {
	f.Add(uint16(0), uint16(50), []byte{10, 0, 30, 3, 10, 0}, []byte{25, 1, 25, 0})
	f.Add(uint16(9), uint16(600), []byte{255, 1, 255, 2, 255, 3}, []byte{})
	f.Add(uint16(1), uint16(3), []byte{0, 3, 4, 0}, []byte{1, 1, 0, 0, 200, 1})
	f.Fuzz(func(t *testing.T, start, window uint16, a, d []byte) {
		if window == 0 || window > 2048 {
			return
		}
		checkMerge(t, int64(start), int64(window), decodeSpans(a), decodeSpans(d))
	})
}
