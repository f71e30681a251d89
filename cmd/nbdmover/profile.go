package main

import (
	"errors"
	"os"
	"path/filepath"
	"runtime"
	"runtime/pprof"
	"runtime/trace"
)

// profiler writes pprof profiles of one run into a directory: cpu.prof and
// trace.out (an execution trace: go tool trace) for the whole run, and at
// the end allocs.prof, heap.prof, block.prof (where
// goroutines waited on channels and locks) and mutex.prof (contention).
type profiler struct {
	dir        string
	cpu, trace *os.File
}

// startProfiles creates dir (0700) and starts the CPU profile; block and
// mutex events are sampled from here on.
func startProfiles(dir string) (*profiler, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, err
	}
	f, err := os.Create(filepath.Join(dir, "cpu.prof"))
	if err != nil {
		return nil, err
	}
	if err := pprof.StartCPUProfile(f); err != nil {
		f.Close()
		return nil, err
	}
	t, err := os.Create(filepath.Join(dir, "trace.out"))
	if err == nil {
		if err = trace.Start(t); err != nil {
			t.Close()
		}
	}
	if err != nil {
		pprof.StopCPUProfile()
		f.Close()
		return nil, err
	}
	// One sample per 10 µs blocked and per 5 contention events: cheap
	// enough to leave the run's timing representative.
	runtime.SetBlockProfileRate(10_000)
	runtime.SetMutexProfileFraction(5)
	return &profiler{dir: dir, cpu: f, trace: t}, nil
}

// stop ends the CPU profile and writes the others.
func (p *profiler) stop() error {
	pprof.StopCPUProfile()
	trace.Stop()
	errs := []error{p.cpu.Close(), p.trace.Close()}
	for _, name := range []string{"allocs", "heap", "block", "mutex"} {
		f, err := os.Create(filepath.Join(p.dir, name+".prof"))
		if err != nil {
			errs = append(errs, err)
			continue
		}
		errs = append(errs, pprof.Lookup(name).WriteTo(f, 0), f.Close())
	}
	return errors.Join(errs...)
}
