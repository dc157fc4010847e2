#!/usr/bin/env bash
# README's second command: installs PostgreSQL server binaries if missing,
# then runs every test: the benchmark's smoke mode (seconds, so that it
# cannot rot), then unit tests and the integration suite, which starts its
# own throwaway clusters.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-postgres.sh
cargo test --benches "$@"
exec cargo test --lib --bins --tests "$@"
