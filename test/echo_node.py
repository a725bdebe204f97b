"""A second process for the DDS round-trip test: republishes every mode_ros/ActionChunk it receives on
~/in unchanged on ~/out (both reliable, depth 10). Run: python echo_node.py --ros-args ..."""
import sys

import rclpy
from rclpy.executors import ExternalShutdownException
from rclpy.node import Node

from mode_ros.msg import ActionChunk


def main() -> int:
    rclpy.init(args=sys.argv)
    node = Node("chunk_echo")
    pub = node.create_publisher(ActionChunk, "~/out", 10)
    node.create_subscription(ActionChunk, "~/in", pub.publish, 10)
    node.get_logger().info("echo ready")
    try:
        rclpy.spin(node)
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        node.destroy_node()
        rclpy.try_shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
