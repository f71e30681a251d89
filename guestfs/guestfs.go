// Package guestfs is a thin cgo binding of the few libguestfs calls that
// read a guest's filesystems: drives (read-only, over NBD or from files),
// launch, inspection, mounting read-only, directory listing, stat,
// symlink targets, checksums, file contents (pread) and tar streams. It
// has no call that writes to a guest filesystem. No Go module of libguestfs can be fetched here, so
// this is our own, like nbdclient's over libnbd.
//
// A Handle is one appliance (a small VM whose kernel parses the guest's
// filesystems, so the host's never does). Its calls are serialized by a
// mutex: libguestfs allows one call on a handle at a time. libguestfs
// keeps its last error per thread, and a goroutine may change threads
// between two cgo calls, so every call here reads the error in the same C
// call that failed.
package guestfs

/*
#cgo pkg-config: libguestfs
#include <stdlib.h>
#include <string.h>
#include <guestfs.h>

// libguestfs's error handler is per thread: each call sets it (to none)
// on the thread it runs on, so nothing is printed on stderr.
static void gfs_quiet(guestfs_h *g) { guestfs_set_error_handler(g, NULL, NULL); }

static char *gfs_err(guestfs_h *g) {
	const char *e = guestfs_last_error(g);
	return strdup(e ? e : "unknown libguestfs error");
}

// The last messages of the library and the appliance while launching,
// for an error that says why a launch failed (libguestfs's own says "see
// earlier messages", which go nowhere here).
#define TAIL 3000
struct tail { size_t n; char buf[TAIL]; };

static void gfs_event(guestfs_h *g, void *opaque, uint64_t ev, int h, int flags,
		const char *buf, size_t len, const uint64_t *a, size_t alen) {
	struct tail *t = opaque;
	if (len >= TAIL) { buf += len - (TAIL - 1); len = TAIL - 1; }
	if (t->n + len >= TAIL) {
		size_t drop = t->n + len - (TAIL - 1);
		memmove(t->buf, t->buf + drop, t->n - drop);
		t->n -= drop;
	}
	memcpy(t->buf + t->n, buf, len);
	t->n += len;
	t->buf[t->n] = 0;
}

static guestfs_h *gfs_create(struct tail **tp, char **err) {
	guestfs_h *g = guestfs_create_flags(GUESTFS_CREATE_NO_ENVIRONMENT);
	if (!g) { *err = strdup("guestfs_create failed (out of memory?)"); return NULL; }
	guestfs_set_error_handler(g, NULL, NULL);
	struct tail *t = calloc(1, sizeof *t);
	if (!t || guestfs_set_event_callback(g, gfs_event,
			GUESTFS_EVENT_LIBRARY | GUESTFS_EVENT_APPLIANCE | GUESTFS_EVENT_WARNING, 0, t) == -1) {
		free(t);
		guestfs_close(g);
		*err = strdup("guestfs_set_event_callback failed");
		return NULL;
	}
	*tp = t;
	return g;
}

static int gfs_add_drive(guestfs_h *g, const char *name, const char *server, int readonly, char **err) {
	struct guestfs_add_drive_opts_argv o = {0};
	o.bitmask = GUESTFS_ADD_DRIVE_OPTS_READONLY_BITMASK | GUESTFS_ADD_DRIVE_OPTS_FORMAT_BITMASK;
	o.readonly = readonly;
	o.format = "raw";
	char *servers[2] = { (char *)server, NULL };
	if (server) {
		o.bitmask |= GUESTFS_ADD_DRIVE_OPTS_PROTOCOL_BITMASK | GUESTFS_ADD_DRIVE_OPTS_SERVER_BITMASK;
		o.protocol = "nbd";
		o.server = servers;
	}
	if (guestfs_add_drive_opts_argv(g, name, &o) == -1) { *err = gfs_err(g); return -1; }
	return 0;
}

static int gfs_int(guestfs_h *g, int r, char **err) {
	if (r == -1) *err = gfs_err(g);
	return r;
}

static char *gfs_str(guestfs_h *g, char *r, char **err) {
	if (!r) *err = gfs_err(g);
	return r;
}

static char **gfs_strs(guestfs_h *g, char **r, char **err) {
	if (!r) *err = gfs_err(g);
	return r;
}

static int gfs_setting(guestfs_h *g, const char *k, const char *v, char **err) {
	return gfs_int(g, guestfs_set_backend_setting(g, k, v), err);
}
static int gfs_memsize(guestfs_h *g, int mb, char **err) { return gfs_int(g, guestfs_set_memsize(g, mb), err); }
static int gfs_backend(guestfs_h *g, const char *b, char **err) { return gfs_int(g, guestfs_set_backend(g, b), err); }
static int gfs_launch(guestfs_h *g, struct tail *t, char **err) {
	t->n = 0; t->buf[0] = 0;
	guestfs_set_verbose(g, 1);
	int r = guestfs_launch(g);
	if (r == -1) *err = gfs_err(g);
	guestfs_set_verbose(g, 0);
	return r;
}
static int gfs_mount_ro(guestfs_h *g, const char *opts, const char *dev, const char *mp, char **err) {
	return gfs_int(g, guestfs_mount_options(g, opts, dev, mp), err);
}
static int gfs_umount_all(guestfs_h *g, char **err) { return gfs_int(g, guestfs_umount_all(g), err); }
static int gfs_device_index(guestfs_h *g, const char *d, char **err) { return gfs_int(g, guestfs_device_index(g, d), err); }
static char *gfs_pread(guestfs_h *g, const char *path, int count, int64_t off, size_t *n, char **err) {
	return gfs_str(g, guestfs_pread(g, path, count, off, n), err);
}
static struct guestfs_btrfssubvolume_list *gfs_btrfs_subvols(guestfs_h *g, const char *fs, char **err) {
	struct guestfs_btrfssubvolume_list *r = guestfs_btrfs_subvolume_list(g, fs);
	if (!r) *err = gfs_err(g);
	return r;
}
static char *subvol_path(struct guestfs_btrfssubvolume_list *l, int i) { return l->val[i].btrfssubvolume_path; }
static int gfs_ls0(guestfs_h *g, const char *dir, const char *local, char **err) {
	return gfs_int(g, guestfs_ls0(g, dir, local), err);
}
static int gfs_tar_out(guestfs_h *g, const char *dir, const char *local, char **err) {
	return gfs_int(g, guestfs_tar_out_opts(g, dir, local, GUESTFS_TAR_OUT_OPTS_NUMERICOWNER, 1, GUESTFS_TAR_OUT_OPTS_XATTRS, 1, -1), err);
}
static int64_t gfs_getsize(guestfs_h *g, const char *d, char **err) {
	int64_t r = guestfs_blockdev_getsize64(g, d);
	if (r == -1) *err = gfs_err(g);
	return r;
}
static char **gfs_inspect_os(guestfs_h *g, char **err) { return gfs_strs(g, guestfs_inspect_os(g), err); }
static char **gfs_mountpoints(guestfs_h *g, const char *root, char **err) { return gfs_strs(g, guestfs_inspect_get_mountpoints(g, root), err); }
static char **gfs_list_filesystems(guestfs_h *g, char **err) { return gfs_strs(g, guestfs_list_filesystems(g), err); }
static char **gfs_list_devices(guestfs_h *g, char **err) { return gfs_strs(g, guestfs_list_devices(g), err); }
static char **gfs_list_partitions(guestfs_h *g, char **err) { return gfs_strs(g, guestfs_list_partitions(g), err); }
static char **gfs_lvs(guestfs_h *g, char **err) { return gfs_strs(g, guestfs_lvs(g), err); }
static char *gfs_vfs_type(guestfs_h *g, const char *d, char **err) { return gfs_str(g, guestfs_vfs_type(g, d), err); }
static char *gfs_product(guestfs_h *g, const char *root, char **err) { return gfs_str(g, guestfs_inspect_get_product_name(g, root), err); }
static char *gfs_label(guestfs_h *g, const char *d, char **err) { return gfs_str(g, guestfs_vfs_label(g, d), err); }
static char *gfs_uuid(guestfs_h *g, const char *d, char **err) { return gfs_str(g, guestfs_vfs_uuid(g, d), err); }
static char *gfs_checksum(guestfs_h *g, const char *t, const char *p, char **err) { return gfs_str(g, guestfs_checksum(g, t, p), err); }
static struct guestfs_statns_list *gfs_lstatnslist(guestfs_h *g, const char *d, char **names, char **err) {
	struct guestfs_statns_list *r = guestfs_lstatnslist(g, d, names);
	if (!r) *err = gfs_err(g);
	return r;
}
static struct guestfs_statns *gfs_lstatns(guestfs_h *g, const char *p, char **err) {
	struct guestfs_statns *r = guestfs_lstatns(g, p);
	if (!r) *err = gfs_err(g);
	return r;
}
static char **gfs_readlinklist(guestfs_h *g, const char *d, char **names, char **err) {
	return gfs_strs(g, guestfs_readlinklist(g, d, names), err);
}
static struct guestfs_statns *statns_at(struct guestfs_statns_list *l, int i) { return &l->val[i]; }
static void free_strings(char **s) { if (!s) return; for (char **p = s; *p; p++) free(*p); free(s); }
*/
import "C"

