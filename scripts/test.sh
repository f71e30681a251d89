#!/usr/bin/env bash
# The whole test suite against real peers: installs what is missing, starts
# libvirtd (if none answers) and a throwaway MinIO, runs the checks and the
# tests, and stops what it started, also on failure or interrupt.
# RACE=0 turns the race detector off; extra arguments go to `go test`.
. "$(dirname "$0")/lib.sh"
cd "$(dirname "$0")/.."

scripts/install-deps.sh
mkdir -p "$NBDMOVER_TEST_STATE"
started_libvirtd=$(scripts/libvirtd.sh)
cleanup() {
	scripts/minio.sh stop "$NBDMOVER_TEST_STATE"
	if [ "$started_libvirtd" = started ]; then
		pkill -x libvirtd || true
		pkill -x virtlogd || true
	fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM
scripts/minio.sh start "$NBDMOVER_TEST_STATE"
set -a
. "$NBDMOVER_TEST_STATE/minio.env"
set +a
export NBDMOVER_TEST_REQUIRE_PEERS=1 # a test whose peer is missing fails instead of skipping

unformatted=$(gofmt -l $(git ls-files '*.go' 2>/dev/null || find . -name '*.go'))
[ -z "$unformatted" ] || die "gofmt would change: $unformatted"
go vet ./...
race=()
[ "${RACE:-1}" = 0 ] || race=(-race)
go test "${race[@]}" -count=1 -timeout 30m "$@" ./...
