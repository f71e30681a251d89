// Package daemon is nbdmover serve, the host agent schedulers call: an
// HTTP/JSON API on a 0600 unix socket (or TCP with a bearer token), a job
// runner that runs backups through package mover and forget, gc and
// verify jobs through package repo (one job per domain, a host-wide limit,
// a memory budget, cancel), NBD exports of backups through package export,
// and Prometheus metrics.
//
// The runner speaks in domain errors (ErrInvalid, ErrNotFound,
// ErrConflict, ErrUnavailable); only the HTTP layer (api.go) turns them
// into statuses.
package daemon