import (
	"errors"
	"fmt"
	"io/fs"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"time"
	"unsafe"
)

// Error is a failed libguestfs call: the call and libguestfs's message.
type Error struct {
	Op, Msg string
}

func (e *Error) Error() string { return e.Op + ": " + e.Msg }

// NotFound reports whether the error is libguestfs's "No such file or
// directory" (the daemon's errno travels as text).
func (e *Error) NotFound() bool { return strings.Contains(e.Msg, "No such file or directory") }

// ErrClosed is returned by the calls of a closed handle.
var ErrClosed = errors.New("libguestfs appliance closed")

// Handle is one libguestfs handle and, once launched, its appliance.
type Handle struct {
	mu   sync.Mutex
	g    *C.guestfs_h
	tail *C.struct_tail
}

// New makes a handle with the direct backend (QEMU run by us, as root,
// not through libvirt) and memsize MiB of appliance memory (0: libguestfs's
// default). The environment (LIBGUESTFS_*) is ignored: what the appliance
// does is decided here.
func New(memsize int) (*Handle, error) {
	var cerr *C.char
	var tail *C.struct_tail
	g := C.gfs_create(&tail, &cerr)
	if g == nil {
		return nil, takeErr("create", cerr)
	}
	h := &Handle{g: g, tail: tail}
	if err := h.call("set_backend", func(e **C.char) C.int { return C.gfs_backend(g, cs("direct"), e) }); err != nil {
		h.Close()
		return nil, err
	}
	if memsize > 0 {
		if err := h.call("set_memsize", func(e **C.char) C.int { return C.gfs_memsize(g, C.int(memsize), e) }); err != nil {
			h.Close()
			return nil, err
		}
	}
	return h, nil
}

