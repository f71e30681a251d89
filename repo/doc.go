// Package repo is the nbdmover repository (format 2): a content-addressed
// chunk store with per-backup manifests and per-disk index chains, kept in
// a sink.Store. docs/format.md has the bytes; docs/design.md the
// protocols (locks, gc, damage).
//
// Words used here:
//
//   - config: the repository's parameters (format version, id, chunk size,
//     digest, compression, encryption and its password cost), written once
//     by Options.Init; keys/ holds the wrapped keys of an encrypted repository.
//   - chunk: a blob under chunks/<2 hex>/<64 hex>, named by the SHA-256
//     of its plaintext (encrypted: its HMAC-SHA256 under the naming key).
//     Chunks are shared by every backup that holds the same data; all-zero
//     chunks are never stored. Chunk I/O goes through the repository
//     (Putter, GetChunk), which owns the put policy and its durability.
//   - index chain: a disk's index in a backup, a full index then deltas
//     (chain.go shapes it as a binary counter: at most 12 deltas), stored
//     as index objects under indexes/. Applied, it lists every chunk that
//     holds data; a chunk it does not list is a zero chunk. Not to be
//     confused with libvirt's checkpoints, which package mover keeps.
//   - manifest: the JSON description of one backup, naming its disks'
//     index chains. It is written last; its presence commits the backup,
//     and nothing it references is missing when it appears.
//   - backup id: a UTC timestamp (20060102T150405.000Z) that sorts by time.
//   - domain: the name backups are kept under: a libvirt domain's, or any
//     source's (--name).
//   - lock: a shared or exclusive lock object under locks/; backups,
//     restores, exports, verify and forget hold shared ones, gc the
//     exclusive one while it deletes. The protocol is package lock's
//     (repo/lock); when gc may take its lock and what it deletes under it
//     is gc.go's.
//   - hold: a backup some holder (an instant restore) needs for a while,
//     under holds/; forget keeps it, as it keeps a protected one.
//   - damage record: what verify (or a reader) found damaged, under
//     state/damage/; backups heal what it names.
//
// A repository is opened with Options.Open and created with Options.Init
// (Options.OpenOrInit: created on first use); Options.Opened gives a store
// already open (a wrapped one) instead of a location.
//
// Every object read is bounded by its kind (bounds.go) before it is read,
// so a repository someone else wrote cannot make nbdmover read without
// end.
package repo
