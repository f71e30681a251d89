# nbdmover: see README.md. Everything here runs as root on Debian 12.
GO ?= go
export PATH := $(PATH):/usr/local/go/bin

.PHONY: all build test demo bench bench-large fuzz clean

all: build

build:
	$(GO) build -ldflags "-X main.buildCommit=$$(git rev-parse --short HEAD 2>/dev/null || echo unknown)" -o bin/nbdmover ./cmd/nbdmover

# Installs what is missing, starts libvirtd and MinIO, runs every test.
test:
	scripts/test.sh

# The main job on the embedded default (a local repository).
demo:
	scripts/demo.sh

# nbdmover next to nbdcopy and virtnbdbackup (bench/run.sh; docs/performance.md).
bench:
	bench/run.sh

# Memory and metadata on a 16 TiB sparse and a 64 GiB allocated disk.
bench-large:
	bench/large.sh

# A short run of every fuzz target.
fuzz:
	scripts/fuzz.sh

clean:
	rm -rf bin bench/out
