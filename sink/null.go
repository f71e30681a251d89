package sink

import (
	"context"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
)

// Null is a store for benchmarks: it discards chunk objects (keys under
// "chunks/") after counting their bytes, and keeps every other object
// (configuration, manifests, indexes) in memory. Nothing survives the
// process; never use it for real backups.
type Null struct {
	Discarded atomic.Int64 // bytes of chunk objects thrown away

	mu   sync.Mutex
	meta map[string][]byte
}

var _ Store = (*Null)(nil)

func NewNull() *Null { return &Null{meta: map[string][]byte{}} }

func (n *Null) Location() string { return "null: (discards chunks)" }

func (n *Null) Put(ctx context.Context, key string, data []byte) error {
	return n.write("put", key, data, true)
}

func (n *Null) Create(ctx context.Context, key string, data []byte) error {
	return n.write("create", key, data, false)
}

// write counts a chunk's bytes and keeps any other object, replacing one
// that exists only when replace.
func (n *Null) write(op, key string, data []byte, replace bool) error {
	if err := ValidKey(key); err != nil {
		return &Error{Op: op, Key: key, Location: n.Location(), Err: err}
	}
	if strings.HasPrefix(key, "chunks/") || strings.HasPrefix(key, "patches/") {
		n.Discarded.Add(int64(len(data)))
		return nil
	}
	n.mu.Lock()
	defer n.mu.Unlock()
	if _, ok := n.meta[key]; ok && !replace {
		return &Error{Op: op, Key: key, Location: n.Location(), Err: ErrExists}
	}
	n.meta[key] = append([]byte(nil), data...)
	return nil
}

func (n *Null) Get(ctx context.Context, key string, buf []byte, limit int64) ([]byte, error) {
	n.mu.Lock()
	defer n.mu.Unlock()
	data, ok := n.meta[key]
	if !ok {
		return nil, &Error{Op: "get", Key: key, Location: n.Location(), Err: ErrNotFound}
	}
	if int64(len(data)) > limit {
		return nil, &Error{Op: "get", Key: key, Location: n.Location(), Err: tooLarge(int64(len(data)), limit)}
	}
	return append(buf[:0], data...), nil
}

func (n *Null) Stat(ctx context.Context, key string) (ObjectInfo, error) {
	n.mu.Lock()
	defer n.mu.Unlock()
	data, ok := n.meta[key]
	if !ok {
		return ObjectInfo{}, &Error{Op: "stat", Key: key, Location: n.Location(), Err: ErrNotFound}
	}
	return ObjectInfo{Key: key, Size: int64(len(data))}, nil
}

func (n *Null) List(ctx context.Context, prefix string, fn func(ObjectInfo) error) error {
	n.mu.Lock()
	var infos []ObjectInfo
	for k, v := range n.meta {
		if strings.HasPrefix(k, prefix) {
			infos = append(infos, ObjectInfo{Key: k, Size: int64(len(v))})
		}
	}
	n.mu.Unlock()
	sort.Slice(infos, func(i, j int) bool { return infos[i].Key < infos[j].Key })
	for _, info := range infos {
		if err := fn(info); err != nil {
			return err
		}
	}
	return nil
}

func (n *Null) Delete(ctx context.Context, key string) error {
	n.mu.Lock()
	defer n.mu.Unlock()
	delete(n.meta, key)
	return nil
}
