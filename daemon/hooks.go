package daemon

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
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
// daemon (root): the file and every directory above it must be owned by
// the daemon's user or root and writable by no one else (a sticky
// directory such as /tmp aside: others cannot replace what is not
// theirs in it). The path's links are resolved first, then it is walked
// one directory at a time without following links (a component swapped
// for a link meanwhile is refused), and the file is opened without
// blocking (a FIFO is refused).
func readHooks(path string) (*hooksFile, error) {
	f, err := openTrusted(path)
	if err != nil {
		return nil, fmt.Errorf("hooks file %s: %w", path, err)
	}
	defer f.Close()
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
	err = dec.Decode(&h)
	if err == nil && dec.More() {
		err = errors.New("more after the JSON object")
	}
	if err == nil {
		if _, terr := dec.Token(); terr != io.EOF {
			err = errors.New("more after the JSON object")
		}
	}
	if err != nil {
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

// openTrusted opens path for reading after checking it and every
// directory above it (readHooks).
func openTrusted(path string) (*os.File, error) {
	abs, err := filepath.Abs(path)
	if err == nil {
		abs, err = filepath.EvalSymlinks(abs)
	}
	if err != nil {
		return nil, err
	}
	dfd, err := unix.Open("/", unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, err
	}
	walked := "/"
	comps := strings.Split(strings.Trim(abs, "/"), "/")
	for k, comp := range comps {
		var st unix.Stat_t
		if err := unix.Fstat(dfd, &st); err != nil {
			unix.Close(dfd)
			return nil, err
		}
		if err := trusted(walked, st); err != nil {
			unix.Close(dfd)
			return nil, err
		}
		flags := unix.O_RDONLY | unix.O_NOFOLLOW | unix.O_CLOEXEC
		if k < len(comps)-1 {
			flags |= unix.O_DIRECTORY
		} else {
			flags |= unix.O_NONBLOCK | unix.O_NOCTTY
		}
		fd, err := unix.Openat(dfd, comp, flags, 0)
		unix.Close(dfd)
		if errors.Is(err, unix.ELOOP) || errors.Is(err, unix.ENOTDIR) {
			err = fmt.Errorf("%s became a symbolic link or a file meanwhile", filepath.Join(walked, comp))
		}
		if err != nil {
			return nil, err
		}
		dfd, walked = fd, filepath.Join(walked, comp)
	}
	f := os.NewFile(uintptr(dfd), abs)
	var st unix.Stat_t
	if err := unix.Fstat(dfd, &st); err != nil {
		f.Close()
		return nil, err
	}
	if st.Mode&unix.S_IFMT != unix.S_IFREG {
		f.Close()
		return nil, errors.New("not a regular file")
	}
	if err := trusted(abs, st); err != nil {
		f.Close()
		return nil, err
	}
	return f, nil
}

// trusted refuses a file or directory that someone other than the
// daemon's user and root owns or may write (a sticky directory may be
// writable by others).
func trusted(path string, st unix.Stat_t) error {
	dir := st.Mode&unix.S_IFMT == unix.S_IFDIR
	switch {
	case st.Uid != 0 && int(st.Uid) != os.Geteuid():
		return fmt.Errorf("%s is owned by user %d: the hooks' commands run as this daemon, so it must be root's (or the daemon's)", path, st.Uid)
	case st.Mode&0o022 != 0 && !(dir && st.Mode&unix.S_ISVTX != 0):
		return fmt.Errorf("%s: others may write it (mode %o): the hooks' commands run as this daemon; chmod go-w", path, st.Mode&0o7777)
	}
	return nil
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
