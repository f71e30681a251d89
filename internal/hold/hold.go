// Package hold stops a process at named steps, so that tests can force
// interleavings of real processes (a gc and a backup, two gcs, a gc
// killed mid-sweep). It does nothing unless NBDMOVER_TEST_HOLD names a
// directory: then, at a step whose gate file <dir>/<step> exists, the
// process writes <dir>/<step>.reached (its pid) and waits until the gate
// is removed.
package hold

import (
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"time"
)

// At holds at step while its gate exists.
func At(step string) {
	dir := os.Getenv("NBDMOVER_TEST_HOLD")
	if dir == "" {
		return
	}
	gate := filepath.Join(dir, step)
	if _, err := os.Stat(gate); err != nil {
		return
	}
	os.WriteFile(gate+".reached", []byte(strconv.Itoa(os.Getpid())), 0o600)
	for {
		if _, err := os.Stat(gate); errors.Is(err, fs.ErrNotExist) {
			return
		}
		time.Sleep(20 * time.Millisecond)
	}
}
