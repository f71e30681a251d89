# nbdmover: see README.md. Everything here runs as root on Debian 12.
GO ?= go
export PATH := $(PATH):/usr/local/go/bin

.PHONY: all build install test demo bench bench-export bench-instant bench-files bench-large bench-chunksize fuzz clean

all: build

build:
	$(GO) build -ldflags "-X main.buildCommit=$$(git rev-parse --short HEAD 2>/dev/null || echo unknown)" -o bin/nbdmover ./cmd/nbdmover

# The binary, the systemd units and timers (docs/examples), the docs they
# point at, and an environment file to edit (kept if there is one).
# DESTDIR stages it elsewhere (packaging).
install: build
	install -D -m 0755 bin/nbdmover $(DESTDIR)/usr/local/bin/nbdmover
	install -d -m 0755 $(DESTDIR)/etc/systemd/system $(DESTDIR)/usr/share/doc/nbdmover
	install -m 0644 docs/examples/*.service docs/examples/*.timer $(DESTDIR)/etc/systemd/system/
	install -m 0644 README.md docs/*.md docs/examples/nbdmover-alerts.yml $(DESTDIR)/usr/share/doc/nbdmover/
	install -d -m 0700 $(DESTDIR)/etc/nbdmover
	[ -e $(DESTDIR)/etc/nbdmover/nbdmover.env ] || install -m 0600 docs/examples/nbdmover.env $(DESTDIR)/etc/nbdmover/nbdmover.env

# Installs what is missing, starts libvirtd and MinIO, runs every test.
test:
	scripts/test.sh

# The main job on the embedded default (a local repository).
demo:
	scripts/demo.sh

# nbdmover next to nbdcopy and virtnbdbackup (bench/run.sh; docs/performance.md).
bench:
	bench/run.sh

# The NBD export next to restore and qemu-nbd; its first byte, scale and
# random reads (bench/export.sh; docs/performance.md).
bench-export:
	bench/export.sh

# File-level restore: the first listing of a 100 GiB disk's backup (local,
# S3 at 50 ms RTT), later listings, files get against restore, peak RSS
# over 100,000 files (bench/files.sh; docs/performance.md).
bench-files:
	bench/files.sh

# Instant restore next to restore: time to a running domain, the copy home
# while the guest works, a resumed copy (bench/instant.sh; docs/performance.md).
bench-instant:
	bench/instant.sh

# Memory and metadata on a 16 TiB sparse and a 64 GiB allocated disk.
bench-large:
	bench/large.sh

# Issue 29's baseline alternative: 1 MiB against 256 KiB chunks for a full,
# a scattered incremental and a restore (bench/chunksize.sh).
bench-chunksize:
	bench/chunksize.sh

# A short run of every fuzz target.
fuzz:
	scripts/fuzz.sh

clean:
	rm -rf bin bench/out
