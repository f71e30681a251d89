// Package mover orchestrates nbdmover's jobs: backups (the libvirt session,
// the checkpoint chain, the per-disk pipeline from NBD into the
// repository), restores, listing and verification. The command line and
// the daemon call one function here per job.
//
// Words used here:
//
//   - The pipeline of one disk: a planner walks the disk's extents one
//     window at a time and plans each chunk to build; readers fill chunk
//     buffers from N NBD connections (holes and zero extents are never
//     requested, only zero-filled); workers detect zero chunks, digest and
//     compress; uploaders store the blobs. Every stage is bounded and the
//     buffers come from fixed pools, so memory does not grow with the disk.
//   - A full backup builds every chunk that holds data; an incremental one
//     builds only the chunks the dirty bitmap touches and takes every other
//     digest from the parent's index, so each index is a synthetic full.
package mover
