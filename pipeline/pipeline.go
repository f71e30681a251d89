package pipeline

import (
	"context"
	"fmt"
	"iter"
	"math/rand/v2"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nbdmover/nbdmover/chunker"
	"github.com/nbdmover/nbdmover/nbdclient"
	"github.com/nbdmover/nbdmover/repo"
	"github.com/nbdmover/nbdmover/repo/index"
	"golang.org/x/sync/errgroup"
)

// Disk is what the pipeline reads one disk from. *nbdclient.Pool is one;
// its methods may be called from any number of goroutines.
type Disk interface {
	Info() nbdclient.Info
	Extents(ctx context.Context, off, length int64) iter.Seq2[nbdclient.Extent, error]
	ReadSegments(ctx context.Context, buf []byte, segs []nbdclient.Segment) error
}

var _ Disk = (*nbdclient.Pool)(nil)

// bufPool is a fixed set of equal buffers: the pipeline's memory budget.
// get blocks until a buffer is free.
type bufPool chan []byte

func newBufPool(n int, size int64) bufPool {
	p := make(bufPool, n)
	for range n {
		p <- make([]byte, size)
	}
	return p
}

func (p bufPool) get(ctx context.Context) ([]byte, error) {
	select {
	case b := <-p:
		return b, nil
	case <-ctx.Done():
		return nil, context.Cause(ctx)
	}
}

func (p bufPool) put(b []byte) { p <- b[:cap(b)] }

// send delivers v on ch unless ctx ends first.
func send[T any](ctx context.Context, ch chan<- T, v T) error {
	select {
	case ch <- v:
		return nil
	case <-ctx.Done():
		return context.Cause(ctx)
	}
}

// Buffers are the chunk buffers shared by the disks of one backup.
type Buffers struct {
	plain bufPool // chunk plaintext: readers and workers
	blob  bufPool // encoded chunks: workers and uploaders
	// patches are the tokens of patches in flight (workers and
	// uploaders), each of its own allocations of at most a quarter of a
	// chunk, plaintext and blob.
	patches chan struct{}
}

// Tuning sizes the pipeline. Each disk runs Readers, Workers and Uploads
// goroutines, but the buffers are shared by the disks of a backup
// (Memory): Readers x disks + Workers + 2 plaintext buffers and Workers +
// Uploads + 2 blob buffers, so with several disks the pools, not the
// goroutines, bound what is in flight. An incremental's patches (a
// quarter of a chunk at most) take none of them but a token each, as
// many as blob buffers.
type Tuning struct {
	Readers int // NBD connections and reader goroutines per disk
	Workers int // digest/compress goroutines per disk (default: the CPUs)
	Uploads int // put goroutines per disk; default: 32 MiB of chunks, at least 8
	// ReadRate, when set, paces the reads from the NBD server (bytes
	// requested): --limit-read, shared by every disk and job that has it.
	ReadRate Pacer `json:"-"`
}

// Pacer waits until n more bytes may go (sink.Rate is one).
type Pacer interface {
	Wait(ctx context.Context, n int) error
}

// uploadBytes is what the default number of uploads keeps in flight: with
// small chunks, more puts at once hide an object store's per-request
// latency.
const uploadBytes = 32 << 20

// WithDefaults fills in the zero fields for a backup of chunkSize-byte
// chunks on a machine with cpus processors.
func (t Tuning) WithDefaults(cpus int, chunkSize int64) Tuning {
	if t.Readers <= 0 {
		t.Readers = 8
	}
	if t.Workers <= 0 {
		t.Workers = cpus
	}
	if t.Uploads <= 0 {
		t.Uploads = int(max(8, uploadBytes/chunkSize))
	}
	return t
}

// NewBuffers allocates the buffers of a backup of disks disks: Memory
// bytes.
func NewBuffers(t Tuning, disks int, chunkSize int64) *Buffers {
	plain, blob := t.buffers(disks)
	return &Buffers{
		plain:   newBufPool(plain, chunkSize),
		blob:    newBufPool(blob, int64(chunker.MaxBlobLen(int(chunkSize)))),
		patches: make(chan struct{}, blob),
	}
}

