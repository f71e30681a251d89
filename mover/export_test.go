package mover

import "libvirt.org/go/libvirtxml"

// SetExportsHook lets a test change what the backup job's XML says of its
// exports; it returns a function that removes the hook.
func SetExportsHook(f func(map[string]libvirtxml.DomainBackupPullDisk)) func() {
	testHookExports = f
	return func() { testHookExports = nil }
}