// cs is a C string that lives as long as the process (for constants).
var csCache sync.Map

func cs(s string) *C.char {
	if p, ok := csCache.Load(s); ok {
		return p.(*C.char)
	}
	p, _ := csCache.LoadOrStore(s, C.CString(s))
	return p.(*C.char)
}

func takeErr(op string, e *C.char) error {
	defer C.free(unsafe.Pointer(e))
	return &Error{Op: op, Msg: strings.TrimSpace(C.GoString(e))}
}

// call runs fn (which returns -1 and sets *err on failure) under the lock.
func (h *Handle) call(op string, fn func(err **C.char) C.int) error {
	return h.with(func(*C.guestfs_h) error {
		var e *C.char
		if fn(&e) == -1 {
			return takeErr(op, e)
		}
		return nil
	})
}

// with runs fn under the lock on an open handle.
func (h *Handle) with(fn func(g *C.guestfs_h) error) error {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.g == nil {
		return ErrClosed
	}
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	C.gfs_quiet(h.g)
	return fn(h.g)
}

// Close ends the appliance (if launched) and frees the handle. Idempotent.
func (h *Handle) Close() {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.g != nil {
		C.guestfs_close(h.g)
		C.free(unsafe.Pointer(h.tail))
		h.g, h.tail = nil, nil
	}
}

