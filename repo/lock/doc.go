// Package lock is the repository's lock protocol: locks/<kind>-<id>
// objects (meta blobs of JSON) with their holder (host, machine, pid,
// process identity, purpose) and a heartbeat refreshed every minute.
// Backups, restores, exports, verify and forget hold a shared lock; gc
// holds the exclusive lock while it deletes, and only then. A lock is
// stale when its heartbeat is old or, on this machine, its process is
// provably gone (internal/liveness). A lock taken for stale (by a gc or
// nbdmover unlock) gets a tombstone, locks/broken-<id>: its holder, if
// alive after all, sees it at its next refresh and must not commit. The
// protocol and why it keeps every committed backup whole (with gc, in
// package repo) is in docs/design.md ("Deleting from a repository").
package lock
