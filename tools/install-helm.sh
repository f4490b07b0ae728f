#!/usr/bin/env bash
# Builds Helm from its Go module into the cache. Prints the path of the helm binary.
source "$(dirname "$0")/lib.sh"

dir="$EVENTOPS_CACHE/helm-$HELM_VERSION"
if [[ -x "$dir/helm" ]]; then echo "$dir/helm"; exit 0; fi
need go "install Go 1.26+ to build Helm"
log "building helm v$HELM_VERSION from Go modules (first time only; took 2-3 min in our cold runs)"
mkdir -p "$dir"
major="${HELM_VERSION%%.*}"
GOBIN="$dir" GOFLAGS="${GOFLAGS:--buildvcs=false}" timed "build helm" \
  go install -ldflags "-s -w" "helm.sh/helm/v$major/cmd/helm@v$HELM_VERSION"
echo "$dir/helm"
