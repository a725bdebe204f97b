"""mode_ros.ros."""