// buffers is how many plaintext and blob buffers a backup of disks disks
// uses.
func (t Tuning) buffers(disks int) (plain, blob int) {
	return t.Readers*disks + t.Workers + 2, t.Workers + t.Uploads + 2
}

// Memory is what NewBuffers allocates for a backup of disks disks, and
// what an incremental's patches in flight may take besides (as many as
// blob buffers, each a quarter of a chunk at most, plaintext and blob):
// the pipeline's memory, whatever the disks' sizes.
func (t Tuning) Memory(disks int, chunkSize int64) int64 {
	plain, blob := t.buffers(disks)
	patch := chunker.MaxPatchLen(chunkSize)
	return int64(plain)*chunkSize + int64(blob)*(int64(chunker.MaxBlobLen(int(chunkSize)))+patch+int64(chunker.MaxBlobLen(int(patch))))
}

// Stats are what one disk's backup moved. Fields are updated atomically
// while the backup runs; Done/Total drive progress.
type Stats struct {
	Total atomic.Int64 // disk bytes to account for (the disk size)
	Done  atomic.Int64 // disk bytes accounted for so far
	// ToRead is what the run will read from the disk (BytesRead at the
	// end), planned from the disk's extents before the first read, and
	// Planned says it is known: a progress's total. Started is when the
	// run began reading (unix nanoseconds); Finished is set when it ends
	// with its result.
	ToRead       atomic.Int64
	Planned      atomic.Bool
	Started      atomic.Int64
	Finished     atomic.Bool
	BytesRead    atomic.Int64 // bytes read from the NBD server
	BytesWritten atomic.Int64 // bytes stored (blobs)
	BytesDedup   atomic.Int64 // chunk bytes already in the repository
	BytesZero    atomic.Int64 // bytes of all-zero chunks
	Patched      atomic.Int64 // chunks stored as patches (their blobs are in BytesWritten)
	// Set when the run ends.
	BytesDirty     int64         // bytes the dirty bitmap marked (0 without one)
	VerifiedChunks int64         // clean chunks read and found equal to the parent's
	VerifiedBytes  int64         // bytes read for them
	ZeroedChunks   int64         // clean chunks unallocated now that held data at the parent
	PlanTime       time.Duration // the walk of the extents that planned ToRead
}

// Reset zeroes the counters, for a new run of the same disk.
func (s *Stats) Reset() {
	for _, c := range []*atomic.Int64{&s.Total, &s.Done, &s.ToRead, &s.Started, &s.BytesRead, &s.BytesWritten, &s.BytesDedup, &s.BytesZero, &s.Patched} {
		c.Store(0)
	}
	s.Planned.Store(false)
	s.Finished.Store(false)
	s.BytesDirty, s.VerifiedChunks, s.VerifiedBytes, s.ZeroedChunks, s.PlanTime = 0, 0, 0, 0, 0
}

// BitmapError says that a disk's dirty bitmap missed a change: a chunk it
// calls clean differs from the parent's (or, Chunk -1, the bitmap marks
// less than it did). Run returns it after every read in flight has
// finished, so the Disk can be read again.
type BitmapError struct {
	Disk   string
	Chunk  int64
	Offset int64
	Detail string
}

func (e *BitmapError) Error() string {
	if e.Chunk < 0 {
		return fmt.Sprintf("disk %s: the dirty bitmap %s", e.Disk, e.Detail)
	}
	return fmt.Sprintf("disk %s: the dirty bitmap missed a change: chunk %d (offset %d) %s", e.Disk, e.Chunk, e.Offset, e.Detail)
}

type readChunk struct {
	chunkPlan
	buf []byte
}

