// Package sink holds the object stores a repository lives in: the local
// filesystem (the embedded default), S3-compatible object storage via
// minio-go, and a null store for benchmarks; and the behaviour that wraps
// any of them: retries with capped, jittered backoff (Retry) and a limit on
// concurrent operations (Limit).
//
// Words used here:
//
//   - A key is a slash-separated object name relative to the store's root,
//     e.g. "chunks/ab/ab12…". Keys are validated (ValidKey) before any store
//     turns them into a path or an object name.
//   - An operation fails with a *Error that says which store, which key and
//     whether the failure is transient (worth retrying) or permanent.
//     ErrNotFound is matched by errors.Is for a missing object.
package sink
