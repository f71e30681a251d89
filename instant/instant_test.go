package instant

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/nbdmover/nbdmover/internal/backuptest"
	"github.com/nbdmover/nbdmover/internal/qemutest"
	"github.com/nbdmover/nbdmover/mover"
	"github.com/nbdmover/nbdmover/mover/domain"
	"github.com/nbdmover/nbdmover/repo"
	"github.com/nbdmover/nbdmover/sink/sinktest"
)

const MiB = 1 << 20

// source is a persistent domain with a raw and a qcow2 disk holding data,
// backed up (full) into ro; refs are raw copies of its disks at the
// backup.
func source(t *testing.T, ro repo.Options) (*qemutest.Domain, map[string]string) {
	t.Helper()
	dom := qemutest.NewDomain(t, true,
		qemutest.DiskSpec{Dev: "vda", Format: "raw", Size: 32 * MiB},
		qemutest.DiskSpec{Dev: "vdb", Format: "qcow2", Size: 24 * MiB})
	dom.Write("vda", "write -P 0x11 1M 5M", "write -P 0x12 20M 2M", "write -P 0x13 32505856 4k")
	dom.Write("vdb", "write -P 0x21 0 3M", "write -P 0x22 16M 4M")
	_, err := mover.Backup(t.Context(), domain.New(domain.Options{Name: dom.Name, ScratchDir: filepath.Join(t.TempDir(), "scratch")}),
		mover.Options{Repo: ro, Init: true, Mode: "full", Log: backuptest.Log(t)})
	if err != nil {
		t.Fatal(err)
	}
	return dom, dom.Snapshot()
}

// reachableDir is a new directory QEMU's user can reach.
func reachableDir(t *testing.T) string {
	dir := t.TempDir()
	os.Chmod(dir, 0o755)
	for p := filepath.Dir(dir); p != "/"; p = filepath.Dir(p) {
		if st, err := os.Stat(p); err == nil && st.Mode().Perm()&0o001 == 0 {
			os.Chmod(p, st.Mode().Perm()|0o011)
		}
	}
	return dir
}

// withWrites is a raw copy of ref with qemu-io commands applied.
func withWrites(t *testing.T, ref string, cmds ...string) string {
	out := filepath.Join(t.TempDir(), "want.raw")
	b, err := os.ReadFile(ref)
	if err != nil {
		t.Fatal(err)
	}
	os.WriteFile(out, b, 0o600)
	args := []string{"-f", "raw"}
	for _, c := range cmds {
		args = append(args, "-c", c)
	}
	qemutest.Run(t, "qemu-io", append(args, out)...)
	return out
}

func sameFile(t *testing.T, what, got, want string) {
	t.Helper()
	a, err1 := os.ReadFile(got)
	b, err2 := os.ReadFile(want)
	if err := errors.Join(err1, err2); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(a, b) {
		t.Fatalf("%s: differs from what it should be", what)
	}
}

type running struct {
	res  chan *Result
	err  chan error
	up   chan Result
	mu   sync.Mutex
	seen []Progress
}

func start(t *testing.T, o Options) *running {
	r := &running{res: make(chan *Result, 1), err: make(chan error, 1), up: make(chan Result, 1)}
	o.Running = func(res Result) { r.up <- res }
	o.Progress = func(p Progress) {
		r.mu.Lock()
		r.seen = append(r.seen, p)
		r.mu.Unlock()
	}
	if o.Log == nil {
		o.Log = backuptest.Log(t)
	}
	go func() {
		res, err := Run(t.Context(), o)
		r.res <- res
		r.err <- err
	}()
	select {
	case res := <-r.up:
		r.up <- res
	case err := <-r.err:
		t.Fatalf("instant restore: %v", err)
	}
	return r
}

func (r *running) wait(t *testing.T) *Result {
	t.Helper()
	res := <-r.res
	if err := <-r.err; err != nil {
		t.Fatalf("instant restore: %v", err)
	}
	return res
}

func (r *running) copying(t *testing.T, dom string) bool {
	out := qemutest.Virsh(t, "blockjob", dom, "vda", "--info")
	return strings.Contains(out, "Block Pull") || strings.Contains(out, "Block Copy")
}

