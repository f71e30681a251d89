package qemutest

import (
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"
)

// NeedLibvirt fails the test (or skips it, when the run does not require
// every peer) unless a libvirt daemon answers on qemu:///system.
func NeedLibvirt(tb testing.TB) {
	tb.Helper()
	Need(tb, "virsh", "qemu-img")
	if err := exec.Command("virsh", "-c", "qemu:///system", "version").Run(); err != nil {
		if os.Getenv("NBDMOVER_TEST_REQUIRE_PEERS") != "" {
			tb.Fatal("libvirtd does not answer on qemu:///system: run the tests with make test")
		}
		tb.Skip("no libvirtd on qemu:///system (make test starts one)")
	}
}

// Virsh runs virsh on qemu:///system and returns its output.
func Virsh(tb testing.TB, args ...string) string {
	tb.Helper()
	return Run(tb, "virsh", append([]string{"-c", "qemu:///system"}, args...)...)
}

// DiskSpec is a disk of a test domain.
type DiskSpec struct {
	Dev    string // target: vda, vdb, ...
	Format string // qcow2 or raw
	Size   int64
	// Backing, when set, is the URI of a raw backing image (an NBD
	// export): the disk is a qcow2 overlay of it, of its size.
	Backing string
	// From, when set, is a raw image whose content the disk starts with
	// (and whose size it has).
	From string
}

// Domain is a throwaway running libvirt domain with no guest OS (the BIOS
// idles), which is all a backup needs.
type Domain struct {
	Name  string
	Dir   string
	Disks []DiskSpec
	tb    testing.TB

	nbdDir string // QEMU's NBD server's socket directory, once started
	reads  int
}

// Path is the image file of a disk.
func (d *Domain) Path(dev string) string {
	for _, s := range d.Disks {
		if s.Dev == dev {
			return filepath.Join(d.Dir, dev+"."+s.Format)
		}
	}
	d.tb.Fatalf("no disk %s", dev)
	return ""
}

// NewDomain creates the disks and starts the domain; persistent domains are
// defined first (their checkpoints survive a restart). Everything is removed
// when the test ends.
func NewDomain(tb testing.TB, persistent bool, disks ...DiskSpec) *Domain {
	tb.Helper()
	NeedLibvirt(tb)
	dir := tb.TempDir()
	os.Chmod(dir, 0o755) // QEMU runs as libvirt-qemu and must reach the images
	for p := filepath.Dir(dir); p != "/"; p = filepath.Dir(p) {
		if st, err := os.Stat(p); err == nil && st.Mode().Perm()&0o001 == 0 {
			os.Chmod(p, st.Mode().Perm()|0o011)
		}
	}
	d := &Domain{Name: fmt.Sprintf("nbdmover-test-%08x", rand.Uint32()), Dir: dir, Disks: disks, tb: tb}
	var devs strings.Builder
	for i, s := range disks {
		img := filepath.Join(dir, s.Dev+"."+s.Format)
		switch {
		case s.Backing != "":
			Run(tb, "qemu-img", "create", "-q", "-f", "qcow2", "-b", s.Backing, "-F", "raw", img)
		case s.From != "":
			Run(tb, "qemu-img", "convert", "-q", "-f", "raw", "-O", s.Format, s.From, img)
		default:
			Run(tb, "qemu-img", "create", "-q", "-f", s.Format, img, strconv.FormatInt(s.Size, 10))
		}
		fmt.Fprintf(&devs, `<disk type='file' device='disk'><driver name='qemu' type='%s'/><source file='%s'/><target dev='%s' bus='virtio'/><alias name='ua-disk%d'/></disk>`,
			s.Format, img, s.Dev, i)
	}
	virtType := "kvm"
	if _, err := os.Stat("/dev/kvm"); err != nil {
		virtType = "qemu"
	}
	xml := fmt.Sprintf(`<domain type='%s'><name>%s</name><memory unit='MiB'>64</memory><vcpu>1</vcpu>
<os><type arch='x86_64' machine='pc'>hvm</type></os><devices>%s
<disk type='file' device='cdrom'><target dev='hdc' bus='ide'/><readonly/></disk></devices></domain>`, virtType, d.Name, devs.String())
	xmlPath := filepath.Join(dir, "domain.xml")
	os.WriteFile(xmlPath, []byte(xml), 0o644)
	tb.Cleanup(d.remove)
	if persistent {
		Virsh(tb, "define", xmlPath)
		Virsh(tb, "start", d.Name)
	} else {
		Virsh(tb, "create", xmlPath)
	}
	return d
}

