#!/usr/bin/env bash
# Builds etcd, kube-apiserver, kube-controller-manager and kubectl from Go modules into
# the cache. k8s.io/kubernetes cannot be `go install`ed (its go.mod replaces the staging
# modules with local paths), so a wrapper module replaces each with its published v0.x.
# Prints the bin directory.
source "$(dirname "$0")/lib.sh"

bin="$EVENTOPS_CACHE/k8s-$KUBERNETES_VERSION-etcd-$ETCD_VERSION/bin"
if [[ -f "$bin/.complete" ]]; then echo "$bin"; exit 0; fi

need go "install Go 1.26+ (the Go toolchain from go.dev or Debian's golang-go if recent enough)"
mkdir -p "$bin"
export GOFLAGS="${GOFLAGS:--buildvcs=false}"

src="$EVENTOPS_CACHE/src/k8s-$KUBERNETES_VERSION"
mkdir -p "$src"
if [[ ! -f "$src/go.sum" ]]; then
  log "preparing the kubernetes v$KUBERNETES_VERSION wrapper module"
  minor="${KUBERNETES_VERSION#*.}"
  staging_version="v0.$minor"
  ( cd "$src"
    rm -f go.mod go.sum
    go mod init eventops.dev/k8s-build >/dev/null 2>&1
    go mod edit -require="k8s.io/kubernetes@v$KUBERNETES_VERSION"
    # The staging list comes from that release's own go.mod, so it never goes stale.
    modfile="$(go env GOMODCACHE)/cache/download/k8s.io/kubernetes/@v/v$KUBERNETES_VERSION.mod"
    [[ -f "$modfile" ]] || go mod download -x "k8s.io/kubernetes@v$KUBERNETES_VERSION" >/dev/null 2>&1 || true
    [[ -f "$modfile" ]] || die "could not download k8s.io/kubernetes@v$KUBERNETES_VERSION's go.mod"
    grep -E '^\s*k8s.io/[a-z0-9-]+ => \./staging' "$modfile" | awk '{print $1}' | while read -r m; do
      go mod edit -replace="$m=$m@$staging_version"
    done
    cat > tools.go <<'GO'
//go:build tools

package tools

import (
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kube-controller-manager"
	_ "k8s.io/kubernetes/cmd/kubectl"
)
GO
    log "resolving kubernetes module graph (first time only; took 7-20 s plus downloads in our cold runs)"
    timed "go mod tidy (kubernetes)" go mod tidy -e >/dev/null
  )
fi

# How long each took in our cold runs on 2 cores (longer on a busy machine).
declare -A took=([kube-apiserver]="5-6 min" [kube-controller-manager]="1.5-2.5 min" [kubectl]="about 30 s")
for cmd in kube-apiserver kube-controller-manager kubectl; do
  if [[ ! -x "$bin/$cmd" ]]; then
    log "building $cmd v$KUBERNETES_VERSION (first time only; took ${took[$cmd]} here)"
    ( cd "$src" && timed "build $cmd" go build -tags tools -ldflags "-s -w -X k8s.io/component-base/version.gitVersion=v$KUBERNETES_VERSION -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=${KUBERNETES_VERSION#1.}" -o "$bin/$cmd" "k8s.io/kubernetes/cmd/$cmd" )
  fi
done

etcd_src="$EVENTOPS_CACHE/src/etcd-$ETCD_VERSION"
if [[ ! -x "$bin/etcd" ]]; then
  log "building etcd v$ETCD_VERSION (first time only; about 30 s)"
  mkdir -p "$etcd_src"
  ( cd "$etcd_src"
    if [[ ! -f go.mod ]]; then
      go mod init eventops.dev/etcd-build >/dev/null 2>&1
      go mod edit -require="go.etcd.io/etcd/server/v3@v$ETCD_VERSION"
      printf '//go:build tools\n\npackage tools\n\nimport _ "go.etcd.io/etcd/server/v3"\n' > tools.go
      go mod tidy -e >/dev/null
    fi
    timed "build etcd" go build -tags tools -ldflags "-s -w" -o "$bin/etcd" go.etcd.io/etcd/server/v3
  )
fi
touch "$bin/.complete"
echo "$bin"
