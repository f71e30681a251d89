package daemon_test

import (
	"archive/tar"
	"bytes"
	"encoding/base64"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nbdmover/nbdmover/daemon"
	"github.com/nbdmover/nbdmover/internal/backuptest"
	"github.com/nbdmover/nbdmover/internal/qemutest"
	"github.com/nbdmover/nbdmover/repo"
)

// fsBackup makes a btrfs image of dir (mkfs.btrfs --rootdir: quick with
// 100,000 files, where mkfs.ext4 -d takes minutes) and backs it up
// through qemu-nbd as name's disk vda.
func fsBackup(t *testing.T, ro repo.Options, dir, name string) string {
	t.Helper()
	img := filepath.Join(t.TempDir(), "fs.img")
	if err := os.WriteFile(img, nil, 0o644); err != nil || os.Truncate(img, 256<<20) != nil {
		t.Fatal(err)
	}
	qemutest.Run(t, "mkfs.btrfs", "-q", "--rootdir", dir, img)
	return backuptest.RawBackup(t, ro, img, name)
}

// fileSessionsOpen reads the metric of open file sessions.
func fileSessionsOpen(d *testDaemon) string {
	for _, l := range strings.Split(d.metrics(), "\n") {
		if strings.HasPrefix(l, "nbdmover_file_sessions_open ") {
			return l
		}
	}
	return "no nbdmover_file_sessions_open"
}