// A domain defined from a backup of a real domain (a raw and a qcow2
// disk) runs from overlays on the export at once; its devices read the
// backup; writes made during the copy home are in the final images; after
// the copy the export is gone, the definition points at the images alone,
// and the domain reads every byte right. Local repository, qcow2 images;
// and from MinIO, raw images (a block copy and a pivot after the pull).
func TestInstantRestore(t *testing.T) {
	qemutest.NeedLibvirt(t)
	for _, tc := range []struct {
		name, format string
		s3           bool
	}{{"local-qcow2", "qcow2", false}, {"s3-raw", "raw", true}} {
		t.Run(tc.name, func(t *testing.T) {
			ro := repo.Options{Location: filepath.Join(t.TempDir(), "repo")}
			if tc.s3 {
				ro = repo.Options{Location: fmt.Sprintf("s3://instant-%08x/r", rand.Uint32()), S3Endpoint: sinktest.S3Endpoint(t)}
			}
			src, refs := source(t, ro)
			dir, run := reachableDir(t), reachableDir(t)
			as := src.Name + "-r"
			// Slow enough that the guest's writes land during the copy.
			r := start(t, Options{Repo: ro, Domain: src.Name, As: as, ImageDir: dir, RunDir: run, Format: tc.format, Bandwidth: 2 * MiB})
			up := <-r.up
			dst := qemutest.Attach(t, as,
				qemutest.DiskSpec{Dev: "vda", Format: "qcow2"}, qemutest.DiskSpec{Dev: "vdb", Format: "qcow2"})
			if st := qemutest.Virsh(t, "domstate", as); !strings.Contains(st, "running") {
				t.Fatalf("%s is %s", as, st)
			}
			t.Logf("running after %.2fs (reconnect delay: %v)", up.RunningAfter, up.Reconnect)
			for _, dev := range []string{"vda", "vdb"} {
				sameFile(t, dev+" through the guest's device, during the copy", dst.Read(dev), refs[dev])
			}
			writes := map[string][]string{
				"vda": {"write -P 0x77 2M 1M", "write -P 0x78 27M 64k"},
				"vdb": {"write -P 0x79 17M 512k", "write -z 0 64k"},
			}
			for dev, w := range writes {
				dst.Write(dev, w...)
			}
			if !r.copying(t, as) {
				t.Fatal("the copy finished before the guest wrote: the test proves nothing; slow the copy")
			}
			res := r.wait(t)
			t.Logf("copied home in %.1fs", res.CopySeconds)

			if _, err := os.Stat(up.Socket); !errors.Is(err, os.ErrNotExist) {
				t.Fatalf("the export's socket is still there: %v", err)
			}
			live := qemutest.Virsh(t, "dumpxml", as)
			conf := qemutest.Virsh(t, "dumpxml", "--inactive", as)
			for _, x := range []string{live, conf} {
				if strings.Contains(x, "protocol='nbd'") || strings.Contains(x, XMLNS) {
					t.Fatalf("the definition still has the export or the restore's state:\n%s", x)
				}
			}
			for _, d := range res.Disks {
				if !strings.Contains(conf, d.Image) || d.Format != tc.format {
					t.Fatalf("disk %s: the definition does not point at %s (%s):\n%s", d.Name, d.Image, d.Format, conf)
				}
				want := withWrites(t, refs[d.Name], writes[d.Name]...)
				sameFile(t, d.Name+" through the guest's device, after the copy", dst.Read(d.Name), want)
				dst.Write(d.Name) // flush: the image read from outside holds what QEMU wrote
				qemutest.Run(t, "qemu-img", "compare", "-U", "-f", tc.format, "-F", "raw", d.Image, want)
			}
			files, _ := os.ReadDir(dir)
			if len(files) != 2 {
				t.Fatalf("the image directory holds %d files, want the 2 images", len(files))
			}
			r.mu.Lock()
			defer r.mu.Unlock()
			if len(r.seen) < 2 || r.seen[len(r.seen)-1].Done != r.seen[len(r.seen)-1].Total {
				t.Fatalf("progress: %+v", r.seen)
			}
		})
	}
}

