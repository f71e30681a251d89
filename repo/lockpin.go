package repo

import (
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"time"

	"golang.org/x/sys/unix"

	"github.com/nbdmover/nbdmover/internal/safedir"
)

// A host keeps what it knows of the S3 Object Lock of each repository it
// writes, where no writer of the bucket can change it: the lock policy
// (a config put again without it is refused, however long ago the
// first one's lock ended), and for each domain the manifest of the last
// backup this host committed with its locked_until (the next backup
// believes its parent's claim only when it is that one: a writer of the
// bucket can plant a manifest claiming locks that do not exist). A
// missing or unreadable record is never a failure: the backup then
// extends what it takes over (docs/design.md, "Object Lock").

// PinDir is where the records are kept, a directory per repository id.
var PinDir = "/var/lib/nbdmover/object-lock"

// maxPin bounds a record's size.
const maxPin = 64 << 10

type policyPin struct {
	Version int         `json:"version"`
	Lock    *LockConfig `json:"object_lock"`
}

type backupPin struct {
	Version     int       `json:"version"`
	Manifest    string    `json:"manifest"`
	LockedUntil time.Time `json:"locked_until"`
}

// pinDir opens the repository's record directory (made when create).
func pinDir(repoID string, create bool) (*os.File, error) {
	if len(repoID) != 32 {
		return nil, fmt.Errorf("repository id %q", repoID)
	}
	if _, err := hex.DecodeString(repoID); err != nil {
		return nil, fmt.Errorf("repository id %q", repoID)
	}
	if create {
		// The state directory above is shared with the backups' scratch
		// and run directories, which QEMU (another user) must traverse:
		// made 0711 as they make it, never 0700 with the records.
		root := filepath.Dir(PinDir)
		d, err := safedir.Open(root, safedir.Options{Chain: true})
		if err != nil { // missing (or not ours: refused again below)
			if d, err = safedir.Open(root, safedir.Options{Create: true, Perm: 0o711, Chain: true}); err != nil {
				return nil, err
			}
			d.Chmod(0o711) // whatever the umask
		}
		d.Close()
	}
	return safedir.Open(filepath.Join(PinDir, repoID), safedir.Options{Create: create, Perm: 0o700, Chain: true})
}

// readPin reads the record name of the repository into v; ok false when
// there is none (or it cannot be read: then the caller trusts nothing).
func readPin(repoID, name string, v any) (ok bool, err error) {
	d, err := pinDir(repoID, false)
	if errors.Is(err, fs.ErrNotExist) {
		return false, nil
	}
	if err != nil {
		return false, err
	}
	defer d.Close()
	fd, err := unix.Openat(int(d.Fd()), name, unix.O_RDONLY|unix.O_NOFOLLOW|unix.O_NONBLOCK|unix.O_CLOEXEC, 0)
	if errors.Is(err, unix.ENOENT) {
		return false, nil
	}
	if err != nil {
		return false, err
	}
	f := os.NewFile(uintptr(fd), name)
	defer f.Close()
	st, err := f.Stat()
	if err != nil || !st.Mode().IsRegular() || st.Size() > maxPin {
		return false, fmt.Errorf("%s/%s/%s: not a record nbdmover writes", PinDir, repoID, name)
	}
	b := make([]byte, st.Size())
	if _, err := f.ReadAt(b, 0); err != nil {
		return false, err
	}
	if err := strictUnmarshal(b, v); err != nil {
		return false, fmt.Errorf("%s/%s/%s: %w", PinDir, repoID, name, err)
	}
	return true, nil
}

// writePin replaces the record name of the repository with v.
func writePin(repoID, name string, v any) error {
	d, err := pinDir(repoID, true)
	if err != nil {
		return err
	}
	defer d.Close()
	b, _ := json.Marshal(v)
	tmp := make([]byte, 8)
	rand.Read(tmp)
	tname := ".tmp-" + hex.EncodeToString(tmp)
	fd, err := unix.Openat(int(d.Fd()), tname, unix.O_WRONLY|unix.O_CREAT|unix.O_EXCL|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0o600)
	if err != nil {
		return err
	}
	f := os.NewFile(uintptr(fd), tname)
	_, err = f.Write(b)
	if err == nil {
		err = f.Sync()
	}
	f.Close()
	if err == nil {
		err = unix.Renameat(int(d.Fd()), tname, int(d.Fd()), name)
	}
	if err != nil {
		unix.Unlinkat(int(d.Fd()), tname, 0)
	}
	return err
}

// checkPolicyPin refuses a repository whose config's lock policy is not
// the one this host recorded for it, and records it when there is none.
func checkPolicyPin(cfg Config, location string) error {
	var p policyPin
	ok, err := readPin(cfg.ID, "policy.json", &p)
	if err == nil && ok {
		if p.Lock != nil && (cfg.ObjectLock == nil || *cfg.ObjectLock != *p.Lock) {
			return fmt.Errorf("%s: the repository's config has S3 Object Lock %s, but this host wrote to it with %s (%s/%s/policy.json): "+
				"its config was replaced; refused, so that nothing is written unprotected (if the bucket was attacked: nbdmover recover --as-of, README)",
				location, describeLock(cfg.ObjectLock), describeLock(p.Lock), PinDir, cfg.ID)
		}
		return nil
	}
	if cfg.ObjectLock == nil {
		return nil
	}
	writePin(cfg.ID, "policy.json", policyPin{Version: 1, Lock: cfg.ObjectLock}) // best effort: a host that cannot keep it checks the bucket's versions only
	return nil
}

// pinBackup records the last backup of domain this host committed into
// the repository, with its lock.
func (r *Repo) pinBackup(m *Manifest) error {
	if m.ObjectLock == nil {
		return nil
	}
	return writePin(r.cfg.ID, "domain-"+m.Domain+".json", backupPin{Version: 1, Manifest: m.Key(), LockedUntil: m.ObjectLock.LockedUntil})
}

// pinned reports whether m is the last backup of its domain this host
// committed, with the same lock.
func (r *Repo) pinned(m *Manifest) bool {
	var p backupPin
	ok, err := readPin(r.cfg.ID, "domain-"+m.Domain+".json", &p)
	return err == nil && ok && p.Manifest == m.Key() && m.ObjectLock != nil && p.LockedUntil.Equal(m.ObjectLock.LockedUntil)
}
