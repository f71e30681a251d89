// Package diskview reads one disk of one backup at any offset, as a block
// device is read: restore copies it to an image, and an NBD export (or a
// file-level restore) serves it.
//
// Words used here:
//
//   - A View is one disk of one backup. Its chunk grid (chunker.Grid) cuts
//     it into chunks; a chunk its index does not list is a zero chunk,
//     which reads as zeroes and is never fetched.
//   - A data chunk is fetched, decoded and checked against its name once
//     (repo.GetChunk: a damaged chunk is an error naming it, never wrong
//     bytes), then kept in a cache of decoded chunks bounded in bytes, the
//     least recently used going first.
//   - A flight is a fetch in progress: readers of a chunk being fetched
//     wait for it rather than fetch it again.
//   - A stream is a reader going forward: when a read starts at the data
//     chunk after the one a stream read last, the next data chunks are
//     fetched ahead (Options.ReadAhead) while it copies.
//
// Memory: the cache (Options.CacheBytes) plus the blobs of the fetches in
// flight (Options.Fetchers), whatever the disk's size.
package diskview

import (
	"container/list"
	"context"
	"errors"
	"fmt"
	"sort"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nbdmover/nbdmover/chunker"
	"github.com/nbdmover/nbdmover/repo"
	"github.com/nbdmover/nbdmover/repo/index"
)

// Options tune a View.
type Options struct {
	// CacheBytes bounds the decoded chunks kept (default 64 MiB, and at
	// least 2 x (ReadAhead + 4) chunks, so read-ahead never evicts what a
	// stream is about to read).
	CacheBytes int64
	// ReadAhead is how many data chunks are fetched ahead of a stream
	// (default 8; from a remote store, 32 MiB of chunks, at least 8).
	ReadAhead int
	// Fetchers bounds the fetches in flight (default ReadAhead + 4).
	Fetchers int
}

// View is a disk of a backup, readable at any offset by any number of
// goroutines at once.
type View struct {
	r    *repo.Repo
	ix   *index.Index
	grid chunker.Grid
	name string // "domain/id disk", for errors
	o    Options
	sem  chan struct{} // fetch slots
	// demand: more slots, for fetches a reader waits for, so that
	// fetches ahead never make a reader wait behind all of them.
	demand chan struct{}
	ahead  atomic.Int64 // fetches ahead started and not done

	bg     context.Context // prefetches; ends with Close
	stop   context.CancelFunc
	bgDone sync.WaitGroup

	hits, fetches atomic.Int64
	fetchTime     atomic.Int64 // nanoseconds

	mu      sync.Mutex
	cache   map[int64]*list.Element // of *entry, by chunk
	lru     *list.List              // front: most recently used
	used    int64                   // bytes in the cache
	flights map[int64]*flight
	streams []stream
}

type entry struct {
	chunk int64
	data  []byte
}

type flight struct {
	done chan struct{}
	data []byte
	err  error
}

// stream is a reader going forward: last is the data chunk (its index
// in the index) it read last, ahead the furthest it had fetched ahead.
type stream struct {
	last, ahead int
	used        uint64 // when it was last used (a counter), to replace the oldest
}

const maxStreams = 8

// Open returns the view of disk of backup m.
func Open(ctx context.Context, r *repo.Repo, m *repo.Manifest, disk string, o Options) (*View, error) {
	ix, err := r.LoadIndex(ctx, m, disk)
	if err != nil {
		return nil, err
	}
	chunk := r.Config().ChunkSize
	if o.ReadAhead <= 0 {
		o.ReadAhead = 8
		if r.Remote() { // a fetch waits a round trip: 32 MiB of chunks in flight
			o.ReadAhead = int(max(8, (32<<20)/chunk))
		}
	}
	if o.Fetchers <= 0 {
		o.Fetchers = o.ReadAhead + 4
	}
	if o.CacheBytes <= 0 {
		o.CacheBytes = 64 << 20
	}
	o.CacheBytes = max(o.CacheBytes, 2*int64(o.ReadAhead+4)*chunk)
	bg, stop := context.WithCancel(context.WithoutCancel(ctx))
	return &View{r: r, ix: ix, grid: ix.Grid(), name: fmt.Sprintf("%s/%s disk %s", m.Domain, m.ID, disk), o: o,
		sem: make(chan struct{}, o.Fetchers), demand: make(chan struct{}, max(2, o.Fetchers/4)), bg: bg, stop: stop,
		cache: map[int64]*list.Element{}, lru: list.New(), flights: map[int64]*flight{}}, nil
}

