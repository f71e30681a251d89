package instant

import (
	"encoding/xml"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"sort"
	"strconv"
	"strings"

	"libvirt.org/go/libvirtxml"
)

// definition builds the new domain's definition from the saved one. The
// saved definition comes from the repository, which whoever can write it
// controls (and with it the guest's disks): nothing of it may reach a host
// file or device, run as another user, or share a writable thing with the
// original. So the new definition is built from an allowlist, element by
// element: the machine (type, memory, vCPUs, CPU model, features, clock,
// firmware from the host's own firmware directories), the backed-up disks
// as overlays on the export, empty removable drives, controllers, network
// interfaces on this host's networks and bridges (new MAC addresses, link
// down unless KeepNetwork), pty consoles, the guest agent channel,
// loopback-only graphics, video, sound, input, an emulated TPM with new
// state, a virtio RNG on /dev/urandom, balloon, watchdog, panic, IOMMU,
// USB hubs and an auto vsock. Everything else is left out and named in
// rs.res.Dropped. The new domain gets a new name, UUID (no sysinfo copies
// the original's), VM generation id and NVRAM.
func (rs *restore) definition(saved []byte) (*libvirtxml.Domain, error) {
	var old libvirtxml.Domain
	if err := old.Unmarshal(string(saved)); err != nil {
		return nil, fmt.Errorf("the domain definition of %s/%s: %w", rs.st.Domain, rs.st.Backup, err)
	}
	if old.Devices == nil {
		return nil, fmt.Errorf("the domain definition of %s/%s has no devices", rs.st.Domain, rs.st.Backup)
	}
	drop := func(format string, args ...any) {
		rs.res.Dropped = append(rs.res.Dropped, fmt.Sprintf(format, args...))
	}
	switch old.Type {
	case "kvm", "qemu":
	default:
		return nil, fmt.Errorf("the domain definition of %s/%s is of type %q: only kvm and qemu domains are restored", rs.st.Domain, rs.st.Backup, old.Type)
	}
	def := &libvirtxml.Domain{
		Type: old.Type, Name: rs.o.As, Title: old.Title,
		Description: fmt.Sprintf("instant restore of backup %s/%s", rs.st.Domain, rs.st.Backup),
		Memory:      old.Memory, CurrentMemory: old.CurrentMemory, MaximumMemory: old.MaximumMemory,
		VCPU: old.VCPU, VCPUs: old.VCPUs, IOThreads: old.IOThreads, IOThreadIDs: old.IOThreadIDs,
		CPU: old.CPU, Features: old.Features, PM: old.PM,
		OnPoweroff: old.OnPoweroff, OnReboot: old.OnReboot, OnCrash: old.OnCrash,
		Devices: &libvirtxml.DomainDeviceList{},
	}
	if old.GenID != nil {
		def.GenID = &libvirtxml.DomainGenID{} // a new one: the guest sees it was restored
	}
	if c := old.Clock; c != nil {
		clock := *c
		if clock.Offset == "timezone" || clock.TimeZone != "" {
			// QEMU gets the zone as TZ, which names a file.
			drop("the clock's time zone %q (UTC now)", clock.TimeZone)
			clock.Offset, clock.TimeZone = "utc", ""
		}
		def.Clock = &clock
	}
	if strings.HasPrefix(def.OnCrash, "coredump") {
		// A guest that crashes at every boot would fill the host's disk.
		drop("on_crash %s (destroy now)", def.OnCrash)
		def.OnCrash = "destroy"
	}
	for what, present := range map[string]bool{
		"seclabel": len(old.SecLabel) > 0, "sysinfo": len(old.SysInfo) > 0, "emulator": old.Devices.Emulator != "",
		"qemu:commandline": old.QEMUCommandline != nil, "qemu:capabilities": old.QEMUCapabilities != nil,
		"qemu:override": old.QEMUOverride != nil, "memoryBacking": old.MemoryBacking != nil, "cputune": old.CPUTune != nil,
		"numatune": old.NUMATune != nil, "blkiotune": old.BlockIOTune != nil, "memtune": old.MemoryTune != nil,
		"resource": old.Resource != nil, "launchSecurity": old.LaunchSecurity != nil, "keywrap": old.KeyWrap != nil,
		"perf": old.Perf != nil, "idmap": old.IDMap != nil, "bootloader": old.Bootloader != "",
	} {
		if present {
			drop("<%s>", what)
		}
	}
	def.OS = osDefinition(old.OS, drop)

	want := map[string]*diskState{}
	for i := range rs.st.Disks {
		want[rs.st.Disks[i].Name] = &rs.st.Disks[i]
	}
	dev := def.Devices
	for _, d := range old.Devices.Disks {
		target := ""
		if d.Target != nil {
			target = d.Target.Dev
		}
		switch ds := want[target]; {
		case ds != nil:
			delete(want, target)
			if d.IOTune != nil {
				drop("the I/O limits of disk %s", target)
			}
			dev.Disks = append(dev.Disks, rs.overlayDisk(d, ds))
		case d.Device == "cdrom" || d.Device == "floppy":
			if d.Source != nil && (d.Source.File != nil || d.Source.Block != nil || d.Source.Network != nil || d.Source.Volume != nil) {
				drop("the media in %s %s (ejected)", d.Device, target)
			}
			dev.Disks = append(dev.Disks, libvirtxml.DomainDisk{Device: d.Device, Target: d.Target, ReadOnly: d.ReadOnly,
				Boot: d.Boot, Alias: d.Alias, Address: d.Address})
		default:
			// Not in the backup: two domains must never write one image.
			drop("disk %s (the backup does not hold it)", target)
		}
	}
	for name := range want {
		return nil, fmt.Errorf("the domain definition has no disk %s, which the backup holds", name)
	}
	dev.Controllers = old.Devices.Controllers
	for _, n := range old.Devices.Interfaces {
		if ni, ok := rs.interfaceDefinition(n, drop); ok {
			dev.Interfaces = append(dev.Interfaces, ni)
		}
	}
	for _, s := range old.Devices.Serials {
		if s.Source != nil && s.Source.Pty == nil {
			drop("the host side of serial port %s (a pty now)", port(s.Target))
		}
		dev.Serials = append(dev.Serials, libvirtxml.DomainSerial{Source: &libvirtxml.DomainChardevSource{Pty: &libvirtxml.DomainChardevSourcePty{}},
			Target: s.Target, Alias: s.Alias, Address: s.Address})
	}
	for _, c := range old.Devices.Consoles {
		if c.Source != nil && c.Source.Pty == nil {
			drop("the host side of a console (a pty now)")
		}
		dev.Consoles = append(dev.Consoles, libvirtxml.DomainConsole{Source: &libvirtxml.DomainChardevSource{Pty: &libvirtxml.DomainChardevSourcePty{}},
			Target: c.Target, Alias: c.Alias})
	}
	for _, c := range old.Devices.Channels {
		switch {
		case c.Target != nil && c.Target.VirtIO != nil && c.Target.VirtIO.Name == "org.qemu.guest_agent.0":
			// libvirt picks the socket's path.
			dev.Channels = append(dev.Channels, libvirtxml.DomainChannel{
				Source: &libvirtxml.DomainChardevSource{UNIX: &libvirtxml.DomainChardevSourceUNIX{Mode: "bind"}},
				Target: &libvirtxml.DomainChannelTarget{VirtIO: &libvirtxml.DomainChannelTargetVirtIO{Name: "org.qemu.guest_agent.0"}},
				Alias:  c.Alias, Address: c.Address})
		case c.Source != nil && c.Source.SpiceVMC != nil:
			dev.Channels = append(dev.Channels, libvirtxml.DomainChannel{Source: c.Source, Target: c.Target, Alias: c.Alias, Address: c.Address})
		default:
			drop("a channel")
		}
	}
	for _, in := range old.Devices.Inputs {
		if in.Type == "mouse" || in.Type == "tablet" || in.Type == "keyboard" {
			dev.Inputs = append(dev.Inputs, libvirtxml.DomainInput{Type: in.Type, Bus: in.Bus, Model: in.Model, Alias: in.Alias, Address: in.Address})
		} else {
			drop("input %s", in.Type)
		}
	}
	for _, t := range old.Devices.TPMs {
		if _, err := exec.LookPath("swtpm"); err != nil && t.Backend != nil && t.Backend.Emulator != nil {
			drop("the emulated TPM (swtpm is not installed here)")
			continue
		}
		if t.Backend != nil && t.Backend.Emulator != nil {
			// New state (under the new UUID): the original's is not in
			// the backup.
			dev.TPMs = append(dev.TPMs, libvirtxml.DomainTPM{Model: t.Model, Alias: t.Alias, Address: t.Address,
				Backend: &libvirtxml.DomainTPMBackend{Emulator: &libvirtxml.DomainTPMBackendEmulator{Version: t.Backend.Emulator.Version}}})
		} else {
			drop("a TPM that is not emulated")
		}
	}
	for _, g := range old.Devices.Graphics {
		// A unix socket libvirt makes (root's; virsh domdisplay names it),
		// never a port every local user could reach without a password.
		local := []libvirtxml.DomainGraphicListener{{Socket: &libvirtxml.DomainGraphicListenerSocket{}}}
		switch {
		case g.VNC != nil:
			dev.Graphics = append(dev.Graphics, libvirtxml.DomainGraphic{VNC: &libvirtxml.DomainGraphicVNC{Keymap: keymap(g.VNC.Keymap, drop), Listeners: local}})
		case g.Spice != nil:
			dev.Graphics = append(dev.Graphics, libvirtxml.DomainGraphic{Spice: &libvirtxml.DomainGraphicSpice{Keymap: keymap(g.Spice.Keymap, drop), Listeners: local}})
		default:
			drop("graphics other than VNC or SPICE")
		}
	}
	for _, v := range old.Devices.Videos {
		m := v.Model
		m.Accel, m.Blob = nil, ""
		dev.Videos = append(dev.Videos, libvirtxml.DomainVideo{Model: m, Alias: v.Alias, Address: v.Address})
	}
	for _, s := range old.Devices.Sounds {
		dev.Sounds = append(dev.Sounds, libvirtxml.DomainSound{Model: s.Model, Codec: s.Codec, Alias: s.Alias, Address: s.Address})
	}
	for _, r := range old.Devices.RNGs {
		dev.RNGs = append(dev.RNGs, libvirtxml.DomainRNG{Model: r.Model, Rate: r.Rate, Alias: r.Alias, Address: r.Address,
			Backend: &libvirtxml.DomainRNGBackend{Random: &libvirtxml.DomainRNGBackendRandom{Device: "/dev/urandom"}}})
	}
	if b := old.Devices.MemBalloon; b != nil {
		dev.MemBalloon = &libvirtxml.DomainMemBalloon{Model: b.Model, AutoDeflate: b.AutoDeflate,
			FreePageReporting: b.FreePageReporting, Stats: b.Stats, Alias: b.Alias, Address: b.Address}
	}
	dev.Panics, dev.IOMMUs, dev.Hubs = old.Devices.Panics, old.Devices.IOMMUs, old.Devices.Hubs
	for _, w := range old.Devices.Watchdogs {
		if w.Action == "dump" {
			drop("the watchdog's dump action (reset now)")
			w.Action = "reset"
		}
		dev.Watchdogs = append(dev.Watchdogs, w)
	}
	if v := old.Devices.VSock; v != nil {
		dev.VSock = &libvirtxml.DomainVSock{Model: v.Model, CID: &libvirtxml.DomainVSockCID{Auto: "yes"}, Alias: v.Alias, Address: v.Address}
	}
	for what, n := range map[string]int{
		"hostdev": len(old.Devices.Hostdevs), "filesystem": len(old.Devices.Filesystems), "memory device": len(old.Devices.Memorydevs),
		"shmem": len(old.Devices.Shmems), "smartcard": len(old.Devices.Smartcards), "redirdev": len(old.Devices.RedirDevs),
		"redirfilter": len(old.Devices.RedirFilters), "parallel port": len(old.Devices.Parallels), "lease": len(old.Devices.Leases),
		"crypto device": len(old.Devices.Crypto), "audio backend": len(old.Devices.Audios),
	} {
		if n > 0 {
			drop("%d %s", n, what)
		}
	}
	if old.Devices.PStore != nil || old.Devices.NVRAM != nil {
		drop("pstore or nvram device")
	}
	sort.Strings(rs.res.Dropped)
	return def, nil
}