type upload struct {
	index  int64
	digest chunker.Digest
	base   chunker.Digest // a patch over base; zero: the chunk whole
	plain  int64          // plaintext length, for the dedup count
	blob   []byte
	pooled bool // blob is one of Buffers.blob
	patch  bool // a patch: it holds a token of Buffers.patches
}

// done returns the upload's blob to the pool it came from (or its
// patch's token).
func (u upload) done(b *Buffers) {
	switch {
	case u.pooled:
		b.blob.put(u.blob)
	case u.patch:
		<-b.patches
	}
}

// Job is the backup of one disk.
type Job struct {
	Name    string // the disk's name, for messages
	Disk    Disk
	Repo    *repo.Repo
	Buffers *Buffers
	Tuning  Tuning // with defaults filled in
	Stats   *Stats
	// Parent is the disk's index in the backup this one is incremental
	// from; nil for a full backup. It is not modified.
	Parent *index.Index
	// Sample is how many clean chunks an incremental run reads to verify
	// the dirty bitmap: below 0 for SampleSize, 0 for none.
	Sample int
	// Seed seeds the choice of sample chunks; 0 picks a random seed.
	Seed uint64
	// MinDirty, for a dirty bitmap that is never cleared, is how many
	// bytes it marked at the parent: marking fewer now means it was
	// cleared or re-created, and the run fails with a *BitmapError.
	MinDirty int64
	// Damaged are the chunks the repository holds damaged (verify's
	// records): never trusted from the parent or the store, but built
	// from the disk where the parent has them, and stored again. Not
	// modified.
	Damaged map[chunker.Digest]bool
}

// Result is what a disk's backup made: the disk's index (a full run), or
// what changed of the parent's (an incremental run).
type Result struct {
	Index *index.Index
	Delta *index.Delta
	// Healed are the damaged chunks the run stored again from the disk.
	Healed []chunker.Digest
}

// run is the state of one Job.Run.
type run struct {
	*Job
	resized *index.Index            // the parent's index resized to the disk; nil on a full run
	known   map[chunker.Digest]bool // chunks the parent references whole: stored, no upload or check
	// knownPatch: chunks the parent references as patches, by base.
	knownPatch map[chunker.Digest]chunker.Digest
	stale      map[int64]bool // chunks whose length changed with a resize
	seed       uint64         // of the sample's choice
	mu         sync.Mutex
	built      index.Builder    // the digests of the chunks built, under mu
	healed     []chunker.Digest // damaged chunks stored again, under mu
	// uploading holds the digests this run is uploading or has
	// uploaded, each with its base (zero: whole).
	uploading sync.Map
	// parentPatches holds, by chunk, the fetches of the parent's patches
	// of dirty chunks (*patchFetch); fetching limits them, fetches is
	// their goroutines (Run waits for them).
	parentPatches sync.Map
	fetching      chan struct{}
	fetches       sync.WaitGroup
	putter        *repo.Putter // stores the chunks (and learns whether asking the store first pays)
	// planned, planReads: chunks and bytes the planner sent; done: plans
	// the workers finished.
	planned, planReads, done atomic.Int64
	verified, verifiedBytes  atomic.Int64
	lie                      atomic.Pointer[BitmapError] // the first lie found
	plans                    []chan chunkPlan            // the planner's output, one channel per reader, while it runs
	planCtx                  context.Context
}