// An export outage mid-copy: the guest keeps running (reads of what the
// overlay holds and every write work), the copy fails and Resume, with a
// new export on the same socket, finishes it from where it was; nothing
// the guest wrote is lost.
func TestInstantRestoreResume(t *testing.T) {
	qemutest.NeedLibvirt(t)
	ro := repo.Options{Location: filepath.Join(t.TempDir(), "repo")}
	src, refs := source(t, ro)
	dir, run := reachableDir(t), reachableDir(t)
	as := src.Name + "-r"
	ctx, cancel := context.WithCancel(t.Context())
	o := Options{Repo: ro, Domain: src.Name, As: as, ImageDir: dir, RunDir: run, Bandwidth: MiB, Log: backuptest.Log(t)}
	done := runUntil(t, ctx, &o, "a third was copied", func(p Progress) bool { return p.Done > 0 && p.Done*3 > p.Total })
	dst := qemutest.Attach(t, as, qemutest.DiskSpec{Dev: "vda", Format: "qcow2"}, qemutest.DiskSpec{Dev: "vdb", Format: "qcow2"})
	cancel() // the export ends with the command
	err := <-done
	if err == nil || !strings.Contains(err.Error(), "--resume "+as) {
		t.Fatalf("interrupted copy: %v", err)
	}
	if st := qemutest.Virsh(t, "domstate", as); !strings.Contains(st, "running") {
		t.Fatalf("%s is %s after the export ended", as, st)
	}
	held := func() bool {
		t.Helper()
		r, err := ro.Open(t.Context())
		if err != nil {
			t.Fatal(err)
		}
		p, err := r.Protected(t.Context(), src.Name)
		if err != nil {
			t.Fatal(err)
		}
		return len(p) == 1
	}
	if !held() {
		t.Fatal("the backup is not held while the restore needs it")
	}
	dst.Write("vda", "write -P 0x55 1M 64k") // into what the overlay holds or not: a write needs no export
	want := withWrites(t, refs["vda"], "write -P 0x55 1M 64k")

	o.Progress = nil
	o.Domain, o.ImageDir = "", ""
	res, err := Resume(t.Context(), o)
	if err != nil {
		t.Fatal(err)
	}
	if st := qemutest.Virsh(t, "domstate", as); !strings.Contains(st, "running") {
		t.Fatalf("%s is %s after the resume", as, st)
	}
	sameFile(t, "vda after the resume", dst.Read("vda"), want)
	sameFile(t, "vdb after the resume", dst.Read("vdb"), refs["vdb"])
	dst.Write("vda") // flush
	qemutest.Run(t, "qemu-img", "compare", "-U", "-f", "qcow2", "-F", "raw", res.Disks[0].Image, want)
	if held() {
		t.Fatal("the backup is still held after the restore")
	}
	if _, err := Resume(t.Context(), o); !errors.Is(err, ErrInvalid) {
		t.Fatalf("a second resume after the copy finished: %v", err)
	}
}

// runUntil runs the restore o in the background until its progress meets
// cond; the returned channel has Run's error.
func runUntil(t *testing.T, ctx context.Context, o *Options, what string, cond func(Progress) bool) <-chan error {
	t.Helper()
	met := make(chan struct{})
	var once sync.Once
	o.Progress = func(p Progress) {
		if cond(p) {
			once.Do(func() { close(met) })
		}
	}
	done := make(chan error, 1)
	go func() { _, err := Run(ctx, *o); done <- err }()
	select {
	case <-met:
	case err := <-done:
		t.Fatalf("ended before %s: %v", what, err)
	}
	return done
}

