package repo

import (
	"fmt"
	"time"
)

// ValidName says why s cannot name a domain or a disk in the repository, or
// returns nil. Names become object keys, so they are restricted to letters,
// digits, '.', '_' and '-', start with a letter or digit, and are at most
// 128 bytes.
func ValidName(kind, s string) error {
	if s == "" || len(s) > 128 {
		return fmt.Errorf("%s name %q: must be 1 to 128 characters", kind, s)
	}
	for i, r := range s {
		ok := r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' ||
			i > 0 && (r == '.' || r == '_' || r == '-')
		if !ok {
			return fmt.Errorf("%s name %q: only letters, digits, '.', '_' and '-' are allowed (and it must start with a letter or digit)", kind, s)
		}
	}
	return nil
}

const idLayout = "20060102T150405.000Z"

// NewBackupID returns the id for a backup taken at t, later than last (the
// newest existing id of the domain, or "").
func NewBackupID(t time.Time, last string) string {
	id := t.UTC().Format(idLayout)
	if last != "" && id <= last {
		if lt, err := time.Parse(idLayout, last); err == nil {
			id = lt.Add(time.Millisecond).Format(idLayout)
		}
	}
	return id
}

// ValidBackupID says why s is not a backup id, or returns nil. Ids are
// times from 1970 to 2286, which the manifests' rank (ManifestKey) orders.
func ValidBackupID(s string) error {
	t, err := time.Parse(idLayout, s)
	if err != nil || len(s) != len(idLayout) {
		return fmt.Errorf("backup id %q: want the form %s", s, idLayout)
	}
	if ms := t.UnixMilli(); ms < 0 || ms > rankLimit {
		return fmt.Errorf("backup id %q: a time from 1970 to 2286 (is the clock right?)", s)
	}
	return nil
}
