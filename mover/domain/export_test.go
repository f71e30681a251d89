package domain

import "libvirt.org/go/libvirtxml"

// SetExportsHook lets a test change what the backup job's XML says of its
// exports; it returns a function that removes the hook.
func SetExportsHook(f func(map[string]libvirtxml.DomainBackupPullDisk)) func() {
	testHookExports = f
	return func() { testHookExports = nil }
}

// SetDeleteCheckpointHook makes the deletion of checkpoints' bitmaps fail
// with f's error; it returns a function that removes the hook.
func SetDeleteCheckpointHook(f func(name string) error) func() {
	testHookDeleteCheckpoint = f
	return func() { testHookDeleteCheckpoint = nil }
}

// NameCheckpointsAsBefore makes backups name their checkpoints as before
// checkpoints named their repository, until the returned function is
// called.
func NameCheckpointsAsBefore() func() {
	testHookLegacyNames = true
	return func() { testHookLegacyNames = false }
}
