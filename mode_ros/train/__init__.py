"""mode_ros.train."""
