package sink_test

import (
	"strings"
	"testing"
	"time"

	"github.com/nbdmover/nbdmover/sink"
)

func TestScheduleRules(t *testing.T) {
	for _, bad := range []string{"", "mon-fri", "mon-fri 08:00-18:00", "monday 08:00-18:00 upload=1MiB",
		"mon-fri 8:00-18:00 upload=1MiB", "mon-fri 08:00-25:00 upload=1MiB", "mon-fri 08:00 upload=1MiB",
		"mon-fri 24:00-02:00 upload=1MiB", "mon-fri 08:00-18:00 upload=1KiB", "mon-fri 08:00-18:00 speed=1MiB",
		"mon-fri 08:00-18:00 upload=1MiB upload=2MiB", "mon-fri 08:60-18:00 upload=1MiB", "x-fri 08:00-18:00 read=off",
		"mon-fri 08:00-18:00 upload=-5MiB", "mon-fri 08:00-18:00 upload=99999999999999999GiB"} {
		if _, err := sink.ParseScheduleRule(bad); err == nil {
			t.Errorf("%q accepted", bad)
		} else if !strings.Contains(err.Error(), "want") {
			t.Errorf("%q: %v: the error must say what is wanted", bad, err)
		}
	}
	s, err := sink.ParseSchedule(`# office hours
mon-fri 08:00-18:00 upload=20MiB read=50MiB

sat,sun 00:00-24:00 upload=off
fri 17:00-18:00 upload=1MiB
daily 22:00-06:00 download=5MiB
wed-mon 12:00:30-12:00:40 read=off
`)
	if err != nil || len(s) != 5 {
		t.Fatalf("%d rules, %v", len(s), err)
	}
	if _, err := sink.ParseSchedule("daily 00:00-01:00 upload=1MiB\nnonsense\n"); err == nil || !strings.Contains(err.Error(), "line 2") {
		t.Fatalf("a bad line: %v", err)
	}
	base := sink.Limits{Upload: 100 << 20, Download: 0, Read: 200 << 20}
	at := func(day, clock string) time.Time { // 2026-12-07 is a Monday
		d, _ := time.ParseInLocation("2006-01-02 15:04:05", "2026-12-"+day+" "+clock, time.Local)
		return d
	}
	for _, tt := range []struct {
		t    time.Time
		want sink.Limits
	}{
		{at("07", "07:59:59"), base},
		{at("07", "08:00:00"), sink.Limits{Upload: 20 << 20, Read: 50 << 20}},
		{at("07", "17:59:59"), sink.Limits{Upload: 20 << 20, Read: 50 << 20}},
		{at("07", "18:00:00"), base},
		{at("11", "17:30:00"), sink.Limits{Upload: 1 << 20, Read: 50 << 20}}, // the later rule wins
		{at("12", "10:00:00"), sink.Limits{Upload: 0, Read: 200 << 20}},      // Saturday: off
		{at("07", "23:00:00"), sink.Limits{Upload: 100 << 20, Download: 5 << 20, Read: 200 << 20}},
		{at("08", "05:59:59"), sink.Limits{Upload: 100 << 20, Download: 5 << 20, Read: 200 << 20}}, // the morning after
		{at("08", "06:00:00"), base},
		{at("09", "12:00:35"), sink.Limits{Upload: 20 << 20, Read: 0}},        // seconds; wed-mon wraps the week
		{at("08", "12:00:35"), sink.Limits{Upload: 20 << 20, Read: 50 << 20}}, // Tuesday is not in wed-mon
	} {
		if got := s.At(tt.t, base); got != tt.want {
			t.Errorf("%s: %+v, want %+v", tt.t.Format("Mon 15:04:05"), got, tt.want)
		}
	}
}

// A variable rate changes speed while used, and lets everything go when
// set to none.
func TestRateSet(t *testing.T) {
	r := sink.NewVariableRate(0)
	start := time.Now()
	for range 10 {
		r.Wait(t.Context(), 10<<20)
	}
	if time.Since(start) > time.Second || r.BytesPerSecond() != 0 {
		t.Fatalf("no limit took %v", time.Since(start))
	}
	r.Set(4 << 20)
	start = time.Now()
	for range 4 {
		r.Wait(t.Context(), 1<<20)
	}
	if took := time.Since(start); took < 900*time.Millisecond || r.BytesPerSecond() != 4<<20 {
		t.Fatalf("4 MiB at 4 MiB/s took %v", took)
	}
}

// A change of rate holds at once for the transfers already waiting: eight
// 1 MiB slots taken at 1 MiB/s (8 s of the line) all go soon after the
// limit is lifted, and at 64 MiB/s the next ones hardly wait.
func TestRateSetReleasesWaiters(t *testing.T) {
	r := sink.NewVariableRate(1 << 20)
	start := time.Now()
	done := make(chan time.Duration, 8)
	for range 8 {
		go func() { r.Wait(t.Context(), 1<<20); done <- time.Since(start) }()
	}
	time.Sleep(300 * time.Millisecond)
	r.Set(0)
	for range 8 {
		if took := <-done; took > 3*time.Second {
			t.Fatalf("a waiter went after %v: the lifted limit did not hold at once", took)
		}
	}
	r.Set(1 << 10)
	slow := time.Now()
	go func() { r.Wait(t.Context(), 1<<20); done <- time.Since(slow) }() // 1024 s at 1 KiB/s
	time.Sleep(100 * time.Millisecond)
	r.Set(64 << 20)
	if took := <-done; took > 3*time.Second {
		t.Fatalf("a waiter at 1 KiB/s went %v after the rate rose to 64 MiB/s", took)
	}
}
