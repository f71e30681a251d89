// Package instant is instant restore: a new libvirt domain that runs from
// a backup within seconds, and whose disks are copied home while it runs.
//
// Each disk of the new domain is a local qcow2 overlay (in the image
// directory) whose backing is the backup's disk served by package export
// on a unix socket given to QEMU's user. Every write of the guest goes to
// the overlay from the first second, so nothing it writes depends on the
// export or the copy. The copy home is libvirt's block pull into the
// overlay (QEMU's block-stream: what the overlay does not hold yet is read
// from the export and written into it); with format raw, a block copy of
// the self-contained overlay to the raw image follows, and a pivot. When
// every disk is self-contained the domain's persistent definition is
// rewritten without the backing, and the export ends.
//
// What the copy needs to resume is kept in the domain itself (libvirt
// metadata, namespace XMLNS): Resume restarts the export on the same
// socket, resumes a guest paused by a read error, and restarts whatever
// block job did not finish. A pull resumes where it stopped: what the
// overlay holds is not read again.
//
// The new domain's definition is built from an allowlist of the saved
// one (definition.go): the repository is not trusted, and nothing of it
// may reach a host file or device.
//
// Failure model (docs/design.md, "Instant restore"): while the export is
// unreachable, reads of what the overlay does not hold yet fail, and so
// do writes covering only part of a cluster not copied yet (QEMU reads
// the rest first); the disks' error policies are "stop" while they have
// a backing, so the guest is paused instead of seeing an I/O error, and
// Resume (or the running copy, once the export answers again) resumes it,
// which retries the request. No write is lost: whatever QEMU completed is
// in the overlay.
package instant
