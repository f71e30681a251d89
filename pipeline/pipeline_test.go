package pipeline

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"iter"
	"math/rand/v2"
	"sync"
	"testing"

	"github.com/nbdmover/nbdmover/chunker"
	"github.com/nbdmover/nbdmover/nbdclient"
	"github.com/nbdmover/nbdmover/repo"
	"github.com/nbdmover/nbdmover/repo/index"
	"github.com/nbdmover/nbdmover/sink"
	"github.com/nbdmover/nbdmover/sink/sinktest"
)

// unit is the granularity of a fakeDisk's flags.
const unit = 4096

// fakeDisk is an in-memory disk: bytes, and per-unit flags as block status
// would report them. Units with the Zero flag hold zeroes. Reads are
// recorded; a read of a Zero unit fails the test.
type fakeDisk struct {
	t      testing.TB
	data   []byte
	flags  []nbdclient.Flags
	window int64 // largest extent reported at once (0: any)

	mu    sync.Mutex
	reads int64 // bytes read
}

func newFakeDisk(t testing.TB, size int64) *fakeDisk {
	units := (size + unit - 1) / unit
	return &fakeDisk{t: t, data: make([]byte, size), flags: make([]nbdclient.Flags, units)}
}

// set marks [off, off+n) (unit-aligned) with flags; data units get pattern
// bytes, zero units zeroes.
func (d *fakeDisk) set(off, n int64, f nbdclient.Flags, pattern byte) {
	for u := off / unit; u < (off+n+unit-1)/unit; u++ {
		d.flags[u] = f
		lo, hi := u*unit, min((u+1)*unit, int64(len(d.data)))
		for i := lo; i < hi; i++ {
			d.data[i] = pattern + byte(i/unit)
			if f&nbdclient.Zero != 0 {
				d.data[i] = 0
			}
		}
	}
}

func (d *fakeDisk) Info() nbdclient.Info { return nbdclient.Info{Size: int64(len(d.data))} }

func (d *fakeDisk) Extents(ctx context.Context, off, length int64) iter.Seq2[nbdclient.Extent, error] {
	return func(yield func(nbdclient.Extent, error) bool) {
		var cur nbdclient.Extent
		for u := range d.flags {
			start := int64(u) * unit
			n := min(unit, int64(len(d.data))-start)
			if cur.Length > 0 && (cur.Flags != d.flags[u] || d.window > 0 && cur.Length+n > d.window) {
				if !yield(cur, nil) {
					return
				}
				cur = nbdclient.Extent{}
			}
			if cur.Length == 0 {
				cur = nbdclient.Extent{Offset: start, Flags: d.flags[u]}
			}
			cur.Length += n
		}
		if cur.Length > 0 {
			yield(cur, nil)
		}
	}
}

func (d *fakeDisk) ReadSegments(ctx context.Context, buf []byte, segs []nbdclient.Segment) error {
	for _, s := range segs {
		for off := s.Offset; off < s.Offset+s.Length; off += unit - off%unit {
			if d.flags[off/unit]&nbdclient.Zero != 0 {
				d.t.Errorf("read of zero extent at %d", off)
			}
		}
		copy(buf[s.BufOffset:s.BufOffset+s.Length], d.data[s.Offset:])
		d.mu.Lock()
		d.reads += s.Length
		d.mu.Unlock()
	}
	return nil
}

// chunkOf is the true content of chunk i.
func (d *fakeDisk) chunkOf(cs int64, i int64) []byte {
	lo := i * cs
	return d.data[lo:min(lo+cs, int64(len(d.data)))]
}

func digestOf(p []byte) chunker.Digest {
	if chunker.IsZero(p) {
		return chunker.ZeroChunk
	}
	return chunker.Sum(p)
}

const cs = 256 << 10 // chunk size of the test repositories

func testRepo(t testing.TB) *repo.Repo {
	r, err := repo.Options{Opened: sink.NewNull()}.Init(context.Background(), repo.InitOptions{ChunkSize: cs})
	if err != nil {
		t.Fatal(err)
	}
	return r
}

