"""Static checks of the package (no ROS needed): the core imports without rclpy, package.xml /
CMakeLists.txt / launch file / config agree with each other."""
from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_core_imports_without_rclpy():
    """A fresh interpreter imports the ground floor (and the ROS-free controller, mode_ros.control, and parameter table) without
    pulling in rclpy or any ROS Python package."""
    mods = ["mode_ros", "mode_ros.model", "mode_ros.data", "mode_ros.train", "mode_ros.ros",
            "mode_ros.ros.params", "mode_ros.control", "mode_ros.control.controller", "mode_ros.control.strategy",
            "mode_ros.control.virtual", "mode_ros.control.execution", "mode_ros.control.safety",
            "mode_ros.control.sync", "mode_ros.control.stats"]
    code = (
        "import importlib, json, sys\n"
        f"for m in {mods!r}:\n"
        "    importlib.import_module(m)\n"
        "ros = sorted(m for m in sys.modules if m.split('.')[0] in "
        "('rclpy', 'rosidl_runtime_py', 'rcl_interfaces', 'std_msgs', 'sensor_msgs', 'builtin_interfaces'))\n"
        "import mode_ros\n"
        "print(json.dumps({'ros': ros, 'file': mode_ros.__file__}))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         cwd=os.environ.get("TMPDIR", "/tmp"))
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["ros"] == [], f"ROS modules imported by the core: {res['ros']}"


def test_package_xml():
    root = ET.parse(ROOT / "package.xml").getroot()
    assert root.get("format") == "3"
    assert root.findtext("name") == "mode_ros"
    assert root.find("export/build_type").text == "ament_cmake"
    deps = {e.text for e in root if e.tag.endswith("depend")}
    for d in ("ament_cmake", "rosidl_default_generators", "rosidl_default_runtime", "rclpy", "std_msgs",
              "sensor_msgs", "trajectory_msgs", "std_srvs", "diagnostic_msgs", "builtin_interfaces",
              "rosgraph_msgs", "lifecycle_msgs"):
        assert d in deps, d
    assert root.findtext("member_of_group") == "rosidl_interface_packages"


def _cmake_launchers() -> dict[str, str]:
    text = (ROOT / "CMakeLists.txt").read_text()
    return {m.group(1): f"{m.group(2)}:{m.group(3)}"
            for m in re.finditer(r"^mode_ros_add_launcher\((\w+) ([\w.]+) (\w+)\)", text, re.M)}


def test_cmake_executables_and_entry_points():
    launchers = _cmake_launchers()
    assert launchers == {"policy_node": "mode_ros.ros.policy_node:main",
                         "metaworld_sim": "mode_ros.sim.bridge_node:main"}
    text = (ROOT / "CMakeLists.txt").read_text()
    assert re.search(r'rosidl_generate_interfaces\(\$\{PROJECT_NAME\}\s+"msg/ActionChunk.msg"', text)
    assert text.index("rosidl_generate_interfaces") < text.index("install(DIRECTORY mode_ros/")
    assert "ament_python_install_package" not in text.split("#")[0]
    assert "install(DIRECTORY launch config DESTINATION share/${PROJECT_NAME})" in text


def test_action_chunk_msg_documents_every_field():
    lines = (ROOT / "msg" / "ActionChunk.msg").read_text().splitlines()
    fields = {}
    for i, ln in enumerate(lines):
        s = ln.strip()
        if s and not s.startswith("#"):
            typ, name = s.split()[:2]
            fields[name] = typ
            assert i > 0 and lines[i - 1].strip().startswith("#"), f"field {name} has no comment above it"
    assert fields == {"header": "std_msgs/Header", "control_period": "builtin_interfaces/Duration",
                      "chunk_size": "uint32", "action_dim": "uint32", "action_names": "string[]",
                      "actions": "float32[]", "first_index": "uint32", "sequence": "uint64", "tick": "uint64",
                      "goal": "string", "inference_latency": "builtin_interfaces/Duration"}


def test_policy_yaml_matches_parameter_table():
    import yaml

    from mode_ros.ros.params import PARAMS, render_yaml

    text = (ROOT / "config" / "policy.yaml").read_text()
    assert text == render_yaml(), "config/policy.yaml is stale: regenerate with mode_ros.ros.params.render_yaml()"
    params = yaml.safe_load(text)["/**"]["ros__parameters"]
    assert list(params) == [p.name for p in PARAMS]
    for p in PARAMS:
        assert params[p.name] == p.default, p.name


# ---- launch file --------------------------------------------------------------------------------------
LAUNCH = ROOT / "launch" / "policy.launch.py"
LAUNCH_ARGS = {"checkpoint", "params_file", "device", "namespace", "use_sim_time", "node_name",
               "goal_topic", "action_chunk_topic", "joint_trajectory_topic", "joint_states_topic",
               "camera_remappings", "log_level", "all_log_level"}


def _calls(tree, name):
    return [n for n in ast.walk(tree) if isinstance(n, ast.Call)
            and (getattr(n.func, "id", None) == name or getattr(n.func, "attr", None) == name)]


def test_launch_file_structure_static():
    tree = ast.parse(LAUNCH.read_text())
    funcs = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
    assert "generate_launch_description" in funcs
    declared = {c.args[0].value for c in _calls(tree, "DeclareLaunchArgument")}
    assert LAUNCH_ARGS <= declared, LAUNCH_ARGS - declared
    used = set()
    for c in _calls(tree, "arg") + _calls(tree, "LaunchConfiguration"):
        if c.args and isinstance(c.args[0], ast.Constant):
            used.add(c.args[0].value)
    assert declared <= used, f"declared but never read: {declared - used}"
    nodes = _calls(tree, "Node")
    assert len(nodes) == 1
    consts = {t.id: n.value.value for n in tree.body if isinstance(n, ast.Assign)
              and isinstance(n.value, ast.Constant) for t in n.targets if isinstance(t, ast.Name)}

    def const(node):
        return consts[node.id] if isinstance(node, ast.Name) else node.value

    kw = {k.arg: k.value for k in nodes[0].keywords}
    assert const(kw["package"]) == "mode_ros"
    assert const(kw["executable"]) in _cmake_launchers()
    assert const(kw["executable"]) == "policy_node"
    for k in ("name", "namespace", "parameters", "remappings", "output"):
        assert k in kw, k


def _launch_function(name: str):
    """One plain function of the launch file, compiled alone (launch_ros is not installable here)."""
    tree = ast.parse(LAUNCH.read_text())
    fn = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == name)
    ns: dict = {}
    exec(compile(ast.Module(body=[fn], type_ignores=[]), str(LAUNCH), "exec"), ns)
    return ns[name]


