package nbdclient

import (
	"bufio"
	"fmt"
	"os"
	"strings"
	"testing"

	"github.com/nbdmover/nbdmover/internal/qemutest"
)

// Helpers that drive the real peers: qemu-img, qemu-io, qemu-nbd, nbdinfo.

var (
	need     = qemutest.Need
	run      = qemutest.Run
	newImage = qemutest.NewImage
	qemuIO   = qemutest.IO
)

type server = qemutest.Server

// serve starts qemu-nbd read-only on img with the given extra arguments.
func serve(tb testing.TB, img string, extra ...string) *server {
	tb.Helper()
	return qemutest.Serve(tb, img, append([]string{"-r"}, extra...)...)
}

// nbdinfoMap runs nbdinfo --map for one context and returns its extents
// with the type number as Flags, joined where adjacent types are equal.
func nbdinfoMap(tb testing.TB, uri, context string) []Extent {
	tb.Helper()
	out := run(tb, "nbdinfo", "--map="+context, uri)
	var exts []Extent
	sc := bufio.NewScanner(strings.NewReader(out))
	for sc.Scan() {
		var e Extent
		var typ int
		if _, err := fmt.Sscan(sc.Text(), &e.Offset, &e.Length, &typ); err != nil {
			tb.Fatalf("nbdinfo line %q: %v", sc.Text(), err)
		}
		e.Flags = Flags(typ)
		exts = appendJoined(exts, e)
	}
	return exts
}

func appendJoined(exts []Extent, e Extent) []Extent {
	if k := len(exts) - 1; k >= 0 && exts[k].Flags == e.Flags && exts[k].End() == e.Offset {
		exts[k].Length += e.Length
		return exts
	}
	return append(exts, e)
}

// project keeps only the flags in mask, mapped back to one context's NBD
// type numbers, and joins adjacent extents that become equal.
func project(exts []Extent, allocation bool) []Extent {
	var out []Extent
	for _, e := range exts {
		var t Flags
		if allocation {
			if e.Flags&Hole != 0 {
				t |= stateHole
			}
			if e.Flags&Zero != 0 {
				t |= stateZero
			}
		} else if e.Flags&Dirty != 0 {
			t = stateDirty
		}
		out = appendJoined(out, Extent{Offset: e.Offset, Length: e.Length, Flags: t})
	}
	return out
}

// rawCopy returns the bytes of img as qemu-img convert reads them.
func rawCopy(tb testing.TB, img string) []byte {
	tb.Helper()
	b, err := os.ReadFile(qemutest.RawCopy(tb, img))
	if err != nil {
		tb.Fatal(err)
	}
	return b
}

func openFDs(tb testing.TB) int {
	tb.Helper()
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		tb.Fatal(err)
	}
	return len(ents)
}
