#!/usr/bin/env bash
# README's first command: installs PostgreSQL server binaries if missing,
# then runs `lockjam demo` (incident 000 on a throwaway local cluster).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
exec cargo run --release --quiet -- demo "$@"
