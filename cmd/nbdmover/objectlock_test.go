package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"math/rand/v2"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/minio/minio-go/v7"
	"github.com/minio/minio-go/v7/pkg/credentials"

	"github.com/nbdmover/nbdmover/internal/backuptest"
	"github.com/nbdmover/nbdmover/internal/qemutest"
	nbdrepo "github.com/nbdmover/nbdmover/repo"
	"github.com/nbdmover/nbdmover/sink"
	"github.com/nbdmover/nbdmover/sink/sinktest"
)

// lockFixture is an S3 repository with Object Lock and a disk served by
// qemu-nbd with a persistent dirty bitmap, so that backups after the
// first are incrementals.
type lockFixture struct {
	bucket string
	repo   []string // --repo and --s3-endpoint
	img    string
	refs   map[string]string // raw image by backup id
	env    []string          // credentials the commands run with (nil: the test's)
	next   []string          // more flags for the next backup
	id     string            // the repository's id
}

type lockedBackup struct {
	ID         string
	Mode       string
	ObjectLock *struct {
		ProtectedUntil time.Time `json:"protected_until"`
		LockedUntil    time.Time `json:"locked_until"`
		Extended       int64
	} `json:"object_lock"`
}

func newLockFixture(t *testing.T, endpoint, mode, period string) *lockFixture {
	t.Helper()
	f := &lockFixture{bucket: fmt.Sprintf("lock-%d-%08x", time.Now().UnixNano()%1e9, rand.Uint32()), refs: map[string]string{}}
	f.repo = []string{"--repo", "s3://" + f.bucket + "/r", "--s3-endpoint", endpoint}
	f.img = qemutest.NewImage(t, t.TempDir(), 32<<20)
	qemutest.IO(t, f.img, "write -s "+backuptest.RandomFile(t, 24<<20, 21)+" 0 24M")
	qemutest.Run(t, "qemu-img", "bitmap", "--add", f.img, "b0")
	if mode != "" {
		out := mustRun(t, append([]string{"init", "--object-lock", mode, "--lock-period", period, "--json"}, f.repo...)...)
		var doc struct{ ID string }
		if !strings.Contains(out, `"mode": "`+mode+`"`) || json.Unmarshal([]byte(out), &doc) != nil {
			t.Fatalf("init --json: %s", out)
		}
		f.id = doc.ID
	} else {
		mustRun(t, append([]string{"init"}, f.repo...)...)
	}
	return f
}

// backup backs the disk up as domain name (after qemu-io cmds, if any)
// and keeps a raw copy of what it saw.
func (f *lockFixture) backup(t *testing.T, name string, cmds ...string) lockedBackup {
	t.Helper()
	if len(cmds) > 0 {
		qemutest.IO(t, f.img, cmds...)
	}
	srv := qemutest.Serve(t, f.img, "-r", "-B", "b0")
	args := append(append([]string{"backup", "--nbd", srv.URI, "--name", name, "--bitmap", "b0", "--disk", "vda", "--json"}, f.repo...), f.next...)
	f.next = nil
	out, stderr, code := nbdmoverEnv(t, f.env, args...)
	srv.Kill()
	if code != 0 {
		t.Fatalf("backup: %d %s", code, stderr)
	}
	var b lockedBackup
	if err := json.Unmarshal([]byte(out), &b); err != nil {
		t.Fatalf("backup --json: %v: %s", err, out)
	}
	f.refs[b.ID] = qemutest.RawCopy(t, f.img)
	return b
}

// restored checks that backup id of d1 restores bit-exact (with extra
// flags, like --as-of).
func (f *lockFixture) restored(t *testing.T, id string, extra ...string) {
	t.Helper()
	dest := filepath.Join(t.TempDir(), "vda.raw")
	args := append(append([]string{"restore", "--domain", "d1", "--backup", id, "--disk", "vda", "--output", dest}, f.repo...), extra...)
	if _, stderr, code := nbdmover(t, args...); code != 0 {
		t.Fatalf("restore %s %v: %s", id, extra, stderr)
	}
	qemutest.Compare(t, f.refs[id], "raw", dest, "raw")
}