// denseIndex is an index as the tests write it: a digest per chunk.
type denseIndex struct {
	Size    int64
	Digests []chunker.Digest
}

func newDense(size int64) *denseIndex {
	return &denseIndex{Size: size, Digests: make([]chunker.Digest, (size+cs-1)/cs)}
}

func (x *denseIndex) sparse() *index.Index {
	var b index.Builder
	for i, d := range x.Digests {
		b.Set(int64(i), d, chunker.Digest{})
	}
	return b.Index(cs, x.Size)
}

func denseOf(ix *index.Index) *denseIndex {
	x := newDense(ix.Size)
	for i, d := range ix.All() {
		x.Digests[i] = d
	}
	return x
}

// runJob backs d up (incrementally from parent, unless nil) and returns
// the disk's index after it.
func runJob(t testing.TB, r *repo.Repo, d *fakeDisk, parent *denseIndex, sample int, seed uint64) (*denseIndex, *Stats, error) {
	tuning := Tuning{Readers: 3, Workers: 2, Uploads: 2}
	j := &Job{Name: "vda", Disk: d, Repo: r, Buffers: NewBuffers(tuning, 1, cs), Tuning: tuning,
		Stats: &Stats{}, Sample: sample, Seed: seed}
	if parent != nil {
		j.Parent = parent.sparse()
	}
	res, err := j.Run(context.Background())
	if err != nil {
		return nil, j.Stats, err
	}
	if parent == nil {
		return denseOf(res.Index), j.Stats, nil
	}
	return denseOf(j.Parent.Apply(res.Delta)), j.Stats, nil
}

// indexOf is the index a full backup of d must produce.
func indexOf(d *fakeDisk) *denseIndex {
	ix := newDense(int64(len(d.data)))
	for i := range ix.Digests {
		ix.Digests[i] = digestOf(d.chunkOf(cs, int64(i)))
	}
	return ix
}

