#!/usr/bin/env bash
# Makes sure PostgreSQL's server binaries (Debian's package) are installed. Prints their
# bin directory.
source "$(dirname "$0")/lib.sh"

find_pg_bin() {
  local d
  for d in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V -r); do
    [[ -x "$d/initdb" && -x "$d/postgres" ]] && { echo "$d"; return 0; }
  done
  return 1
}

if bin=$(find_pg_bin); then echo "$bin"; exit 0; fi
command -v apt-get >/dev/null || die "PostgreSQL is missing and apt-get is not available: install PostgreSQL 15+ server binaries"
[[ $(id -u) == 0 ]] || die "PostgreSQL is missing: run 'sudo apt-get install -y postgresql'"
log "installing PostgreSQL from Debian's packages (first time only)"
timed "apt-get install postgresql" bash -c 'apt-get update -qq && apt-get install -y -qq postgresql >/dev/null'
bin=$(find_pg_bin) || die "PostgreSQL was installed but no initdb was found under /usr/lib/postgresql"
echo "$bin"
