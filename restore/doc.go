// Package restore writes the disks of a backup to new image files: sparse
// raw files, or qcow2 images written through a private qemu-nbd. It reads
// the repository through package repo and needs nothing of libvirt.
//
// A restore never overwrites: each image is written under a temporary name
// next to its output and linked into place only when it is complete.
package restore
