# Shared helpers for the environment scripts. Sourced, not run.
set -euo pipefail

SCRIPTS_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "$SCRIPTS_DIR/.." && pwd)"
# eventops-devenv runs this checkout's install scripts, whichever checkout built it.
export EVENTOPS_REPO_ROOT="$REPO_ROOT"
# shellcheck source=versions.env
source "$SCRIPTS_DIR/versions.env"

# Everything downloaded or built lives here, keyed by version, so a second run is warm.
EVENTOPS_CACHE="${EVENTOPS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/eventops}"
mkdir -p "$EVENTOPS_CACHE"

log() { printf '\033[1m[eventops]\033[0m %s\n' "$*" >&2; }
die() { printf '\033[31m[eventops] error:\033[0m %s\n' "$*" >&2; exit 1; }

# need TOOL HINT: fail with a clear message when a toolchain is missing.
need() {
  command -v "$1" >/dev/null 2>&1 || die "'$1' is not installed: $2"
}

# timed LABEL CMD...: run a step and say how long it took. The step's output goes to
# stderr: the install scripts print only their result on stdout.
timed() {
  local label=$1; shift
  local start=$SECONDS
  "$@" >&2
  log "$label done in $((SECONDS - start))s"
}

# Where cargo puts binaries (CI points CARGO_TARGET_DIR into the cache).
TARGET_DIR="${CARGO_TARGET_DIR:-$REPO_ROOT/target}"

# start_env STATE_DIR: starts eventops-devenv in the background (PID in DEVENV_PID) and
# waits until it has written STATE_DIR/env.json. Fails with the component logs if it dies.
# EVENTOPS_BROKERS (default 1) sets how many Kafka brokers run.
start_env() {
  local state=$1
  "$TARGET_DIR/debug/eventops-devenv" up --state-dir "$state" --keep \
    --brokers "${EVENTOPS_BROKERS:-1}" &
  DEVENV_PID=$!
  local waited=0
  until [[ -f "$state/env.json" ]]; do
    if ! kill -0 "$DEVENV_PID" 2>/dev/null; then
      wait "$DEVENV_PID" || true
      die "the environment did not start; logs are in $state/logs"
    fi
    sleep 0.5
    waited=$((waited + 1))
    # Generous: the first run fetches and builds Kafka, Kubernetes and Helm (~12 min).
    (( waited < 3600 )) || die "the environment was not ready after 30 minutes"
  done
}

# run_watched CMD...: runs CMD while the environment runs. If a component of the
# environment dies, eventops-devenv stops (printing which component and the end of its
# log); then CMD and everything it started is stopped at once and this fails, rather
# than letting tests time out one by one against a dead server.
run_watched() {
  set -m
  "$@" &
  local pid=$!
  set +m
  while kill -0 "$pid" 2>/dev/null; do
    if ! kill -0 "$DEVENV_PID" 2>/dev/null; then
      kill -TERM -- "-$pid" 2>/dev/null || true
      wait "$pid" 2>/dev/null || true
      log "the environment stopped during the run: a component died (named above, with its log)"
      return 125
    fi
    sleep 1
  done
  wait "$pid"
}

# stop_env: stops the environment started by start_env.
stop_env() {
  if [[ -n "${DEVENV_PID:-}" ]] && kill -0 "$DEVENV_PID" 2>/dev/null; then
    kill -TERM "$DEVENV_PID" && wait "$DEVENV_PID" || true
  fi
}
