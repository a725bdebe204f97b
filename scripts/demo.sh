#!/usr/bin/env bash
# The main job on the embedded default (README command 1): set up, then start the policy node on the
# MoDE checkpoint bundled in the package (mode_ros/assets/metaworld_mt10, trained by this pipeline on
# Meta-World MT10 from state + language) against the Meta-World sim bridge over ROS 2, and print each
# episode's result and per-task success as the episodes finish (docs/SIM.md).
#
#   scripts/demo.sh                          10 tasks x 2 held-out episodes (~2-3 min on 2 CPU cores)
#   scripts/demo.sh --episodes 5 --tasks reach,push,door-open
#   MODE_ROS_DEMO_MODE=lockstep scripts/demo.sh   deterministic lockstep (needs a policy node that
#                                                 publishes as soon as an inference finishes)
# Any other `mode-ros sim eval` option can be added (e.g. --json report.json, --seed 3).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$ROOT/scripts/setup.sh"
# shellcheck disable=SC1091
source "$ROOT/scripts/env.sh"
cd "${TMPDIR:-/tmp}"
echo "[demo] policy node on the bundled MT10 checkpoint + Meta-World sim bridge over ROS 2" >&2
exec python -m mode_ros.cli sim eval --ros --ros-mode "${MODE_ROS_DEMO_MODE:-realtime}" \
  --checkpoint bundled --tasks all --episodes 2 --seed 0 --replan-every 2 --device cpu "$@"
