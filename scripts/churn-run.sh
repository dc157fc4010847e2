#!/usr/bin/env bash
# The long churn run (tests/it/robustness.rs `churn_many`): for
# LOCKJAM_CHURN_SECONDS (default 600) a database is created every few
# seconds, a lock wait is staged in it for `lockjam run` (a release build)
# to see, and it is dropped once 75 s old. Prints, each minute, lockjam's
# RSS, series, wait-histogram series, databases on /metrics and sessions;
# docs/reliability.md quotes a run. PostgreSQL major as the argument
# (default 16; server binaries from scripts/pg-versions.sh).
#
#   scripts/churn-run.sh        # PostgreSQL 16, 10 minutes
#   LOCKJAM_CHURN_SECONDS=120 scripts/churn-run.sh 18
set -euo pipefail
cd "$(dirname "$0")/.."
major=${1:-16}
bindir=$(scripts/pg-versions.sh "$major" | awk -v m="$major" '$1 == m { print $2 }')
echo "== churn run on PostgreSQL $major ($bindir), ${LOCKJAM_CHURN_SECONDS:-600} s"
LOCKJAM_PG_BINDIR="$bindir" cargo test --release --test it churn_many -- --ignored --nocapture 2>&1 \
  | grep -E '^churn: |^DROP DATABASE|^test result|panicked'
