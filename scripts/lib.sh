# Shared by the scripts: paths and small helpers. Source it; do not run it.
set -euo pipefail

export PATH="$PATH:/usr/local/go/bin:/usr/sbin:/sbin"
# Slow-to-build things (the MinIO binary) live here between runs.
NBDMOVER_CACHE="${NBDMOVER_CACHE:-/var/cache/nbdmover}"
# State of the services the test run started (pids, addresses, credentials).
NBDMOVER_TEST_STATE="${NBDMOVER_TEST_STATE:-/run/nbdmover-test}"

say() { printf '%s\n' "$*" >&2; }
die() { say "error: $*"; exit 1; }

# wait_for SECONDS DESCRIPTION COMMAND...: retry COMMAND until it succeeds.
wait_for() {
	local secs=$1 what=$2
	shift 2
	local i
	for ((i = 0; i < secs * 10; i++)); do
		"$@" >/dev/null 2>&1 && return 0
		sleep 0.1
	done
	die "$what did not come up within ${secs}s"
}
