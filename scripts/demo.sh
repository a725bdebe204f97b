#!/usr/bin/env bash
# The main job on an embedded default (README command 1). For now: set up, then show what exists
# (the model summary of the tiny preset). It grows into "start the policy node on a bundled
# checkpoint with the simulator bridge and drive it end to end".
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$ROOT/scripts/setup.sh"
# shellcheck disable=SC1091
source "$ROOT/scripts/env.sh"
cd "${TMPDIR:-/tmp}"
exec python -m mode_ros.cli info --preset tiny "$@"