func TestPlanTable(t *testing.T) {
	data, zero, dirty := nbdclient.Flags(0), nbdclient.Hole|nbdclient.Zero, nbdclient.Dirty
	for _, tt := range []struct {
		name   string
		size   int64
		setup  func(d *fakeDisk)
		parent func(d *fakeDisk) *denseIndex // nil: full
		read   int64                         // bytes read (sample off)
		zeroed int64
	}{
		{"empty disk full", 4 * cs, func(d *fakeDisk) { d.set(0, 4*cs, zero, 0) }, nil, 0, 0},
		{"data in chunk 1 full", 4 * cs, func(d *fakeDisk) {
			d.set(0, 4*cs, zero, 0)
			d.set(cs+8192, 3*unit, data, 1)
		}, nil, 3 * unit, 0},
		{"partial last chunk full", 3*cs + 2*unit, func(d *fakeDisk) {
			d.set(0, 3*cs+2*unit, zero, 0)
			d.set(3*cs, 2*unit, data, 7)
		}, nil, 2 * unit, 0},
		{"dirty zero range becomes zero", 4 * cs, func(d *fakeDisk) {
			d.set(0, 4*cs, data, 1)
			d.set(cs, cs, zero|dirty, 0)
		}, func(d *fakeDisk) *denseIndex {
			ix := indexOf(d)
			ix.Digests[1] = chunker.Sum([]byte("old data"))
			return ix
		}, 0, 0},
		{"dirty island reads whole chunk", 4 * cs, func(d *fakeDisk) {
			d.set(0, 4*cs, data, 1)
			d.set(2*cs+unit, unit, data|dirty, 9)
		}, func(d *fakeDisk) *denseIndex {
			ix := indexOf(d)
			ix.Digests[2] = chunker.Sum([]byte("old"))
			return ix
		}, cs, 0},
		{"clean discard rebuilt as zero", 4 * cs, func(d *fakeDisk) {
			d.set(0, 4*cs, data, 1)
			d.set(3*cs, cs, zero, 0) // discarded behind the bitmap's back
		}, func(d *fakeDisk) *denseIndex {
			ix := indexOf(d)
			ix.Digests[3] = chunker.Sum([]byte("held data at the parent"))
			return ix
		}, 0, 1},
		{"grown disk: old last chunk stale", 3*cs + unit, func(d *fakeDisk) {
			d.set(0, 3*cs+unit, data, 2)
			d.set(3*cs, unit, data|dirty, 2) // written after the grow
		}, func(d *fakeDisk) *denseIndex {
			full := indexOf(d)
			old := newDense(2*cs + unit) // the disk was 2 chunks and a unit
			copy(old.Digests, full.Digests[:2])
			old.Digests[2] = chunker.Sum([]byte("short"))
			return old
		}, cs + unit, 0},
		{"grown disk: data past the old end the bitmap does not mark", 4 * cs, func(d *fakeDisk) {
			d.set(0, 4*cs, data, 4) // e.g. a backing file longer than the old disk
		}, func(d *fakeDisk) *denseIndex {
			full := indexOf(d)
			old := newDense(2 * cs)
			copy(old.Digests, full.Digests[:2])
			return old
		}, 2 * cs, 0},
		{"shrunk disk: new last chunk stale", 2*cs + unit, func(d *fakeDisk) {
			d.set(0, 2*cs+unit, data, 3)
		}, func(d *fakeDisk) *denseIndex {
			full := indexOf(d)
			old := newDense(4 * cs)
			copy(old.Digests, full.Digests[:2])
			old.Digests[2], old.Digests[3] = chunker.Sum([]byte("a")), chunker.Sum([]byte("b"))
			return old
		}, unit, 0},
	} {
		t.Run(tt.name, func(t *testing.T) {
			d := newFakeDisk(t, tt.size)
			tt.setup(d)
			var parent *denseIndex
			if tt.parent != nil {
				parent = tt.parent(d)
			}
			ix, st, err := runJob(t, testRepo(t), d, parent, 0, 1)
			if err != nil {
				t.Fatal(err)
			}
			if want := indexOf(d); !sameDigests(ix, want) {
				t.Fatalf("index differs from the disk's content")
			}
			if d.reads != tt.read || st.BytesRead.Load() != tt.read || st.ZeroedChunks != tt.zeroed {
				t.Fatalf("read %d (stats %d), zeroed %d; want %d, %d", d.reads, st.BytesRead.Load(), st.ZeroedChunks, tt.read, tt.zeroed)
			}
			if st.Done.Load() != tt.size {
				t.Fatalf("done %d of %d", st.Done.Load(), tt.size)
			}
			if !st.Planned.Load() || !st.Finished.Load() || st.ToRead.Load() != st.BytesRead.Load() {
				t.Fatalf("planned %v to read %d, finished %v; read %d", st.Planned.Load(), st.ToRead.Load(), st.Finished.Load(), st.BytesRead.Load())
			}
		})
	}
}

func sameDigests(a, b *denseIndex) bool {
	if a.Size != b.Size || len(a.Digests) != len(b.Digests) {
		return false
	}
	for i := range a.Digests {
		if a.Digests[i] != b.Digests[i] {
			return false
		}
	}
	return true
}

