"""mode_ros.sim."""