// Run backs the disk up: on a full run it returns the disk's index, on an
// incremental one what changed of the parent's (every index the chain
// makes is a synthetic full).
func (j *Job) Run(ctx context.Context) (Result, error) {
	size := j.Disk.Info().Size
	chunkSize := j.Repo.Config().ChunkSize
	fetches := patchFetches
	if j.Repo.Remote() {
		fetches = remotePatchFetches
	}
	r := &run{Job: j, putter: j.Repo.NewPutter(), fetching: make(chan struct{}, fetches)}
	j.Stats.Total.Store(size)
	grid := chunker.Grid{ChunkSize: chunkSize, Size: size}
	if j.Parent != nil {
		if j.Parent.ChunkSize != chunkSize {
			return Result{}, fmt.Errorf("disk %s: the parent's index has %d-byte chunks, the repository %d-byte ones",
				j.Name, j.Parent.ChunkSize, chunkSize)
		}
		r.parentState(size)
	}
	if err := r.count(ctx, grid); err != nil {
		return Result{}, err
	}
	p := r.planner(grid, r.plan, r.zero, r.skip)
	p.lie, p.lied = r.recordLie, func() bool { return r.lie.Load() != nil }
	err := r.pipe(ctx, p)
	r.fetches.Wait() // ended by now: pipe's context is cancelled when it returns
	if err != nil {
		return Result{}, err
	}
	j.Stats.BytesDirty, j.Stats.ZeroedChunks = p.dirtyBytes, p.zeroedClean
	j.Stats.VerifiedChunks, j.Stats.VerifiedBytes = r.verified.Load(), r.verifiedBytes.Load()
	if lie := r.lie.Load(); lie != nil {
		return Result{}, lie
	}
	// Never commit a partial result: every planned chunk was built and
	// every planned byte was read.
	if r.done.Load() != r.planned.Load() || j.Stats.BytesRead.Load() != r.planReads.Load() {
		return Result{}, fmt.Errorf("disk %s: internal error: planned %d chunks (%d bytes to read), built %d (%d bytes read)",
			j.Name, r.planned.Load(), r.planReads.Load(), r.done.Load(), j.Stats.BytesRead.Load())
	}
	j.Stats.Finished.Store(true)
	if j.Parent == nil {
		return Result{Index: r.built.Index(chunkSize, size), Healed: r.healed}, nil
	}
	return Result{Delta: r.built.Delta(j.Parent, size), Healed: r.healed}, nil
}

// parentState sets up an incremental run: the parent resized to the disk,
// its digests, the stale chunks and the sample's seed.
func (r *run) parentState(size int64) {
	var stale []int64
	r.resized, stale = r.Parent.Resized(size)
	r.known = make(map[chunker.Digest]bool, r.Parent.Len())
	r.knownPatch = map[chunker.Digest]chunker.Digest{}
	for i, d := range r.Parent.All() {
		switch base := r.Parent.Base(i); {
		case r.Damaged[d] || r.Damaged[base]:
		case base.IsZeroChunk():
			r.known[d] = true
		default:
			r.knownPatch[d] = base
		}
	}
	r.stale = map[int64]bool{}
	for _, i := range stale {
		r.stale[i] = true
	}
	r.seed = r.Seed
	if r.seed == 0 {
		r.seed = rand.Uint64()
	}
}

// planner is a planner of the run with the given outcomes: two planners
// of one run decide alike, sample included (given the same extents).
func (r *run) planner(grid chunker.Grid, build func(chunkPlan) error, zero func(i, n int64), skip func(first, count, bytes int64)) *planner {
	p := &planner{grid: grid, build: build, zero: zero, skip: skip,
		lie: func(*BitmapError) {}, lied: func() bool { return false }}
	if r.Parent == nil {
		return p
	}
	if len(r.Damaged) > 0 {
		p.heal = func(i int64) bool { return r.Damaged[r.resized.Digest(i)] || r.Damaged[r.resized.Base(i)] }
	}
	p.parent, p.stale, p.grown = r.resized, r.stale, r.Parent.Count()
	p.sample = r.Sample
	if p.sample < 0 {
		p.sample = SampleSize(r.Parent)
	}
	p.rng = rand.New(rand.NewPCG(r.seed, uint64(len(r.Name))))
	p.minDirty = r.MinDirty
	return p
}

