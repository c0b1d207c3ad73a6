"""The ROS edge: message conversion (pure Python) and the rclpy node (ros/node.py only)."""
