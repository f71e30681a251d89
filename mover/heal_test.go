package mover_test

import (
	"bytes"
	"fmt"
	"math/rand/v2"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/nbdmover/nbdmover/chunker"
	"github.com/nbdmover/nbdmover/internal/backuptest"
	"github.com/nbdmover/nbdmover/internal/qemutest"
	"github.com/nbdmover/nbdmover/mover"
	"github.com/nbdmover/nbdmover/repo"
	"github.com/nbdmover/nbdmover/restore"
	"github.com/nbdmover/nbdmover/sink/sinktest"
)

// A repository that heals: a corrupt and a missing chunk are found by
// verify, which names the backups that need them, and stored again by the
// next incremental although its bitmap calls them clean; the older
// backups then restore exactly. A chunk whose data is no longer on the
// disk stays reported, and its backups stay damaged.
func heal(t *testing.T, ro repo.Options) {
	const size = 12 * MiB
	img := qemutest.NewImage(t, t.TempDir(), size)
	qemutest.IO(t, img, "write -s "+backuptest.RandomFile(t, 8*MiB, 7)+" 0 8M", "write -P 0x21 10M 1M")
	// The bitmap starts after the data: the incrementals' bitmap calls
	// the data chunks clean (qemu-nbd never clears it).
	qemutest.Run(t, "qemu-img", "bitmap", "--add", img, "b0")
	var points []backuptest.Point
	take := func(mode string) *mover.BackupResult {
		t.Helper()
		res, err := backuptest.ExportBackup(t, ro, img, "heal-vm", mode, "")
		if err != nil {
			t.Fatal(err)
		}
		points = append(points, backuptest.Point{ID: res.ID, Refs: map[string]string{"vda": qemutest.RawCopy(t, img)}})
		return res
	}
	full := take("full")
	qemutest.IO(t, img, "write -P 0x42 11M 4k")
	inc1 := take("incremental")
	names := []string{"heal-vm/" + full.ID, "heal-vm/" + inc1.ID}

	r, err := ro.Open(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	m, err := r.Backup(t.Context(), "heal-vm", inc1.ID)
	if err != nil {
		t.Fatal(err)
	}
	ix, err := r.LoadIndex(t.Context(), m, "vda")
	if err != nil {
		t.Fatal(err)
	}
	// Three chunks of the random data (chunks of 256 KiB, or of 1 MiB in
	// a repository made by init).
	chunk := r.Config().ChunkSize
	corrupt, missing, gone := ix.Digest(1), ix.Digest(3), ix.Digest(5)
	store := r.Store()
	flip := func(d chunker.Digest) []byte {
		t.Helper()
		b, err := store.Get(t.Context(), repo.ChunkKey(d), nil, 1<<30)
		if err != nil {
			t.Fatal(err)
		}
		b[len(b)-7] ^= 0x10
		if err := store.Put(t.Context(), repo.ChunkKey(d), b); err != nil {
			t.Fatal(err)
		}
		return b
	}
	bad := flip(corrupt)
	if err := store.Delete(t.Context(), repo.ChunkKey(missing)); err != nil {
		t.Fatal(err)
	}

	// verify names both chunks, every backup that needs them, and keeps
	// the corrupt bytes.
	check := func(want map[chunker.Digest]string, backups []string) repo.VerifyStats {
		t.Helper()
		got := map[string]repo.Problem{}
		st, err := verify(t, ro, repo.VerifyOptions{ReadData: true}, func(p repo.Problem) { got[p.Object] = p })
		if err != nil {
			t.Fatal(err)
		}
		if len(got) != len(want) {
			t.Fatalf("verify found %v, want %d problems", got, len(want))
		}
		for d, what := range want {
			p, ok := got[repo.ChunkKey(d)]
			if !ok || !strings.Contains(p.Problem, what) || !slices.Equal(p.AllBackups(), backups) {
				t.Errorf("verify of chunk %s: %+v, want %q in backups %v", repo.ChunkKey(d), p, what, backups)
			}
		}
		if len(want) > 0 && !slices.Equal(st.Damaged, backups) || len(want) == 0 && len(st.Damaged) != 0 {
			t.Errorf("damaged backups %v, want %v", st.Damaged, backups)
		}
		_, damaged, err := r.Damage(t.Context())
		if err != nil {
			t.Fatal(err)
		}
		for _, p := range points {
			name := "heal-vm/" + p.ID
			if damaged[name] != (len(want) > 0 && slices.Contains(backups, name)) {
				t.Errorf("list marks %s damaged: %v, want it in %v", name, damaged[name], backups)
			}
		}
		return st
	}
	st := check(map[chunker.Digest]string{corrupt: "corrupt", missing: "missing"}, names)
	if st.Corrupt != 1 || st.Missing != 1 || st.Quarantined != 1 || st.Repaired != 0 {
		t.Errorf("verify stats %+v", st)
	}
	if q, err := store.Get(t.Context(), repo.QuarantineKey(corrupt), nil, 1<<30); err != nil || !bytes.Equal(q, bad) {
		t.Errorf("the quarantined copy is not the corrupt chunk's bytes: %v", err)
	}
	// A restore of a damaged backup fails and names the chunk; it does not
	// write wrong bytes silently.
	_, _, err = restore.Restore(t.Context(), restore.Options{Repo: ro, Domain: "heal-vm", Backup: full.ID,
		Output: filepath.Join(t.TempDir(), "r"), Disk: "vda"})
	if err == nil || !strings.Contains(err.Error(), repo.ChunkKey(corrupt)[:20]) && !strings.Contains(err.Error(), repo.ChunkKey(missing)[:20]) {
		t.Errorf("restore of a damaged backup: %v", err)
	}

	// The next incremental touches neither chunk, yet stores both again.
	qemutest.IO(t, img, "write -P 0x43 11M 4k")
	inc2 := take("incremental")
	if inc2.Mode != "incremental" || inc2.Healed != 2 || inc2.Fallback != "" {
		t.Fatalf("the incremental after verify: %+v", inc2)
	}
	st = check(nil, nil)
	if st.Repaired != 0 { // the backup cleared the records itself
		t.Errorf("verify after the healing backup: %+v", st)
	}
	backuptest.CheckRestores(t, ro, "heal-vm", points)

	// The next backup of any domain heals what its disk holds: a full
	// of a copy under another name stores a lost chunk again.
	if err := store.Delete(t.Context(), repo.ChunkKey(missing)); err != nil {
		t.Fatal(err)
	}
	check(map[chunker.Digest]string{missing: "missing"}, append(names, "heal-vm/"+inc2.ID))
	other, err := backuptest.ExportBackup(t, ro, img, "heal-copy", "full", "")
	if err != nil || other.Healed != 1 {
		t.Fatalf("a full of another domain: %+v %v", other, err)
	}
	check(nil, nil)
	backuptest.CheckRestores(t, ro, "heal-vm", points)

	// A chunk damaged whose data then changed on the disk: nothing can
	// store it again, and its backups stay damaged.
	flip(gone)
	qemutest.IO(t, img, fmt.Sprintf("write -P 0x44 %d %d", 5*chunk, chunk))
	names = append(names, "heal-copy/"+other.ID, "heal-vm/"+inc2.ID)
	slices.Sort(names)
	st = check(map[chunker.Digest]string{gone: "corrupt"}, names)
	inc3 := take("incremental")
	if inc3.Healed != 0 || inc3.Mode != "incremental" {
		t.Fatalf("an incremental that cannot heal: %+v", inc3)
	}
	st = check(map[chunker.Digest]string{gone: "corrupt"}, names)
	if st.Repaired != 0 || st.Corrupt != 1 {
		t.Errorf("verify stats %+v", st)
	}
	backuptest.CheckRestores(t, ro, "heal-vm", points[3:])
}

func TestHealLocal(t *testing.T) {
	heal(t, repo.Options{Location: filepath.Join(t.TempDir(), "repo")})
}

func TestHealS3(t *testing.T) {
	ep := sinktest.S3Endpoint(t)
	heal(t, repo.Options{Location: fmt.Sprintf("s3://heal-%08x/nbdmover", rand.Uint32()), S3Endpoint: ep})
}

func TestHealEncrypted(t *testing.T) {
	heal(t, encryptedRepo(t, repo.Options{Location: filepath.Join(t.TempDir(), "repo")}))
}
