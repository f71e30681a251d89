// Package nbdclient is nbdmover's NBD client: a thin cgo binding over the
// libnbd C library (libnbd 1.14 or newer), shaped for reading disks fast.
//
// Words used here:
//
//   - A Conn is one NBD connection (one libnbd handle). It is safe for use by
//     one goroutine at a time; its methods serialise on a mutex, and Close may
//     be called from any goroutine at any time, which aborts a call in
//     progress.
//   - A Pool is N connections to the same export (NBD multi-conn), for N
//     parallel readers.
//   - An Extent is a range of the export with its Flags: Hole and Zero from
//     the "base:allocation" meta context, Dirty from a
//     "qemu:dirty-bitmap:NAME" context. Extents come from block status
//     requests made one bounded window at a time, so a 1 TiB disk is never
//     mapped up front.
//
// Every wait on the server happens in one C call that polls the socket and a
// per-connection eventfd. That gives three guarantees: a server that stalls
// becomes an error after Config.IOTimeout without progress; cancelling the
// context or closing the connection interrupts a call promptly; and libnbd
// never holds a pointer to Go memory after a call returns (when a call must
// give up with requests in flight, the C side closes the handle first, and
// the Conn is then dead).
package nbdclient