// count plans the run without reading to learn what it will read, for
// progress: one walk of the disk's block status (and dirty bitmap), a few
// requests per GiB that holds data and far fewer where none does.
func (r *run) count(ctx context.Context, grid chunker.Grid) error {
	start := time.Now()
	defer func() { r.Stats.PlanTime = time.Since(start) }()
	var n int64
	p := r.planner(grid, func(c chunkPlan) error { n += c.readBytes(); return nil }, func(int64, int64) {}, func(int64, int64, int64) {})
	if err := p.run(ctx, r.Disk.Extents(ctx, 0, grid.Size)); err != nil {
		return fmt.Errorf("disk %s: %w", r.Name, err)
	}
	r.Stats.ToRead.Store(n)
	r.Stats.Started.Store(time.Now().UnixNano())
	r.Stats.Planned.Store(true)
	return nil
}

// set records a built chunk's digest (and base, when it is stored as a
// patch). A zero chunk where the parent has none (or on a full run)
// changes nothing and is not kept: memory is per chunk that holds data.
func (r *run) set(i int64, d, base chunker.Digest) {
	if d.IsZeroChunk() && (r.Parent == nil || r.Parent.Digest(i).IsZeroChunk()) {
		return
	}
	r.mu.Lock()
	r.built.Set(i, d, base)
	r.mu.Unlock()
}

// pipe runs the stages: planner -> readers -> workers -> uploaders.
func (r *run) pipe(ctx context.Context, p *planner) error {
	plans := make([]chan chunkPlan, r.Tuning.Readers)
	for i := range plans {
		plans[i] = make(chan chunkPlan, readStretch)
	}
	reads := make(chan readChunk, r.Tuning.Workers)
	uploads := make(chan upload, r.Tuning.Uploads)
	g, ctx := errgroup.WithContext(ctx)
	r.plans, r.planCtx = plans, ctx
	g.Go(func() error {
		defer func() {
			for _, c := range plans {
				close(c)
			}
		}()
		if err := p.run(ctx, r.Disk.Extents(ctx, 0, p.grid.Size)); err != nil {
			return fmt.Errorf("disk %s: %w", r.Name, err)
		}
		return nil
	})
	stage(g, r.Tuning.Readers, func() { close(reads) }, func(i int) error { return r.readAll(ctx, plans[i], reads) })
	stage(g, r.Tuning.Workers, func() { close(uploads) }, func(int) error { return r.digestAll(ctx, reads, uploads) })
	// Twice the uploads on a remote store: the chunks' buffers bound the
	// chunks in flight, and the others carry patches, small objects whose
	// cost is the round trip.
	uploaders := r.Tuning.Uploads
	if r.Repo.Remote() && r.Parent != nil && r.Repo.Patches() {
		uploaders *= 2
	}
	stage(g, uploaders, func() {}, func(int) error { return r.storeAll(ctx, uploads) })
	return g.Wait()
}

// readStretch is how many consecutive plans one reader takes before the
// next reader's turn: each NBD connection then reads runs of the disk, as
// nbdcopy does. Readers that took the next plan from one shared channel
// read neighbouring chunks at once, and QEMU's I/O threads spent 2-4x the
// CPU on the same bytes (4.5-6.8 against 1.1-1.9 core-s in a cold full;
// docs/performance.md, 2026-12-03).
const readStretch = 16

// plan sends a chunk to its reader, and starts fetching the parent's
// patch of it when it may be patched again.
func (r *run) plan(c chunkPlan) error {
	n := r.planned.Add(1) - 1
	r.planReads.Add(c.readBytes())
	if pd, pb, ok := r.patchable(c); ok && !pb.IsZeroChunk() && c.dirty.Bytes(c.n) <= chunker.MaxPatchData(c.n) {
		r.prefetch(c.index, pd, pb)
	}
	return send(r.planCtx, r.plans[int(n/int64(readStretch))%len(r.plans)], c)
}

// zero records a chunk built as the zero chunk without reading it.
func (r *run) zero(i, n int64) {
	r.set(i, chunker.ZeroChunk, chunker.Digest{})
	r.Stats.BytesZero.Add(n)
	r.Stats.Done.Add(n)
}

// skip accounts for chunks the planner does not build: zero chunks on a
// full run, the parent's digests on an incremental one.
func (r *run) skip(_, _, bytes int64) {
	if r.Parent == nil {
		r.Stats.BytesZero.Add(bytes)
	}
	r.Stats.Done.Add(bytes)
}

