#!/usr/bin/env python3
"""Publish depth frames (16UC1 + camera_info) at a fixed rate for the ROS launch tests; keep going 1 s past SIGINT.

    python3 test/ros_frame_publisher.py --rate 30 --image /test/depth --camera-info /test/camera_info [--no-info]

Run by the launch tests as a separate process, so the node is still under load while launch stops it.
"""

from __future__ import annotations

import argparse
import signal
import time

import numpy as np
import rclpy
from rclpy.qos import qos_profile_sensor_data
from rclpy.signals import SignalHandlerOptions
from sensor_msgs.msg import CameraInfo, Image

from featmap_ros.geometry import Intrinsics
from featmap_ros.ros.messages import MessageFactory

FRAME = "camera_depth_optical_frame"
INTR = Intrinsics(fx=240.0, fy=240.0, cx=79.5, cy=59.5, width=160, height=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=30.0)
    parser.add_argument("--image", default="/test/depth")
    parser.add_argument("--camera-info", default="/test/camera_info")
    parser.add_argument("--no-info", action="store_true", help="publish images only (a silent camera_info)")
    parser.add_argument("--linger-s", type=float, default=1.0, help="keep publishing this long after SIGINT")
    args, ros_args = parser.parse_known_args()
    rclpy.init(args=ros_args, signal_handler_options=SignalHandlerOptions.NO)
    stop_at: list[float] = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop_at.append(time.monotonic() + args.linger_s) if not stop_at else None)
    node = rclpy.create_node("featmap_test_frames")
    factory = MessageFactory.for_rclpy()
    pub_image = node.create_publisher(Image, args.image, qos_profile_sensor_data)
    pub_info = node.create_publisher(CameraInfo, args.camera_info, qos_profile_sensor_data)
    depth = np.full((INTR.height, INTR.width), 1.2, dtype=np.float32)
    depth[30:90, 50:110] = 0.6
    period = 1.0 / args.rate
    next_t = time.monotonic()
    while not stop_at or time.monotonic() < stop_at[0]:
        stamp_ns = node.get_clock().now().nanoseconds
        if not args.no_info:
            pub_info.publish(factory.camera_info(INTR, stamp_ns, FRAME))
        pub_image.publish(factory.image_depth(depth, stamp_ns, FRAME))
        next_t += period
        time.sleep(max(0.0, next_t - time.monotonic()))
    node.destroy_node()
    rclpy.try_shutdown()


if __name__ == "__main__":
    main()
