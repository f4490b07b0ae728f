#!/usr/bin/env bash
# Fetches the Prometheus Operator's ServiceMonitor and PrometheusRule CRDs from its Go
# module (through the Go module proxy) into the cache, so the chart's monitoring
# templates can be dry-run against the real schemas. Prints the directory holding them.
source "$(dirname "$0")/lib.sh"

version="${PROMETHEUS_OPERATOR_VERSION:-0.85.0}"
dir="$EVENTOPS_CACHE/prometheus-operator-crds-$version"
files=(monitoring.coreos.com_servicemonitors.yaml monitoring.coreos.com_prometheusrules.yaml)
if [[ -f "$dir/${files[1]}" ]]; then echo "$dir"; exit 0; fi
need go "install Go 1.26+ to fetch the Prometheus Operator's CRDs"
log "fetching the Prometheus Operator v$version CRDs (Go module, about 4 MB)"
module="github.com/prometheus-operator/prometheus-operator@v$version"
src="$(cd "$EVENTOPS_CACHE" && GOFLAGS=-mod=mod go mod download -json "$module" \
  | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')"
[[ -n "$src" && -d "$src" ]] || die "go mod download $module failed"
mkdir -p "$dir.tmp"
for f in "${files[@]}"; do cp "$src/example/prometheus-operator-crd/$f" "$dir.tmp/"; done
rm -rf "$dir" && mv "$dir.tmp" "$dir"
echo "$dir"
