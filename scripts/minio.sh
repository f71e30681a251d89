#!/usr/bin/env bash
# minio.sh build: build the pinned MinIO once into $NBDMOVER_CACHE/bin.
# minio.sh start DIR: start it on 127.0.0.1 with a fresh data directory and
#   write DIR/minio.env (endpoint and throwaway credentials for the tests).
# minio.sh stop DIR: stop the MinIO that "start DIR" started.
. "$(dirname "$0")/lib.sh"

MINIO_VERSION=v0.0.0-20260212201848-7aac2a2c5b7c
bin="$NBDMOVER_CACHE/minio-$MINIO_VERSION/minio"

build() {
	[ -x "$bin" ] && return 0
	say "building MinIO $MINIO_VERSION into $NBDMOVER_CACHE (once; a few minutes)"
	local tmp
	tmp=$(mktemp -d)
	(cd "$tmp" && GOBIN="$tmp/bin" GOFLAGS=-mod=mod go install "github.com/minio/minio@$MINIO_VERSION") >"$tmp/build.log" 2>&1 ||
		{ cat "$tmp/build.log" >&2; die "MinIO build failed"; }
	mkdir -p "$(dirname "$bin")"
	mv "$tmp/bin/minio" "$bin"
	rm -rf "$tmp"
}

# free_port: a loopback port nobody listens on, from a random start.
free_port() {
	local p
	for ((p = 20000 + RANDOM % 20000; p < 65000; p++)); do
		(exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null || { echo "$p"; return; }
	done
	die "no free port"
}

start() {
	local dir=$1
	build
	mkdir -p "$dir"
	local port user pass
	port=$(free_port)
	user="test-$(head -c6 /dev/urandom | od -An -tx1 | tr -d ' \n')"
	pass="$(head -c24 /dev/urandom | od -An -tx1 | tr -d ' \n')"
	rm -rf "$dir/minio-data"
	mkdir -p "$dir/minio-data"
	MINIO_ROOT_USER=$user MINIO_ROOT_PASSWORD=$pass MINIO_BROWSER=off \
		setsid "$bin" server "$dir/minio-data" --quiet --address "127.0.0.1:$port" \
		--console-address "127.0.0.1:$(free_port)" >"$dir/minio.log" 2>&1 &
	echo $! >"$dir/minio.pid"
	wait_for 60 MinIO curl -sf "http://127.0.0.1:$port/minio/health/live"
	cat >"$dir/minio.env" <<EOT
NBDMOVER_TEST_S3_ENDPOINT=http://127.0.0.1:$port
AWS_ACCESS_KEY_ID=$user
AWS_SECRET_ACCESS_KEY=$pass
AWS_REGION=us-east-1
EOT
	chmod 600 "$dir/minio.env"
}

stop() {
	local dir=$1
	[ -f "$dir/minio.pid" ] || return 0
	kill "$(cat "$dir/minio.pid")" 2>/dev/null || true
	rm -rf "$dir/minio.pid" "$dir/minio-data" "$dir/minio.env"
}

case "${1:-}" in
build) build ;;
start) start "${2:?usage: minio.sh start DIR}" ;;
stop) stop "${2:?usage: minio.sh stop DIR}" ;;
*) die "usage: minio.sh build|start DIR|stop DIR" ;;
esac
