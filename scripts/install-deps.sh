#!/usr/bin/env bash
# Installs what lockjam's demo and tests run, when it is missing.
# Always: PostgreSQL server binaries (initdb, pg_ctl, postgres), looked for
# where lockjam looks: LOCKJAM_PG_BINDIR, PATH, `pg_config --bindir`,
# /usr/lib/postgresql/*/bin. With --test-tools, also pgbench and wrk (the
# benchmark and its smoke mode in the tests), Prometheus with promtool and
# Alertmanager's amtool (the monitoring tests), psql (the role script's
# tests), curl (the HTTPS tests), postgres_exporter (the benchmark
# measures it beside lockjam) and Chromium with a font (the page's tests
# drive it headless). Debian and Ubuntu only;
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

packages=()
has_server || packages+=(postgresql postgresql-client)
if [ "${1:-}" = "--test-tools" ]; then
  command -v pgbench >/dev/null 2>&1 || packages+=(postgresql)
  command -v wrk >/dev/null 2>&1 || packages+=(wrk)
  { command -v prometheus && command -v promtool; } >/dev/null 2>&1 || packages+=(prometheus)
  command -v amtool >/dev/null 2>&1 || packages+=(prometheus-alertmanager)
  command -v psql >/dev/null 2>&1 || packages+=(postgresql-client)
  command -v curl >/dev/null 2>&1 || packages+=(curl)
  command -v prometheus-postgres-exporter >/dev/null 2>&1 || packages+=(prometheus-postgres-exporter)
  command -v "${LOCKJAM_CHROMIUM:-chromium}" >/dev/null 2>&1 || packages+=(chromium fonts-dejavu-core)
fi
if [ ${#packages[@]} -eq 0 ]; then
  exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
  echo "missing ${packages[*]} and this is not a Debian/Ubuntu machine: install your" >&2
  echo "distribution's packages for them (or set LOCKJAM_PG_BINDIR for the server)" >&2
  exit 1
fi

sudo=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then
    sudo="sudo"
  else
    echo "missing ${packages[*]}; run as root: apt-get install ${packages[*]}" >&2
    exit 1
  fi
fi

echo "installing ${packages[*]} (apt-get install)" >&2
export DEBIAN_FRONTEND=noninteractive
# The packages would start a system cluster, a Prometheus and an
# Alertmanager of their own; lockjam's tests start throwaway ones, so keep
# the services from starting where possible.
if [ ! -e /usr/sbin/policy-rc.d ]; then
  printf '#!/bin/sh\nexit 101\n' | $sudo tee /usr/sbin/policy-rc.d >/dev/null
  $sudo chmod +x /usr/sbin/policy-rc.d
  trap '$sudo rm -f /usr/sbin/policy-rc.d' EXIT
fi
$sudo apt-get update -qq
$sudo apt-get install -y -qq --no-install-recommends "${packages[@]}" >/dev/null
has_server || { echo "installed postgresql, but its server binaries are still not found" >&2; exit 1; }
