# Shared helpers for the environment scripts. Sourced, not run.
set -euo pipefail

SCRIPTS_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "$SCRIPTS_DIR/.." && pwd)"
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

# timed LABEL CMD...: run a step and say how long it took.
timed() {
  local label=$1; shift
  local start=$SECONDS
  "$@"
  log "$label done in $((SECONDS - start))s"
}
