#!/usr/bin/env bash
# README's second command: installs PostgreSQL (and pgbench and wrk, for
# the benchmark) if missing, then runs every test: the benchmark's smoke
# mode (about a minute, so that it cannot rot), then unit tests and the
# integration suite, which starts its own throwaway clusters.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-postgres.sh --bench-tools
cargo test --benches "$@"
exec cargo test --lib --bins --tests "$@"
