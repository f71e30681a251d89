package main

import (
	"bytes"
	"context"
	"crypto/aes"
	"crypto/cipher"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/nbdmover/nbdmover/internal/backuptest"
	"github.com/nbdmover/nbdmover/internal/qemutest"
	nbdrepo "github.com/nbdmover/nbdmover/repo"
	"github.com/nbdmover/nbdmover/sink/sinktest"
	"golang.org/x/crypto/argon2"
)

// session runs nbdmover commands and keeps everything they print, to be
// searched for secrets at the end.
type session struct {
	t    *testing.T
	logs strings.Builder
}

func (s *session) run(env []string, args ...string) (string, string, int) {
	s.t.Helper()
	out, errOut, code := nbdmoverEnv(s.t, env, append([]string{"--log-level", "debug"}, args...)...)
	fmt.Fprintf(&s.logs, "$ %v\n%s%s", args, out, errOut)
	return out, errOut, code
}

// must runs a command that has to succeed.
func (s *session) must(env []string, args ...string) string {
	s.t.Helper()
	out, errOut, code := s.run(env, args...)
	if code != 0 {
		s.t.Fatalf("%v: exit %d: %s%s", args, code, out, errOut)
	}
	return out
}

// fails runs a command that has to fail with status code and say want.
func (s *session) fails(code int, want string, env []string, args ...string) {
	s.t.Helper()
	out, errOut, got := s.run(env, args...)
	if got != code || !strings.Contains(out+errOut, want) {
		s.t.Fatalf("%v: exit %d (want %d): %s%s (want %q)", args, got, code, out, errOut, want)
	}
}

// masterKeys decrypts a password key object by docs/format.md alone and
// returns the naming and data keys, and the config digest it holds.
func masterKeys(t *testing.T, object []byte, password string) (idKey, dataKey, configSum []byte) {
	t.Helper()
	var o struct {
		ID, Repository string
		KDF            struct {
			Name      string
			Time      uint32
			MemoryKiB uint32 `json:"memory_kib"`
			Threads   uint8
			Salt      []byte
		}
		Nonce, Wrapped []byte
	}
	if err := json.Unmarshal(object, &o); err != nil || o.KDF.Name != "argon2id" {
		t.Fatalf("key object: %v %s", err, object)
	}
	out := argon2.IDKey([]byte(password), o.KDF.Salt, o.KDF.Time, o.KDF.MemoryKiB, o.KDF.Threads, 64)
	block, _ := aes.NewCipher(out[:32])
	aead, _ := cipher.NewGCM(block)
	master, err := aead.Open(nil, o.Nonce, o.Wrapped, []byte("nbdmover key\x00"+o.Repository+"\x00"+o.ID))
	if err != nil || len(master) != 97 || master[0] != 1 {
		t.Fatalf("unwrap the key object as docs/format.md says: %v (%d bytes)", err, len(master))
	}
	return master[1:33], master[33:65], master[65:97]
}

// checkNoSecrets fails when logs hold any of the secrets, in any of the
// encodings a careless log line might use.
func checkNoSecrets(t *testing.T, logs string, secrets ...[]byte) {
	t.Helper()
	for _, s := range secrets {
		for _, form := range []string{string(s), hex.EncodeToString(s), base64.StdEncoding.EncodeToString(s), base64.RawURLEncoding.EncodeToString(s), fmt.Sprint(s)} {
			if len(form) >= 6 && strings.Contains(logs, form) {
				t.Fatalf("a secret (%d bytes) appears in the commands' output", len(s))
			}
		}
	}
}

