// Package sentinel (tests only) makes directories that nothing may touch:
// a test points planted symbolic links at one, runs the commands, and
// checks that no file in it was created, changed or deleted.
package sentinel

import (
	"crypto/sha256"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// New makes a sentinel directory holding a few files (one named like a
// chunk, one like a lock, a subdirectory) and returns it with a check that
// fails the test when its content, names, modes or link targets changed.
func New(t testing.TB) (dir string, check func()) {
	t.Helper()
	dir = t.TempDir()
	for name, content := range map[string]string{
		"victim":          "a host file nbdmover must never touch\n",
		"ab":              "x",
		".tmp-0123456789": "an old temporary-looking file",
		"sub/deep":        "deeper",
	} {
		p := filepath.Join(dir, name)
		os.MkdirAll(filepath.Dir(p), 0o755)
		if err := os.WriteFile(p, []byte(content), 0o600); err != nil {
			t.Fatal(err)
		}
		os.Chtimes(p, oldTime, oldTime) // old enough for every cleanup of temporary files
	}
	before := Digest(t, dir)
	return dir, func() {
		t.Helper()
		if after := Digest(t, dir); after != before {
			t.Errorf("the sentinel directory %s changed:\nbefore:\n%s\nafter:\n%s", dir, before, after)
		}
	}
}

var oldTime = time.Date(2020, 1, 1, 0, 0, 0, 0, time.UTC)

// Digest describes every entry below dir: path, type, mode, size, the
// SHA-256 of a file's content, a link's target.
func Digest(t testing.TB, dir string) string {
	t.Helper()
	var b strings.Builder
	err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		info, err := d.Info()
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(dir, p)
		fmt.Fprintf(&b, "%s %v", rel, info.Mode())
		switch {
		case info.Mode()&fs.ModeSymlink != 0:
			target, _ := os.Readlink(p)
			fmt.Fprintf(&b, " -> %s", target)
		case info.Mode().IsRegular():
			data, err := os.ReadFile(p)
			if err != nil {
				return err
			}
			fmt.Fprintf(&b, " %d %x %d", len(data), sha256.Sum256(data), info.ModTime().UnixNano())
		}
		b.WriteByte('\n')
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return b.String()
}