// firmwareDirs hold the host's firmware: a loader or NVRAM template the
// saved definition names is kept only from here.
var firmwareDirs = []string{"/usr/share/OVMF/", "/usr/share/AAVMF/", "/usr/share/qemu/", "/usr/share/seabios/", "/usr/share/edk2/", "/usr/share/ovmf/"}

func firmwarePath(p string) bool {
	if p != filepath.Clean(p) {
		return false
	}
	for _, d := range firmwareDirs {
		if strings.HasPrefix(p, d) {
			return true
		}
	}
	return false
}

// osDefinition keeps the machine and the boot order; firmware only from
// the host's firmware directories (else libvirt picks EFI firmware); never
// a kernel, initrd or table from a host path, never the original's NVRAM.
func osDefinition(old *libvirtxml.DomainOS, drop func(string, ...any)) *libvirtxml.DomainOS {
	if old == nil {
		return nil
	}
	os := &libvirtxml.DomainOS{Type: old.Type, Firmware: old.Firmware, FirmwareInfo: old.FirmwareInfo,
		BootDevices: old.BootDevices, BootMenu: old.BootMenu, BIOS: old.BIOS}
	if old.Kernel != "" || old.Initrd != "" || old.DTB != "" || old.Shim != "" || old.ACPI != nil {
		drop("direct kernel boot and ACPI tables from host files (it boots from its disks)")
	}
	if old.SMBios != nil {
		drop("<smbios>")
	}
	if l := old.Loader; l != nil {
		switch {
		case old.Firmware != "":
			// Autoselection (libvirt 9.0 refuses a loader beside it).
		case firmwarePath(l.Path):
			os.Loader = &libvirtxml.DomainLoader{Path: l.Path, Readonly: l.Readonly, Secure: l.Secure, Type: l.Type, Format: l.Format}
		case l.Type == "pflash" || old.Firmware == "efi":
			drop("the loader %s (libvirt picks the host's EFI firmware)", l.Path)
			os.Firmware = "efi"
			if l.Secure == "yes" {
				os.FirmwareInfo = &libvirtxml.DomainOSFirmwareInfo{Features: []libvirtxml.DomainOSFirmwareFeature{{Enabled: "yes", Name: "secure-boot"}}}
			}
		case l.Path != "":
			drop("the loader %s", l.Path)
		}
	}
	if n := old.NVRam; n != nil && os.Loader != nil && os.Firmware == "" {
		// Its own, from the template: never the original's file.
		os.NVRam = &libvirtxml.DomainNVRam{Format: n.Format, TemplateFormat: n.TemplateFormat}
		if firmwarePath(n.Template) {
			os.NVRam.Template = n.Template
		}
	}
	return os
}