// File-level restore through the API: filesystems, a directory of
// 100,000 files paged (first pages, and a cursor near its end), a file's bytes, a tar stream, each compared with the
// source; the errors' statuses; one appliance for concurrent first
// requests and reused by later ones; an idle session closed to make room
// within the memory budget, and after the idle timeout.
func TestDaemonFiles(t *testing.T) {
	qemutest.Need(t, "qemu-nbd", "qemu-img", "mkfs.btrfs", "guestfish")
	ro := repo.Options{Location: filepath.Join(t.TempDir(), "repo")}
	src := t.TempDir()
	big, err := os.ReadFile(backuptest.RandomFile(t, 6<<20, 3))
	if err != nil {
		t.Fatal(err)
	}
	var many []string
	for i := range 100000 {
		many = append(many, fmt.Sprintf("f%06d", i))
	}
	put := func(p, data string) {
		os.MkdirAll(filepath.Join(src, filepath.Dir(p)), 0o755)
		if err := os.WriteFile(filepath.Join(src, p), []byte(data), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	put("etc/hosts", "127.0.0.1 localhost\n")
	put("data/big", string(big))
	for _, n := range many {
		put("many/"+n, n)
	}
	os.Symlink("/etc/shadow", filepath.Join(src, "etc/shadow-link"))
	old := fsBackup(t, ro, src, "vm")
	put("etc/added", "added\n")
	latest := fsBackup(t, ro, src, "vm")

	accel := "tcg"
	if os.Getenv("NBDMOVER_TEST_GUESTFS_KVM") != "" {
		accel = "auto"
	}
	d := startDaemonServe(t, ro, 1, nil, func(o *daemon.ServeOptions) {
		// One session's appliance and cache (32 MiB) fit the budget, not two.
		o.FilesIdleTimeout, o.FilesMemoryMiB, o.FilesMemoryBudgetMiB, o.FilesAccel = 3*time.Second, 384, 416, accel
	})
	type fsView struct {
		Domain, ID, Accel string
		Opened            time.Time
		Filesystems       []struct{ Name, Type string }
	}
	get := func(path string, out any) int {
		t.Helper()
		return d.do("GET", path, "", out)
	}

	// Two first requests at once share one appliance.
	var views [2]fsView
	var codes [2]int
	var wg sync.WaitGroup
	for i := range 2 {
		wg.Go(func() { codes[i] = get("/v1/backups/vm/latest/filesystems", &views[i]) })
	}
	wg.Wait()
	if codes != [2]int{200, 200} || !views[0].Opened.Equal(views[1].Opened) || views[0].ID != latest ||
		len(views[0].Filesystems) != 1 || views[0].Filesystems[0].Type != "btrfs" {
		t.Fatalf("filesystems: %v %+v", codes, views)
	}
	t.Logf("appliance %s", views[0].Accel)

	// A directory of 100,000 files, in pages of 1000: the first two, then
	// from a cursor near the end to the last.
	page := func(after string) ([]string, string) {
		t.Helper()
		var p struct {
			Entries []struct{ Name, Type string }
			Next    string
		}
		if code := get("/v1/backups/vm/latest/files?path=/many&limit=1000&after="+after, &p); code != 200 {
			t.Fatalf("files page after %q: %d", after, code)
		}
		var names []string
		for _, e := range p.Entries {
			names = append(names, e.Name)
		}
		return names, p.Next
	}
	first, next := page("")
	second, _ := page(next)
	last, end := page(base64.RawURLEncoding.EncodeToString([]byte(many[99499])))
	if !slices.Equal(first, many[:1000]) || !slices.Equal(second, many[1000:2000]) || !slices.Equal(last, many[99500:]) || end != "" {
		t.Fatalf("paged listing: %d, %d and %d names (next %q)", len(first), len(second), len(last), end)
	}
	var etc struct {
		Entries []struct{ Name, Type, Target string }
	}
	get("/v1/backups/vm/latest/files?path=/etc", &etc)
	if len(etc.Entries) != 3 || etc.Entries[0].Name != "added" || etc.Entries[2].Target != "/etc/shadow" {
		t.Errorf("files /etc: %+v", etc.Entries)
	}

	// A file's bytes, and a tar stream.
	body := func(path string) (int, []byte, http.Header) {
		t.Helper()
		resp, err := d.client.Get(d.base + path)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, err := io.ReadAll(resp.Body)
		if err != nil {
			t.Fatalf("GET %s: %v", path, err)
		}
		return resp.StatusCode, b, resp.Header
	}
	code, b, h := body("/v1/backups/vm/latest/files/content?path=/data/big")
	if code != 200 || !bytes.Equal(b, big) || h.Get("Content-Length") != fmt.Sprint(len(big)) {
		t.Errorf("files/content: %d, %d bytes (want %d), %v", code, len(b), len(big), h)
	}
	code, b, _ = body("/v1/backups/vm/latest/files/tar?path=/etc&path=/data")
	got := map[string]string{}
	tr := tar.NewReader(bytes.NewReader(b))
	for {
		h, err := tr.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatalf("files/tar: %v", err)
		}
		c, _ := io.ReadAll(tr)
		got[h.Name] = string(c) + h.Linkname
	}
	if code != 200 || got["etc/hosts"] != "127.0.0.1 localhost\n" || got["data/big"] != string(big) || got["etc/shadow-link"] != "/etc/shadow" ||
		len(got) != 6 {
		t.Errorf("files/tar: %d, %d entries", code, len(got))
	}

	// Errors.
	for _, c := range []struct {
		path string
		code int
		want string
	}{
		{"/v1/backups/vm/latest/files?path=/nope", 404, "/nope"},
		{"/v1/backups/vm/latest/files/content?path=/etc", 422, "not a file"},
		{"/v1/backups/vm/latest/files?path=etc", 422, "absolute"},
		{"/v1/backups/vm/latest/files?limit=0", 422, "limit"},
		{"/v1/backups/vm/latest/files?after=%25%25", 422, "cursor"},
		{"/v1/backups/vm/latest/files?fs=bogus", 422, "bogus"},
		{"/v1/backups/vm/20990101T000000.000Z/files", 404, "no such backup"},
		{"/v1/backups/vm/nonsense/files", 422, "backup id"},
		{"/v1/backups/a%2Fb/latest/files", 422, "domain"},
		{"/v1/backups/vm/latest/files/tar?path=/nope", 404, "/nope"},
	} {
		var e struct{ Error string }
		if code := get(c.path, &e); code != c.code || !strings.Contains(e.Error, c.want) {
			t.Errorf("GET %s: %d %q, want %d and %q", c.path, code, e.Error, c.code, c.want)
		}
	}

	// Reused by a later request; closed to make room for another backup's
	// (the budget holds one); closed after the idle timeout.
	var again fsView
	get("/v1/backups/vm/latest/filesystems", &again)
	if !again.Opened.Equal(views[0].Opened) {
		t.Errorf("a second request opened another appliance: %v, then %v", views[0].Opened, again.Opened)
	}
	var other struct {
		Entries []struct{ Name string }
	}
	if code := get("/v1/backups/vm/"+old+"/files?path=/etc", &other); code != 200 || len(other.Entries) != 2 {
		t.Errorf("files of the older backup: %d %+v", code, other.Entries)
	}
	if m := fileSessionsOpen(d); m != "nbdmover_file_sessions_open 1" {
		t.Errorf("after a session for another backup within a one-session budget: %q", m)
	}
	waitFor(t, "the idle session to close", func() bool { return fileSessionsOpen(d) == "nbdmover_file_sessions_open 0" })
}
