"""Start the MoDE policy node.

    ros2 launch mode_ros policy.launch.py checkpoint:=/path/to/ckpt
    ros2 launch mode_ros policy.launch.py checkpoint:=/ckpt device:=cuda use_sim_time:=true \\
        camera_remappings:="image_static:=/camera/color/image_raw;image_gripper:=/wrist/image_raw"
    ros2 topic pub --once /mode_policy/goal std_msgs/msg/String "{data: 'open the drawer'}"
    # or latched, received by a node started later:
    ros2 topic pub --qos-durability transient_local --qos-reliability reliable /mode_policy/goal \\
        std_msgs/msg/String "{data: 'open the drawer'}"

~/goal takes both a default-QoS (volatile) publisher and a transient-local one. A goal the checkpoint
cannot embed (no CLIP text weights, not among its cached instructions) is refused with one log line
listing the known instructions, and the output stops until a valid goal arrives.

The node subscribes to ~/image_<camera> for every camera slot of the checkpoint (or
~/image_<camera>/compressed with image_transport: compressed); remap them to the robot's topics with
`camera_remappings` ("from:=to" pairs separated by ";" or ","). Parameters come from `params_file`
(default: the installed config/policy.yaml); `checkpoint`, `device` and `use_sim_time` override it.
"""
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, OpaqueFunction
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node
from launch_ros.substitutions import FindPackageShare

PACKAGE = "mode_ros"
EXECUTABLE = "policy_node"


def _truthy(text: str) -> bool:
    return text.strip().lower() in ("1", "true", "yes", "on")


def _parse_remappings(text: str):
    pairs = []
    for item in text.replace(",", ";").split(";"):
        item = item.strip()
        if not item:
            continue
        if ":=" not in item:
            raise RuntimeError(f"camera_remappings: {item!r} is not of the form from:=to")
        src, dst = (s.strip() for s in item.split(":=", 1))
        if not src.startswith(("~", "/")):
            src = "~/" + src
        pairs.append((src, dst))
    return pairs


def _log_arguments(node_name: str, namespace: str, level: str, all_level: str) -> list:
    """--ros-args logging options: ``log_level`` sets only the node's own logger (named
    NAMESPACE.NODE_NAME with dots, e.g. robot1.mode_policy); ``all_log_level`` sets the default level
    of every logger, rcl and the middleware included (their debug output is hundreds of lines a second)."""
    args = ["--log-level", all_level] if all_level else []
    if level:
        logger = ".".join([p for p in namespace.strip("/").split("/") if p] + [node_name])
        args += ["--log-level", f"{logger}:={level}"]
    return args


def _launch_node(context, *args, **kwargs):
    def arg(name):
        return LaunchConfiguration(name).perform(context)

    overrides = {"use_sim_time": _truthy(arg("use_sim_time"))}
    if arg("checkpoint"):
        overrides["checkpoint"] = arg("checkpoint")
    if arg("device"):
        overrides["device"] = arg("device")
    remappings = [("~/goal", arg("goal_topic")), ("~/action_chunk", arg("action_chunk_topic")),
                  ("~/joint_trajectory", arg("joint_trajectory_topic")),
                  ("~/joint_states", arg("joint_states_topic"))]
    remappings = [(a, b) for a, b in remappings if b]
    remappings += _parse_remappings(arg("camera_remappings"))
    node = Node(
        package=PACKAGE,
        executable=EXECUTABLE,
        name=arg("node_name"),
        namespace=arg("namespace"),
        parameters=[arg("params_file"), overrides],
        remappings=remappings,
        ros_arguments=_log_arguments(arg("node_name"), arg("namespace"), arg("log_level"), arg("all_log_level")),
        output="screen",
        emulate_tty=True,
    )
    return [node]


def generate_launch_description():
    default_params = [FindPackageShare(PACKAGE), "/config/policy.yaml"]
    return LaunchDescription([
        DeclareLaunchArgument("checkpoint", default_value="",
                              description="Checkpoint folder (overrides `checkpoint` in params_file)."),
        DeclareLaunchArgument("params_file", default_value=default_params,
                              description="Parameter file (default: the installed config/policy.yaml)."),
        DeclareLaunchArgument("device", default_value="",
                              description="auto, cpu, cuda or cuda:N (empty: as in params_file)."),
        DeclareLaunchArgument("namespace", default_value="", description="Namespace of the node."),
        DeclareLaunchArgument("node_name", default_value="mode_policy", description="Name of the node."),
        DeclareLaunchArgument("use_sim_time", default_value="false",
                              description="Use /clock (simulation or bag replay) for stamps and timers."),
        DeclareLaunchArgument("goal_topic", default_value="",
                              description="Remap ~/goal (std_msgs/String) to this topic (empty: no remap)."),
        DeclareLaunchArgument("action_chunk_topic", default_value="",
                              description="Remap ~/action_chunk (mode_ros/ActionChunk) (empty: no remap)."),
        DeclareLaunchArgument("joint_trajectory_topic", default_value="",
                              description="Remap ~/joint_trajectory (trajectory_msgs/JointTrajectory)."),
        DeclareLaunchArgument("joint_states_topic", default_value="",
                              description="Remap ~/joint_states (sensor_msgs/JointState)."),
        DeclareLaunchArgument("camera_remappings", default_value="",
                              description="Camera topic remappings, e.g. "
                                          "'image_static:=/cam/image_raw;image_gripper:=/wrist/image_raw'."),
        DeclareLaunchArgument("log_level", default_value="info",
                              description="Level of the node's own logger: debug, info, warn, error or fatal "
                                          "(rcl and the middleware stay quiet; see all_log_level)."),
        DeclareLaunchArgument("all_log_level", default_value="",
                              description="Level of every logger, rcl and rmw included (empty: unchanged); "
                                          "debug prints hundreds of lines a second."),
        OpaqueFunction(function=_launch_node),
    ])
