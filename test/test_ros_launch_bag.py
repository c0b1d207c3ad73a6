"""A bag made by `featmap bag make objects`, played through object_pose.launch.py: TF, markers and poses per frame.

Issue 16: every image of the bag gets a Detection3DArray and a MarkerArray stamped with that image's
stamp, and TF frames featmap/<object> at the stamps of the frames with estimates. Needs a ROS
machine (launch_test / colcon test) and the LM-O BOP data (FEATMAP_TEST_BOP or ../shared/data/lmo);
FEATMAP_TEST_OBJECTS_MODEL may name a trained objects checkpoint (else a tiny untrained one).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

pytest.importorskip("rclpy", reason="needs a ROS 2 installation (rclpy); run on a ROS machine with launch_test")
pytest.importorskip("launch_testing", reason="needs launch_testing (ROS 2); run on a ROS machine with launch_test")
pytest.importorskip("torch", reason="the node's estimator needs PyTorch")

BOP = Path(os.environ.get("FEATMAP_TEST_BOP") or Path(__file__).resolve().parents[2] / "shared" / "data" / "lmo")
if not (BOP / "test" / "000002" / "scene_gt.json").is_file():
    pytest.skip(f"LM-O BOP data not found at {BOP} (set FEATMAP_TEST_BOP)", allow_module_level=True)

import time  # noqa: E402 - after the skips, so collecting off-ROS needs none of these
import unittest  # noqa: E402

import launch  # noqa: E402
import launch.actions  # noqa: E402
import launch_testing.actions  # noqa: E402
import launch_testing.asserts  # noqa: E402
import rclpy  # noqa: E402
from launch.launch_description_sources import PythonLaunchDescriptionSource  # noqa: E402
from launch_ros.substitutions import FindPackageShare  # noqa: E402
from rcl_interfaces.srv import DescribeParameters  # noqa: E402
from rclpy.qos import DurabilityPolicy, QoSProfile  # noqa: E402
from tf2_msgs.msg import TFMessage  # noqa: E402
from vision_msgs.msg import Detection3DArray  # noqa: E402
from visualization_msgs.msg import MarkerArray  # noqa: E402

FRAMES = "3-58"  # LM-O scene 2 image ids 3, 8, 17, 27, 36, 38, 39, 41, 47, 58
WORK = Path(tempfile.mkdtemp(prefix="featmap_bag_test_"))


def tiny_objects_checkpoint(folder: Path) -> str:
    """An untrained objects checkpoint over the LM-O models (enough to run PnP on every detection)."""
    import torch

    from featmap_ros.datasets import bop
    from featmap_ros.model import checkpoint
    from featmap_ros.model.nets import FeatureMappingModel, NetConfig

    infos = bop.load_models_info(BOP / "models" / "models_info.json")
    ids = [i for i in (1, 5, 6, 8, 9, 10, 11, 12) if i in infos]
    torch.manual_seed(0)
    model = FeatureMappingModel(NetConfig(task="objects", input_size=64, width=4, feature_dim=32,
                                          n_outputs=16 * len(ids), mapping=True))
    objects = [{"obj_id": i, "name": f"o{i}", "corners_m": infos[i].corners.tolist(),
                "extent_m": infos[i].size_xyz.tolist(), "symmetric": infos[i].symmetric} for i in ids]
    return str(checkpoint.save(folder / "tiny_objects", model,
                               {"method": "fm", "objects": objects, "crop": {"size": 64, "window_scale": 1.2}}))


def make_bag() -> Path:
    """The bag, written by the project's own command."""
    out = WORK / "bag"
    subprocess.run([sys.executable, "-m", "featmap_ros.cli", "bag", "make", "objects", "--bop", str(BOP),
                    "--scene", "2", "--frames", FRAMES, "--out", str(out)], check=True)
    return out


def image_stamps(bag: Path) -> list[int]:
    """Header stamps of the bag's colour images, in order."""
    from rosbags.highlevel import AnyReader

    stamps = []
    with AnyReader([bag]) as reader:
        conns = [c for c in reader.connections if c.topic == "/camera/color/image_raw"]
        for conn, _, raw in reader.messages(connections=conns):
            h = reader.deserialize(raw, conn.msgtype).header
            stamps.append(h.stamp.sec * 10**9 + h.stamp.nanosec)
    return stamps