func rootClient(t *testing.T, endpoint string) *minio.Client {
	u, _ := url.Parse(endpoint)
	c, err := minio.New(u.Host, &minio.Options{Creds: credentials.NewEnvAWS(), Region: "us-east-1"})
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// noBypass returns credentials (as environment variables, and a client)
// that may do anything to the bucket but bypass governance retention:
// MinIO's STS AssumeRole with a session policy.
func noBypass(t *testing.T, endpoint string) ([]string, *minio.Client) {
	policy := `{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Action":["s3:*"],"Resource":["arn:aws:s3:::*"]},` +
		`{"Effect":"Deny","Action":["s3:BypassGovernanceRetention"],"Resource":["arn:aws:s3:::*"]}]}`
	creds, err := credentials.NewSTSAssumeRole(endpoint, credentials.STSAssumeRoleOptions{AccessKey: os.Getenv("AWS_ACCESS_KEY_ID"),
		SecretKey: os.Getenv("AWS_SECRET_ACCESS_KEY"), Policy: policy, DurationSeconds: 3600, Location: "us-east-1"})
	if err != nil {
		t.Fatal(err)
	}
	v, err := creds.GetWithContext(nil)
	if err != nil {
		t.Fatal(err)
	}
	u, _ := url.Parse(endpoint)
	c, err := minio.New(u.Host, &minio.Options{Creds: credentials.NewStaticV4(v.AccessKeyID, v.SecretAccessKey, v.SessionToken), Region: "us-east-1"})
	if err != nil {
		t.Fatal(err)
	}
	return []string{"AWS_ACCESS_KEY_ID=" + v.AccessKeyID, "AWS_SECRET_ACCESS_KEY=" + v.SecretAccessKey, "AWS_SESSION_TOKEN=" + v.SessionToken}, c
}

type objVersion struct{ key, id string }

// versions lists the bucket's object versions (not delete markers).
func versions(t *testing.T, c *minio.Client, bucket string) map[objVersion]bool {
	out := map[objVersion]bool{}
	for o := range c.ListObjects(context.Background(), bucket, minio.ListObjectsOptions{Recursive: true, WithVersions: true}) {
		if o.Err != nil {
			t.Fatal(o.Err)
		}
		if !o.IsDeleteMarker {
			out[objVersion{o.Key, o.VersionID}] = true
		}
	}
	return out
}

// attack does what an attacker holding the host's credentials (c) can:
// overwrite every object with garbage, delete every object, then try to
// delete every version, with the governance bypass. It returns the
// versions it managed to delete.
func attack(t *testing.T, c *minio.Client, bucket string) map[objVersion]bool {
	ctx := context.Background()
	var keys []string
	for o := range c.ListObjects(ctx, bucket, minio.ListObjectsOptions{Recursive: true}) {
		if o.Err != nil {
			t.Fatal(o.Err)
		}
		keys = append(keys, o.Key)
	}
	if len(keys) < 10 {
		t.Fatalf("only %d objects to attack", len(keys))
	}
	for _, k := range keys {
		garbage := []byte("ransom note: " + k)
		if _, err := c.PutObject(ctx, bucket, k, bytes.NewReader(garbage), int64(len(garbage)), minio.PutObjectOptions{DisableMultipart: true}); err != nil {
			t.Fatalf("the attacker's overwrite of %s: %v", k, err)
		}
	}
	for _, k := range keys {
		if err := c.RemoveObject(ctx, bucket, k, minio.RemoveObjectOptions{}); err != nil {
			t.Fatalf("the attacker's delete of %s: %v", k, err)
		}
	}
	deleted := map[objVersion]bool{}
	all := versions(t, c, bucket)
	for v := range all {
		if c.RemoveObject(ctx, bucket, v.key, minio.RemoveObjectOptions{VersionID: v.id, GovernanceBypass: true}) == nil {
			deleted[v] = true
		}
	}
	t.Logf("the attacker overwrote and deleted %d objects, and tried to delete %d versions: %d went (its own garbage and unlocked ones)", len(keys), len(all), len(deleted))
	return deleted
}

// An attacker with the host's credentials (governance mode without the
// bypass permission, and compliance mode with every permission)
// overwrites and deletes every object and tries to delete every
// version: no version nbdmover locked goes; list, restore and verify
// --read-data --as-of a time before the attack give every backup
// bit-exact; recover makes the repository usable again (list, restore,
// verify, a new incremental). Forget refuses backups inside their
// window (and --bypass-governance needs the permission).
func TestObjectLockAttack(t *testing.T) {
	qemutest.Need(t, "qemu-img", "qemu-io", "qemu-nbd", "nbdcopy")
	ep := sinktest.S3Endpoint(t)
	for _, mode := range []string{"governance", "compliance"} {
		t.Run(mode, func(t *testing.T) {
			f := newLockFixture(t, ep, mode, "10m")
			b1 := f.backup(t, "d1")
			b2 := f.backup(t, "d1", "write -s "+backuptest.RandomFile(t, 2<<20, 22)+" 4M 2M")
			b3 := f.backup(t, "d1", "write -P 0x5a 20M 1M")
			ids := []string{b1.ID, b2.ID, b3.ID}
			if b1.Mode != "full" || b2.Mode != "incremental" || b3.Mode != "incremental" {
				t.Fatalf("modes %s %s %s", b1.Mode, b2.Mode, b3.Mode)
			}
			for _, b := range []lockedBackup{b1, b2, b3} {
				if l := b.ObjectLock; l == nil || l.ProtectedUntil.Before(time.Now().Add(9*time.Minute)) || l.LockedUntil.Before(l.ProtectedUntil) {
					t.Fatalf("backup %s: object_lock %+v", b.ID, l)
				}
			}

			// forget refuses what is inside its window.
			out, stderr, code := nbdmover(t, append([]string{"forget", "--domain", "d1", "--keep-last", "1"}, f.repo...)...)
			if code != 1 || !strings.Contains(stderr, "inside its Object Lock window") || !strings.Contains(stderr, b1.ID) || !strings.Contains(stderr, b2.ID) {
				t.Fatalf("forget inside the window: %d %s %s", code, out, stderr)
			}
			if out := mustRun(t, append([]string{"list", "--domain", "d1"}, f.repo...)...); strings.Count(out, "locked until") != 3 {
				t.Fatalf("list after a refused forget: %s", out)
			}
			root := rootClient(t, ep)
			if mode == "governance" {
				env, _ := noBypass(t, ep)
				_, stderr, code := nbdmoverEnv(t, env, append([]string{"forget", "--domain", "d1", "--keep-last", "2", "--bypass-governance"}, f.repo...)...)
				if code != 1 || !strings.Contains(stderr, "s3:BypassGovernanceRetention") {
					t.Fatalf("forget --bypass-governance without the permission: %d %s", code, stderr)
				}
			} else if _, stderr, code := nbdmover(t, append([]string{"forget", "--domain", "d1", "--keep-last", "2", "--bypass-governance"}, f.repo...)...); code != 2 || !strings.Contains(stderr, "compliance") {
				t.Fatalf("forget --bypass-governance in compliance mode: %d %s", code, stderr)
			}
			if out := mustRun(t, append([]string{"list", "--domain", "d1"}, f.repo...)...); strings.Count(out, "locked until") != 3 {
				t.Fatalf("list after forget --bypass-governance failed: %s", out)
			}

			before := versions(t, root, f.bucket)
			time.Sleep(1100 * time.Millisecond)
			asOf := time.Now().UTC().Truncate(time.Second)
			time.Sleep(time.Until(asOf.Add(1100 * time.Millisecond)))
			attacker := root
			if mode == "governance" {
				_, attacker = noBypass(t, ep)
			}
			deleted := attack(t, attacker, f.bucket)
			for v := range deleted {
				if before[v] && sink.Immutable(strings.TrimPrefix(v.key, "r/")) {
					t.Errorf("the attacker deleted locked version %s of %s", v.id, v.key)
				}
			}
			if out, _, code := nbdmover(t, append([]string{"list", "--domain", "d1"}, f.repo...)...); code == 0 && strings.Contains(out, b1.ID) {
				t.Fatalf("list after the attack still shows the backups: %s", out)
			}

			at := asOf.Format(time.RFC3339)
			var listed struct{ Backups []struct{ ID string } }
			out = mustRun(t, append([]string{"list", "--as-of", at, "--json"}, f.repo...)...)
			if json.Unmarshal([]byte(out), &listed) != nil || len(listed.Backups) != 3 {
				t.Fatalf("list --as-of: %s", out)
			}
			for _, id := range ids {
				f.restored(t, id, "--as-of", at)
			}
			if out, stderr, code := nbdmover(t, append([]string{"verify", "--as-of", at, "--read-data"}, f.repo...)...); code != 0 {
				t.Fatalf("verify --as-of --read-data: %d %s %s", code, out, stderr)
			}
			// Reading the past records nothing of it in the present.
			for o := range root.ListObjects(context.Background(), f.bucket, minio.ListObjectsOptions{Prefix: "r/state/", Recursive: true}) {
				t.Errorf("verify --as-of wrote %s", o.Key)
			}
			// An NBD export of the past, read by nbdcopy.
			sock := filepath.Join(t.TempDir(), "export.sock")
			p, doc := startExport(t, append([]string{"--domain", "d1", "--backup", b2.ID, "--as-of", at, "--listen", "unix://" + sock}, f.repo...)...)
			dst := filepath.Join(t.TempDir(), "copy.raw")
			if out, err := exec.Command("nbdcopy", doc.Disks[0].URI, dst).CombinedOutput(); err != nil {
				t.Fatalf("nbdcopy of export --as-of: %v\n%s", err, out)
			}
			qemutest.Compare(t, f.refs[b2.ID], "raw", dst, "raw")
			p.cmd.Process.Signal(syscall.SIGINT)
			p.wait(t)

			var rec struct {
				DryRun   bool `json:"dry_run"`
				Restored map[string]int
				Removed  map[string]int
			}
			out = mustRun(t, append([]string{"recover", "--as-of", at, "--dry-run", "--json"}, f.repo...)...)
			if json.Unmarshal([]byte(out), &rec) != nil || !rec.DryRun || rec.Restored["manifests"] != 3 || rec.Restored["chunks"] < 20 || rec.Restored["config"] != 1 {
				t.Fatalf("recover --dry-run: %s", out)
			}
			if _, _, code := nbdmover(t, append([]string{"list"}, f.repo...)...); code == 0 {
				t.Fatal("the repository works after a dry run of recover")
			}
			out = mustRun(t, append([]string{"recover", "--as-of", at}, f.repo...)...)
			if !strings.Contains(out, "restored") {
				t.Fatalf("recover: %s", out)
			}
			t.Logf("recover: %s", strings.SplitN(out, "\n", 2)[0])
			out = mustRun(t, append([]string{"list", "--domain", "d1", "--json"}, f.repo...)...)
			if json.Unmarshal([]byte(out), &listed) != nil || len(listed.Backups) != 3 {
				t.Fatalf("list after recover: %s", out)
			}
			out = mustRun(t, append([]string{"recover", "--as-of", at, "--dry-run", "--json"}, f.repo...)...)
			rec.Restored, rec.Removed = nil, nil
			if json.Unmarshal([]byte(out), &rec) != nil || len(rec.Restored)+len(rec.Removed) != 0 {
				t.Fatalf("recover after recover would still do: %s", out)
			}
			f.restored(t, b3.ID)
			if out, stderr, code := nbdmover(t, append([]string{"verify", "--read-data"}, f.repo...)...); code != 0 {
				t.Fatalf("verify --read-data after recover: %d %s %s", code, out, stderr)
			}
			b4 := f.backup(t, "d1", "write -P 0x77 8M 64k")
			if b4.Mode != "incremental" {
				t.Fatalf("the backup after recover: %+v", b4)
			}
			f.restored(t, b4.ID)
			f.restored(t, b1.ID)
			if mode == "governance" { // with the bypass permission (the test's root credentials)
				mustRun(t, append([]string{"forget", "--domain", "d1", "--keep-last", "1", "--bypass-governance"}, f.repo...)...)
				out = mustRun(t, append([]string{"list", "--domain", "d1", "--json"}, f.repo...)...)
				if json.Unmarshal([]byte(out), &listed) != nil || len(listed.Backups) != 1 || listed.Backups[0].ID != b4.ID {
					t.Fatalf("list after forget --bypass-governance: %s", out)
				}
				f.restored(t, b4.ID)
			}
		})
	}
}

// A backup extends the locks of what it takes over from its parent only
// when they could end before its window does (once in a quarter of the
// period, not every backup), and a chunk another backup stored is
// locked anew when a backup finds it held. The requests of an
// incremental with 1% of the disk changed, with and without Object
// Lock, are counted side by side.
func TestObjectLockExtension(t *testing.T) {
	qemutest.Need(t, "qemu-img", "qemu-io", "qemu-nbd")
	ep := sinktest.S3Endpoint(t)
	f := newLockFixture(t, ep, "governance", "40s")
	b1 := f.backup(t, "d1")
	b2 := f.backup(t, "d1") // unchanged: every chunk stored is b2's
	if b2.ObjectLock.Extended != 0 || !b2.ObjectLock.LockedUntil.Equal(b1.ObjectLock.LockedUntil) {
		t.Fatalf("an incremental 10s into the parent's renewal extended %d objects; locks %+v, parent %+v", b2.ObjectLock.Extended, b2.ObjectLock, b1.ObjectLock)
	}
	s, err := sink.NewS3(sink.S3Options{Endpoint: ep, Bucket: f.bucket, Prefix: "r/"})
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	// The config was extended by the first backup (it was locked once,
	// at init).
	if _, until, err := s.Retention(ctx, "config", ""); err != nil || until.Before(b1.ObjectLock.ProtectedUntil) {
		t.Fatalf("config locked until %v, before b1's window ends (%v): %v", until, b1.ObjectLock.ProtectedUntil, err)
	}
	// A manifest with a second version (someone put it again: its
	// locked_until cannot be believed) is extended from at once.
	root := rootClient(t, ep)
	key := "r/manifests/d1/" + strings.TrimPrefix(mustManifestKey(t, root, f.bucket, b2.ID), "r/manifests/d1/")
	obj, err := root.GetObject(ctx, f.bucket, key, minio.GetObjectOptions{})
	if err != nil {
		t.Fatal(err)
	}
	blob, _ := io.ReadAll(obj)
	if _, err := root.PutObject(ctx, f.bucket, key, bytes.NewReader(blob), int64(len(blob)), minio.PutObjectOptions{DisableMultipart: true}); err != nil {
		t.Fatal(err)
	}
	if b := f.backup(t, "d1"); b.ObjectLock.Extended < 20 {
		t.Fatalf("the backup after its parent's manifest was put again extended %d objects", b.ObjectLock.Extended)
	}
	// A parent this host did not commit (no record of it here: another
	// host's, or one planted in the bucket) is not believed either.
	if b := f.backup(t, "d1"); b.ObjectLock.Extended != 0 {
		t.Fatalf("a backup right after one this host committed extended %d objects", b.ObjectLock.Extended)
	}
	if err := os.Remove(filepath.Join(nbdrepo.PinDir, f.id, "domain-d1.json")); err != nil {
		t.Fatal(err)
	}
	last := f.backup(t, "d1")
	if last.ObjectLock.Extended < 20 {
		t.Fatalf("the backup after a parent this host has no record of extended %d objects", last.ObjectLock.Extended)
	}
	var chunks []string
	s.List(ctx, "chunks/", func(o sink.ObjectInfo) error { chunks = append(chunks, o.Key); return nil })
	// The period is 40s, Renew 10s: a backup that starts more than 40s
	// before its parent's locks end finds them ending before its window.
	time.Sleep(time.Until(last.ObjectLock.LockedUntil.Add(-40*time.Second + 2*time.Second)))
	// A chunk of the parent deleted (a marker): the extension finds it
	// missing, records it, and the next backup stores it again.
	if err := root.RemoveObject(ctx, f.bucket, "r/"+chunks[5], minio.RemoveObjectOptions{}); err != nil {
		t.Fatal(err)
	}
	b3 := f.backup(t, "d1", "write -P 0x32 2M 64k")
	if b3.ObjectLock.Extended < int64(len(chunks))-1 || b3.ObjectLock.LockedUntil.Before(b3.ObjectLock.ProtectedUntil) {
		t.Fatalf("the incremental after Renew extended %d objects (the repository has %d chunks): %+v", b3.ObjectLock.Extended, len(chunks), b3.ObjectLock)
	}
	t.Logf("the incremental after Renew extended the locks of %d objects (%d chunks in the repository); the one before, %d", b3.ObjectLock.Extended, len(chunks), b2.ObjectLock.Extended)
	var healed struct {
		Healed int `json:"healed_chunks"`
	}
	srv := qemutest.Serve(t, f.img, "-r", "-B", "b0")
	out := mustRun(t, append([]string{"backup", "--nbd", srv.URI, "--name", "d1", "--bitmap", "b0", "--disk", "vda", "--json"}, f.repo...)...)
	srv.Kill()
	if json.Unmarshal([]byte(out), &healed) != nil || healed.Healed != 1 {
		t.Fatalf("the backup after the one that found a chunk missing: %s", out)
	}
	for _, k := range append(chunks, "config") {
		_, until, err := s.Retention(context.Background(), k, "")
		if err != nil || until.Before(b3.ObjectLock.ProtectedUntil) {
			t.Fatalf("chunk %s locked until %v, before b3's window ends (%v): %v", k, until, b3.ObjectLock.ProtectedUntil, err)
		}
	}
	// Another domain's full backup of the same disk finds every chunk
	// held, and locks each anew.
	time.Sleep(2 * time.Second)
	d2 := f.backup(t, "d2")
	for _, k := range chunks[:3] {
		if _, until, _ := s.Retention(context.Background(), k, ""); until.Before(d2.ObjectLock.ProtectedUntil) {
			t.Fatalf("held chunk %s locked until %v, before d2's window ends (%v)", k, until, d2.ObjectLock.ProtectedUntil)
		}
	}

	// Requests of an incremental with 1% changed, with and without
	// Object Lock, through a counting proxy.
	count := func(mode string) map[string]int {
		proxy, counts := countingProxy(t, ep)
		g := newLockFixture(t, proxy, mode, "1h")
		g.backup(t, "d1")
		counts.reset()
		g.backup(t, "d1", "write -P 0x41 9M 320k") // 1% of 32 MiB
		return counts.get()
	}
	plain, locked := count(""), count("governance")
	total := func(m map[string]int) (n int) {
		for _, v := range m {
			n += v
		}
		return n
	}
	t.Logf("requests of a 1%% incremental: without Object Lock %d %v; with %d %v", total(plain), plain, total(locked), locked)
	if float64(total(locked)) > 1.05*float64(total(plain))+1 {
		t.Errorf("an incremental with Object Lock sent %d requests, without %d: more than 5%% more", total(locked), total(plain))
	}
}

type requestCounts struct {
	mu sync.Mutex
	m  map[string]int
}

func (c *requestCounts) reset() { c.mu.Lock(); c.m = map[string]int{}; c.mu.Unlock() }
func (c *requestCounts) get() map[string]int {
	c.mu.Lock()
	defer c.mu.Unlock()
	out := map[string]int{}
	for k, v := range c.m {
		out[k] = v
	}
	return out
}

// countingProxy forwards to endpoint and counts requests by method (and
// the retention and versions subresources).
func countingProxy(t *testing.T, endpoint string) (string, *requestCounts) {
	u, _ := url.Parse(endpoint)
	counts := &requestCounts{m: map[string]int{}}
	rp := httputil.NewSingleHostReverseProxy(u)
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		kind := r.Method
		for _, sub := range []string{"retention", "versions", "versionId"} {
			if r.URL.Query().Has(sub) {
				kind += "?" + sub
			}
		}
		counts.mu.Lock()
		counts.m[kind]++
		counts.mu.Unlock()
		rp.ServeHTTP(w, r)
	}))
	t.Cleanup(srv.Close)
	return srv.URL, counts
}