// The sample reads clean chunks and catches a bitmap that missed a change;
// it never trusts a clean chunk it read.
func TestSampleCatchesLies(t *testing.T) {
	d := newFakeDisk(t, 40*cs)
	d.set(0, 40*cs, 0, 1)
	parent := indexOf(d)
	d.set(5*cs, unit, 0, 0x40) // changed, but not marked dirty
	for seed := uint64(1); seed <= 20; seed++ {
		_, st, err := runJob(t, testRepo(t), d, parent, 40, seed)
		var be *BitmapError
		if !errors.As(err, &be) || be.Chunk != 5 || be.Disk != "vda" {
			t.Fatalf("seed %d: %v (verified %d)", seed, err, st.VerifiedChunks)
		}
	}
	// A sample of 4 of the 40 chunks misses it about 90% of the time: the
	// check is a sample, and says how much it read.
	caught := 0
	for seed := uint64(1); seed <= 200; seed++ {
		_, st, err := runJob(t, testRepo(t), d, parent, 4, seed)
		if err != nil {
			caught++
		} else if st.VerifiedChunks != 4 || st.VerifiedBytes != 4*cs {
			t.Fatalf("verified %d chunks, %d bytes", st.VerifiedChunks, st.VerifiedBytes)
		}
	}
	if caught < 5 || caught > 50 {
		t.Fatalf("a 4-chunk sample caught a 1-in-40 lie %d times in 200", caught)
	}
	// With the bitmap telling the truth the sample passes and reads what
	// it says.
	d.set(5*cs, unit, nbdclient.Dirty, 0x40)
	ix, st, err := runJob(t, testRepo(t), d, parent, 16, 3)
	if err != nil || !sameDigests(ix, indexOf(d)) || st.VerifiedChunks != 16 || d.reads == 0 {
		t.Fatalf("truthful bitmap: %v, verified %d", err, st.VerifiedChunks)
	}
}

func TestSampleSize(t *testing.T) {
	for _, tt := range []struct{ data, want int }{{0, 16}, {1, 17}, {1000, 17}, {1001, 18}, {100000, 116}, {300000, 256}} {
		var b index.Builder
		for i := range tt.data {
			b.Set(int64(i), chunker.Digest{1}, chunker.Digest{})
		}
		if got := SampleSize(b.Index(cs, int64(tt.data+5)*cs)); got != tt.want {
			t.Errorf("%d chunks with data: %d, want %d", tt.data, got, tt.want)
		}
	}
}

// FuzzPlan runs the pipeline on random disks (random data, holes, zero
// runs, dirty runs, extents split at random windows, a parent that agrees
// with the disk on clean chunks and not on dirty ones, grown and shrunk
// disks, discards the bitmap missed) and checks the result against a
// per-unit oracle: the index equals the disk's content, and exactly the
// non-zero units of the chunks that must be built or verified are read,
// once.
func FuzzPlan(f *testing.F) {
	f.Add([]byte{0, 1, 2, 3, 4, 5, 6, 7}, uint8(0), int16(0))
	f.Add([]byte{9, 200, 33, 7, 0, 0, 12, 250, 1}, uint8(3), int16(100))
	f.Add([]byte{255, 255, 255}, uint8(1), int16(-70))
	f.Add([]byte{1, 66, 130, 3}, uint8(7), int16(-300))
	f.Fuzz(func(t *testing.T, runs []byte, mode uint8, resize int16) {
		size := int64(len(runs)%7+1)*cs - int64(len(runs)%3)*unit
		d := newFakeDisk(t, size)
		d.window = int64(mode/8%4) * 3 * unit
		rng := rand.New(rand.NewPCG(uint64(len(runs)), uint64(mode)))
		for i, off := 0, int64(0); off < size; i++ {
			b := byte(i * 37)
			if len(runs) > 0 {
				b = runs[i%len(runs)]
			}
			n := min(size-off, int64(b%17+1)*unit)
			flags := []nbdclient.Flags{0, nbdclient.Hole | nbdclient.Zero, nbdclient.Zero, nbdclient.Hole}[b%4]
			if b&0x40 != 0 {
				flags |= nbdclient.Dirty
			}
			d.set(off, n, flags, byte(rng.Uint32()))
			off += n
		}
		incremental, sample := mode%2 == 1, 0
		if mode%4 == 3 {
			sample = 1000 // more than there are chunks: every clean chunk with data
		}
		var parent *denseIndex
		var stale map[int64]bool
		truth := indexOf(d)
		if incremental {
			oldSize := min(max(0, size+int64(resize)*unit/16), 8*cs)
			for u := oldSize / unit; u < int64(len(d.flags)); u++ {
				d.flags[u] |= nbdclient.Dirty // what a grow added was written since
			}
			parent = newDense(oldSize)
			_, st := parent.sparse().Resized(size)
			stale = map[int64]bool{}
			for _, i := range st {
				stale[i] = true
			}
			for i := range parent.Digests {
				in := int64(i) < int64(len(truth.Digests))
				switch {
				case in && !chunkDirty(d, int64(i)) && !stale[int64(i)] && (!truth.Digests[i].IsZeroChunk() || rng.IntN(4) > 0):
					parent.Digests[i] = truth.Digests[i]
				default: // changed since, or discarded behind the bitmap's back
					parent.Digests[i] = chunker.Sum([]byte(fmt.Sprint("old", i)))
				}
			}
		}
		ix, st, err := runJob(t, testRepo(t), d, parent, sample, 7)
		if err != nil {
			t.Fatal(err)
		}
		if !sameDigests(ix, truth) {
			t.Fatal("index differs from the disk's content")
		}
		var want, verified int64
		for i := range truth.Digests {
			lo, hi := int64(i)*cs, min(int64(i+1)*cs, size)
			var dataBytes int64
			for o := lo; o < hi; o += unit {
				if d.flags[o/unit]&nbdclient.Zero == 0 {
					dataBytes += min(unit, hi-o)
				}
			}
			switch built := !incremental || chunkDirty(d, int64(i)) || stale[int64(i)]; {
			case built:
				want += dataBytes
			case sample > 0 && dataBytes > 0:
				want += dataBytes
				verified++
			}
		}
		if d.reads != want || st.BytesRead.Load() != want || st.Done.Load() != size || st.VerifiedChunks != verified {
			t.Fatalf("read %d bytes (stats %d), want %d; done %d of %d; verified %d chunks, want %d",
				d.reads, st.BytesRead.Load(), want, st.Done.Load(), size, st.VerifiedChunks, verified)
		}
		// progress's total, planned before the first read, sample included
		if st.ToRead.Load() != want {
			t.Fatalf("planned to read %d bytes, read %d", st.ToRead.Load(), want)
		}
	})
}