def test_launch_log_level_is_scoped_to_the_node_logger():
    """log_level:=debug sets only the node's logger (--log-level NAMESPACE.NAME:=debug), so rcl and rmw do
    not print their debug output (157 lines in 25 s of start-up, measured); all_log_level sets them all;
    the arguments are the ones the node's rcl accepts (checked by starting the node in
    test_node_log_level_argument_scopes_debug)."""
    log_args = _launch_function("_log_arguments")
    assert log_args("mode_policy", "", "debug", "") == ["--log-level", "mode_policy:=debug"]
    assert log_args("mode_policy", "/robot1/arm/", "warn", "") == ["--log-level", "robot1.arm.mode_policy:=warn"]
    assert log_args("p", "", "info", "debug") == ["--log-level", "debug", "--log-level", "p:=info"]
    assert log_args("p", "", "", "") == []
    tree = ast.parse(LAUNCH.read_text())
    node = _calls(tree, "Node")[0]
    ros_args = next(k.value for k in node.keywords if k.arg == "ros_arguments")
    assert isinstance(ros_args, ast.Call) and ros_args.func.id == "_log_arguments"
    assert [a.args[0].value for a in ros_args.args] == ["node_name", "namespace", "log_level", "all_log_level"]


@pytest.mark.ros
def test_node_log_level_argument_scopes_debug(tmp_path):
    """The installed node with the launch file's arguments for log_level:=debug: its own INFO lines, no
    [rcl]/[rmw] DEBUG lines (with a plain --log-level debug there are over a hundred at start-up)."""
    import subprocess
    import time

    from mode_ros.ros.processes import stop_process_group
    from ros_helpers import executable

    args = _launch_function("_log_arguments")("mode_policy", "", "debug", "")
    proc = subprocess.Popen([str(executable("policy_node")), "--ros-args", "-p", "checkpoint:=" + str(tmp_path),
                             *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        lines = []
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if "configure failed" in line:   # an empty folder: the node says so, then stays up
                break
    finally:
        # what is tested is the log; stopping escalates like every other node test (ros_helpers), so a
        # slow DDS teardown on a loaded machine cannot fail it (the exit itself: test_node_faults)
        stop_process_group(proc, timeout=30)
    text = "".join(lines)
    assert "configure failed" in text and "[mode_policy]" in text, text[-2000:]
    assert "[rcl]" not in text and "[rmw" not in text, text[:2000]


def test_launch_description_with_launch_ros():
    pytest.importorskip("launch_ros", reason="launch_ros is not installable here (no PyPI wheel)")
    import importlib.util

    from launch import LaunchDescription
    from launch.actions import DeclareLaunchArgument

    spec = importlib.util.spec_from_file_location("policy_launch", LAUNCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    ld = mod.generate_launch_description()
    assert isinstance(ld, LaunchDescription)
    names = {a.name for a in ld.entities if isinstance(a, DeclareLaunchArgument)}
    assert LAUNCH_ARGS <= names


def test_mode_ros_command_is_installed():
    """After sourcing the install (scripts/env.sh), `mode-ros` is on PATH and dispatches subcommands."""
    import shutil
    import subprocess
    exe = shutil.which("mode-ros")
    if exe is None:
        pytest.skip("mode-ros not on PATH (run through scripts/test.sh, which sources the colcon install)")
    r = subprocess.run([exe, "check-reference", "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "fixture" in r.stdout
