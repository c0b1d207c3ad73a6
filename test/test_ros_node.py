"""The featmap node on a ROS 2 machine (launch_testing): it starts, publishes diagnostics and joints, stops cleanly.

Runs under `colcon test` on a sourced Humble or Jazzy install (torch from pip). The model is a tiny
randomly initialised hand checkpoint written here, or FEATMAP_TEST_MODEL (a hands checkpoint).
"""

from __future__ import annotations

import pytest

pytest.importorskip("rclpy", reason="needs a ROS 2 installation (rclpy); run on a ROS machine with colcon test")
pytest.importorskip("launch_testing", reason="needs launch_testing (ROS 2); run on a ROS machine with colcon test")
pytest.importorskip("torch", reason="the node's estimator needs PyTorch")

import sys  # noqa: E402
import time  # noqa: E402
import unittest  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

import launch  # noqa: E402
import launch_testing.actions  # noqa: E402
import launch_testing.asserts  # noqa: E402
import numpy as np  # noqa: E402
import rclpy  # noqa: E402
from diagnostic_msgs.msg import DiagnosticArray  # noqa: E402
from rcl_interfaces.srv import DescribeParameters  # noqa: E402

from featmap_ros.geometry import Intrinsics  # noqa: E402
from featmap_ros.msg import HandJointsArray  # noqa: E402
from featmap_ros.ros.messages import MessageFactory  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ros_launch_common import hand_node  # noqa: E402

FRAME = "camera_depth_optical_frame"
INTR = Intrinsics(fx=240.0, fy=240.0, cx=79.5, cy=59.5, width=160, height=120)


@pytest.mark.launch_test
def generate_test_description() -> tuple[launch.LaunchDescription, dict]:
    """The node on CPU with the tiny model, hands without detections, inputs on /test/*."""
    node = hand_node()
    return launch.LaunchDescription([node, launch_testing.actions.ReadyToTest()]), {"featmap": node}


class TestNodeRuns(unittest.TestCase):
    """Probe the running node from a second node."""

    @classmethod
    def setUpClass(cls) -> None:
        rclpy.init()

    @classmethod
    def tearDownClass(cls) -> None:
        rclpy.shutdown()

    def setUp(self) -> None:
        self.node = rclpy.create_node("featmap_test_probe")

    def tearDown(self) -> None:
        self.node.destroy_node()

    def spin_until(self, done: Callable[[], bool], timeout_s: float) -> None:
        """Spin the probe until done() or the timeout."""
        end = time.monotonic() + timeout_s
        while time.monotonic() < end and not done():
            rclpy.spin_once(self.node, timeout_sec=0.1)

    def test_publishes_diagnostics(self) -> None:
        got = []
        self.node.create_subscription(
            DiagnosticArray, "/diagnostics", lambda m: got.extend(s for s in m.status if "featmap" in s.name), 10
        )
        self.spin_until(lambda: any(s.values for s in got), 60.0)
        assert got, "no diagnostics from the featmap node within 60 s"
        keys = {v.key for s in got for v in s.values}
        assert {"device", "processed", "dropped (newest wins)", "end-to-end median (ms)", "buffer wait median (ms)",
                "processing median (ms)", "unmatched images", "received: image (/test/depth)"} <= keys

    def test_parameters_are_described_and_model_path_is_read_only(self) -> None:
        client = self.node.create_client(DescribeParameters, "/featmap/describe_parameters")
        assert client.wait_for_service(timeout_sec=60.0)
        future = client.call_async(DescribeParameters.Request(names=["model_path", "min_score"]))
        rclpy.spin_until_future_complete(self.node, future, timeout_sec=10.0)
        model_path, min_score = future.result().descriptors
        assert model_path.read_only and model_path.description and not min_score.read_only

    def test_a_depth_frame_gives_hand_joints_with_its_stamp(self) -> None:
        from rclpy.qos import qos_profile_sensor_data
        from sensor_msgs.msg import CameraInfo, Image

        factory = MessageFactory.for_rclpy()
        pub_image = self.node.create_publisher(Image, "/test/depth", qos_profile_sensor_data)
        pub_info = self.node.create_publisher(CameraInfo, "/test/camera_info", qos_profile_sensor_data)
        got: list = []
        self.node.create_subscription(HandJointsArray, "/featmap/hands", got.append, 10)
        depth = np.full((INTR.height, INTR.width), 1.2, dtype=np.float32)
        depth[30:90, 50:110] = 0.6
        stamp_ns = 0
        end = time.monotonic() + 60.0
        while not got and time.monotonic() < end:  # the node may still be loading: keep sending
            stamp_ns = self.node.get_clock().now().nanoseconds
            pub_info.publish(factory.camera_info(INTR, stamp_ns, FRAME))
            pub_image.publish(factory.image_depth(depth, stamp_ns, FRAME))
            self.spin_until(lambda: bool(got), 0.5)
        assert got, "no HandJointsArray on /featmap/hands within 60 s"
        msg = got[0]
        assert msg.header.frame_id == FRAME and len(msg.hands) == 1 and len(msg.hands[0].positions) == 14


@launch_testing.post_shutdown_test()
class TestNodeStopsCleanly(unittest.TestCase):
    """Ctrl-C (SIGINT from launch) ends the node with exit code 0."""

    def test_exit_code(self, proc_info) -> None:
        launch_testing.asserts.assertExitCodes(proc_info, allowable_exit_codes=[0])
