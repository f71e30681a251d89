package daemon

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"strings"
	"time"

	"github.com/nbdmover/nbdmover/mover"
	"github.com/nbdmover/nbdmover/repo"
	"golang.org/x/sys/unix"
)

// hooksFile is serve --hooks-file: hooks by domain.
//
//	{"domains": {"web1": {"pre_hook": "...", "post_hook": "...", "hook_timeout": "5m"}}}
//
// A domain's entry replaces the flags' hooks for its backups; a field it
// leaves out keeps the flag's, and "" turns that hook off for it.
type hooksFile struct {
	Domains map[string]domainHooks `json:"domains"`
}

type domainHooks struct {
	Pre     *string `json:"pre_hook"`
	Post    *string `json:"post_hook"`
	Timeout string  `json:"hook_timeout"`
}

// maxHooksFile bounds a hooks file: a few commands per domain.
const maxHooksFile = 1 << 20

// readHooks reads and checks a hooks file. Its commands run as the
// daemon (root): the file must be a regular file owned by the daemon's
// user or root that no one else may write, as must its directory; it is
// opened without following a link or blocking (a FIFO is refused).
func readHooks(path string) (*hooksFile, error) {
	fd, err := unix.Open(path, unix.O_RDONLY|unix.O_NONBLOCK|unix.O_NOCTTY|unix.O_CLOEXEC|unix.O_NOFOLLOW, 0)
	if err != nil {
		return nil, fmt.Errorf("hooks file %s: %w", path, err)
	}
	f := os.NewFile(uintptr(fd), path)
	defer f.Close()
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return nil, fmt.Errorf("hooks file %s: %w", path, err)
	}
	if err := trusted(path, st); err != nil {
		return nil, err
	}
	var dir unix.Stat_t
	if err := unix.Stat(parentDir(path), &dir); err != nil {
		return nil, fmt.Errorf("hooks file %s: its directory: %w", path, err)
	}
	if err := trusted(parentDir(path), dir); err != nil {
		return nil, err
	}
	b, err := io.ReadAll(io.LimitReader(f, maxHooksFile+1))
	if err != nil {
		return nil, fmt.Errorf("hooks file %s: %w", path, err)
	}
	if len(b) > maxHooksFile {
		return nil, fmt.Errorf("hooks file %s: larger than %d bytes", path, maxHooksFile)
	}
	var h hooksFile
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&h); err != nil {
		return nil, fmt.Errorf("hooks file %s: %v (want {\"domains\": {\"web1\": {\"pre_hook\": \"...\", \"post_hook\": \"...\", \"hook_timeout\": \"5m\"}}})", path, err)
	}
	for name, d := range h.Domains {
		if err := repo.ValidName("domain", name); err != nil {
			return nil, fmt.Errorf("hooks file %s: %v", path, err)
		}
		if d.Timeout != "" {
			if t, err := time.ParseDuration(d.Timeout); err != nil || t < time.Second {
				return nil, fmt.Errorf("hooks file %s: domain %s: hook_timeout %q: want a duration of at least 1s, like \"5m\"", path, name, d.Timeout)
			}
		}
		for what, cmd := range map[string]*string{"pre_hook": d.Pre, "post_hook": d.Post} {
			if cmd != nil && *cmd != "" && strings.TrimSpace(*cmd) == "" {
				return nil, fmt.Errorf("hooks file %s: domain %s: %s is blank (\"\" turns it off)", path, name, what)
			}
		}
	}
	return &h, nil
}

// trusted refuses a file or directory that someone other than the
// daemon's user and root may write, or that is not of its kind.
func trusted(path string, st unix.Stat_t) error {
	switch {
	case st.Mode&unix.S_IFMT != unix.S_IFREG && st.Mode&unix.S_IFMT != unix.S_IFDIR:
		return fmt.Errorf("hooks file %s: not a regular file", path)
	case st.Uid != 0 && int(st.Uid) != os.Geteuid():
		return fmt.Errorf("hooks file %s: owned by user %d: its commands run as this daemon, so it must be root's (or the daemon's)", path, st.Uid)
	case st.Mode&0o022 != 0 && !(st.Mode&unix.S_IFMT == unix.S_IFDIR && st.Mode&unix.S_ISVTX != 0 && st.Mode&0o002 == 0):
		return fmt.Errorf("hooks file %s: others may write it (mode %o): its commands run as this daemon; chmod go-w", path, st.Mode&0o7777)
	}
	return nil
}

func parentDir(path string) string {
	if i := strings.LastIndexByte(path, '/'); i > 0 {
		return path[:i]
	} else if i == 0 {
		return "/"
	}
	return "."
}

// hooksFor are the hooks of a backup of domain: the flags', changed by
// the hooks file's entry for it.
func (r *Runner) hooksFor(domain string) (mover.Hooks, error) {
	h := r.o.Backup.Hooks
	if r.o.HooksFile == "" {
		return h, nil
	}
	f, err := readHooks(r.o.HooksFile)
	if err != nil {
		return h, err
	}
	d, ok := f.Domains[domain]
	if !ok {
		return h, nil
	}
	if d.Pre != nil {
		h.Pre = *d.Pre
	}
	if d.Post != nil {
		h.Post = *d.Post
	}
	if d.Timeout != "" {
		h.Timeout, _ = time.ParseDuration(d.Timeout) // checked
	}
	return h, nil
}
