// Package mover takes backups: it drives a Source (a running libvirt
// domain, package mover/domain, or any NBD export, package mover/nbd)
// through one flow written once in Backup:
// lock the name, find the last committed backup, start the source's
// session (for a domain: the checkpoint chain and a pull-mode backup
// job), read every disk through package pipeline, commit the manifest,
// end the session.
//
// Words used here:
//
//   - A source is what is backed up; its name (the source name: a
//     libvirt domain's, or --name for an NBD export) is the name the
//     repository keeps its backups under, which it calls the domain. A
//     session is one backup's hold on it: for a domain, the libvirt job
//     that exports the disks over NBD and the checkpoint it creates.
//   - A full backup builds every chunk that holds data; an incremental one
//     builds only the chunks the dirty bitmap marks and takes every other
//     digest from the parent's index, so each index is a synthetic full.
//   - The parent is the last committed backup of the same name; the
//     checkpoint chain (libvirt's) is never based on a checkpoint whose
//     backup did not commit. (The repository's "index chain" is another
//     thing: package repo.)
package mover