// ForceTCG makes the appliance run without KVM.
func (h *Handle) ForceTCG() error {
	return h.call("set_backend_setting", func(e **C.char) C.int { return C.gfs_setting(h.g, cs("force_tcg"), cs("1"), e) })
}

// AddNBD adds the NBD export name served on the unix socket path as a
// read-only raw drive (before Launch). Drives appear in the appliance as
// /dev/sda, /dev/sdb… in the order added.
func (h *Handle) AddNBD(socket, name string) error {
	return h.addDrive(name, "unix:"+socket, true)
}

// AddFile adds a raw image file as a drive (before Launch).
func (h *Handle) AddFile(path string, readonly bool) error {
	return h.addDrive(path, "", readonly)
}

func (h *Handle) addDrive(name, server string, readonly bool) error {
	n := C.CString(name)
	defer C.free(unsafe.Pointer(n))
	var srv *C.char
	if server != "" {
		srv = C.CString(server)
		defer C.free(unsafe.Pointer(srv))
	}
	ro := C.int(0)
	if readonly {
		ro = 1
	}
	return h.call("add_drive", func(e **C.char) C.int { return C.gfs_add_drive(h.g, n, srv, ro, e) })
}

// LaunchError is a failed launch: libguestfs's error and the last
// messages of the library and the appliance before it.
type LaunchError struct {
	Err  *Error
	Tail string
}

func (e *LaunchError) Error() string { return e.Err.Error() }
func (e *LaunchError) Unwrap() error { return e.Err }

// Launch starts the appliance. It blocks until the appliance answers or
// fails; Close from another goroutine does not interrupt it.
func (h *Handle) Launch() error {
	var tail string
	err := h.call("launch", func(e **C.char) C.int {
		r := C.gfs_launch(h.g, h.tail, e)
		tail = C.GoStringN(&h.tail.buf[0], C.int(h.tail.n))
		return r
	})
	var ge *Error
	if errors.As(err, &ge) {
		return &LaunchError{Err: ge, Tail: tail}
	}
	return err
}

// strs converts a NULL-terminated string list (freeing it).
func strs(p **C.char) []string {
	defer C.free_strings(p)
	var out []string
	for i := 0; ; i++ {
		s := *(**C.char)(unsafe.Add(unsafe.Pointer(p), uintptr(i)*unsafe.Sizeof(p)))
		if s == nil {
			return out
		}
		out = append(out, C.GoString(s))
	}
}

func (h *Handle) strList(op string, fn func(g *C.guestfs_h, e **C.char) **C.char) ([]string, error) {
	var out []string
	err := h.with(func(g *C.guestfs_h) error {
		var e *C.char
		p := fn(g, &e)
		if p == nil {
			return takeErr(op, e)
		}
		out = strs(p)
		return nil
	})
	return out, err
}

func (h *Handle) str(op string, fn func(g *C.guestfs_h, e **C.char) *C.char) (string, error) {
	var out string
	err := h.with(func(g *C.guestfs_h) error {
		var e *C.char
		p := fn(g, &e)
		if p == nil {
			return takeErr(op, e)
		}
		out = C.GoString(p)
		C.free(unsafe.Pointer(p))
		return nil
	})
	return out, err
}

// pairs turns libguestfs's flat key, value, key, value… list into pairs.
func pairs(l []string) [][2]string {
	var out [][2]string
	for i := 0; i+1 < len(l); i += 2 {
		out = append(out, [2]string{l[i], l[i+1]})
	}
	return out
}

// InspectOS returns the root filesystems of the operating systems found.
func (h *Handle) InspectOS() ([]string, error) {
	return h.strList("inspect_os", func(g *C.guestfs_h, e **C.char) **C.char { return C.gfs_inspect_os(g, e) })
}

