package repo

import (
	"os"
	"path/filepath"
	"testing"
)

// The first record made where the state directory does not exist yet
// makes it traversable (0711), as the backups' scratch and run
// directories inside it need (QEMU runs as another user), and keeps the
// records private (0700): a first use of Object Lock once made
// /var/lib/nbdmover 0700, and every later backup of a domain failed
// opening its scratch image.
func TestPinDirModes(t *testing.T) {
	old := PinDir
	PinDir = filepath.Join(t.TempDir(), "state", "object-lock")
	t.Cleanup(func() { PinDir = old })
	id := "0123456789abcdef0123456789abcdef"
	if err := writePin(id, "policy.json", policyPin{Version: 1}); err != nil {
		t.Fatal(err)
	}
	for dir, want := range map[string]os.FileMode{filepath.Dir(PinDir): 0o711, PinDir: 0o700, filepath.Join(PinDir, id): 0o700} {
		st, err := os.Stat(dir)
		if err != nil || st.Mode().Perm() != want {
			t.Errorf("%s: %v, want %v (%v)", dir, st.Mode().Perm(), want, err)
		}
	}
}
