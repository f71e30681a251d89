package sink

import (
	"bufio"
	"fmt"
	"strconv"
	"strings"
	"time"

	"github.com/nbdmover/nbdmover/internal/units"
)

// Limits are bytes per second for what is stored (Upload), read from the
// repository (Download) and read from the VMs' disks (Read); 0 is none.
type Limits struct {
	Upload   int64 `json:"upload"`
	Download int64 `json:"download"`
	Read     int64 `json:"read"`
}

// Schedule is a weekly timetable of limits: each rule sets some limits on
// some days between two times of day (the host's local time). Outside
// every rule the base limits hold; where rules overlap, the last one
// that sets a limit wins for that limit.
type Schedule []ScheduleRule

// ScheduleRule is one line of a schedule: "mon-fri 08:00-18:00
// upload=20MiB read=off".
type ScheduleRule struct {
	Text     string
	days     [7]bool       // by time.Weekday: the days a window starts
	from, to time.Duration // since midnight; to <= from: the window ends the next day
	set      map[string]int64
}

var weekdays = map[string]time.Weekday{"sun": time.Sunday, "mon": time.Monday, "tue": time.Tuesday,
	"wed": time.Wednesday, "thu": time.Thursday, "fri": time.Friday, "sat": time.Saturday}

// ParseScheduleRule parses "DAYS FROM-TO KEY=SIZE...": DAYS like mon-fri,
// sat,sun or daily; FROM and TO as HH:MM or HH:MM:SS (TO up to 24:00; a
// TO at or before FROM ends the next day); KEY upload, download or read,
// SIZE a size per second (20MiB) or off.
func ParseScheduleRule(s string) (ScheduleRule, error) {
	r := ScheduleRule{Text: strings.Join(strings.Fields(s), " "), set: map[string]int64{}}
	f := strings.Fields(s)
	bad := func(format string, a ...any) (ScheduleRule, error) {
		return ScheduleRule{}, fmt.Errorf("limit schedule %q: %s (want e.g. \"mon-fri 08:00-18:00 upload=20MiB read=50MiB\")", r.Text, fmt.Sprintf(format, a...))
	}
	if len(f) < 3 {
		return bad("want days, a time range and at least one limit")
	}
	if err := r.parseDays(f[0]); err != nil {
		return bad("%v", err)
	}
	from, to, ok := strings.Cut(f[1], "-")
	var err1, err2 error
	r.from, err1 = timeOfDay(from)
	r.to, err2 = timeOfDay(to)
	if !ok || err1 != nil || err2 != nil || r.from >= 24*time.Hour {
		return bad("time range %q: want HH:MM-HH:MM (or HH:MM:SS), from 00:00 to 24:00", f[1])
	}
	for _, kv := range f[2:] {
		k, v, _ := strings.Cut(kv, "=")
		if k != "upload" && k != "download" && k != "read" {
			return bad("%q: want upload=, download= or read=", kv)
		}
		if _, dup := r.set[k]; dup {
			return bad("%s is set twice", k)
		}
		if v == "off" {
			r.set[k] = 0
			continue
		}
		n, err := units.ParseSize(v)
		if err != nil || n < 64<<10 || n > MaxRate {
			return bad("%s=%q: a size per second from 64KiB to 1TiB, like 20MiB, or off", k, v)
		}
		r.set[k] = n
	}
	return r, nil
}

func (r *ScheduleRule) parseDays(s string) error {
	if s == "daily" || s == "*" {
		r.days = [7]bool{true, true, true, true, true, true, true}
		return nil
	}
	for part := range strings.SplitSeq(s, ",") {
		a, b, isRange := strings.Cut(part, "-")
		first, ok1 := weekdays[a]
		last, ok2 := weekdays[b]
		if !isRange {
			last, ok2 = first, ok1
		}
		if !ok1 || !ok2 {
			return fmt.Errorf("days %q: want mon, tue, wed, thu, fri, sat, sun, ranges like mon-fri, lists like sat,sun, or daily", s)
		}
		for d := first; ; d = (d + 1) % 7 {
			r.days[d] = true
			if d == last {
				break
			}
		}
	}
	return nil
}

func timeOfDay(s string) (time.Duration, error) {
	p := strings.Split(s, ":")
	if len(p) < 2 || len(p) > 3 {
		return 0, fmt.Errorf("bad time")
	}
	var v [3]int
	for i, x := range p {
		n, err := strconv.Atoi(x)
		if err != nil || n < 0 || len(x) != 2 || (i > 0 && n > 59) {
			return 0, fmt.Errorf("bad time")
		}
		v[i] = n
	}
	d := time.Duration(v[0])*time.Hour + time.Duration(v[1])*time.Minute + time.Duration(v[2])*time.Second
	if d > 24*time.Hour {
		return 0, fmt.Errorf("bad time")
	}
	return d, nil
}

// ParseSchedule parses a schedule file: one rule a line; blank lines and
// lines starting with # are skipped. An error names the line.
func ParseSchedule(text string) (Schedule, error) {
	var s Schedule
	sc := bufio.NewScanner(strings.NewReader(text))
	for n := 1; sc.Scan(); n++ {
		line := strings.TrimSpace(sc.Text())
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		r, err := ParseScheduleRule(line)
		if err != nil {
			return nil, fmt.Errorf("line %d: %w", n, err)
		}
		s = append(s, r)
	}
	return s, sc.Err()
}

// active reports whether the rule's window holds at t.
func (r ScheduleRule) active(t time.Time) bool {
	since := time.Duration(t.Hour())*time.Hour + time.Duration(t.Minute())*time.Minute + time.Duration(t.Second())*time.Second
	today, yesterday := t.Weekday(), (t.Weekday()+6)%7
	if r.to > r.from { // within one day
		return r.days[today] && since >= r.from && since < r.to
	}
	// over midnight: the evening of a listed day, or the morning after one
	return r.days[today] && since >= r.from || r.days[yesterday] && since < r.to
}

// At is the limits at t: base, changed by the rules active then.
func (s Schedule) At(t time.Time, base Limits) Limits {
	l := base
	for _, r := range s {
		if !r.active(t) {
			continue
		}
		for k, v := range r.set {
			switch k {
			case "upload":
				l.Upload = v
			case "download":
				l.Download = v
			case "read":
				l.Read = v
			}
		}
	}
	return l
}