// Devices lists the whole block devices, the partitions and the LVM
// logical volumes (list_filesystems leaves out what it cannot mount,
// such as LUKS volumes: these are where to look for them).
func (h *Handle) Devices() ([]string, error) {
	var all []string
	for _, f := range []struct {
		op string
		fn func(*C.guestfs_h, **C.char) **C.char
	}{{"list_devices", func(g *C.guestfs_h, e **C.char) **C.char { return C.gfs_list_devices(g, e) }},
		{"list_partitions", func(g *C.guestfs_h, e **C.char) **C.char { return C.gfs_list_partitions(g, e) }},
		{"lvs", func(g *C.guestfs_h, e **C.char) **C.char { return C.gfs_lvs(g, e) }}} {
		l, err := h.strList(f.op, f.fn)
		if err != nil {
			return nil, err
		}
		all = append(all, l...)
	}
	return all, nil
}

// VfsType is the type of what a device holds, as blkid says ("" if none).
func (h *Handle) VfsType(dev string) (string, error) {
	d := C.CString(dev)
	defer C.free(unsafe.Pointer(d))
	return h.str("vfs_type", func(g *C.guestfs_h, e **C.char) *C.char { return C.gfs_vfs_type(g, d, e) })
}

// Mountpoints returns an inspected root's mount points and their
// filesystems (mount point, mountable).
func (h *Handle) Mountpoints(root string) ([][2]string, error) {
	r := C.CString(root)
	defer C.free(unsafe.Pointer(r))
	l, err := h.strList("inspect_get_mountpoints", func(g *C.guestfs_h, e **C.char) **C.char { return C.gfs_mountpoints(g, r, e) })
	return pairs(l), err
}

// ProductName is the inspected root's operating system, as it names itself.
func (h *Handle) ProductName(root string) (string, error) {
	r := C.CString(root)
	defer C.free(unsafe.Pointer(r))
	return h.str("inspect_get_product_name", func(g *C.guestfs_h, e **C.char) *C.char { return C.gfs_product(g, r, e) })
}

// Filesystems lists every filesystem libguestfs finds (mountable, type):
// partitions, LVs, btrfs subvolumes ("btrfsvol:/dev/sda1/sub"), whole disks.
func (h *Handle) Filesystems() ([][2]string, error) {
	l, err := h.strList("list_filesystems", func(g *C.guestfs_h, e **C.char) **C.char { return C.gfs_list_filesystems(g, e) })
	return pairs(l), err
}

// Label is a filesystem's label ("" if none).
func (h *Handle) Label(mountable string) (string, error) {
	m := C.CString(mountable)
	defer C.free(unsafe.Pointer(m))
	return h.str("vfs_label", func(g *C.guestfs_h, e **C.char) *C.char { return C.gfs_label(g, m, e) })
}

// UUID is a filesystem's UUID ("" if none).
func (h *Handle) UUID(mountable string) (string, error) {
	m := C.CString(mountable)
	defer C.free(unsafe.Pointer(m))
	return h.str("vfs_uuid", func(g *C.guestfs_h, e **C.char) *C.char { return C.gfs_uuid(g, m, e) })
}

// DeviceIndex is the index of the drive a device is on (/dev/sdb: 1).
func (h *Handle) DeviceIndex(dev string) (int, error) {
	d := C.CString(dev)
	defer C.free(unsafe.Pointer(d))
	var i C.int
	err := h.call("device_index", func(e **C.char) C.int { i = C.gfs_device_index(h.g, d, e); return i })
	return int(i), err
}

// Size is a block device's size in bytes.
func (h *Handle) Size(dev string) (int64, error) {
	d := C.CString(dev)
	defer C.free(unsafe.Pointer(d))
	var n C.int64_t
	err := h.call("blockdev_getsize64", func(e **C.char) C.int {
		n = C.gfs_getsize(h.g, d, e)
		if n == -1 {
			return -1
		}
		return 0
	})
	return int64(n), err
}

// MountRO mounts a filesystem at mountpoint (in the appliance) with the
// options given (e.g. "ro,nouuid"). The drives are read-only to QEMU: a
// journal replayed at mount goes to the appliance's throwaway overlay,
// never to the backup.
func (h *Handle) MountRO(options, mountable, mountpoint string) error {
	o := C.CString(options)
	m := C.CString(mountable)
	p := C.CString(mountpoint)
	defer C.free(unsafe.Pointer(o))
	defer C.free(unsafe.Pointer(m))
	defer C.free(unsafe.Pointer(p))
	return h.call("mount", func(e **C.char) C.int { return C.gfs_mount_ro(h.g, o, m, p, e) })
}