def _ns(header) -> int:
    return header.stamp.sec * 10**9 + header.stamp.nanosec


@pytest.mark.launch_test
def generate_test_description() -> tuple[launch.LaunchDescription, dict]:
    """object_pose.launch.py as a user starts it, on the bag's topics."""
    bag = make_bag()
    model = os.environ.get("FEATMAP_TEST_OBJECTS_MODEL") or tiny_objects_checkpoint(WORK)
    launch_file = Path(FindPackageShare("featmap_ros").find("featmap_ros")) / "launch" / "object_pose.launch.py"
    include = launch.actions.IncludeLaunchDescription(
        PythonLaunchDescriptionSource(str(launch_file)),
        launch_arguments={"model_path": model, "image_topic": "/camera/color/image_raw",
                          "camera_info_topic": "/camera/color/camera_info",
                          "detections_topic": "/camera/color/detections"}.items(),
    )
    return launch.LaunchDescription([include, launch_testing.actions.ReadyToTest()]), {"bag": bag}


class TestBagThroughTheLaunchFile(unittest.TestCase):

    def test_every_frame_gives_tf_markers_and_detections_with_its_stamp(self, bag: Path) -> None:
        stamps = image_stamps(bag)
        assert len(stamps) >= 5
        rclpy.init()
        try:
            probe = rclpy.create_node("featmap_bag_probe")
            poses: dict[int, Detection3DArray] = {}
            markers: dict[int, MarkerArray] = {}
            tf: dict[int, set[str]] = {}
            probe.create_subscription(
                Detection3DArray, "/featmap/objects", lambda m: poses.setdefault(_ns(m.header), m), 50)
            probe.create_subscription(
                MarkerArray, "/featmap/markers", lambda m: markers.setdefault(_ns(m.markers[0].header), m), 50)

            def on_tf(msg: TFMessage) -> None:
                for t in msg.transforms:
                    tf.setdefault(_ns(t.header), set()).add(t.child_frame_id)

            tf_qos = QoSProfile(depth=100, durability=DurabilityPolicy.VOLATILE)
            probe.create_subscription(TFMessage, "/tf", on_tf, tf_qos)
            client = probe.create_client(DescribeParameters, "/featmap/describe_parameters")
            assert client.wait_for_service(timeout_sec=120.0), "the node did not come up (model loading?)"
            # Half speed: the node keeps the newest frame only, and this test wants every one.
            player = subprocess.Popen(["ros2", "bag", "play", str(bag), "--rate", "0.5"])
            end = time.monotonic() + 120.0
            while time.monotonic() < end and (player.poll() is None or len(poses) < len(stamps)):
                rclpy.spin_once(probe, timeout_sec=0.1)
            player.wait(timeout=30)
            settle = time.monotonic() + 3.0  # the last frame's TF and markers
            while time.monotonic() < settle:
                rclpy.spin_once(probe, timeout_sec=0.1)
            probe.destroy_node()
        finally:
            rclpy.shutdown()
        assert player.returncode == 0
        assert sorted(poses) == stamps, f"Detection3DArray stamps {sorted(poses)} != image stamps {stamps}"
        assert sorted(markers) == stamps, f"MarkerArray stamps {sorted(markers)} != image stamps {stamps}"
        with_objects = sorted(s for s, m in poses.items() if len(m.detections))
        assert with_objects, "no frame gave an object estimate"
        assert sorted(tf) == with_objects
        for stamp in with_objects:
            names = {f"featmap/{d.id}" for d in poses[stamp].detections}
            assert names == tf[stamp], (stamp, names, tf[stamp])
            assert poses[stamp].header.frame_id == "camera_color_optical_frame"


@launch_testing.post_shutdown_test()
class TestStops(unittest.TestCase):

    def test_exit_codes(self, proc_info) -> None:
        launch_testing.asserts.assertExitCodes(proc_info, allowable_exit_codes=[0])
