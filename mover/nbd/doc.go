// Package nbd is the NBD source of backups (New): any NBD export, e.g. a
// stopped domain's disk served by qemu-nbd, incremental when it carries a
// persistent dirty bitmap that recorded since the last backup.
package nbd
