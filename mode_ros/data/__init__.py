"""mode_ros.data."""