// UmountAll unmounts every filesystem.
func (h *Handle) UmountAll() error {
	return h.call("umount_all", func(e **C.char) C.int { return C.gfs_umount_all(h.g, e) })
}

// Ls0 writes the names in the guest directory dir, each ended by a NUL
// ("." and ".." left out), to the local file (a /dev/fd/N pipe, say):
// unlike readdir, whose reply is bounded (4 MiB: some 100,000 names), it
// streams any number.
func (h *Handle) Ls0(dir, local string) error {
	d := C.CString(dir)
	l := C.CString(local)
	defer C.free(unsafe.Pointer(d))
	defer C.free(unsafe.Pointer(l))
	return h.call("ls0 "+strconv.Quote(dir), func(e **C.char) C.int { return C.gfs_ls0(h.g, d, l, e) })
}

// Stat is what lstat says of a guest file.
type Stat struct {
	Ino, Nlink, Size, Blocks int64
	Mode                     uint32 // st_mode: type and permission bits
	UID, GID                 int64
	Mtime                    time.Time
	Atime                    time.Time
}

// FileMode is the stat's mode as Go's.
func (s Stat) FileMode() fs.FileMode {
	m := fs.FileMode(s.Mode & 0o777)
	switch s.Mode & 0o170000 {
	case 0o040000:
		m |= fs.ModeDir
	case 0o120000:
		m |= fs.ModeSymlink
	case 0o010000:
		m |= fs.ModeNamedPipe
	case 0o140000:
		m |= fs.ModeSocket
	case 0o060000:
		m |= fs.ModeDevice
	case 0o020000:
		m |= fs.ModeDevice | fs.ModeCharDevice
	}
	if s.Mode&0o4000 != 0 {
		m |= fs.ModeSetuid
	}
	if s.Mode&0o2000 != 0 {
		m |= fs.ModeSetgid
	}
	if s.Mode&0o1000 != 0 {
		m |= fs.ModeSticky
	}
	return m
}

func statOf(s *C.struct_guestfs_statns) Stat {
	return Stat{Ino: int64(s.st_ino), Nlink: int64(s.st_nlink), Size: int64(s.st_size), Blocks: int64(s.st_blocks),
		Mode: uint32(s.st_mode), UID: int64(s.st_uid), GID: int64(s.st_gid),
		Mtime: time.Unix(int64(s.st_mtime_sec), int64(s.st_mtime_nsec)),
		Atime: time.Unix(int64(s.st_atime_sec), int64(s.st_atime_nsec))}
}

// Lstat stats one path without following a final symlink.
func (h *Handle) Lstat(path string) (Stat, error) {
	p := C.CString(path)
	defer C.free(unsafe.Pointer(p))
	var out Stat
	err := h.with(func(g *C.guestfs_h) error {
		var e *C.char
		s := C.gfs_lstatns(g, p, &e)
		if s == nil {
			return takeErr("lstat "+strconv.Quote(path), e)
		}
		out = statOf(s)
		C.guestfs_free_statns(s)
		return nil
	})
	return out, err
}

// cstrings is a NULL-terminated C array of names, freed by free.
func cstrings(names []string) (**C.char, func()) {
	arr := (**C.char)(C.calloc(C.size_t(len(names)+1), C.size_t(unsafe.Sizeof((*C.char)(nil)))))
	sl := unsafe.Slice(arr, len(names)+1)
	for i, n := range names {
		sl[i] = C.CString(n)
	}
	return arr, func() {
		for _, p := range sl[:len(names)] {
			C.free(unsafe.Pointer(p))
		}
		C.free(unsafe.Pointer(arr))
	}
}