// Close stops the fetches ahead and drops the cache. Reads after Close
// still work, without the cache's help.
func (v *View) Close() {
	v.stop()
	v.bgDone.Wait()
	v.mu.Lock()
	v.cache, v.lru, v.used = map[int64]*list.Element{}, list.New(), 0
	v.mu.Unlock()
}

// Size is the disk's size in bytes.
func (v *View) Size() int64 { return v.grid.Size }

// Grid is the disk's chunk grid.
func (v *View) Grid() chunker.Grid { return v.grid }

// DataChunks is how many chunks hold data (the others read as zeroes).
func (v *View) DataChunks() int { return v.ix.Len() }

// DataChunk returns the k-th chunk that holds data (0 <= k < DataChunks):
// its index in the grid.
func (v *View) DataChunk(k int) int64 {
	i, _ := v.ix.At(k)
	return i
}

// ErrRange is matched by the error of a read outside the disk.
var ErrRange = errors.New("read outside the disk")

// ReadAt reads len(p) bytes at off: zeroes where the backup holds none,
// the backup's bytes elsewhere. A chunk that cannot be read whole is an
// error naming it (a *repo.ChunkError); p is then partly filled.
func (v *View) ReadAt(ctx context.Context, p []byte, off int64) error {
	return v.Pieces(ctx, off, int64(len(p)), func(pos int64, data []byte, n int64) error {
		dst := p[pos-off : pos-off+n]
		if data == nil {
			clear(dst)
		} else {
			copy(dst, data)
		}
		return nil
	})
}

// Pieces calls fn with the bytes of [off, off+n), in order, without
// copying them: data is part of a cached chunk (shared: it must not be
// changed; it stays valid after fn returns), or nil for n bytes of
// zeroes (zero chunks next to each other are one piece). The chunks of
// the range are fetched in parallel, and a read that goes on from where
// an earlier one stopped fetches the data chunks after it ahead.
func (v *View) Pieces(ctx context.Context, off, n int64, fn func(off int64, data []byte, n int64) error) error {
	end := off + n
	if off < 0 || n < 0 || end > v.grid.Size || end < off {
		return fmt.Errorf("%s: %w: %d bytes at %d of %d", v.name, ErrRange, n, off, v.grid.Size)
	}
	if n == 0 {
		return nil
	}
	first, last := off/v.grid.ChunkSize, (end-1)/v.grid.ChunkSize
	for i := first + 1; i <= last; i++ { // the first is fetched below, at once
		v.Prefetch(i)
	}
	zeroFrom := int64(-1) // start of the pending zero piece
	for pos := off; pos < end; {
		i := pos / v.grid.ChunkSize
		cOff, cLen := v.grid.Chunk(i)
		m := min(end, cOff+cLen) - pos
		data, err := v.Chunk(ctx, i)
		if err != nil {
			return err
		}
		switch {
		case data == nil && zeroFrom < 0:
			zeroFrom = pos
		case data != nil:
			if zeroFrom >= 0 {
				if err := fn(zeroFrom, nil, pos-zeroFrom); err != nil {
					return err
				}
				zeroFrom = -1
			}
			if err := fn(pos, data[pos-cOff:pos-cOff+m], m); err != nil {
				return err
			}
		}
		pos += m
	}
	if zeroFrom >= 0 {
		if err := fn(zeroFrom, nil, end-zeroFrom); err != nil {
			return err
		}
	}
	v.stream(first, last)
	return nil
}

// Run is a stretch of the disk: zero chunks, or data chunks.
type Run struct {
	Length int64
	Zero   bool
}

