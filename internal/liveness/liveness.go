// Package liveness tells whether a process that recorded its identity
// (a repository lock's holder) provably no longer runs: what makes a lock
// of a crashed process stale at once on the machine it ran on.
package liveness

import (
	"errors"
	"io/fs"
	"os"
	"slices"
	"strconv"
	"strings"
)

// Identity is the boot id, pid namespace and start time of
// process pid, "BOOT/NS/START" ("" when it does not exist or /proc cannot
// tell).
func Identity(pid int) string {
	dir := "/proc/" + strconv.Itoa(pid)
	stat, err := os.ReadFile(dir + "/stat")
	if err != nil {
		return ""
	}
	// The command name (field 2) may hold spaces and parentheses: count
	// fields after its closing parenthesis; the start time is field 22.
	i := strings.LastIndexByte(string(stat), ')')
	fields := strings.Fields(string(stat[i+1:]))
	ns, _ := os.Readlink(dir + "/ns/pid")
	boot := bootID()
	if i < 0 || len(fields) < 20 || ns == "" || boot == "" {
		return ""
	}
	return boot + "/" + ns + "/" + fields[19]
}

func bootID() string {
	b, _ := os.ReadFile("/proc/sys/kernel/random/boot_id")
	return strings.TrimSpace(string(b))
}

// Gone reports whether the process of the given identity
// (Identity when it was recorded), pid, provably no longer
// runs: the machine booted since, or, in the same pid namespace, /proc has
// no such pid or it belongs to a process started at another time.
// Anything that cannot be told counts as running: an unknown identity,
// another pid namespace (a container), or a judge that is not root
// (/proc may hide other users' processes).
func Gone(pid int, identity string) bool {
	parts := strings.Split(identity, "/")
	if len(parts) != 3 || slices.Contains(parts, "") || os.Geteuid() != 0 {
		return false
	}
	if boot := bootID(); boot == "" || boot != parts[0] {
		return boot != "" // rebooted since (or cannot tell)
	}
	if ns, _ := os.Readlink("/proc/self/ns/pid"); ns != parts[1] {
		return false
	}
	if _, err := os.Stat("/proc/" + strconv.Itoa(pid)); errors.Is(err, fs.ErrNotExist) {
		return true
	}
	now := Identity(pid)
	return now != "" && now != identity // the pid was reused
}

// MachineID is /etc/machine-id ("" when there is none).
func MachineID() string {
	b, _ := os.ReadFile("/etc/machine-id")
	return strings.TrimSpace(string(b))
}