// stage runs f(0) .. f(n-1) in g and calls done once all have returned.
func stage(g *errgroup.Group, n int, done func(), f func(i int) error) {
	var wg sync.WaitGroup
	for i := range n {
		wg.Add(1)
		g.Go(func() error { defer wg.Done(); return f(i) })
	}
	g.Go(func() error { wg.Wait(); done(); return nil })
}

// readAll fills a buffer for each plan and passes it on.
func (r *run) readAll(ctx context.Context, plans <-chan chunkPlan, out chan<- readChunk) error {
	for p := range plans {
		buf, err := r.Buffers.plain.get(ctx)
		if err != nil {
			return err
		}
		buf = buf[:p.n]
		if err := r.read(ctx, p, buf); err != nil {
			r.Buffers.plain.put(buf)
			return err
		}
		if err := send(ctx, out, readChunk{p, buf}); err != nil {
			r.Buffers.plain.put(buf)
			return err
		}
	}
	return nil
}

// read fills buf with the chunk: the planned spans from the server, all
// in flight together, zeroes elsewhere (holes and zero extents are never
// requested).
func (r *run) read(ctx context.Context, p chunkPlan, buf []byte) error {
	segs := make([]nbdclient.Segment, len(p.reads))
	pos := int64(0)
	for i, s := range p.reads {
		clear(buf[pos:s.off])
		segs[i] = nbdclient.Segment{BufOffset: s.off, Offset: p.off + s.off, Length: s.n}
		pos = s.off + s.n
	}
	clear(buf[pos:])
	if r.Tuning.ReadRate != nil {
		if err := r.Tuning.ReadRate.Wait(ctx, int(p.readBytes())); err != nil {
			return err
		}
	}
	if err := r.Disk.ReadSegments(ctx, buf, segs); err != nil {
		return fmt.Errorf("disk %s: %w", r.Name, err)
	}
	r.Stats.BytesRead.Add(p.readBytes())
	return nil
}

// digestAll names each read chunk and passes on the uploads it needs.
func (r *run) digestAll(ctx context.Context, in <-chan readChunk, out chan<- upload) error {
	for rc := range in {
		if rc.kind == planVerify {
			r.verify(rc)
			r.Buffers.plain.put(rc.buf)
			r.done.Add(1)
			continue
		}
		u, err := r.digest(ctx, rc)
		r.Buffers.plain.put(rc.buf)
		r.done.Add(1)
		if err != nil {
			return err
		}
		if u.blob == nil {
			r.Stats.Done.Add(rc.n)
			continue
		}
		if err := send(ctx, out, u); err != nil {
			u.done(r.Buffers)
			return err
		}
	}
	return nil
}

