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
# pip, minus its noise about the ROS wheels (e.g. "... is ignored" lines); keeps pip's exit status
pip_quiet() {
  "$VENV/bin/python" -m pip "$@" 2>&1 | { grep -v -E "is ignored|^[[:space:]]*$" || true; } >&2
  return "${PIPESTATUS[0]}"
}

# ---- 0. system libraries for headless MuJoCo rendering (Meta-World sim, mode_ros/sim) ----------
# EGL + Mesa's software rasteriser, used through MUJOCO_GL=egl. Installs only what is missing (root).
sim_missing=""
if command -v dpkg >/dev/null 2>&1; then
  for p in libegl1 libgl1-mesa-dri; do dpkg -s "$p" >/dev/null 2>&1 || sim_missing="$sim_missing $p"; done
fi
if [ -n "$sim_missing" ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    log "installing$sim_missing (headless MuJoCo rendering)"
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $sim_missing; } \
      || log "warning: could not install$sim_missing; 'mode-ros sim' rendering will fail"
  else
    log "warning: missing$sim_missing (apt-get install$sim_missing); 'mode-ros sim' rendering will fail"
  fi
fi

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
  # the venv takes ~6.5 GB (torch + its CUDA libraries) and pip unpacks through its cache and TMPDIR:
  # say so up front rather than after a half-written install ends in "No space left on device"
  free_kb="$(df -Pk "$(dirname "$VENV")" 2>/dev/null | awk 'NR==2 {print $4}')"
  if [ -n "$free_kb" ] && [ "$free_kb" -lt $((10 * 1024 * 1024)) ]; then
    log "warning: only $(( free_kb / 1024 / 1024 )) GB free under $(dirname "$VENV"); the install needs ~10 GB"
  fi
  pip_quiet install -q --upgrade pip
  # setuptools: torch wants >=77.0.3, colcon-core wants <80 -> pin the overlap in the same command
  pip_quiet install -q -r "$REQ"
  echo "$want" > "$stamp"
  log "requirements installed in $(( $(date +%s) - t0 )) s"
fi
[ "${1:-}" = "--venv" ] && exit 0

# ---- 2. colcon build of the ROS package -------------------------------------------------------
"$ROOT/scripts/build.sh"