// gc of a repository with Object Lock: forget keeps backups inside their
// window; once it has ended they are forgotten, gc deletes what no
// backup references through delete markers, and removes the versions
// once their locks end, never meeting a refusal (denied 0); what is
// left restores bit-exact.
func TestObjectLockGC(t *testing.T) {
	qemutest.Need(t, "qemu-img", "qemu-io", "qemu-nbd")
	ep := sinktest.S3Endpoint(t)
	f := newLockFixture(t, ep, "governance", "6s")
	b1 := f.backup(t, "d1")
	f.next = []string{"--mode", "full"} // so that b1's index is not b2's too
	b2 := f.backup(t, "d1", "write -s "+backuptest.RandomFile(t, 8<<20, 23)+" 0 8M")
	if _, stderr, code := nbdmover(t, append([]string{"forget", "--domain", "d1", "--keep-last", "1"}, f.repo...)...); code != 1 || !strings.Contains(stderr, b1.ID) {
		t.Fatalf("forget inside the window: %d %s", code, stderr)
	}
	time.Sleep(time.Until(b1.ObjectLock.ProtectedUntil.Add(time.Second)))
	if out := mustRun(t, append([]string{"forget", "--domain", "d1", "--keep-last", "1"}, f.repo...)...); !strings.Contains(out, "forgotten 1") {
		t.Fatalf("forget after the window: %s", out)
	}
	type gcOut struct {
		Chunks struct {
			Deleted int
		}
		ObjectLock *struct {
			Purged      int        `json:"versions_deleted"`
			Locked      int        `json:"versions_locked"`
			LockedUntil *time.Time `json:"locked_until"`
			Denied      int
		} `json:"object_lock"`
	}
	gc := func() gcOut {
		t.Helper()
		out := mustRun(t, append([]string{"gc", "--grace", "1s", "--json"}, f.repo...)...)
		var g gcOut
		if err := json.Unmarshal([]byte(out), &g); err != nil || g.ObjectLock == nil {
			t.Fatalf("gc --json: %v %s", err, out)
		}
		if g.ObjectLock.Denied != 0 {
			t.Fatalf("gc met %d refusals: %s", g.ObjectLock.Denied, out)
		}
		return g
	}
	g1 := gc()
	if g1.Chunks.Deleted < 8 {
		t.Fatalf("gc deleted %d chunks of the forgotten backup: %+v", g1.Chunks.Deleted, g1)
	}
	// gc again until no lock holds a version back (the locks end at most
	// the period and a quarter after b1).
	purged := g1.ObjectLock.Purged
	for g := g1; g.ObjectLock.Locked > 0; {
		if time.Since(b1.ObjectLock.LockedUntil) > 40*time.Second {
			t.Fatalf("versions still locked long after b1's locks ended: %+v", g.ObjectLock)
		}
		time.Sleep(time.Until(g.ObjectLock.LockedUntil.Add(time.Second)))
		g = gc()
		purged += g.ObjectLock.Purged
	}
	if purged < g1.Chunks.Deleted {
		t.Fatalf("gc removed %d versions and markers, for %d chunks deleted", purged, g1.Chunks.Deleted)
	}
	// No version is left of a chunk the kept backup does not reference.
	root := rootClient(t, ep)
	// Planted: a foreign key, a key nbdmover never writes, and a state
	// object whose old version is under legal hold. gc goes on, counts
	// the refusal, and touches nothing foreign.
	ctx := context.Background()
	put := func(key string, opts minio.PutObjectOptions) string {
		t.Helper()
		opts.DisableMultipart = true
		info, err := root.PutObject(ctx, f.bucket, key, bytes.NewReader([]byte("x")), 1, opts)
		if err != nil {
			t.Fatal(err)
		}
		return info.VersionID
	}
	put("foreign/a", minio.PutObjectOptions{})
	put("foreign/a", minio.PutObjectOptions{})
	put("r/odd name", minio.PutObjectOptions{})
	put("r/odd name", minio.PutObjectOptions{})
	put("r/state/planted", minio.PutObjectOptions{LegalHold: minio.LegalHoldEnabled})
	put("r/state/planted", minio.PutObjectOptions{})
	out := mustRun(t, append([]string{"gc", "--grace", "1s", "--json"}, f.repo...)...)
	var g3 gcOut
	if json.Unmarshal([]byte(out), &g3) != nil || g3.ObjectLock == nil || g3.ObjectLock.Denied != 1 {
		t.Fatalf("gc beside planted versions: %s", out)
	}
	n := 0
	for v := range versions(t, root, f.bucket) {
		if v.key == "foreign/a" || v.key == "r/odd name" {
			n++
		}
	}
	if n != 4 {
		t.Fatalf("gc removed versions of keys not its own: %d of 4 left", n)
	}
	live := map[string]bool{}
	for o := range root.ListObjects(context.Background(), f.bucket, minio.ListObjectsOptions{Prefix: "r/chunks/", Recursive: true}) {
		live[o.Key] = true
	}
	for v := range versions(t, root, f.bucket) {
		if strings.HasPrefix(v.key, "r/chunks/") && !live[v.key] {
			t.Errorf("gc left version %s of deleted chunk %s", v.id, v.key)
		}
	}
	f.restored(t, b2.ID)
	if _, stderr, code := nbdmover(t, append([]string{"verify", "--read-data"}, f.repo...)...); code != 0 {
		t.Fatalf("verify: %s", stderr)
	}
}