var ifname = regexp.MustCompile(`^[A-Za-z0-9_][A-Za-z0-9_.:-]{0,14}$`)

// interfaceDefinition keeps an interface on a network or bridge this host
// has (or user networking), with a new MAC address; its link is down
// unless KeepNetwork.
func (rs *restore) interfaceDefinition(n libvirtxml.DomainInterface, drop func(string, ...any)) (libvirtxml.DomainInterface, bool) {
	ni := libvirtxml.DomainInterface{Model: n.Model, Boot: n.Boot, MTU: n.MTU, Alias: n.Alias, Address: n.Address}
	src := n.Source
	switch {
	case src != nil && src.Network != nil:
		if rs.networkExists == nil || !rs.networkExists(src.Network.Network) {
			drop("an interface on network %q (no such active network here)", src.Network.Network)
			return ni, false
		}
		ni.Source = &libvirtxml.DomainInterfaceSource{Network: &libvirtxml.DomainInterfaceSourceNetwork{Network: src.Network.Network, PortGroup: src.Network.PortGroup}}
	case src != nil && src.Bridge != nil:
		if !ifname.MatchString(src.Bridge.Bridge) || !isDir("/sys/class/net/"+src.Bridge.Bridge+"/bridge") {
			drop("an interface on bridge %q (no such bridge here)", src.Bridge.Bridge)
			return ni, false
		}
		ni.Source = &libvirtxml.DomainInterfaceSource{Bridge: &libvirtxml.DomainInterfaceSourceBridge{Bridge: src.Bridge.Bridge}}
	case src != nil && src.User != nil:
		ni.Source = &libvirtxml.DomainInterfaceSource{User: &libvirtxml.DomainInterfaceSourceUser{}}
	default:
		drop("an interface that is not on a network, a bridge or user networking")
		return ni, false
	}
	guarded := n.FilterRef != nil || n.VLan != nil
	if guarded {
		drop("the nwfilter and VLAN of an interface on %s (its link stays down)", interfaceSource(ni))
	}
	if n.Bandwidth != nil {
		drop("the bandwidth limits of an interface on %s", interfaceSource(ni))
	}
	if !rs.o.KeepNetwork || guarded {
		ni.Link = &libvirtxml.DomainInterfaceLink{State: "down"}
	} else {
		ni.Link = n.Link
	}
	return ni, true
}

