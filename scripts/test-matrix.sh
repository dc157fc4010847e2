#!/usr/bin/env bash
# Runs the integration suite against every PostgreSQL major of the matrix
# (13 to 18, server binaries from scripts/pg-versions.sh), one after the
# other. `scripts/test-matrix.sh 13 18` runs just those.
set -euo pipefail
cd "$(dirname "$0")/.."
versions=$(scripts/pg-versions.sh "$@")
pg_dump=$(echo "$versions" | awk '$1 == "pg_dump" { print $2 }')
echo "$versions" | while read -r major bindir; do
  [ "$major" = pg_dump ] && continue
  echo "== integration suite on PostgreSQL $major ($bindir)"
  LOCKJAM_PG_BINDIR="$bindir" LOCKJAM_PG_DUMP="$pg_dump" cargo test --test it
done
