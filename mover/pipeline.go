package mover

import (
	"context"
	"fmt"
	"sync"
	"sync/atomic"

	"github.com/nbdmover/nbdmover/chunker"
	"github.com/nbdmover/nbdmover/nbdclient"
	"github.com/nbdmover/nbdmover/repo"
	"golang.org/x/sync/errgroup"
)

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

// buffers are shared by the disks of one backup.
type buffers struct {
	plain bufPool // chunk plaintext: readers and workers
	blob  bufPool // encoded chunks: workers and uploaders
}

// Tuning sizes the pipeline. Memory is about
// (Readers*disks + 2*Workers + Uploads + 4) x chunk size.
type Tuning struct {
	Readers int // NBD connections and reader goroutines per disk
	Workers int // digest/compress goroutines per disk
	Uploads int // concurrent puts per disk; default: 32 MiB of chunks, at least 8
}

// uploadBytes is what the default number of uploads keeps in flight: with
// small chunks, more puts at once hide an object store's per-request
// latency.
const uploadBytes = 32 << 20

func (t Tuning) withDefaults(cpus int) Tuning {
	if t.Readers <= 0 {
		t.Readers = 8
	}
	if t.Workers <= 0 {
		t.Workers = cpus
	}
	return t
}

// forChunks sets the default number of uploads for a chunk size.
func (t Tuning) forChunks(chunkSize int64) Tuning {
	if t.Uploads <= 0 {
		t.Uploads = int(max(8, uploadBytes/chunkSize))
	}
	return t
}

func newBuffers(t Tuning, disks int, chunkSize int64) *buffers {
	return &buffers{
		plain: newBufPool(t.Readers*disks+t.Workers+2, chunkSize),
		blob:  newBufPool(t.Workers+t.Uploads+2, int64(chunker.MaxBlobLen(int(chunkSize)))),
	}
}

// DiskStats are what one disk's backup moved. Fields are updated
// atomically while the backup runs; Done/Total drive progress.
type DiskStats struct {
	Total        atomic.Int64 // disk bytes to account for (the disk size)
	Done         atomic.Int64 // disk bytes accounted for so far
	BytesRead    atomic.Int64 // bytes read from the NBD server
	BytesWritten atomic.Int64 // bytes stored (blobs)
	BytesDedup   atomic.Int64 // chunk bytes already in the repository
	BytesZero    atomic.Int64 // bytes of all-zero chunks
}

// span is a range of the disk, relative to a chunk's start.
type span struct{ off, n int64 }

// chunkPlan says how to build one chunk: read the spans, zero the rest.
type chunkPlan struct {
	index int64
	off   int64 // disk offset of the chunk
	n     int64 // chunk length
	reads []span
}

type readChunk struct {
	chunkPlan
	buf []byte
}

type upload struct {
	index int64
	plain int64 // plaintext length, for the dedup count
	blob  []byte
}

// diskJob is the backup of one disk.
type diskJob struct {
	name   string
	pool   *nbdclient.Pool
	repo   *repo.Repo
	bufs   *buffers
	tuning Tuning
	// parent is the index to start from on an incremental run, resized to
	// the disk; run updates it in place and returns it. nil means full.
	// stale chunks must be read even if not dirty.
	parent *repo.Index
	stale  []int64
	// known are digests already stored, that need no upload or check.
	known map[chunker.Digest]bool
	stats *DiskStats
}

// run backs the disk up and returns its new index.
func (j *diskJob) run(ctx context.Context) (*repo.Index, error) {
	size := j.pool.Info().Size
	ix := j.parent // already a private copy, resized to the disk
	if ix == nil {
		ix = repo.NewIndex(j.repo.Config().ChunkSize, size)
	}
	j.stats.Total.Store(size)

	var planned, planReads atomic.Int64 // chunks and bytes the planner sent
	var built atomic.Int64              // chunks whose digest was set
	var uploading sync.Map              // digests being or been uploaded by this run

	plans := make(chan chunkPlan, j.tuning.Readers)
	reads := make(chan readChunk, j.tuning.Workers)
	uploads := make(chan upload, j.tuning.Uploads)
	g, ctx := errgroup.WithContext(ctx)

	g.Go(func() error {
		defer close(plans)
		return j.plan(ctx, ix.Grid(), plans, &planned, &planReads)
	})

	var readers sync.WaitGroup
	for range j.tuning.Readers {
		readers.Add(1)
		g.Go(func() error {
			defer readers.Done()
			for p := range plans {
				buf, err := j.bufs.plain.get(ctx)
				if err != nil {
					return err
				}
				buf = buf[:p.n]
				if err := j.read(ctx, p, buf); err != nil {
					j.bufs.plain.put(buf)
					return err
				}
				if err := send(ctx, reads, readChunk{p, buf}); err != nil {
					j.bufs.plain.put(buf)
					return err
				}
			}
			return nil
		})
	}
	g.Go(func() error { readers.Wait(); close(reads); return nil })

	var workers sync.WaitGroup
	for range j.tuning.Workers {
		workers.Add(1)
		g.Go(func() error {
			defer workers.Done()
			for rc := range reads {
				u, err := j.digest(ctx, rc, ix, &uploading)
				j.bufs.plain.put(rc.buf)
				built.Add(1)
				if err != nil {
					return err
				}
				if u.blob == nil {
					j.stats.Done.Add(rc.n)
					continue
				}
				if err := send(ctx, uploads, u); err != nil {
					j.bufs.blob.put(u.blob)
					return err
				}
			}
			return nil
		})
	}
	g.Go(func() error { workers.Wait(); close(uploads); return nil })

	for range j.tuning.Uploads {
		g.Go(func() error {
			for u := range uploads {
				err := j.store(ctx, u, ix.Digests[u.index])
				j.bufs.blob.put(u.blob)
				if err != nil {
					return err
				}
				j.stats.Done.Add(u.plain)
			}
			return nil
		})
	}
	if err := g.Wait(); err != nil {
		return nil, err
	}
	// Never commit a partial result: every planned chunk was built and
	// every planned byte was read.
	if built.Load() != planned.Load() || j.stats.BytesRead.Load() != planReads.Load() {
		return nil, fmt.Errorf("disk %s: internal error: planned %d chunks (%d bytes to read), built %d (%d bytes read)",
			j.name, planned.Load(), planReads.Load(), built.Load(), j.stats.BytesRead.Load())
	}
	return ix, nil
}

