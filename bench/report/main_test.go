package main

import (
	"encoding/json"
	"encoding/xml"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestMedian(t *testing.T) {
	for _, c := range []struct {
		in   []float64
		want float64
	}{
		{[]float64{3}, 3},
		{[]float64{5, 1, 3}, 3},
		{[]float64{4, 1, 3, 2}, 2.5},
	} {
		if got := median(c.in); got != c.want {
			t.Errorf("median(%v) = %v, want %v", c.in, got, c.want)
		}
	}
}

// TestReport feeds samples of three rounds through the whole report and
// checks the summary, the goals and the files.
func TestReport(t *testing.T) {
	dir := t.TempDir()
	var lines []string
	add := func(name string, round int, wall, qemu float64, rss, out int64) {
		b, _ := json.Marshal(sample{Name: name, Round: round, Wall: wall, CPU: wall / 2, QemuCPU: qemu, RSSKiB: rss, OutputBytes: out})
		lines = append(lines, string(b))
	}
	for round, f := range []float64{1, 1.1, 0.9} {
		add("nbdcopy-null", round+1, 4*f, 1, 40<<10, 0)
		add("nbdcopy-to-file", round+1, 6*f, 1, 40<<10, 4<<30)
		add("virtnbdbackup-full-z", round+1, 20*f, 4*f, 200<<10, 1000)
		add("nbdmover-full-null", round+1, 9*f, 2, 100<<10, 0)
		add("nbdmover-full-null-nocomp", round+1, 5*f, 2, 100<<10, 0)
		add("nbdmover-full-local", round+1, 10*f, 2*f, 120<<10, 900)
		add("nbdmover-full-minio", round+1, 10*f, 2, 120<<10, 0)
		add("nbdmover-full-minio-wan", round+1, 11*f, 2, 120<<10, 0)
		add("nbdmover-restore-minio", round+1, 8*f, 0, 120<<10, 4<<30)
		add("nbdmover-restore-minio-wan", round+1, 12*f, 0, 120<<10, 4<<30)
		add("nbdmover-restore-raw", round+1, 10*f, 0, 350<<10, 4<<30)
		add("nbdmover-inc-1pct", round+1, 0.4*f, 0.1, 90<<10, 900)
		add("nbdmover-inc-1pct-nosample", round+1, 0.38*f, 0.1, 90<<10, 900)
		add("nbdmover-inc-10pct", round+1, 2*f, 0.5, 90<<10, 900)
		add("virtnbdbackup-inc-10pct", round+1, 1.5*f, 0.5, 90<<10, 900)
		for _, s := range []sample{
			{Name: "nbdmover-inc-scatter-minio-wan", Wall: 2.4 * f, CPU: 1.2 * f, StoredBytes: 60e6, DirtyBytes: 52e6},
			{Name: "nbdmover-inc-aligned-minio-wan", Wall: 1.6 * f, CPU: 0.8 * f, StoredBytes: 50e6, DirtyBytes: 52e6},
		} {
			s.Round = round + 1
			b, _ := json.Marshal(s)
			lines = append(lines, string(b))
		}
	}
	in := filepath.Join(dir, "samples.jsonl")
	if err := os.WriteFile(in, []byte(strings.Join(lines, "\n")+"\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	stdout := os.Stdout
	devnull, _ := os.Open(os.DevNull)
	os.Stdout = devnull
	err := run(in, dir, 2e9, "test")
	os.Stdout = stdout
	if err != nil {
		t.Fatal(err)
	}

	var doc struct {
		Rows  []row  `json:"rows"`
		Goals []goal `json:"goals"`
	}
	b, err := os.ReadFile(filepath.Join(dir, "results.json"))
	if err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal(b, &doc); err != nil {
		t.Fatal(err)
	}
	local := doc.Rows[5]
	if local.Name != "nbdmover-full-local" || local.Rounds != 3 || local.Median != 10 || local.Min != 9 || local.Max != 11 ||
		local.QemuCPU != 2 || local.HostCPU() != 7 {
		t.Errorf("row %+v", local)
	}
	want := map[string]bool{ // what -> met
		"full backup to the local store (defaults), time vs virtnbdbackup -l full -z":         true,  // 0.5
		"full backup output size vs virtnbdbackup -z":                                         false, // 0.9
		"full backup to the local store vs the same to the null store":                        true,  // 1.11
		"full backup to null, no compression, time vs nbdcopy to null:":                       true,  // 1.25
		"host CPU (nbdmover + QEMU) of the default full vs virtnbdbackup -z's":                true,  // 7/14
		"10%-dirty incremental time vs virtnbdbackup -l inc":                                  false, // 1.33
		"1%-dirty incremental time vs the full":                                               true,  // 0.04
		"restore to raw: rate vs nbdcopy writing a file":                                      false, // 0.6
		"full backup to MinIO through a 50 ms, 1 Gbit/s link vs direct":                       true,  // 1.1
		"restore from MinIO through a 50 ms, 1 Gbit/s link vs direct":                         false, // 1.5
		"1%-dirty incremental with the bitmap check vs without":                               true,  // 1.05
		"peak RSS of any nbdmover command, MiB":                                               false, // 350
		"800 scattered 64 KiB writes: incremental to MinIO through the 50 ms link, wall s":    true,  // 2.4
		"the same, nbdmover CPU s":                                                            false, // 1.2 (met) and 0.8 (not): checked below
		"the same, bytes stored vs bytes the dirty bitmap marked":                             true,  // 1.15
		"50 MiB in 1 MiB-aligned writes: incremental to MinIO through the 50 ms link, wall s": false, // 1.6
	}
	cpuMet := map[string]bool{"nbdmover-inc-scatter-minio-wan": true, "nbdmover-inc-aligned-minio-wan": false}
	if len(doc.Goals) != len(want)+1 {
		t.Fatalf("%d goals, want %d: %+v", len(doc.Goals), len(want)+1, doc.Goals)
	}
	for _, g := range doc.Goals {
		if g.What == "the same, nbdmover CPU s" {
			if g.Met != cpuMet[g.From] {
				t.Errorf("CPU goal of %s: met=%v value=%v", g.From, g.Met, g.Value)
			}
			continue
		}
		if met, ok := want[g.What]; !ok || met != g.Met {
			t.Errorf("goal %q: met=%v value=%v, want met=%v", g.What, g.Met, g.Value, met)
		}
	}

	md, _ := os.ReadFile(filepath.Join(dir, "report.md"))
	if !strings.Contains(string(md), "| nbdmover-full-local | 10.00 | 9.00 | 11.00 | 200 |") {
		t.Errorf("report.md lacks the local row:\n%s", md)
	}
	svg, _ := os.ReadFile(filepath.Join(dir, "chart.svg"))
	dec := xml.NewDecoder(strings.NewReader(string(svg)))
	bars := 0
	for {
		tok, err := dec.Token()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatalf("chart.svg is not well-formed: %v", err)
		}
		if se, ok := tok.(xml.StartElement); ok && se.Name.Local == "rect" {
			bars++
		}
	}
	if bars != 1+17 { // background + one bar per row
		t.Errorf("chart has %d rects, want 18", bars)
	}
}
