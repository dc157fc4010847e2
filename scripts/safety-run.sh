#!/usr/bin/env bash
# The long randomized safety run (tests/it/safety.rs): LOCKJAM_SAFETY_SCENARIOS
# scenarios (default 1000) from seed LOCKJAM_SAFETY_SEED (default 1000) on
# each PostgreSQL major given (default 13 and 18, server binaries from
# scripts/pg-versions.sh), one after the other. Prints, per version, the
# scenarios, signals, wrong signals, misses and checker reads;
# docs/reliability.md quotes a run. About 12 minutes per 1,000 scenarios.
#
#   scripts/safety-run.sh            # PostgreSQL 13 and 18
#   scripts/safety-run.sh 15         # just 15
set -euo pipefail
cd "$(dirname "$0")/.."
majors=("$@")
[ ${#majors[@]} -gt 0 ] || majors=(13 18)
versions=$(scripts/pg-versions.sh "${majors[@]}")
echo "$versions" | while read -r major bindir; do
  [ "$major" = pg_dump ] && continue
  echo "== safety run on PostgreSQL $major ($bindir): ${LOCKJAM_SAFETY_SCENARIOS:-1000} scenarios from seed ${LOCKJAM_SAFETY_SEED:-1000}"
  LOCKJAM_PG_BINDIR="$bindir" cargo test --test it safety_many -- --ignored --nocapture 2>&1 \
    | grep -E '^safety: |^- |^test result|panicked'
done
