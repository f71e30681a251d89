package main

import (
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/nbdmover/nbdmover/internal/backuptest"
	"github.com/nbdmover/nbdmover/internal/qemutest"
)

// verify records a corrupt and a missing chunk (exit 1), list marks the
// backup damaged, the next backup stores both again, and verify passes;
// --read-data=PERCENT reads a share.
func TestVerifyHealCommands(t *testing.T) {
	repo := filepath.Join(t.TempDir(), "repo")
	img := qemutest.NewImage(t, t.TempDir(), 8<<20)
	qemutest.IO(t, img, "write -s "+backuptest.RandomFile(t, 4<<20, 5)+" 0 4M")
	qemutest.Run(t, "qemu-img", "bitmap", "--add", img, "b0")
	backup := func() string {
		t.Helper()
		srv := qemutest.Serve(t, img, "-r", "-B", "b0")
		defer srv.Kill()
		out, stderr, code := nbdmover(t, "backup", "--init", "--repo", repo, "--chunk-size", "256KiB", "--nbd", srv.URI,
			"--name", "vm1", "--bitmap", "b0", "--disk", "vda", "--json")
		if code != 0 {
			t.Fatalf("backup: %d %s", code, stderr)
		}
		return out
	}
	backup()
	chunks, _ := filepath.Glob(filepath.Join(repo, "chunks", "*", "*"))
	if len(chunks) != 16 {
		t.Fatalf("%d chunks", len(chunks))
	}
	b, _ := os.ReadFile(chunks[3])
	b[len(b)-1] ^= 1
	os.WriteFile(chunks[3], b, 0o600)
	os.Remove(chunks[9])
	out, _, code := nbdmover(t, "verify", "--repo", repo, "--read-data")
	if code != 1 || strings.Count(out, "BAD ") != 2 || !strings.Contains(out, "1 corrupt chunk (1 quarantined), 1 missing, referenced by 1 backup: vm1/") {
		t.Fatalf("verify of a damaged repository: %d %s", code, out)
	}
	for _, c := range []string{chunks[3], chunks[9]} {
		if !strings.Contains(out, filepath.Base(c)) {
			t.Errorf("verify does not name %s: %s", c, out)
		}
	}
	if out, _, _ := nbdmover(t, "list", "--repo", repo); strings.Count(out, "DAMAGED") != 2 { // the header and the backup
		t.Errorf("list does not mark the damaged backup: %s", out)
	}
	for _, bad := range []string{"--read-data=0%", "--read-data=101%", "--read-data=ten"} {
		if _, stderr, code := nbdmover(t, "verify", "--repo", repo, bad); code != 2 {
			t.Errorf("verify %s: %d %s", bad, code, stderr)
		}
	}
	qemutest.IO(t, img, "write -P 0x11 6M 4k")
	var res struct {
		Mode   string
		Healed int `json:"healed_chunks"`
	}
	if out := backup(); json.Unmarshal([]byte(out), &res) != nil || res.Mode != "incremental" || res.Healed != 2 {
		t.Fatalf("the backup after verify: %s", out)
	}
	out, _, code = nbdmover(t, "verify", "--repo", repo, "--read-data=10%", "--json")
	var st struct {
		ReadPercent int      `json:"read_percent"`
		Damaged     []string `json:"damaged_backups"`
		Problems    []any
	}
	if code != 0 || json.Unmarshal([]byte(out), &st) != nil || st.ReadPercent != 10 || len(st.Problems) != 0 || st.Damaged == nil || len(st.Damaged) != 0 {
		t.Fatalf("verify --read-data=10%% after the healing backup: %d %s", code, out)
	}
	if out, _, _ := nbdmover(t, "list", "--repo", repo); strings.Count(out, "DAMAGED") != 1 {
		t.Errorf("list marks a healed backup: %s", out)
	}
	if _, _, code := nbdmover(t, "verify", "--repo", repo, "--read-data"); code != 0 {
		t.Fatalf("verify after the healing backup: %d", code)
	}
}