// A raw restore stopped with one disk home (pivoted to its raw image,
// then written to) and the other not: resumed while the domain is off,
// the disk at home is left as it is (its overlay is older than it), the
// other is copied home offline.
func TestInstantRestoreResumeOffline(t *testing.T) {
	qemutest.NeedLibvirt(t)
	ro := repo.Options{Location: filepath.Join(t.TempDir(), "repo")}
	src, refs := source(t, ro)
	dir, run := reachableDir(t), reachableDir(t)
	as := src.Name + "-r"
	ctx, cancel := context.WithCancel(t.Context())
	testHookStart = func(disk, job string) bool { return disk == "vdb" } // vda waits
	defer func() { testHookStart = nil }()
	o := Options{Repo: ro, Domain: src.Name, As: as, ImageDir: dir, RunDir: run, Format: "raw", Log: backuptest.Log(t)}
	done := runUntil(t, ctx, &o, "vdb was home", func(p Progress) bool { return p.Disks[1].Phase == "done" })
	cancel()
	<-done
	dst := qemutest.Attach(t, as, qemutest.DiskSpec{Dev: "vda", Format: "qcow2"}, qemutest.DiskSpec{Dev: "vdb", Format: "raw"})
	dst.Write("vdb", "write -P 0x66 8M 1M") // into vdb.raw, after its pivot
	qemutest.Virsh(t, "destroy", as)
	testHookStart = nil

	o.Progress, o.NoStart = nil, true
	o.Domain, o.ImageDir, o.Format = "", "", ""
	res, err := Resume(t.Context(), o)
	if err != nil {
		t.Fatal(err)
	}
	if st := qemutest.Virsh(t, "domstate", as); !strings.Contains(st, "shut off") {
		t.Fatalf("%s is %s", as, st)
	}
	sameFile(t, "vda", res.Disks[0].Image, refs["vda"])
	sameFile(t, "vdb, written to after its pivot", res.Disks[1].Image, withWrites(t, refs["vdb"], "write -P 0x66 8M 1M"))
	if files, _ := os.ReadDir(dir); len(files) != 2 {
		t.Fatalf("the image directory holds %d files, want the 2 raw images", len(files))
	}
}

// With NoStart the domain is defined, not started, and its disks are
// copied home with qemu-img; starting it afterwards reads the backup.
func TestInstantRestoreNoStart(t *testing.T) {
	qemutest.NeedLibvirt(t)
	ro := repo.Options{Location: filepath.Join(t.TempDir(), "repo")}
	src, refs := source(t, ro)
	dir, run := reachableDir(t), reachableDir(t)
	as := src.Name + "-r"
	res, err := Run(t.Context(), Options{Repo: ro, Domain: src.Name, As: as, ImageDir: dir, RunDir: run, Format: "raw", NoStart: true, Log: backuptest.Log(t)})
	if err != nil {
		t.Fatal(err)
	}
	dst := qemutest.Attach(t, as, qemutest.DiskSpec{Dev: "vda", Format: "raw"}, qemutest.DiskSpec{Dev: "vdb", Format: "raw"})
	if st := qemutest.Virsh(t, "domstate", as); !strings.Contains(st, "shut off") {
		t.Fatalf("%s is %s", as, st)
	}
	for _, d := range res.Disks {
		sameFile(t, d.Name, d.Image, refs[d.Name])
	}
	qemutest.Virsh(t, "start", as)
	sameFile(t, "vda through the started domain", dst.Read("vda"), refs["vda"])
}

