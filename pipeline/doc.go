// Package pipeline backs up one disk: it plans which chunks to build from
// the disk's extents, reads them, digests and compresses them, and stores
// the ones the repository lacks. It knows nothing of libvirt: a Disk is
// anything with extents and bytes (an NBD connection pool in production,
// an in-memory disk in tests).
//
// Words used here:
//
//   - The planner walks the disk's extents one window at a time and plans
//     each chunk to build: on a full run every chunk that holds data, on an
//     incremental run every chunk a dirty extent touches. Holes and zero
//     extents are never requested, only zero-filled.
//   - Readers fill chunk buffers from the disk; workers detect zero chunks,
//     digest and compress; uploaders store the blobs. Every stage is
//     bounded and the buffers come from fixed pools (Buffers), so memory
//     does not grow with the disk.
//   - A stale chunk is one whose length changed with a resize of the disk:
//     it is read again whatever the bitmap says.
package pipeline