// init --object-lock: bad usage exits 2; a bucket without Object Lock is
// refused naming the setting.
func TestObjectLockInit(t *testing.T) {
	ep := sinktest.S3Endpoint(t)
	plain := fmt.Sprintf("s3://plain-%d-%08x", time.Now().UnixNano()%1e9, rand.Uint32())
	mustRun(t, "init", "--repo", plain+"/a", "--s3-endpoint", ep)
	for _, c := range []struct {
		args []string
		code int
		want string
	}{
		{[]string{"--repo", t.TempDir(), "--object-lock", "governance", "--lock-period", "30d"}, 2, "needs an S3 repository"},
		{[]string{"--repo", plain + "/b", "--s3-endpoint", ep, "--object-lock", "governance"}, 2, "needs --lock-period"},
		{[]string{"--repo", plain + "/b", "--s3-endpoint", ep, "--object-lock", "strict", "--lock-period", "1d"}, 2, "want governance or compliance"},
		{[]string{"--repo", plain + "/b", "--s3-endpoint", ep, "--lock-period", "1d"}, 2, "goes with --object-lock"},
		{[]string{"--repo", plain + "/b", "--s3-endpoint", ep, "--object-lock", "compliance", "--lock-period", "1d"}, 1, "does not have Object Lock enabled"},
	} {
		_, stderr, code := nbdmover(t, append([]string{"init"}, c.args...)...)
		if code != c.code || !strings.Contains(stderr, c.want) {
			t.Errorf("init %v: %d %s", c.args, code, stderr)
		}
	}
	for _, args := range [][]string{{"list", "--repo", t.TempDir(), "--as-of", "2026-01-01T00:00:00Z"},
		{"list", "--repo", plain + "/a", "--s3-endpoint", ep, "--as-of", "yesterday"},
		{"recover", "--repo", plain + "/a", "--s3-endpoint", ep}} {
		if _, stderr, code := nbdmover(t, args...); code != 2 {
			t.Errorf("%v: %d %s", args, code, stderr)
		}
	}
}

