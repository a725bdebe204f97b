# Source me (bash):  source scripts/env.sh
# The environment to run mode_ros from the colcon install in build_ws/ (after scripts/setup.sh):
# the venv, the install's setup.bash, and DDS kept on this machine with a private domain.
_mode_ros_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
_mode_ros_venv="${MODE_ROS_VENV:-$_mode_ros_root/.venv}"
_mode_ros_ws="${MODE_ROS_WS:-$_mode_ros_root/build_ws}"

export VIRTUAL_ENV="$_mode_ros_venv"
case ":$PATH:" in *":$_mode_ros_venv/bin:"*) ;; *) export PATH="$_mode_ros_venv/bin:$PATH" ;; esac
case ":${AMENT_PREFIX_PATH:-}:" in *":$_mode_ros_venv:"*) ;;
  *) export AMENT_PREFIX_PATH="$_mode_ros_venv${AMENT_PREFIX_PATH:+:$AMENT_PREFIX_PATH}" ;; esac
case ":${LD_LIBRARY_PATH:-}:" in *":$_mode_ros_venv/lib:"*) ;;
  *) export LD_LIBRARY_PATH="$_mode_ros_venv/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" ;; esac

if [ -f "$_mode_ros_ws/install/setup.bash" ]; then
  # setup.bash reads unset variables: relax `set -u` around it if the caller uses it
  case "$-" in *u*) _mode_ros_had_u=1; set +u ;; *) _mode_ros_had_u= ;; esac
  # shellcheck disable=SC1091
  source "$_mode_ros_ws/install/setup.bash"
  [ -n "$_mode_ros_had_u" ] && set -u
  unset _mode_ros_had_u
else
  echo "scripts/env.sh: no $_mode_ros_ws/install/setup.bash yet (run scripts/setup.sh)" >&2
fi

# DDS: only this machine (Fast DDS otherwise multicasts on the LAN), a private random domain
# unless one was chosen, logs in a temp folder unless chosen.
export ROS_AUTOMATIC_DISCOVERY_RANGE="${ROS_AUTOMATIC_DISCOVERY_RANGE:-LOCALHOST}"
export ROS_DOMAIN_ID="${ROS_DOMAIN_ID:-$(( RANDOM % 100 + 1 ))}"
if [ -z "${ROS_LOG_DIR:-}" ]; then
  ROS_LOG_DIR="$(mktemp -d "${TMPDIR:-/tmp}/mode_ros_log.XXXXXX")"
  export ROS_LOG_DIR
fi
unset _mode_ros_root _mode_ros_venv _mode_ros_ws
