"""featmap_ros: Feature Mapping for 3D pose from synthetic images, on ROS 2.

Kept light on purpose: on a ROS machine this file replaces the one rosidl generates for the
message package of the same name, so it must import neither rclpy nor torch.
"""

__version__ = "0.1.0"
