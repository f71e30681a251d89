// Package restore writes the disks of a backup to new image files: sparse
// raw files, or qcow2 images written through a private qemu-nbd. It reads
// each disk through package diskview (a sequential copy) and needs nothing
// of libvirt.
//
// A restore never overwrites: each image is made in a private directory
// <output>.partial next to its output, reached only through descriptors,
// and linked into place only when it is complete (docs/design.md,
// "Restore").
package restore
