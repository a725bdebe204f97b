"""Exports of a checkpoint or of recordings for other runtimes and toolchains (no ROS)."""