func interfaceSource(n libvirtxml.DomainInterface) string {
	switch s := n.Source; {
	case s.Network != nil:
		return "network " + s.Network.Network
	case s.Bridge != nil:
		return "bridge " + s.Bridge.Bridge
	}
	return "user networking"
}

var keymapName = regexp.MustCompile(`^[a-z]{2,3}(-[a-z]{2,})?$`)

// keymap keeps a keymap name (QEMU takes a path too: never that).
func keymap(k string, drop func(string, ...any)) string {
	if k == "" || keymapName.MatchString(k) {
		return k
	}
	drop("the keymap %q", k)
	return ""
}

func port(t *libvirtxml.DomainSerialTarget) string {
	if t == nil || t.Port == nil {
		return "?"
	}
	return strconv.FormatUint(uint64(*t.Port), 10)
}

// overlayDisk is the new domain's disk for a backed-up one: a qcow2
// overlay on the export, with the guest-facing parts of the original
// (target, boot order, serial, block sizes, address) and its reads and
// writes stopping the guest, not failing, while the export is away.
func (rs *restore) overlayDisk(d libvirtxml.DomainDisk, ds *diskState) libvirtxml.DomainDisk {
	drv := &libvirtxml.DomainDiskDriver{Name: "qemu", Type: "qcow2", ErrorPolicy: "stop", RErrorPolicy: "stop"}
	if o := d.Driver; o != nil {
		if knownPolicy(o.ErrorPolicy) && knownPolicy(o.RErrorPolicy) {
			ds.ErrorPolicy, ds.RErrorPolicy = o.ErrorPolicy, o.RErrorPolicy
		}
		drv.Cache, drv.IO, drv.Discard, drv.DetectZeros, drv.IOThread, drv.Queues = o.Cache, o.IO, o.Discard, o.DetectZeros, o.IOThread, o.Queues
	}
	return libvirtxml.DomainDisk{
		Device: "disk", Driver: drv, Target: d.Target, Boot: d.Boot, Serial: d.Serial, WWN: d.WWN, Vendor: d.Vendor,
		Product: d.Product, BlockIO: d.BlockIO, Geometry: d.Geometry, Alias: d.Alias, Address: d.Address,
		Source: &libvirtxml.DomainDiskSource{File: &libvirtxml.DomainDiskSourceFile{File: ds.Overlay}},
		BackingStore: &libvirtxml.DomainDiskBackingStore{
			Format: &libvirtxml.DomainDiskFormat{Type: "raw"},
			Source: &libvirtxml.DomainDiskSource{Network: &libvirtxml.DomainDiskSourceNetwork{
				Protocol:  "nbd",
				Name:      ds.Name,
				Hosts:     []libvirtxml.DomainDiskSourceHost{{Transport: "unix", Socket: rs.st.Socket}},
				Reconnect: &libvirtxml.DomainDiskSourceNetworkReconnect{Delay: strconv.Itoa(ReconnectDelay)},
			}},
		},
	}
}

// finalDisk makes d the disk's final image, with its own error policies.
func finalDisk(d *libvirtxml.DomainDisk, ds *diskState, format string) {
	if d.Driver == nil {
		d.Driver = &libvirtxml.DomainDiskDriver{Name: "qemu"}
	}
	d.Driver.Type = format
	d.Driver.ErrorPolicy, d.Driver.RErrorPolicy = ds.ErrorPolicy, ds.RErrorPolicy
	d.Source = &libvirtxml.DomainDiskSource{File: &libvirtxml.DomainDiskSourceFile{File: ds.Image}}
	d.BackingStore = nil
	d.Mirror = nil
}

func isDir(p string) bool {
	st, err := os.Stat(p)
	return err == nil && st.IsDir()
}

func xmlEscape(s string) string {
	var b strings.Builder
	xml.EscapeText(&b, []byte(s))
	return b.String()
}