// What can be refused is refused before anything is made: the name
// taken, the image directory missing, shared or full, a backup without a
// domain definition. Nothing is defined or left behind.
func TestInstantRestoreRefusals(t *testing.T) {
	qemutest.NeedLibvirt(t)
	ro := repo.Options{Location: filepath.Join(t.TempDir(), "repo")}
	src, _ := source(t, ro)
	run := reachableDir(t)
	full := reachableDir(t)
	if out, err := exec.Command("mount", "-t", "tmpfs", "-o", "size=1m,mode=0755", "tmpfs", full).CombinedOutput(); err != nil {
		t.Fatalf("mount a small tmpfs: %v: %s", err, out)
	}
	t.Cleanup(func() { exec.Command("umount", full).Run() })
	shared := reachableDir(t)
	os.Chmod(shared, 0o777)
	nbdBackup := repo.Options{Location: filepath.Join(t.TempDir(), "nbdrepo")}
	if _, err := backuptest.ExportBackup(t, nbdBackup, backuptest.Image(t, 24*MiB), "disk", "full", ""); err != nil {
		t.Fatal(err)
	}
	as := src.Name + "-r"
	for _, tc := range []struct {
		name, want string
		invalid    bool
		o          Options
	}{
		{"name taken", "already defined", true, Options{Repo: ro, Domain: src.Name, As: src.Name}},
		{"no image dir", "not a directory", true, Options{Repo: ro, Domain: src.Name, As: as, ImageDir: "/nonexistent/images"}},
		{"shared image dir", "only root", true, Options{Repo: ro, Domain: src.Name, As: as, ImageDir: shared}},
		{"full image dir", "MiB free", false, Options{Repo: ro, Domain: src.Name, As: as, ImageDir: full}},
		{"no definition", "--xml FILE", true, Options{Repo: nbdBackup, Domain: "disk", As: as}},
		{"bad name", "--as", true, Options{Repo: ro, Domain: src.Name, As: "../x"}},
		{"bad format", "--format", true, Options{Repo: ro, Domain: src.Name, As: as, Format: "vmdk"}},
		{"unknown backup", "", false, Options{Repo: ro, Domain: src.Name, As: as, Backup: "20200101T000000.000Z"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if tc.o.ImageDir == "" {
				tc.o.ImageDir = reachableDir(t)
			}
			tc.o.RunDir = run
			tc.o.Log = backuptest.Log(t)
			_, err := Run(t.Context(), tc.o)
			if err == nil || !strings.Contains(err.Error(), tc.want) || errors.Is(err, ErrInvalid) != tc.invalid {
				t.Fatalf("got %v; want an error with %q (invalid: %v)", err, tc.want, tc.invalid)
			}
			if tc.name != "name taken" {
				if out, _ := exec.Command("virsh", "-c", "qemu:///system", "domstate", as).CombinedOutput(); !strings.Contains(string(out), "failed to get domain") {
					t.Fatalf("%s was defined: %s", as, out)
				}
			}
			for _, d := range []string{tc.o.ImageDir, filepath.Join(run, "instant")} {
				if files, _ := os.ReadDir(d); len(files) > 0 {
					t.Fatalf("%s holds %v", d, files)
				}
			}
		})
	}
}