func (d *Domain) remove() {
	exec.Command("virsh", "-c", "qemu:///system", "destroy", d.Name).Run()
	exec.Command("virsh", "-c", "qemu:///system", "undefine", d.Name, "--checkpoints-metadata").Run()
}

// Write runs qemu-io commands on a disk through QEMU's block layer, so the
// dirty bitmaps see them, and flushes. qemu-io's output goes to QEMU's
// standard output, which libvirt keeps in the domain's log: a command
// that failed there fails the test.
func (d *Domain) Write(dev string, cmds ...string) {
	d.tb.Helper()
	idx := -1
	for i, s := range d.Disks {
		if s.Dev == dev {
			idx = i
		}
	}
	logPath := "/var/log/libvirt/qemu/" + d.Name + ".log"
	for _, c := range append(cmds, "flush") {
		var from int64
		if st, err := os.Stat(logPath); err == nil {
			from = st.Size()
		}
		out := Virsh(d.tb, "qemu-monitor-command", d.Name, "--hmp",
			fmt.Sprintf(`qemu-io -d /machine/peripheral/ua-disk%d/virtio-backend "%s"`, idx, c))
		if strings.Contains(out, "rror") || strings.Contains(out, "failed") {
			d.tb.Fatalf("qemu-io %s on %s: %s", c, dev, out)
		}
		if c != "flush" {
			d.ioResult(logPath, from, c, dev)
		}
	}
}

