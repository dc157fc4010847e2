#!/usr/bin/env bash
# README's second command: installs PostgreSQL, pgbench and wrk (for the
# benchmark), Prometheus, promtool and amtool (for the monitoring tests) if
# missing, then runs every test: the benchmark's smoke mode (about a
# minute, so that it cannot rot), then unit tests and the integration
# suite, which starts its own throwaway clusters and Prometheus.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh --test-tools
cargo test --benches "$@"
exec cargo test --lib --bins --tests "$@"