// gc's purge of expired versions beside a backup (real processes): gc
// holds after it listed the versions it deletes (every version of the
// forgotten backup's chunks, and the delete markers its sweep left);
// meanwhile a backup of the same disk stores those chunks anew. The
// purge deletes what it listed and nothing else: the new backup
// restores bit-exact and verifies.
func TestObjectLockPurgeBesideBackup(t *testing.T) {
	qemutest.Need(t, "qemu-img", "qemu-io", "qemu-nbd")
	ep := sinktest.S3Endpoint(t)
	f := newLockFixture(t, ep, "governance", "3s")
	b1 := f.backup(t, "d1")
	time.Sleep(time.Until(b1.ObjectLock.ProtectedUntil.Add(time.Second)))
	mustRun(t, append([]string{"forget", "--domain", "d1", "--keep-last", "0"}, f.repo...)...)
	gcArgs := append([]string{"gc", "--grace", "1s", "--json"}, f.repo...)
	if r := parseGC(t, mustRun(t, gcArgs...)); r.Chunks.Deleted < 20 {
		t.Fatalf("gc of the forgotten backup: %+v", r)
	}
	// Every lock of b1's has ended (its objects were put up to a few
	// seconds after its start), and gc's margin of 5s too.
	time.Sleep(time.Until(b1.ObjectLock.LockedUntil.Add(12 * time.Second)))

	holds := t.TempDir()
	reached := gate(t, holds, "gc-purge")
	g := start(t, holds, gcArgs...)
	reached()
	b2 := f.backup(t, "d1")
	open(holds, "gc-purge")
	out, stderr, code := g.wait(t)
	var res struct {
		ObjectLock struct {
			Purged int `json:"versions_deleted"`
			Denied int
		} `json:"object_lock"`
	}
	if code != 0 || json.Unmarshal([]byte(out), &res) != nil || res.ObjectLock.Purged < 20 || res.ObjectLock.Denied != 0 {
		t.Fatalf("gc beside a backup: %d %s %s", code, out, stderr)
	}
	f.restored(t, b2.ID)
	if _, stderr, code := nbdmover(t, append([]string{"verify", "--read-data"}, f.repo...)...); code != 0 {
		t.Fatalf("verify after the purge: %s", stderr)
	}
}