// Allocation describes [off, off+n) as at most max runs (max >= 1), in
// order, alternating between zero and data; the last run may end before
// off+n when max runs do not reach it. It reads only the index: its cost
// is in the runs, not in the chunks they span.
func (v *View) Allocation(off, n int64, max int) []Run {
	end := min(off+n, v.grid.Size)
	var runs []Run
	for pos := off; pos < end && len(runs) < max; {
		i := pos / v.grid.ChunkSize
		k := v.dataAtOrAfter(i)
		var next int64 // where the run starting at pos ends
		zero := k == v.ix.Len() || v.DataChunk(k) != i
		if zero {
			next = end
			if k < v.ix.Len() {
				next, _ = v.grid.Chunk(v.DataChunk(k))
			}
		} else { // data: up to the first chunk after a run of consecutive data chunks
			j := k
			for j+1 < v.ix.Len() && v.DataChunk(j+1) == v.DataChunk(j)+1 && v.DataChunk(j+1)*v.grid.ChunkSize < end {
				j++
			}
			c, l := v.grid.Chunk(v.DataChunk(j))
			next = c + l
		}
		next = min(next, end)
		runs = append(runs, Run{Length: next - pos, Zero: zero})
		pos = next
	}
	return runs
}

// Chunk returns the decoded bytes of chunk i of the grid (nil for a zero
// chunk), fetching it unless it is cached or being fetched. The bytes
// are shared: callers must not change them. A fetch serves every reader
// waiting for it, so it does not end with the context of the reader that
// started it: a cancelled reader only stops waiting.
func (v *View) Chunk(ctx context.Context, i int64) ([]byte, error) {
	if v.ix.Digest(i).IsZeroChunk() {
		return nil, nil
	}
	v.mu.Lock()
	if e, ok := v.cache[i]; ok {
		v.lru.MoveToFront(e)
		v.mu.Unlock()
		v.hits.Add(1)
		return e.Value.(*entry).data, nil
	}
	f, ok := v.flights[i]
	if !ok {
		f = &flight{done: make(chan struct{})}
		v.flights[i] = f
		v.bgDone.Add(1)
		go func() {
			defer v.bgDone.Done()
			fctx := v.bg
			if fctx.Err() != nil { // after Close
				fctx = context.WithoutCancel(ctx)
			}
			v.fetch(fctx, i, f, true)
		}()
	}
	v.mu.Unlock()
	select {
	case <-f.done:
		return f.data, f.err
	case <-ctx.Done():
		return nil, context.Cause(ctx)
	}
}

// Stats count a view's reads of chunks.
type Stats struct {
	Hits      int64         // chunks found in the cache
	Fetches   int64         // chunks fetched from the repository
	FetchTime time.Duration // their fetches' time, added up
}

// Stats returns what the view did so far.
func (v *View) Stats() Stats {
	return Stats{Hits: v.hits.Load(), Fetches: v.fetches.Load(), FetchTime: time.Duration(v.fetchTime.Load())}
}

// PrefetchRange starts fetching the data chunks of [off, off+n) (at most
// as many as the cache holds: the rest would evict the first).
func (v *View) PrefetchRange(off, n int64) {
	end := min(off+n, v.grid.Size)
	if off < 0 || off >= end {
		return
	}
	budget := v.o.CacheBytes / v.grid.ChunkSize / 2
	for k := v.dataAtOrAfter(off / v.grid.ChunkSize); k < v.ix.Len() && budget > 0; k, budget = k+1, budget-1 {
		i := v.DataChunk(k)
		if i*v.grid.ChunkSize >= end {
			return
		}
		v.Prefetch(i)
	}
}

// Prefetch starts fetching chunk i of the grid in the background unless it
// is a zero chunk, cached or being fetched, or twice Fetchers fetches
// ahead are waiting or running already (it is then dropped: a flood of
// NBD_CMD_CACHE starts no more).
func (v *View) Prefetch(i int64) {
	if v.ix.Digest(i).IsZeroChunk() || v.bg.Err() != nil {
		return
	}
	v.mu.Lock()
	_, cached := v.cache[i]
	_, flying := v.flights[i]
	if cached || flying || v.ahead.Load() >= 2*int64(v.o.Fetchers) {
		v.mu.Unlock()
		return
	}
	f := &flight{done: make(chan struct{})}
	v.flights[i] = f
	v.bgDone.Add(1)
	v.ahead.Add(1)
	v.mu.Unlock()
	go func() {
		defer v.bgDone.Done()
		defer v.ahead.Add(-1)
		v.fetch(v.bg, i, f, false)
	}()
}

