#!/usr/bin/env bash
# Installs PostgreSQL server binaries (initdb, pg_ctl, postgres) when none
# are found where lockjam looks for them: LOCKJAM_PG_BINDIR, PATH,
# `pg_config --bindir`, /usr/lib/postgresql/*/bin. Debian and Ubuntu only;
# elsewhere it says what to install. Idempotent.
set -euo pipefail

has_server() {
  local dir
  for dir in "${LOCKJAM_PG_BINDIR:-}" $(echo "${PATH}" | tr ':' ' ') \
             "$(pg_config --bindir 2>/dev/null || true)" /usr/lib/postgresql/*/bin; do
    [ -n "$dir" ] && [ -x "$dir/initdb" ] && [ -x "$dir/pg_ctl" ] && [ -x "$dir/postgres" ] && return 0
  done
  return 1
}

if has_server; then
  exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
  echo "PostgreSQL server binaries not found and this is not a Debian/Ubuntu machine:" >&2
  echo "install your distribution's PostgreSQL server package, or set LOCKJAM_PG_BINDIR" >&2
  exit 1
fi

sudo=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then
    sudo="sudo"
  else
    echo "PostgreSQL server binaries not found; run as root: apt-get install postgresql" >&2
    exit 1
  fi
fi

echo "installing PostgreSQL server binaries (apt-get install postgresql)" >&2
export DEBIAN_FRONTEND=noninteractive
# The package would start a system cluster of its own; lockjam's clusters
# are throwaway ones, so keep the service from starting where possible.
if [ ! -e /usr/sbin/policy-rc.d ]; then
  printf '#!/bin/sh\nexit 101\n' | $sudo tee /usr/sbin/policy-rc.d >/dev/null
  $sudo chmod +x /usr/sbin/policy-rc.d
  trap '$sudo rm -f /usr/sbin/policy-rc.d' EXIT
fi
$sudo apt-get update -qq
$sudo apt-get install -y -qq --no-install-recommends postgresql postgresql-client >/dev/null
has_server || { echo "installed postgresql, but its server binaries are still not found" >&2; exit 1; }