// LstatList stats names in dir (one round trip for all of them).
func (h *Handle) LstatList(dir string, names []string) ([]Stat, error) {
	d := C.CString(dir)
	defer C.free(unsafe.Pointer(d))
	arr, free := cstrings(names)
	defer free()
	var out []Stat
	err := h.with(func(g *C.guestfs_h) error {
		var e *C.char
		l := C.gfs_lstatnslist(g, d, arr, &e)
		if l == nil {
			return takeErr("lstatnslist "+strconv.Quote(dir), e)
		}
		defer C.guestfs_free_statns_list(l)
		if int(l.len) != len(names) {
			return &Error{Op: "lstatnslist " + dir, Msg: fmt.Sprintf("%d results for %d names", l.len, len(names))}
		}
		out = make([]Stat, len(names))
		for i := range out {
			out[i] = statOf(C.statns_at(l, C.int(i)))
		}
		return nil
	})
	return out, err
}

// ReadlinkList returns the targets of symlinks in dir ("" where a name is
// not one).
func (h *Handle) ReadlinkList(dir string, names []string) ([]string, error) {
	d := C.CString(dir)
	defer C.free(unsafe.Pointer(d))
	arr, free := cstrings(names)
	defer free()
	l, err := h.strList("readlinklist "+strconv.Quote(dir), func(g *C.guestfs_h, e **C.char) **C.char { return C.gfs_readlinklist(g, d, arr, e) })
	if err == nil && len(l) != len(names) {
		err = &Error{Op: "readlinklist " + dir, Msg: fmt.Sprintf("%d results for %d names", len(l), len(names))}
	}
	return l, err
}

// Checksum is a file's checksum (kind: md5, sha256…) in hex.
func (h *Handle) Checksum(kind, path string) (string, error) {
	k := C.CString(kind)
	p := C.CString(path)
	defer C.free(unsafe.Pointer(k))
	defer C.free(unsafe.Pointer(p))
	return h.str("checksum "+strconv.Quote(path), func(g *C.guestfs_h, e **C.char) *C.char { return C.gfs_checksum(g, k, p, e) })
}

// TarOut writes the tree beneath the guest directory dir to the local
// file (a /dev/fd/N pipe, say) as a tar stream made by GNU tar in the
// appliance: numeric owners, and xattrs, which make it POSIX (PAX) format
// with nanosecond times. Names are "./" and "./a/b", relative to dir.
func (h *Handle) TarOut(dir, local string) error {
	d := C.CString(dir)
	l := C.CString(local)
	defer C.free(unsafe.Pointer(d))
	defer C.free(unsafe.Pointer(l))
	return h.call("tar-out "+strconv.Quote(dir), func(e **C.char) C.int { return C.gfs_tar_out(h.g, d, l, e) })
}

// MaxPread is the most one Pread returns (libguestfs's messages are
// bounded at 4 MiB).
const MaxPread = 2 << 20

// Pread reads up to len(buf) (at most MaxPread) bytes of the guest file
// at off into buf, in one round trip; it returns the count (0 at the end).
func (h *Handle) Pread(path string, buf []byte, off int64) (int, error) {
	p := C.CString(path)
	defer C.free(unsafe.Pointer(p))
	var n int
	err := h.with(func(g *C.guestfs_h) error {
		var e *C.char
		var sz C.size_t
		r := C.gfs_pread(g, p, C.int(min(len(buf), MaxPread)), C.int64_t(off), &sz, &e)
		if r == nil {
			return takeErr("pread "+strconv.Quote(path), e)
		}
		defer C.free(unsafe.Pointer(r))
		n = copy(buf, unsafe.Slice((*byte)(unsafe.Pointer(r)), int(sz)))
		return nil
	})
	return n, err
}

// BtrfsSubvolumes lists the subvolumes of the btrfs filesystem on dev
// (their paths, relative to its top).
func (h *Handle) BtrfsSubvolumes(dev string) ([]string, error) {
	d := C.CString(dev)
	defer C.free(unsafe.Pointer(d))
	var out []string
	err := h.with(func(g *C.guestfs_h) error {
		var e *C.char
		l := C.gfs_btrfs_subvols(g, d, &e)
		if l == nil {
			return takeErr("btrfs_subvolume_list "+strconv.Quote(dev), e)
		}
		defer C.guestfs_free_btrfssubvolume_list(l)
		for i := 0; i < int(l.len); i++ {
			out = append(out, C.GoString(C.subvol_path(l, C.int(i))))
		}
		return nil
	})
	return out, err
}