// digest names a built chunk, records it in the index and returns the
// upload it needs (blob nil when none: zero, known, or already being
// uploaded by this run). Whether the store holds the chunk from elsewhere
// is the uploader's question: asked here, a round trip to S3 would stall
// the compressing workers.
func (r *run) digest(ctx context.Context, rc readChunk) (upload, error) {
	d := chunker.ZeroChunk
	if !chunker.IsZero(rc.buf) {
		d = r.Repo.Sum(rc.buf)
	}
	if rc.kind == planHeal {
		if want := r.resized.Digest(rc.index); d != want {
			r.recordLie(&BitmapError{Chunk: rc.index, Offset: rc.off,
				Detail: fmt.Sprintf("reads as %s, the parent's index says %s (read to rebuild its damaged copy)", digestName(d), digestName(want))})
		}
	}
	var none chunker.Digest
	switch base, patched := r.knownPatch[d]; {
	case d.IsZeroChunk():
		r.set(rc.index, d, none)
		r.Stats.BytesZero.Add(rc.n)
		return upload{}, nil
	case r.known[d]:
		r.set(rc.index, d, none)
		r.Stats.BytesDedup.Add(rc.n)
		return upload{}, nil
	case patched: // the parent's patch (of this chunk or another)
		r.set(rc.index, d, base)
		r.Stats.BytesDedup.Add(rc.n)
		return upload{}, nil
	}
	base, patch, err := r.patch(ctx, rc, d)
	if err != nil {
		return upload{}, err
	}
	if stored, dup := r.uploading.LoadOrStore(d, base); dup {
		if patch != nil {
			<-r.Buffers.patches
		}
		r.set(rc.index, d, stored.(chunker.Digest))
		r.Stats.BytesDedup.Add(rc.n)
		return upload{}, nil
	}
	r.set(rc.index, d, base)
	if patch != nil {
		// A patch's blob is its own allocation, a quarter of a chunk at
		// most: patches in flight do not take the chunks' buffers.
		r.Stats.Patched.Add(1)
		blob := make([]byte, 0, chunker.MaxBlobLen(len(patch)))
		return upload{index: rc.index, digest: d, base: base, plain: rc.n, blob: r.Repo.EncodePatch(blob, d, base, patch), patch: true}, nil
	}
	blob, err := r.Buffers.blob.get(ctx)
	if err != nil {
		return upload{}, err
	}
	return upload{index: rc.index, digest: d, plain: rc.n, blob: r.Repo.EncodeChunk(blob, d, rc.buf), pooled: true}, nil
}

// patchFetches bounds the parent's patches fetched at once (each a round
// trip to S3, beside the uploads), on a local store and on a remote one.
const patchFetches, remotePatchFetches = 16, 64

// patchable says whether a chunk to build may be stored as a patch: an
// incremental into a repository with patches, a dirty chunk of the
// length it had, whose parent entry pd (a patch over pb, or whole when
// pb is zero) is intact. A patch of it is over pd when pd is whole, else
// over pb (one level).
func (r *run) patchable(c chunkPlan) (pd, pb chunker.Digest, ok bool) {
	if r.Parent == nil || !r.Repo.Patches() || c.kind != planBuild || c.dirty == nil || r.stale[c.index] || c.index >= r.Parent.Count() {
		return pd, pb, false
	}
	pd, pb = r.resized.Digest(c.index), r.resized.Base(c.index)
	return pd, pb, !pd.IsZeroChunk() && !r.Damaged[pd] && !r.Damaged[pb]
}

// addUnread adds to set the blocks of c that c does not read whole.
func addUnread(set chunker.Blocks, c chunkPlan) {
	pos := int64(0) // every byte before pos is read, or its block is in set
	for _, s := range c.reads {
		if s.off > pos {
			set.AddRange(pos, s.off-pos)
		}
		pos = max(pos, s.off+s.n)
	}
	if pos < c.n {
		set.AddRange(pos, c.n-pos)
	}
}

// patchFetch is the fetch of a parent's patch: the blocks it holds.
type patchFetch struct {
	done   chan struct{}
	blocks chunker.Blocks
	err    error
}

// prefetch starts fetching the parent's patch of chunk i (d over base),
// which patch takes when the chunk is read.
func (r *run) prefetch(i int64, d, base chunker.Digest) {
	f := &patchFetch{done: make(chan struct{})}
	r.parentPatches.Store(i, f)
	r.fetches.Add(1)
	go func() {
		defer r.fetches.Done()
		defer close(f.done)
		select {
		case r.fetching <- struct{}{}:
		case <-r.planCtx.Done():
			f.err = context.Cause(r.planCtx)
			return
		}
		defer func() { <-r.fetching }()
		pt, _, err := r.Repo.GetPatch(r.planCtx, d, base, nil)
		if err == nil {
			f.blocks = pt.Blocks
		}
		f.err = err
	}()
}

