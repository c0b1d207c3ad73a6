"""Images with no camera_info: the node's diagnostics name the silent topic and count the unmatched images.

Issue 16 item 2: ApproximateTimeSynchronizer never calls back while one input is silent, so the
node used to say only "no frames in the last 5 s". Run on a ROS machine with launch_test / colcon test.
"""

from __future__ import annotations

import pytest

pytest.importorskip("rclpy", reason="needs a ROS 2 installation (rclpy); run on a ROS machine with launch_test")
pytest.importorskip("launch_testing", reason="needs launch_testing (ROS 2); run on a ROS machine with launch_test")
pytest.importorskip("torch", reason="the node's estimator needs PyTorch")

import sys  # noqa: E402
import time  # noqa: E402
import unittest  # noqa: E402
from pathlib import Path  # noqa: E402

import launch  # noqa: E402
import launch.actions  # noqa: E402
import launch_testing.actions  # noqa: E402
import launch_testing.asserts  # noqa: E402
import rclpy  # noqa: E402
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from ros_launch_common import hand_node  # noqa: E402


@pytest.mark.launch_test
def generate_test_description() -> tuple[launch.LaunchDescription, dict]:
    """The node listening to /test/depth + /test/camera_info; only depth images are published."""
    node = hand_node()
    images_only = launch.actions.ExecuteProcess(
        cmd=[sys.executable, str(HERE / "ros_frame_publisher.py"), "--rate", "10", "--no-info"], output="screen",
    )
    return launch.LaunchDescription([node, images_only, launch_testing.actions.ReadyToTest()]), {"featmap": node}


class TestSilentCameraInfo(unittest.TestCase):

    def test_diagnostics_name_the_silent_topic(self) -> None:
        rclpy.init()
        try:
            probe = rclpy.create_node("featmap_inputs_probe")
            got: list = []
            probe.create_subscription(
                DiagnosticArray, "/diagnostics", lambda m: got.extend(s for s in m.status if "featmap" in s.name), 10
            )
            end = time.monotonic() + 60.0
            while time.monotonic() < end and not any("/test/camera_info" in s.message for s in got):
                rclpy.spin_once(probe, timeout_sec=0.1)
            probe.destroy_node()
        finally:
            rclpy.shutdown()
        named = [s for s in got if "/test/camera_info" in s.message]
        assert named, f"no diagnostics naming /test/camera_info within 60 s; got {[s.message for s in got][-3:]}"
        status = named[-1]
        assert status.level == DiagnosticStatus.ERROR
        assert status.message.startswith("images arrive on /test/depth but nothing on camera_info topic "
                                         "/test/camera_info for 5 s")
        values = {v.key: v.value for v in status.values}
        assert int(values["unmatched images: no camera_info"]) > 0
        assert int(values["received: image (/test/depth)"]) > 0
        assert values["received: camera_info (/test/camera_info)"] == "0"


@launch_testing.post_shutdown_test()
class TestStops(unittest.TestCase):

    def test_exit_code(self, proc_info, featmap) -> None:
        launch_testing.asserts.assertExitCodes(proc_info, allowable_exit_codes=[0], process=featmap)