func writeSecret(t *testing.T, path, content string) string {
	t.Helper()
	if err := os.WriteFile(path, []byte(content), 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

// An encrypted repository through the command line: init, backups and
// restores with a password (file, variable, command) and a key file,
// key add, passwd and remove, wrong and missing passwords, a tampered
// chunk; and no secret in anything printed.
func TestEncryptedCommands(t *testing.T) {
	qemutest.Need(t, "qemu-nbd", "qemu-img", "qemu-io")
	s := &session{t: t}
	dir := t.TempDir()
	repo := filepath.Join(dir, "repo")
	r := []string{"--repo", repo}
	const pw1, pw2, pw3 = "correct horse battery", "second password", "third password"
	pwFile := writeSecret(t, filepath.Join(dir, "pw"), pw1+"\n")
	withPw := append(r, "--password-file", pwFile)

	s.fails(2, "password", nil, "init", "--repo", repo, "--encryption")
	s.fails(2, "--encryption", []string{"NBDMOVER_PASSWORD=" + pw1}, "init", "--repo", repo)
	if out := s.must(nil, append([]string{"init", "--encryption"}, withPw...)...); !strings.Contains(out, "encrypted") {
		t.Fatalf("init: %q", out)
	}
	s.fails(1, "exists", nil, append([]string{"init", "--encryption"}, withPw...)...)

	img := qemutest.NewImage(t, dir, 8<<20)
	qemutest.IO(t, img, "write -P 0x42 1M 2M", "write -s "+backuptest.TextFile(t, 1<<20)+" 4M 1M")
	ref1 := qemutest.RawCopy(t, img)
	srv := qemutest.Serve(t, img, "-r")
	s.must(nil, append([]string{"backup", "--nbd", srv.URI, "--name", "disk1"}, withPw...)...)
	srv.Kill()

	s.fails(12, "encrypted", nil, "list", "--repo", repo)
	s.fails(12, "wrong password", []string{"NBDMOVER_PASSWORD=wrong"}, "list", "--repo", repo)
	s.must([]string{"NBDMOVER_PASSWORD=" + pw1}, "list", "--repo", repo)
	s.must(nil, "list", "--repo", repo, "--password-command", "cat "+pwFile)
	s.fails(1, "password command failed", nil, "list", "--repo", repo, "--password-command", "exit 3")

	// A key file for another host, and a second password.
	keyFile := filepath.Join(dir, "host2.key")
	s.must(nil, append([]string{"key", "add", "--new-key-file", keyFile, "--label", "host2"}, withPw...)...)
	if st, err := os.Stat(keyFile); err != nil || st.Mode().Perm() != 0o600 {
		t.Fatalf("key file: %v %v", st, err)
	}
	s.must([]string{"NBDMOVER_NEW_PASSWORD=" + pw2}, append([]string{"key", "add", "--label", "second"}, withPw...)...)
	var keyDoc struct{ Keys []nbdrepo.KeyInfo }
	if err := json.Unmarshal([]byte(s.must(nil, append([]string{"key", "list", "--json"}, withPw...)...)), &keyDoc); err != nil || len(keyDoc.Keys) != 3 {
		t.Fatalf("key list: %v %+v", err, keyDoc)
	}

	// The second backup through the key file; restores through each key.
	qemutest.IO(t, img, "write -P 0x17 6M 1M", "write -z 1M 1M")
	ref2 := qemutest.RawCopy(t, img)
	srv = qemutest.Serve(t, img, "-r")
	s.must(nil, "backup", "--repo", repo, "--key-file", keyFile, "--nbd", srv.URI, "--name", "disk1")
	srv.Kill()
	var list struct{ Backups []struct{ ID string } }
	json.Unmarshal([]byte(s.must(nil, "list", "--repo", repo, "--key-file", keyFile, "--json")), &list)
	if len(list.Backups) != 2 {
		t.Fatalf("list: %+v", list)
	}
	for i, c := range []struct {
		env  []string
		args []string
		ref  string
	}{
		{nil, []string{"--key-file", keyFile}, ref1},
		{[]string{"NBDMOVER_PASSWORD=" + pw2}, nil, ref2},
		{nil, []string{"--password-file", pwFile}, ref2},
	} {
		format := []string{"raw", "qcow2"}[i%2]
		id := list.Backups[0].ID
		if c.ref == ref2 {
			id = list.Backups[1].ID
		}
		dest := filepath.Join(dir, fmt.Sprintf("restore%d.%s", i, format))
		s.must(c.env, append([]string{"restore", "--repo", repo, "--domain", "disk1", "--disk", "nbd", "--backup", id, "--output", dest, "--format", format}, c.args...)...)
		qemutest.Compare(t, c.ref, "raw", dest, format)
	}
	s.must(nil, append([]string{"verify", "--read-data"}, withPw...)...)

	// passwd: the old password stops working.
	s.must([]string{"NBDMOVER_NEW_PASSWORD=" + pw3}, append([]string{"key", "passwd"}, withPw...)...)
	s.fails(12, "wrong password", nil, append([]string{"list"}, withPw...)...)
	pw3Env := []string{"NBDMOVER_PASSWORD=" + pw3}
	s.must(pw3Env, "list", "--repo", repo)
	// remove: the key file's key goes, the key in use cannot.
	json.Unmarshal([]byte(s.must(pw3Env, "key", "list", "--repo", repo, "--json")), &keyDoc)
	var current, fileKey string
	for _, k := range keyDoc.Keys {
		if k.Current {
			current = k.ID
		}
		if k.Kind == "key-file" {
			fileKey = k.ID
		}
	}
	s.fails(1, "another key", pw3Env, "key", "remove", "--repo", repo, current)
	s.must(pw3Env, "key", "remove", "--repo", repo, fileKey)
	s.fails(12, "removed", nil, "list", "--repo", repo, "--key-file", keyFile)

	// A flipped bit in a chunk: verify names it.
	chunks, _ := filepath.Glob(filepath.Join(repo, "chunks", "*", "*"))
	b, _ := os.ReadFile(chunks[0])
	b[len(b)/2] ^= 8
	os.WriteFile(chunks[0], b, 0o600)
	rel, _ := filepath.Rel(repo, chunks[0])
	s.fails(1, filepath.ToSlash(rel), pw3Env, "verify", "--repo", repo, "--read-data")

	// Nothing printed holds a password, the key file's secret or the
	// master keys (unwrapped here by the format's description).
	objs, _ := filepath.Glob(filepath.Join(repo, "keys", "*"))
	var obj []byte
	for _, o := range objs {
		if b, _ := os.ReadFile(o); bytes.Contains(b, []byte(current)) {
			obj = b
		}
	}
	idKey, dataKey, cfgSum := masterKeys(t, obj, pw3)
	cfg, _ := os.ReadFile(filepath.Join(repo, "config"))
	if sum := sha256.Sum256(cfg); !bytes.Equal(sum[:], cfgSum) {
		t.Fatal("the master key set does not hold the config's SHA-256")
	}
	var kf struct{ Secret []byte }
	kb, _ := os.ReadFile(keyFile)
	json.Unmarshal(kb, &kf)
	checkNoSecrets(t, s.logs.String(), []byte(pw1), []byte(pw2), []byte(pw3), kf.Secret, idKey, dataKey)
}

// The same basic flow on MinIO, through a key file.
func TestEncryptedCommandsS3(t *testing.T) {
	qemutest.Need(t, "qemu-nbd", "qemu-img", "qemu-io")
	ep := sinktest.S3Endpoint(t)
	s := &session{t: t}
	dir := t.TempDir()
	r := []string{"--repo", fmt.Sprintf("s3://enc-%08x/nb", rand.Uint32()), "--s3-endpoint", ep}
	pw := []string{"NBDMOVER_PASSWORD=s3 password"}
	s.must(pw, append([]string{"init", "--encryption"}, r...)...)
	keyFile := filepath.Join(dir, "host.key")
	s.must(pw, append([]string{"key", "add", "--new-key-file", keyFile}, r...)...)
	withKey := append(r, "--key-file", keyFile)
	img := qemutest.NewImage(t, dir, 8<<20)
	qemutest.IO(t, img, "write -P 0x42 1M 3M")
	srv := qemutest.Serve(t, img, "-r")
	s.must(nil, append([]string{"backup", "--nbd", srv.URI, "--name", "disk1"}, withKey...)...)
	dest := filepath.Join(dir, "restore.qcow2")
	s.must(nil, append([]string{"restore", "--domain", "disk1", "--disk", "nbd", "--output", dest, "--format", "qcow2"}, withKey...)...)
	qemutest.Compare(t, img, "qcow2", dest, "qcow2")
	s.must(pw, append([]string{"verify", "--read-data"}, r...)...)
	var kf struct{ Secret []byte }
	kb, _ := os.ReadFile(keyFile)
	json.Unmarshal(kb, &kf)
	checkNoSecrets(t, s.logs.String(), []byte("s3 password"), kf.Secret)
}

// The daemon on an encrypted repository, its password from a file: a
// wrong one stops it at start; with the right one a job of a real domain
// backs up what restores bit-exact.
func TestServeEncrypted(t *testing.T) {
	qemutest.NeedLibvirt(t)
	dir := t.TempDir()
	repo := filepath.Join(dir, "repo")
	const password = "daemon password"
	pwFile := writeSecret(t, filepath.Join(dir, "pw"), password+"\n")
	badFile := writeSecret(t, filepath.Join(dir, "bad"), "not it\n")
	s := &session{t: t}
	s.must(nil, "init", "--encryption", "--repo", repo, "--password-file", pwFile)
	runDir := filepath.Join(dir, "run")
	os.Mkdir(runDir, 0o711)
	sock := filepath.Join(dir, "d.sock")
	serve := func(pw string) []string {
		return []string{"--log-level", "debug", "serve", "--listen", "unix://" + sock, "--repo", repo, "--password-file", pw,
			"--run-dir", runDir, "--scratch-dir", filepath.Join(dir, "scratch")}
	}
	bad := start(t, t.TempDir(), serve(badFile)...)
	_, errOut, code := bad.wait(t)
	if code != 12 || !strings.Contains(errOut, "wrong password") {
		t.Fatalf("serve with a wrong password: %d %q", code, errOut)
	}
	s.logs.WriteString(errOut)

	dom := qemutest.NewDomain(t, false, qemutest.DiskSpec{Dev: "vda", Format: "qcow2", Size: 64 * backuptest.MiB})
	dom.Write("vda", "write -P 0x5a 1M 20M")
	d := start(t, t.TempDir(), serve(pwFile)...)
	waitFor(t, "the daemon's socket", func() bool { _, err := os.Stat(sock); return err == nil })
	client := &http.Client{Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
		return (&net.Dialer{}).DialContext(ctx, "unix", sock)
	}}}
	call := func(method, path, body string, out any) int {
		req, _ := http.NewRequest(method, "http://nbdmover"+path, strings.NewReader(body))
		resp, err := client.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		if out != nil {
			json.Unmarshal(b, out)
		}
		return resp.StatusCode
	}
	var sub struct{ ID string }
	if code := call("POST", "/v1/jobs", fmt.Sprintf(`{"domain": %q}`, dom.Name), &sub); code != 202 {
		t.Fatalf("submit: %d", code)
	}
	var job struct {
		State    string
		BackupID string `json:"backup_id"`
		Error    string
	}
	deadline := time.Now().Add(3 * time.Minute)
	for job.State != "succeeded" && job.State != "failed" && time.Now().Before(deadline) {
		time.Sleep(100 * time.Millisecond)
		call("GET", "/v1/jobs/"+sub.ID, "", &job)
	}
	if job.State != "succeeded" || job.BackupID == "" {
		t.Fatalf("job: %+v", job)
	}
	refs := dom.Snapshot()
	d.cmd.Process.Signal(os.Interrupt)
	_, errOut, _ = d.wait(t)
	s.logs.WriteString(errOut)
	keys, _ := nbdrepo.PasswordKeys([]byte(password))
	backuptest.CheckRestores(t, nbdrepo.Options{Location: repo, Keys: keys}, dom.Name, []backuptest.Point{{ID: job.BackupID, Refs: refs}})
	objs, _ := filepath.Glob(filepath.Join(repo, "keys", "*"))
	obj, _ := os.ReadFile(objs[0])
	idKey, dataKey, _ := masterKeys(t, obj, password)
	checkNoSecrets(t, s.logs.String(), []byte(password), idKey, dataKey)
}