func chunkDirty(d *fakeDisk, i int64) bool {
	for o := i * cs; o < min((i+1)*cs, int64(len(d.data))); o += unit {
		if d.flags[o/unit]&nbdclient.Dirty != 0 {
			return true
		}
	}
	return false
}

// Chunks the repository holds damaged are built from the disk although
// the bitmap calls them clean, stored again (Healed), and checked against
// the parent's digest: a difference is a change the bitmap missed.
func TestHealPlans(t *testing.T) {
	d := newFakeDisk(t, 20*cs)
	d.set(0, 20*cs, 0, 1)
	parent := indexOf(d)
	// The pattern repeats every 4 chunks: 1, 5, 9, ... share a digest.
	damaged := map[chunker.Digest]bool{parent.Digests[1]: true, parent.Digests[2]: true}
	heal := func() (Result, error) {
		tuning := Tuning{Readers: 3, Workers: 2, Uploads: 2}
		j := &Job{Name: "vda", Disk: d, Repo: testRepo(t), Buffers: NewBuffers(tuning, 1, cs), Tuning: tuning,
			Stats: &Stats{}, Sample: 0, Parent: parent.sparse(),
			Damaged: damaged}
		d.reads = 0
		return j.Run(context.Background())
	}
	res, err := heal()
	if err != nil || len(res.Healed) != 2 || d.reads != 10*cs || res.Delta.Len() != 0 {
		t.Fatalf("heal: %+v %v, read %d", res, err, d.reads)
	}
	for _, h := range res.Healed {
		if !damaged[h] {
			t.Errorf("healed %s", h)
		}
	}
	d.set(6*cs, unit, 0, 0x40) // changed, but not marked dirty
	var be *BitmapError
	if _, err := heal(); !errors.As(err, &be) || be.Chunk != 6 {
		t.Fatalf("a damaged chunk that changed behind the bitmap: %v", err)
	}
}