// A copy into a repository with Object Lock gives each copied backup its
// own window there (from the copy), locks what it stores, and forget in
// the target refuses the copies inside it; they restore bit-exact.
func TestObjectLockCopyInto(t *testing.T) {
	qemutest.Need(t, "qemu-nbd", "qemu-img", "qemu-io")
	f := newCopyFixture(t)
	ep := sinktest.S3Endpoint(t)
	bucket := fmt.Sprintf("lockcopy-%d-%08x", time.Now().UnixNano()%1e9, rand.Uint32())
	to := []string{"s3://" + bucket + "/r", "--s3-endpoint", ep}
	mustRun(t, append([]string{"init", "--object-lock", "compliance", "--lock-period", "5m", "--repo"}, to...)...)
	start := time.Now()
	if res := parseCopy(t, mustRun(t, append([]string{"copy", "--from", f.repo[1], "--all", "--json", "--to"}, to...)...)); len(res.Backups) != 2 {
		t.Fatalf("copy: %+v", res)
	}
	var listed struct {
		Backups []struct {
			ID             string
			ProtectedUntil *time.Time `json:"protected_until"`
		}
	}
	out := mustRun(t, append([]string{"list", "--json", "--repo"}, to...)...)
	if json.Unmarshal([]byte(out), &listed) != nil || len(listed.Backups) != 2 {
		t.Fatalf("list of the target: %s", out)
	}
	for _, b := range listed.Backups {
		if b.ProtectedUntil == nil || b.ProtectedUntil.Before(start.Add(5*time.Minute-2*time.Second)) {
			t.Fatalf("copied backup %s: protected until %v, copied at %v", b.ID, b.ProtectedUntil, start)
		}
	}
	s, err := sink.NewS3(sink.S3Options{Endpoint: ep, Bucket: bucket, Prefix: "r/"})
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	s.List(context.Background(), "chunks/", func(o sink.ObjectInfo) error {
		if mode, until, err := s.Retention(context.Background(), o.Key, ""); err != nil || mode != "compliance" || until.Before(*listed.Backups[1].ProtectedUntil) {
			t.Errorf("copied chunk %s: %q until %v: %v", o.Key, mode, until, err)
		}
		n++
		return nil
	})
	if n < 20 {
		t.Fatalf("%d chunks copied", n)
	}
	if _, stderr, code := nbdmover(t, append([]string{"forget", "--domain", "d1", "--keep-last", "0", "--repo"}, to...)...); code != 1 || !strings.Contains(stderr, "Object Lock window") {
		t.Fatalf("forget in the target: %d %s", code, stderr)
	}
	f.restored(t, append([]string{"--repo"}, to...), f.ids...)
}

