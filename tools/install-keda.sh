#!/usr/bin/env bash
# Builds KEDA (github.com/kedacore/keda/v2) from the Go module proxy into the cache, for
# tools/bench-keda. `go install ...@version` refuses the module (its go.mod carries a
# `replace`), so the module is downloaded, copied somewhere writable and built there.
# Prints the directory holding bin/keda-operator, bin/keda-adapter and src/ (whose
# config/crd/bases has the CRDs).
source "$(dirname "$0")/lib.sh"

KEDA_VERSION="${KEDA_VERSION:-2.21.0}"
dir="$EVENTOPS_CACHE/keda-$KEDA_VERSION"
if [[ -f "$dir/.complete" ]]; then echo "$dir"; exit 0; fi

need go "install Go 1.26+ (the Go toolchain from go.dev or Debian's golang-go if recent enough)"
need python3 "install python3 (reads go mod download's JSON)"
mkdir -p "$dir/bin"
export GOFLAGS="${GOFLAGS:--buildvcs=false}"

if [[ ! -f "$dir/src/go.mod" ]]; then
  log "downloading github.com/kedacore/keda/v2@v$KEDA_VERSION"
  json="$(cd "$dir" && GOFLAGS=-mod=mod go mod download -json "github.com/kedacore/keda/v2@v$KEDA_VERSION")" \
    || die "go mod download of KEDA v$KEDA_VERSION failed"
  module_dir="$(python3 -c 'import json,sys; print(json.load(sys.stdin)["Dir"])' <<<"$json")"
  rm -rf "$dir/src.tmp"
  cp -r "$module_dir" "$dir/src.tmp"
  chmod -R u+w "$dir/src.tmp"
  mv "$dir/src.tmp" "$dir/src"
fi

# How long each took in our cold run on 2 cores (longer on a busy machine).
declare -A took=([operator]="about 9 min" [adapter]="about 2 min once the operator is built")
for cmd in operator adapter; do
  if [[ ! -x "$dir/bin/keda-$cmd" ]]; then
    log "building keda-$cmd v$KEDA_VERSION (first time only; took ${took[$cmd]} here)"
    ( cd "$dir/src" && GOFLAGS="$GOFLAGS -mod=mod" timed "build keda-$cmd" \
        go build -ldflags "-s -w" -o "$dir/bin/keda-$cmd.tmp" "./cmd/$cmd" )
    mv "$dir/bin/keda-$cmd.tmp" "$dir/bin/keda-$cmd"
  fi
done
[[ -d "$dir/src/config/crd/bases" ]] || die "no CRDs under $dir/src/config/crd/bases"
touch "$dir/.complete"
echo "$dir"
