#!/usr/bin/env bash
# README's second command: installs PostgreSQL server binaries if missing,
# then runs every test (unit tests and the integration suite, which starts
# its own throwaway clusters).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-postgres.sh
exec cargo test --all-targets "$@"