// patch decides how chunk rc, named d, is stored: as a patch, returning
// its base and plaintext, when it is patchable and the blocks it may
// differ from the base in hold at most a quarter of it in data (blocks
// of zeroes cost nothing); whole otherwise (a zero base). Those blocks:
// the dirty ones; those the chunk has zero extents in (not read: a
// discard the bitmap missed reads as zeroes where the base has data);
// and, when the parent's entry is a patch, its blocks. A parent's patch
// that cannot be read makes the chunk whole (and the slot's base anew).
func (r *run) patch(ctx context.Context, rc readChunk, d chunker.Digest) (chunker.Digest, []byte, error) {
	var none chunker.Digest
	pd, pb, ok := r.patchable(rc.chunkPlan)
	if !ok || r.Damaged[d] {
		return none, nil, nil
	}
	set, base := slices.Clone(rc.dirty), pd
	addUnread(set, rc.chunkPlan)
	if !pb.IsZeroChunk() {
		v, _ := r.parentPatches.LoadAndDelete(rc.index)
		f, _ := v.(*patchFetch)
		if f == nil {
			return none, nil, nil
		}
		select {
		case <-f.done:
		case <-ctx.Done():
			return none, nil, context.Cause(ctx)
		}
		if f.err != nil || len(f.blocks) != len(set) {
			return none, nil, nil
		}
		base = pb
		set.Union(f.blocks)
	}
	if base == d || chunker.PatchData(rc.buf, set) > chunker.MaxPatchData(rc.n) {
		return none, nil, nil
	}
	select { // a token for the patch's memory, given back when it is stored
	case r.Buffers.patches <- struct{}{}:
	case <-ctx.Done():
		return none, nil, context.Cause(ctx)
	}
	return base, chunker.EncodePatch(make([]byte, 0, chunker.MaxPatchLen(rc.n)), base, rc.buf, set), nil
}

// verify checks a sample chunk the bitmap calls clean against the
// parent's digest, and records a lie when they differ.
func (r *run) verify(rc readChunk) {
	d := chunker.ZeroChunk
	if !chunker.IsZero(rc.buf) {
		d = r.Repo.Sum(rc.buf)
	}
	if want := r.resized.Digest(rc.index); d != want {
		r.recordLie(&BitmapError{Chunk: rc.index, Offset: rc.off,
			Detail: fmt.Sprintf("reads as %s, the parent's index says %s", digestName(d), digestName(want))})
		return
	}
	r.verified.Add(1)
	r.verifiedBytes.Add(rc.readBytes())
}

// recordLie keeps the first lie found on the disk.
func (r *run) recordLie(e *BitmapError) {
	e.Disk = r.Name
	r.lie.CompareAndSwap(nil, e)
}

func digestName(d chunker.Digest) string {
	if d.IsZeroChunk() {
		return "zeroes"
	}
	return d.String()[:16] + "…"
}

// storeAll stores the uploads.
func (r *run) storeAll(ctx context.Context, in <-chan upload) error {
	for u := range in {
		err := r.store(ctx, u)
		u.done(r.Buffers)
		if err != nil {
			return err
		}
		r.Stats.Done.Add(u.plain)
	}
	return nil
}

// store hands an upload's blob to the repository, which stores it unless
// it holds the chunk already (repo.Putter). A damaged chunk is stored
// whatever the store holds: that heals it.
func (r *run) store(ctx context.Context, u upload) error {
	heal := r.Damaged[u.digest] && u.base.IsZeroChunk()
	var held bool
	var err error
	if u.base.IsZeroChunk() {
		held, err = r.putter.Put(ctx, u.digest, u.blob, heal)
	} else {
		held, err = r.putter.PutPatch(ctx, u.digest, u.base, u.blob)
	}
	if err != nil {
		return fmt.Errorf("disk %s: store chunk %d: %w", r.Name, u.index, err)
	}
	if held {
		r.Stats.BytesDedup.Add(u.plain)
		return nil
	}
	if heal {
		r.mu.Lock()
		r.healed = append(r.healed, u.digest)
		r.mu.Unlock()
	}
	r.Stats.BytesWritten.Add(int64(len(u.blob)))
	return nil
}