// On S3 the uploaders ask before a put only while it pays: a new disk's
// chunks are created at one round trip each after the first 16; a disk
// whose chunks are stored keeps being asked about, and nothing is
// uploaded twice.
func TestStoreAsksWhileItPays(t *testing.T) {
	c := &sinktest.Counting{Store: sinktest.NewS3(t, "")}
	r, err := repo.Options{Opened: c}.Init(t.Context(), repo.InitOptions{ChunkSize: cs})
	if err != nil {
		t.Fatal(err)
	}
	const n = 64
	d := newFakeDisk(t, n*cs)
	d.set(0, n*cs, 0, 1)
	rand.NewChaCha8([32]byte{1}).Read(d.data)
	run := func() *Stats {
		t.Helper()
		c.Stats.Store(0)
		c.Creates.Store(0)
		c.Puts.Store(0)
		tuning := Tuning{Readers: 2, Workers: 2, Uploads: 4}
		j := &Job{Name: "vda", Disk: d, Repo: r, Buffers: NewBuffers(tuning, 1, cs), Tuning: tuning, Stats: &Stats{}}
		res, err := j.Run(t.Context())
		if err != nil || !sameDigests(denseOf(res.Index), indexOf(d)) {
			t.Fatalf("run: %v", err)
		}
		return j.Stats
	}
	st := run()
	if c.Stats.Load() > 16+4 || c.Creates.Load() < n-16-4 || c.Stats.Load()+c.Creates.Load() != n || st.BytesDedup.Load() != 0 {
		t.Errorf("a new disk: %d stats, %d creates, %d puts, %d bytes deduplicated", c.Stats.Load(), c.Creates.Load(), c.Puts.Load(), st.BytesDedup.Load())
	}
	st = run()
	if c.Stats.Load() != n || c.Creates.Load()+c.Puts.Load() != 0 || st.BytesWritten.Load() != 0 || st.BytesDedup.Load() != n*cs {
		t.Errorf("a stored disk: %d stats, %d creates, %d puts, %d bytes written", c.Stats.Load(), c.Creates.Load(), c.Puts.Load(), st.BytesWritten.Load())
	}
}

// A dirty chunk is stored as a patch over the parent's chunk, and the
// patch covers a block the bitmap calls clean that reads as zeroes now (a
// discard it missed), where the parent's chunk has data: the patch
// applied to its base is the chunk. (A fake disk: no NBD server reports a
// discard its dirty bitmap missed.)
func TestPatchCoversMissedDiscard(t *testing.T) {
	r, err := repo.Options{Location: t.TempDir()}.Init(context.Background(), repo.InitOptions{ChunkSize: cs})
	if err != nil {
		t.Fatal(err)
	}
	d := newFakeDisk(t, 4*cs)
	d.set(0, 4*cs, 0, 0x10)
	tuning := Tuning{Readers: 2, Workers: 2, Uploads: 2}
	run := func(parent *index.Index) *index.Index {
		t.Helper()
		j := &Job{Name: "vda", Disk: d, Repo: r, Buffers: NewBuffers(tuning, 1, cs), Tuning: tuning, Stats: &Stats{}, Parent: parent}
		res, err := j.Run(context.Background())
		if err != nil {
			t.Fatal(err)
		}
		if parent == nil {
			return res.Index
		}
		return parent.Apply(res.Delta)
	}
	full := run(nil)
	d.set(cs+8192, 4096, nbdclient.Dirty, 0x99)                           // a write in block 0 of chunk 1
	d.set(cs+2*chunker.PatchBlock, chunker.PatchBlock, nbdclient.Zero, 0) // block 2 discarded behind the bitmap's back
	inc := run(full)
	if inc.Base(1) != full.Digest(1) || inc.Digest(1) != digestOf(d.chunkOf(cs, 1)) {
		t.Fatalf("chunk 1: %v over %v, want a patch over %v", inc.Digest(1), inc.Base(1), full.Digest(1))
	}
	got, _, err := r.GetEntry(context.Background(), inc.Digest(1), inc.Base(1), nil, nil)
	if err != nil || !bytes.Equal(got, d.chunkOf(cs, 1)) {
		t.Fatalf("the patch applied to its base: %v", err)
	}
}