// A backup whose parent is older than the lock period says so, with the
// numbers: what the parent alone referenced was unprotected for a while.
func TestObjectLockGapWarning(t *testing.T) {
	qemutest.Need(t, "qemu-img", "qemu-io", "qemu-nbd")
	f := newLockFixture(t, sinktest.S3Endpoint(t), "governance", "2s")
	f.backup(t, "d1")
	time.Sleep(3 * time.Second)
	srv := qemutest.Serve(t, f.img, "-r", "-B", "b0")
	defer srv.Kill()
	_, stderr, code := nbdmover(t, append([]string{"backup", "--nbd", srv.URI, "--name", "d1", "--bitmap", "b0", "--disk", "vda"}, f.repo...)...)
	if code != 0 || !strings.Contains(stderr, "more than the lock period 2s") {
		t.Fatalf("a backup 3s after its parent, lock period 2s: %d %s", code, stderr)
	}
}

// mustManifestKey is the key of backup id's manifest in bucket.
func mustManifestKey(t *testing.T, c *minio.Client, bucket, id string) string {
	for o := range c.ListObjects(context.Background(), bucket, minio.ListObjectsOptions{Prefix: "r/manifests/", Recursive: true}) {
		if strings.HasSuffix(o.Key, "-"+id) {
			return o.Key
		}
	}
	t.Fatalf("no manifest of %s", id)
	return ""
}

