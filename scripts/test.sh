#!/usr/bin/env bash
# The whole test suite against the INSTALLED package (README command 2).
#   scripts/test.sh                 set up (venv + colcon build; quick when done), then pytest test/
#   scripts/test.sh -k chunk -x     extra arguments go to pytest
# pytest runs from a scratch directory, so the source tree's mode_ros/ (which has no generated
# mode_ros.msg) cannot shadow the installed one; the install comes first on PYTHONPATH via env.sh.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$ROOT/scripts/setup.sh"
# shellcheck disable=SC1091
source "$ROOT/scripts/env.sh"
# test paths given relative to the caller's directory (test/test_x.py::name) -> absolute
args=()
has_path=
for a in "$@"; do
  f="${a%%::*}"
  if [ "${a:0:1}" != "-" ] && [ -e "$f" ]; then
    has_path=1
    [ "${f:0:1}" = "/" ] || a="$PWD/$a"
  fi
  args+=("$a")
done
[ -n "$has_path" ] || args=("$ROOT/test" ${args[@]+"${args[@]}"})
work="$(mktemp -d "${TMPDIR:-/tmp}/mode_ros_test.XXXXXX")"
trap 'rm -rf "$work"' EXIT
cd "$work"
t0=$(date +%s)
set +e
python -m pytest -p no:cacheprovider -q "${args[@]}"
rc=$?
set -e
echo "[test] pytest exit code $rc after $(( $(date +%s) - t0 )) s" >&2
exit $rc
