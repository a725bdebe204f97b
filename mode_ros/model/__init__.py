"""mode_ros.model."""