// ioResult waits for qemu-io's report of a command in the domain's log
// ("wrote 65536/65536 bytes at offset 0", or the error).
func (d *Domain) ioResult(logPath string, from int64, c, dev string) {
	d.tb.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		b, _ := os.ReadFile(logPath)
		if int64(len(b)) > from {
			out := string(b[from:])
			if strings.Contains(out, "failed") || strings.Contains(out, "rror") {
				d.tb.Fatalf("qemu-io %s on %s: %s", c, dev, out)
			}
			if strings.Contains(out, "bytes at offset") { // wrote, read, discard

				return
			}
		}
		if time.Now().After(deadline) {
			d.tb.Fatalf("qemu-io %s on %s: no report in %s", c, dev, logPath)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// Attach is a domain defined elsewhere (one the code under test made),
// with these disks in the order of their ua-disk aliases; it is destroyed
// and undefined when the test ends.
func Attach(tb testing.TB, name string, disks ...DiskSpec) *Domain {
	d := &Domain{Name: name, Disks: disks, tb: tb}
	tb.Cleanup(d.remove)
	return d
}

// Read copies what the guest sees of a disk now to a raw file, through
// QEMU's own NBD server exporting the disk's node.
func (d *Domain) Read(dev string) string {
	d.tb.Helper()
	if d.nbdDir == "" {
		d.nbdDir = d.tb.TempDir()
		os.Chmod(d.nbdDir, 0o777)
		d.QMP(fmt.Sprintf(`{"execute":"nbd-server-start","arguments":{"addr":{"type":"unix","data":{"path":%q}}}}`,
			filepath.Join(d.nbdDir, "s")))
	}
	d.reads++
	id := fmt.Sprintf("r%d", d.reads)
	d.QMP(fmt.Sprintf(`{"execute":"block-export-add","arguments":{"type":"nbd","id":%q,"node-name":%q,"name":%q}}`, id, d.NodeName(dev), id))
	defer d.QMP(fmt.Sprintf(`{"execute":"block-export-del","arguments":{"id":%q}}`, id))
	out := filepath.Join(d.tb.TempDir(), dev+".raw")
	Run(d.tb, "qemu-img", "convert", "-f", "raw", "-O", "raw", "nbd+unix:///"+id+"?socket="+filepath.Join(d.nbdDir, "s"), out)
	return out
}

// Snapshot returns raw reference copies of every disk as they are now,
// taken with the domain paused after a flush.
func (d *Domain) Snapshot() map[string]string {
	d.tb.Helper()
	for _, s := range d.Disks {
		d.Write(s.Dev) // flush
	}
	Virsh(d.tb, "suspend", d.Name)
	defer Virsh(d.tb, "resume", d.Name)
	refs := map[string]string{}
	for _, s := range d.Disks {
		raw := filepath.Join(d.tb.TempDir(), s.Dev+".raw")
		Run(d.tb, "qemu-img", "convert", "-U", "-f", s.Format, "-O", "raw", d.Path(s.Dev), raw)
		refs[s.Dev] = raw
	}
	return refs
}

// Checkpoints lists the domain's checkpoint names.
func (d *Domain) Checkpoints() []string {
	d.tb.Helper()
	return strings.Fields(Virsh(d.tb, "checkpoint-list", d.Name, "--name"))
}

// JobActive reports whether a backup job runs on the domain.
func (d *Domain) JobActive() bool {
	d.tb.Helper()
	out, err := exec.Command("virsh", "-c", "qemu:///system", "backup-dumpxml", d.Name).CombinedOutput()
	if err != nil && !strings.Contains(string(out), "no domain backup job") {
		d.tb.Fatalf("virsh backup-dumpxml %s: %v: %s", d.Name, err, out)
	}
	return err == nil
}

// QMP sends a QMP command to the domain's QEMU and returns the reply.
func (d *Domain) QMP(cmd string) string {
	d.tb.Helper()
	out := Virsh(d.tb, "qemu-monitor-command", d.Name, cmd)
	if strings.Contains(out, `"error"`) {
		d.tb.Fatalf("QMP %s: %s", cmd, out)
	}
	return out
}

// NodeName is the block node QEMU reads a disk's image through (the node
// its dirty bitmaps live on).
func (d *Domain) NodeName(dev string) string {
	d.tb.Helper()
	idx := -1
	for i, s := range d.Disks {
		if s.Dev == dev {
			idx = i
		}
	}
	var reply struct {
		Return []struct {
			Qdev     string `json:"qdev"`
			Inserted *struct {
				NodeName string `json:"node-name"`
			} `json:"inserted"`
		} `json:"return"`
	}
	if err := json.Unmarshal([]byte(d.QMP(`{"execute":"query-block"}`)), &reply); err != nil {
		d.tb.Fatal(err)
	}
	for _, b := range reply.Return {
		if strings.Contains(b.Qdev, fmt.Sprintf("/ua-disk%d/", idx)) && b.Inserted != nil {
			return b.Inserted.NodeName
		}
	}
	d.tb.Fatalf("no block node for %s in query-block", dev)
	return ""
}

// Bitmaps lists the dirty bitmaps QEMU keeps on a disk's node.
func (d *Domain) Bitmaps(dev string) []string {
	d.tb.Helper()
	node := d.NodeName(dev)
	var reply struct {
		Return []struct {
			NodeName string `json:"node-name"`
			Bitmaps  []struct {
				Name string `json:"name"`
			} `json:"dirty-bitmaps"`
		} `json:"return"`
	}
	if err := json.Unmarshal([]byte(d.QMP(`{"execute":"query-named-block-nodes"}`)), &reply); err != nil {
		d.tb.Fatal(err)
	}
	var names []string
	for _, n := range reply.Return {
		if n.NodeName == node {
			for _, b := range n.Bitmaps {
				names = append(names, b.Name)
			}
		}
	}
	return names
}

// BehindBitmap runs f (writes to dev) with the dirty bitmap disabled
// through QMP, so that it misses them: a bitmap that lies, as a QEMU bug
// or a tool behind libvirt's back could make it.
func (d *Domain) BehindBitmap(dev, bitmap string, f func()) {
	d.tb.Helper()
	args := fmt.Sprintf(`{"node":%q,"name":%q}`, d.NodeName(dev), bitmap)
	d.QMP(`{"execute":"block-dirty-bitmap-disable","arguments":` + args + `}`)
	f()
	d.QMP(`{"execute":"block-dirty-bitmap-enable","arguments":` + args + `}`)
}