// The new definition is built from an allowlist: a definition written by
// whoever can write the repository reaches no host file, device or user
// through it (each kind below was seen to work on libvirt 9.0 when kept),
// shares nothing writable with the original, and gets a new name, UUID,
// MAC and NVRAM; what is left out is named.
func TestDefinition(t *testing.T) {
	saved := `<domain type='kvm' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'><name>web</name>
<uuid>4dea22b3-1d52-d8f3-2516-782e98ab3fa0</uuid><genid>43dc0cf8-809b-4adb-9bea-a9abb5f3d90d</genid>
<memory unit='MiB'>512</memory><vcpu>2</vcpu>
<sysinfo type='smbios'><system><entry name='uuid'>4dea22b3-1d52-d8f3-2516-782e98ab3fa0</entry><entry name='serial'>SN-ORIG</entry></system></sysinfo>
<os><type arch='x86_64' machine='q35'>hvm</type><loader readonly='yes' type='pflash'>/etc/evil_CODE.fd</loader>
<nvram template='/etc/shadow'>/var/lib/libvirt/qemu/nvram/web_VARS.fd</nvram><kernel>/boot/evil</kernel><boot dev='hd'/></os>
<features><acpi/><apic/></features><clock offset='timezone' timezone='../../etc/shadow'/><on_crash>coredump-restart</on_crash>
<devices><emulator>/tmp/evil-qemu</emulator>
<disk type='block' device='disk'><driver name='qemu' type='raw' error_policy='report' cache='none'/><source dev='/dev/vg/web'/><target dev='vda' bus='virtio'/><boot order='1'/><serial>DISK-1</serial><transient/><shareable/></disk>
<disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='/var/lib/libvirt/images/web-data.qcow2'/><target dev='vdb' bus='virtio'/></disk>
<disk type='file' device='cdrom'><source file='/etc/shadow'/><target dev='sdc' bus='sata'/><readonly/></disk>
<filesystem type='mount'><driver type='virtiofs'/><source dir='/'/><target dir='root'/></filesystem>
<hostdev mode='subsystem' type='pci' managed='yes'><source><address domain='0x0000' bus='0x01' slot='0x00' function='0x0'/></source></hostdev>
<memory model='nvdimm'><source><path>/dev/sda</path></source><target><size unit='MiB'>128</size></target></memory>
<interface type='network'><mac address='52:54:00:12:34:56'/><source network='default'/><model type='virtio'/></interface>
<interface type='network'><source network='default'/><vlan><tag id='42'/></vlan><filterref filter='clean-traffic'/></interface>
<watchdog model='i6300esb' action='dump'/>
<interface type='network'><source network='elsewhere'/><model type='virtio'/></interface>
<interface type='direct'><source dev='eth0' mode='bridge'/></interface>
<interface type='ethernet'><target dev='tap9'/><script path='/tmp/evil.sh'/></interface>
<serial type='file'><source path='/etc/cron.d/evil'/><target port='0'/></serial>
<console type='file'><source path='/etc/evil'/><target type='serial' port='0'/></console>
<channel type='unix'><source mode='bind' path='/etc/evil.sock'/><target type='virtio' name='org.qemu.guest_agent.0'/></channel>
<channel type='pty'><target type='virtio' name='com.evil'/></channel>
<input type='evdev'><source dev='/dev/input/event0'/></input><input type='tablet' bus='usb'/>
<graphics type='vnc' port='5900' listen='0.0.0.0' passwd='x' keymap='/etc/passwd'/>
<tpm model='tpm-tis'><backend type='passthrough'><device path='/dev/tpm0'/></backend></tpm>
<rng model='virtio'><backend model='random'>/dev/sda</backend></rng>
<video><model type='virtio' heads='1'><acceleration accel3d='yes' rendernode='/dev/dri/card0'/></model></video>
</devices>
<seclabel type='static' model='dac' relabel='no'><label>+0:+0</label></seclabel>
<qemu:commandline><qemu:arg value='-evil'/></qemu:commandline></domain>`
	rs := &restore{o: Options{As: "web-r", KeepNetwork: true, Log: backuptest.Log(t)}, log: backuptest.Log(t),
		networkExists: func(n string) bool { return n == "default" },
		st: state{Domain: "web", Backup: "b1", Socket: "/run/nbdmover/instant/x.sock",
			Disks: []diskState{{Name: "vda", Size: MiB, Overlay: "/img/web-r-vda.qcow2", Image: "/img/web-r-vda.qcow2"}}}}
	def, err := rs.definition([]byte(saved))
	if err != nil {
		t.Fatal(err)
	}
	x, _ := def.Marshal()
	for _, bad := range []string{"4dea22b3", "43dc0cf8", "52:54:00:12:34:56", "web_VARS", "/dev/vg/web", "web-data", "/etc/", "/boot/evil",
		"/tmp/evil", "/dev/sda", "/dev/input", "/dev/tpm0", "/dev/dri", "0.0.0.0", "passwd", "seclabel", "-evil", "commandline",
		"sysinfo", "SN-ORIG", "hostdev", "filesystem", "nvdimm", "elsewhere", "eth0", "tap9", "com.evil", "transient", "shareable",
		"<name>web</name>", "emulator", "timezone", "coredump", `action="dump"`, "keymap", "vlan", "clean-traffic"} {
		if strings.Contains(x, bad) {
			t.Errorf("the new definition keeps %s:\n%s", bad, x)
		}
	}
	for _, good := range []string{"<name>web-r</name>", `state="down"`, `<clock offset="utc">`, "<on_crash>destroy</on_crash>", `action="reset"`, "/img/web-r-vda.qcow2", `rerror_policy="stop"`, `protocol="nbd"`,
		`socket="/run/nbdmover/instant/x.sock"`, `<boot order="1">`, `firmware="efi"`, `<serial>DISK-1</serial>`, `cache="none"`,
		`network="default"`, `<source mode="bind">`, `<listen type="socket">`, "/dev/urandom", `device="cdrom"`, `type="tablet"`,
		`<memory unit="MiB">512</memory>`, "<genid></genid>"} {
		if !strings.Contains(x, good) {
			t.Errorf("the new definition lacks %s:\n%s", good, x)
		}
	}
	dropped := strings.Join(rs.res.Dropped, "\n")
	for _, named := range []string{"<seclabel>", "<qemu:commandline>", "<sysinfo>", "hostdev", "filesystem", "memory device",
		"disk vdb", "sdc", "elsewhere", "serial port 0", "evil_CODE.fd", "direct kernel boot", "input evdev", "TPM", "time zone",
		"on_crash", "dump action", "keymap", "nwfilter and VLAN"} {
		if !strings.Contains(dropped, named) {
			t.Errorf("dropped does not name %s:\n%s", named, dropped)
		}
	}
	if rs.st.Disks[0].ErrorPolicy != "report" {
		t.Errorf("the original error policy was not kept: %+v", rs.st.Disks[0])
	}
	// With --keep-network, the interface without a filter is up, the one
	// whose filter and VLAN were left out stays down.
	if n := strings.Count(x, `state="down"`); n != 1 {
		t.Errorf("%d links down, want the filtered interface's alone:\n%s", n, x)
	}
	// Firmware autoselection keeps no loader (libvirt 9.0 refuses one
	// beside it).
	auto := strings.Replace(saved, "<os>", "<os firmware='efi'>", 1)
	auto = strings.Replace(auto, "/etc/evil_CODE.fd", "/usr/share/OVMF/OVMF_CODE_4M.fd", 1)
	rs.res.Dropped = nil
	def, err = rs.definition([]byte(auto))
	if err != nil {
		t.Fatal(err)
	}
	if x, _ := def.Marshal(); !strings.Contains(x, `firmware="efi"`) || strings.Contains(x, "<loader") || strings.Contains(x, "template") {
		t.Errorf("firmware autoselection with a loader:\n%s", x)
	}
	if _, err := rs.definition([]byte(strings.Replace(saved, "'vda'", "'sda'", 1))); err == nil {
		t.Error("a definition without the backup's disk was taken")
	}
	if _, err := rs.definition([]byte(strings.Replace(saved, "type='kvm'", "type='lxc'", 1))); err == nil {
		t.Error("an lxc definition was taken")
	}
}

