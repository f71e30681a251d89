// Package domain is the libvirt source of backups (New): a running domain
// read through a pull-mode backup job, with checkpoints for incrementals,
// optional quiescing through the guest agent, and scratch images; and the
// crash cleanup of domains (Cleanup) that ends what a killed backup left.
// docs/design.md, "Live backups", has the steps and what each failure
// leaves behind.
package domain
