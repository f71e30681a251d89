#!/usr/bin/env bash
# make fuzz: run every fuzz target for FUZZTIME (default 20s) each.
. "$(dirname "$0")/lib.sh"
cd "$(dirname "$0")/.."
t=${FUZZTIME:-20s}
for target in nbdclient:FuzzMergeWindow chunker:FuzzDecode repo/index:FuzzUnmarshalIndexPart repo:FuzzUnmarshalManifest pipeline:FuzzPlan \
	repo:FuzzConfig repo:FuzzKeyObject repo/lock:FuzzLock repo:FuzzCatalog repo:FuzzDamageRecord repo:FuzzVerifiedState repo:FuzzV1Manifest repo:FuzzV1Index \
	nbdserver:FuzzParsers nbdserver:FuzzConnection; do
	pkg=${target%%:*} fn=${target#*:}
	say "fuzzing $fn ($pkg) for $t"
	go test -run '^$' -fuzz "^$fn\$" -fuzztime "$t" "./$pkg"
done
