#!/usr/bin/env bash
# colcon build of the mode_ros ROS 2 package (ActionChunk message + Python package + executables)
# into build_ws/{build,install,log}, against the ROS 2 wheels in the venv (../shared/ROS_BUILD.md).
#
# --symlink-install: the installed Python package, launch and config files are symlinks to the
# source files, so an edited .py file is live without a rebuild. The build is skipped when nothing
# that needs one changed (hash of msg/, CMake files, package.xml and the LIST of installed files:
# a new or removed file needs a rebuild, an edited one does not). Force with --force.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${MODE_ROS_VENV:-$ROOT/.venv}"
WS="${MODE_ROS_WS:-$ROOT/build_ws}"
log() { printf '[build %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

[ -x "$VENV/bin/python3" ] || { log "no venv at $VENV: run scripts/setup.sh"; exit 1; }

# one build at a time in this workspace (two shells, or tests started side by side, share build_ws)
mkdir -p "$WS"
if command -v flock >/dev/null 2>&1 && [ -z "${MODE_ROS_BUILD_LOCKED:-}" ]; then
  export MODE_ROS_BUILD_LOCKED=1
  exec flock "$WS/.build.lock" "$0" "$@"
fi

inputs_hash() {
  (
    cd "$ROOT"
    echo "venv=$VENV ws=$WS"
    cat package.xml CMakeLists.txt cmake/* msg/*.msg
    find mode_ros launch config -type f ! -path '*/__pycache__/*' ! -name '*.pyc' | LC_ALL=C sort
  ) | sha256sum | cut -d' ' -f1
}
stamp="$WS/.mode_ros_build.sha"
want="$(inputs_hash)"
if [ "${1:-}" != "--force" ] && [ -f "$WS/install/setup.bash" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$want" ]; then
  log "build up to date ($WS/install)"
  exit 0
fi

mkdir -p "$WS"
touch "$WS/COLCON_IGNORE"   # never crawl the build trees as packages
export VIRTUAL_ENV="$VENV"
export PATH="$VENV/bin:$PATH"
export AMENT_PREFIX_PATH="$VENV${AMENT_PREFIX_PATH:+:$AMENT_PREFIX_PATH}"
export CMAKE_PREFIX_PATH="$VENV${CMAKE_PREFIX_PATH:+:$CMAKE_PREFIX_PATH}"
export LD_LIBRARY_PATH="$VENV/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export PYTHONWARNINGS="ignore"   # colcon's setuptools deprecation chatter
t0=$(date +%s)
log "colcon build -> $WS/install"
cd "$WS"
# --paths: exactly this package (no recursive crawl of the repo, its .venv or build trees)
if ! colcon --log-base "$WS/log" build \
      --paths "$ROOT" \
      --build-base "$WS/build" --install-base "$WS/install" \
      --symlink-install \
      --event-handlers console_cohesion- summary- status- \
      --cmake-args -DPython3_EXECUTABLE="$VENV/bin/python3" -DBUILD_TESTING=OFF \
        -DCMAKE_BUILD_TYPE=Release -Wno-dev > "$WS/last_build.log" 2>&1; then
  tail -n 60 "$WS/last_build.log" >&2
  log "colcon build FAILED (full log: $WS/last_build.log)"
  exit 1
fi
echo "$want" > "$stamp"
log "built in $(( $(date +%s) - t0 )) s"