// plan walks the disk's extents window by window and sends a plan for each
// chunk that must be built: on a full run, every chunk that is not all
// holes/zeroes; on an incremental run, every chunk a dirty extent touches
// (and the stale ones). Chunks left out keep their index entry (zero on a
// full run, the parent's digest on an incremental one).
func (j *diskJob) plan(ctx context.Context, g chunker.Grid, out chan<- chunkPlan, planned, planReads *atomic.Int64) error {
	incremental := j.parent != nil
	stale := map[int64]bool{}
	for _, i := range j.stale {
		stale[i] = true
	}
	var cur *chunkPlan
	touched := false
	flush := func() error {
		if cur == nil {
			return nil
		}
		p := *cur
		cur = nil
		build := (!incremental || touched || stale[p.index]) && (len(p.reads) > 0 || incremental)
		if !build {
			// Full run: nothing to read means a zero chunk. Incremental:
			// untouched, the parent's digest stands.
			if !incremental {
				j.stats.BytesZero.Add(p.n)
			}
			j.stats.Done.Add(p.n)
			return nil
		}
		planned.Add(1)
		for _, s := range p.reads {
			planReads.Add(s.n)
		}
		return send(ctx, out, p)
	}
	for e, err := range j.pool.Extents(ctx, 0, g.Size) {
		if err != nil {
			return fmt.Errorf("disk %s: %w", j.name, err)
		}
		for off := e.Offset; off < e.End(); {
			i := g.Index(off)
			if cur == nil || cur.index != i {
				if err := flush(); err != nil {
					return err
				}
				coff, n := g.Chunk(i)
				cur = &chunkPlan{index: i, off: coff, n: n}
				touched = false
			}
			end := min(e.End(), cur.off+cur.n)
			if e.Flags&nbdclient.Zero == 0 {
				rel := off - cur.off
				if k := len(cur.reads) - 1; k >= 0 && cur.reads[k].off+cur.reads[k].n == rel {
					cur.reads[k].n += end - off
				} else {
					cur.reads = append(cur.reads, span{rel, end - off})
				}
			}
			if e.Flags&nbdclient.Dirty != 0 {
				touched = true
			}
			off = end
		}
	}
	return flush()
}

// read fills buf with the chunk: the planned spans from the server, all
// in flight together, zeroes elsewhere (holes and zero extents are never
// requested).
func (j *diskJob) read(ctx context.Context, p chunkPlan, buf []byte) error {
	segs := make([]nbdclient.Segment, len(p.reads))
	pos := int64(0)
	var n int64
	for i, s := range p.reads {
		clear(buf[pos:s.off])
		segs[i] = nbdclient.Segment{BufOffset: s.off, Offset: p.off + s.off, Length: s.n}
		pos = s.off + s.n
		n += s.n
	}
	clear(buf[pos:])
	if err := j.pool.ReadSegments(ctx, buf, segs); err != nil {
		return fmt.Errorf("disk %s: %w", j.name, err)
	}
	j.stats.BytesRead.Add(n)
	return nil
}

// digest names a built chunk, records it in the index and returns the
// upload it needs (blob nil when none: zero, known, or already being
// uploaded by this run). Whether the store holds the chunk from elsewhere
// is the uploader's question: asked here, a round trip to S3 would stall
// the compressing workers.
func (j *diskJob) digest(ctx context.Context, rc readChunk, ix *repo.Index, uploading *sync.Map) (upload, error) {
	if chunker.IsZero(rc.buf) {
		ix.Digests[rc.index] = chunker.ZeroChunk
		j.stats.BytesZero.Add(rc.n)
		return upload{}, nil
	}
	d := chunker.Sum(rc.buf)
	ix.Digests[rc.index] = d
	if j.known[d] {
		j.stats.BytesDedup.Add(rc.n)
		return upload{}, nil
	}
	if _, dup := uploading.LoadOrStore(d, true); dup {
		j.stats.BytesDedup.Add(rc.n)
		return upload{}, nil
	}
	blob, err := j.bufs.blob.get(ctx)
	if err != nil {
		return upload{}, err
	}
	return upload{index: rc.index, plain: rc.n, blob: j.repo.Encode(blob, rc.buf)}, nil
}

// store puts an upload's blob unless the store already holds the chunk
// (stored by a backup other than the parent, or by one that failed before
// its commit).
func (j *diskJob) store(ctx context.Context, u upload, d chunker.Digest) error {
	stored, err := j.repo.HasChunk(ctx, d)
	if err != nil {
		return fmt.Errorf("disk %s: chunk %d: %w", j.name, u.index, err)
	}
	if stored {
		j.stats.BytesDedup.Add(u.plain)
		return nil
	}
	if err := j.repo.Store().Put(ctx, repo.ChunkKey(d), u.blob); err != nil {
		return fmt.Errorf("disk %s: store chunk %d: %w", j.name, u.index, err)
	}
	j.stats.BytesWritten.Add(int64(len(u.blob)))
	return nil
}
