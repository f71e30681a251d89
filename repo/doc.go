// Package repo is the nbdmover repository: a content-addressed chunk store
// with per-backup manifests and per-disk indexes, kept in a sink.Store.
//
// Words used here (the byte-level format is in docs/format.md):
//
//   - config: the repository's parameters (format version, chunk size,
//     digest, compression), written once by Init.
//   - chunk: a blob under chunks/<2 hex>/<64 hex>, named by the SHA-256 of
//     its plaintext. Chunks are shared by every backup that holds the same
//     data; all-zero chunks are never stored.
//   - index: for one disk of one backup, the digest of every chunk of the
//     disk in order (the zero digest for an all-zero chunk). Every index is
//     complete on its own: a backup restores without its parents.
//   - manifest: the JSON description of one backup. It is written last;
//     its presence commits the backup, and nothing it references is missing
//     when it appears.
//   - backup id: a UTC timestamp (20060102T150405.000Z) that sorts by time.
package repo
