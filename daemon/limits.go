package daemon

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"time"

	"github.com/nbdmover/nbdmover/sink"
	"golang.org/x/sys/unix"
)

// limiter applies the limit timetable to the rates every job shares:
// each second it computes the limits of the moment (the flags' limits,
// changed by the schedule's rules and the schedule file's) and sets the
// rates that differ. The file is read again when it changes (readFile).
type limiter struct {
	base     sink.Limits
	schedule sink.Schedule
	file     string
	rates    [3]*sink.Rate // upload, download, read: never nil
	log      *slog.Logger
	now      func() time.Time

	fileRules sink.Schedule
	fileStamp string // the file's mtime and size when last read
}

// maxScheduleFile bounds a schedule file: a timetable is a few lines.
const maxScheduleFile = 64 << 10

// newLimiter makes the rates variable (a rate the flags did not set
// becomes one with no limit, that the timetable can set) and returns the
// limiter, or nil when there is no timetable. It reads the file once: an
// unreadable or bad one stops the daemon at start.
func newLimiter(o *ServeOptions) (*limiter, error) {
	if len(o.LimitSchedule) == 0 && o.LimitScheduleFile == "" {
		return nil, nil
	}
	read, _ := o.Runner.Backup.Tuning.ReadRate.(*sink.Rate)
	if o.Runner.Backup.Tuning.ReadRate != nil && read == nil {
		return nil, refuse(ErrInvalid, "a limit schedule needs the read limit to be a rate")
	}
	l := &limiter{schedule: o.LimitSchedule, file: o.LimitScheduleFile, log: o.Log, now: time.Now,
		base: sink.Limits{Upload: o.Runner.Backup.Repo.Upload.BytesPerSecond(),
			Download: o.Runner.Backup.Repo.Download.BytesPerSecond(), Read: read.BytesPerSecond()}}
	for i, r := range []**sink.Rate{&o.Runner.Backup.Repo.Upload, &o.Runner.Backup.Repo.Download, &read} {
		if *r == nil {
			*r = sink.NewVariableRate(0)
		}
		l.rates[i] = *r
	}
	o.Runner.Backup.Tuning.ReadRate = read
	if l.file != "" {
		if _, err := os.Stat(l.file); err != nil {
			return nil, refuse(ErrInvalid, "--limit-schedule-file: %v", err)
		}
		if _, err := l.readFile(); err != nil {
			return nil, refuse(ErrInvalid, "--limit-schedule-file: %v", err)
		}
	}
	l.apply()
	return l, nil
}

// run applies the timetable every second until ctx ends.
func (l *limiter) run(ctx context.Context) {
	t := time.NewTicker(time.Second)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			if l.file != "" {
				if changed, err := l.readFile(); err != nil {
					l.log.Error("the limit schedule file cannot be used; the rules read before stay", "file", l.file, "error", err)
				} else if changed {
					l.log.Info("limit schedule file read", "file", l.file, "rules", len(l.fileRules))
				}
			}
			l.apply()
		}
	}
}

// readFile reads the schedule file if it changed since the last read (by
// its inode, size and times). A file that is gone holds no rules; one
// that cannot be read or parsed is an error, reported once per change,
// and keeps the rules read before. It is opened without blocking and read
// only when it is a regular file (a FIFO put in its place would otherwise
// hang the daemon), at most maxScheduleFile bytes.
func (l *limiter) readFile() (bool, error) {
	fd, err := unix.Open(l.file, unix.O_RDONLY|unix.O_NONBLOCK|unix.O_NOCTTY|unix.O_CLOEXEC, 0)
	if errors.Is(err, unix.ENOENT) {
		if l.fileStamp == "gone" {
			return false, nil
		}
		had := l.fileStamp != ""
		l.fileStamp, l.fileRules = "gone", nil
		if had {
			l.log.Warn("the limit schedule file is gone: its rules no longer hold", "file", l.file)
		}
		return had, nil
	}
	if err != nil {
		return l.failed("open: " + err.Error())
	}
	f := os.NewFile(uintptr(fd), l.file)
	defer f.Close()
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return l.failed("stat: " + err.Error())
	}
	stamp := fmt.Sprintf("%d %d %d %d.%d %d.%d", st.Dev, st.Ino, st.Size, st.Mtim.Sec, st.Mtim.Nsec, st.Ctim.Sec, st.Ctim.Nsec)
	if stamp == l.fileStamp {
		return false, nil
	}
	l.fileStamp = stamp
	if st.Mode&unix.S_IFMT != unix.S_IFREG {
		return false, fmt.Errorf("%s is not a regular file", l.file)
	}
	b, err := io.ReadAll(io.LimitReader(f, maxScheduleFile+1))
	if err != nil {
		return false, err
	}
	if len(b) > maxScheduleFile {
		return false, fmt.Errorf("%s is larger than %d bytes", l.file, maxScheduleFile)
	}
	rules, err := sink.ParseSchedule(string(b))
	if err != nil {
		return false, fmt.Errorf("%s: %w", l.file, err)
	}
	l.fileRules = rules
	return true, nil
}

// failed reports an error once until it changes (the file is looked at
// every second).
func (l *limiter) failed(msg string) (bool, error) {
	if l.fileStamp == "error: "+msg {
		return false, nil
	}
	l.fileStamp = "error: " + msg
	return false, fmt.Errorf("%s: %s", l.file, msg)
}

// apply sets the rates to the limits of now.
func (l *limiter) apply() {
	want := append(l.schedule[:len(l.schedule):len(l.schedule)], l.fileRules...).At(l.now(), l.base)
	changed := false
	for i, v := range []int64{want.Upload, want.Download, want.Read} {
		if l.rates[i].BytesPerSecond() != min(v, sink.MaxRate) {
			l.rates[i].Set(v)
			changed = true
		}
	}
	if changed {
		l.log.Info("limits now", "upload", want.Upload, "download", want.Download, "read", want.Read)
	}
}