// fetch fetches and decodes chunk i for the flight f (one fetch slot;
// a reader's fetch may also take a demand slot), caches it, and lands
// the flight.
func (v *View) fetch(ctx context.Context, i int64, f *flight, demand bool) {
	var slot chan struct{}
	if demand {
		select {
		case v.sem <- struct{}{}:
			slot = v.sem
		case v.demand <- struct{}{}:
			slot = v.demand
		case <-ctx.Done():
		}
	} else {
		select {
		case v.sem <- struct{}{}:
			slot = v.sem
		case <-ctx.Done():
		}
	}
	if slot != nil {
		d := v.ix.Digest(i)
		start := time.Now()
		f.data, _, f.err = v.r.GetEntry(ctx, d, v.ix.Base(i), nil, nil)
		<-slot
		v.fetches.Add(1)
		v.fetchTime.Add(int64(time.Since(start)))
		if _, n := v.grid.Chunk(i); f.err == nil && int64(len(f.data)) != n {
			f.err = &repo.ChunkError{Key: repo.ChunkKey(d),
				Err: fmt.Errorf("%w: %d bytes for chunk %d of %d bytes", chunker.ErrCorrupt, len(f.data), i, n)}
		}
	} else {
		f.err = context.Cause(ctx)
	}
	if f.err != nil {
		f.err = fmt.Errorf("%s: %w", v.name, f.err)
		f.data = nil
	}
	v.mu.Lock()
	delete(v.flights, i)
	if f.err == nil {
		v.insert(i, f.data)
	}
	v.mu.Unlock()
	close(f.done)
}

// insert caches chunk i's bytes, dropping the least recently used chunks
// beyond CacheBytes. v.mu is held.
func (v *View) insert(i int64, data []byte) {
	if _, ok := v.cache[i]; ok {
		return
	}
	v.cache[i] = v.lru.PushFront(&entry{i, data})
	v.used += int64(len(data))
	for v.used > v.o.CacheBytes && v.lru.Len() > 1 {
		e := v.lru.Back().Value.(*entry)
		v.lru.Remove(v.lru.Back())
		delete(v.cache, e.chunk)
		v.used -= int64(len(e.data))
	}
}

// stream notes a read of chunks first..last of the grid and, when it goes
// on from where a stream stopped, fetches the next data chunks ahead.
func (v *View) stream(first, last int64) {
	kFirst := v.dataAtOrAfter(first)
	kLast := v.dataAtOrAfter(last+1) - 1 // the last data chunk read (kFirst-1 when none)
	v.mu.Lock()
	var s *stream
	var tick uint64
	for j := range v.streams {
		tick = max(tick, v.streams[j].used)
	}
	for j := range v.streams {
		// Going on: the read starts at the data chunk a stream read last
		// (small reads within one chunk), or the one after it.
		if st := &v.streams[j]; kFirst == st.last || kFirst == st.last+1 {
			s = st
			break
		}
	}
	if s == nil {
		if len(v.streams) < maxStreams {
			v.streams = append(v.streams, stream{last: kLast, ahead: kLast, used: tick + 1})
		} else {
			oldest := 0
			for j := range v.streams {
				if v.streams[j].used < v.streams[oldest].used {
					oldest = j
				}
			}
			v.streams[oldest] = stream{last: kLast, ahead: kLast, used: tick + 1}
		}
		v.mu.Unlock()
		return
	}
	s.last, s.used = max(s.last, kLast), tick+1
	from, to := max(s.ahead, s.last)+1, min(s.last+v.o.ReadAhead, v.ix.Len()-1)
	if to >= from {
		s.ahead = to
	}
	v.mu.Unlock()
	for k := from; k <= to; k++ {
		v.Prefetch(v.DataChunk(k))
	}
}

// dataAtOrAfter is the position in the index of the first data chunk at
// or after chunk i of the grid (DataChunks when there is none).
func (v *View) dataAtOrAfter(i int64) int {
	return sort.Search(v.ix.Len(), func(k int) bool { c, _ := v.ix.At(k); return c >= i })
}