// A config put again without Object Lock (a writer of the bucket turning
// it off for every later backup of an unencrypted repository) is
// refused, naming what it had.
func TestObjectLockConfigReplaced(t *testing.T) {
	ep := sinktest.S3Endpoint(t)
	bucket := fmt.Sprintf("lockcfg-%d-%08x", time.Now().UnixNano()%1e9, rand.Uint32())
	repo := []string{"--repo", "s3://" + bucket + "/r", "--s3-endpoint", ep}
	mustRun(t, append([]string{"init", "--object-lock", "governance", "--lock-period", "1h"}, repo...)...)
	root := rootClient(t, ep)
	obj, err := root.GetObject(context.Background(), bucket, "r/config", minio.GetObjectOptions{})
	if err != nil {
		t.Fatal(err)
	}
	var cfg map[string]any
	if err := json.NewDecoder(obj).Decode(&cfg); err != nil {
		t.Fatal(err)
	}
	delete(cfg, "object_lock")
	b, _ := json.Marshal(cfg)
	if _, err := root.PutObject(context.Background(), bucket, "r/config", bytes.NewReader(b), int64(len(b)), minio.PutObjectOptions{DisableMultipart: true}); err != nil {
		t.Fatal(err)
	}
	if _, stderr, code := nbdmover(t, append([]string{"list"}, repo...)...); code != 1 || !strings.Contains(stderr, "config was replaced") {
		t.Fatalf("list with a replaced config: %d %s", code, stderr)
	}
	// Its first version gone too (once its lock ended; here with the
	// bypass): this host remembers the policy it wrote with.
	vs := versions(t, root, bucket)
	for v := range vs {
		if v.key == "r/config" {
			if err := root.RemoveObject(context.Background(), bucket, v.key, minio.RemoveObjectOptions{VersionID: v.id, GovernanceBypass: true}); err != nil {
				t.Fatal(err)
			}
		}
	}
	if _, err := root.PutObject(context.Background(), bucket, "r/config", bytes.NewReader(b), int64(len(b)), minio.PutObjectOptions{DisableMultipart: true}); err != nil {
		t.Fatal(err)
	}
	if _, stderr, code := nbdmover(t, append([]string{"list"}, repo...)...); code != 1 || !strings.Contains(stderr, "policy.json") {
		t.Fatalf("list with a config replaced, its first version gone: %d %s", code, stderr)
	}
}

// A host whose clock is far from the S3 server's is refused, naming both.
// No real MinIO can be given another clock here: a proxy in front of it
// moves the Date header of every answer 10 minutes ahead (the requests
// still carry the host's time, which MinIO checks).
func TestObjectLockClockSkew(t *testing.T) {
	ep := sinktest.S3Endpoint(t)
	bucket := fmt.Sprintf("lockclock-%d-%08x", time.Now().UnixNano()%1e9, rand.Uint32())
	mustRun(t, "init", "--repo", "s3://"+bucket+"/r", "--s3-endpoint", ep, "--object-lock", "governance", "--lock-period", "1h")
	u, _ := url.Parse(ep)
	rp := httputil.NewSingleHostReverseProxy(u)
	rp.ModifyResponse = func(r *http.Response) error {
		if d, err := http.ParseTime(r.Header.Get("Date")); err == nil {
			r.Header.Set("Date", d.Add(10*time.Minute).UTC().Format(http.TimeFormat))
		}
		return nil
	}
	srv := httptest.NewServer(rp)
	defer srv.Close()
	_, stderr, code := nbdmover(t, "list", "--repo", "s3://"+bucket+"/r", "--s3-endpoint", srv.URL)
	if code != 1 || !strings.Contains(stderr, "clock is 10m0s behind the S3 server's") {
		t.Fatalf("list with the server's clock 10 minutes ahead: %d %s", code, stderr)
	}
}