// A backup of an NBD export has no domain definition: with one given
// (--xml), it is restored like any other (here defined, not started, and
// copied home offline).
func TestInstantRestoreGivenXML(t *testing.T) {
	qemutest.NeedLibvirt(t)
	ro := repo.Options{Location: filepath.Join(t.TempDir(), "repo")}
	img := backuptest.Image(t, 24*MiB)
	if _, err := backuptest.ExportBackup(t, ro, img, "disk", "full", ""); err != nil {
		t.Fatal(err)
	}
	virt := "kvm"
	if _, err := os.Stat("/dev/kvm"); err != nil {
		virt = "qemu"
	}
	xml := fmt.Sprintf(`<domain type='%s'><name>given</name><memory unit='MiB'>64</memory><vcpu>1</vcpu>
<os><type arch='x86_64' machine='pc'>hvm</type></os><devices><disk type='file' device='disk'><target dev='vda' bus='virtio'/></disk></devices></domain>`, virt)
	as := fmt.Sprintf("nbdmover-test-%08x-r", rand.Uint32())
	res, err := Run(t.Context(), Options{Repo: ro, Domain: "disk", As: as, XML: []byte(xml), ImageDir: reachableDir(t), RunDir: reachableDir(t),
		NoStart: true, Log: backuptest.Log(t)})
	qemutest.Attach(t, as)
	if err != nil {
		t.Fatal(err)
	}
	qemutest.Run(t, "qemu-img", "compare", "-f", "qcow2", "-F", "qcow2", res.Disks[0].Image, img)
}
