"""The ROS 2 package files agree with each other and with the rules of shared/ROS2_NOTES.md."""

from __future__ import annotations

import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest

from featmap_ros.ros.typestore import DISTROS, message_definitions, typestore

ROOT = Path(__file__).resolve().parents[1]


def test_package_xml_is_an_ament_cmake_interface_package():
    root = ET.parse(ROOT / "package.xml").getroot()
    assert root.get("format") == "3" and root.findtext("name") == "featmap_ros"
    assert root.find("export/build_type").text == "ament_cmake"
    assert root.findtext("member_of_group") == "rosidl_interface_packages"
    tools = {e.text for e in root.findall("buildtool_depend")}
    assert {"ament_cmake", "ament_cmake_python", "rosidl_default_generators"} <= tools
    execs = {e.text for e in root.findall("exec_depend")}
    assert {"rclpy", "vision_msgs", "tf2_ros_py", "message_filters", "rosidl_default_runtime"} <= execs
    email = root.find("maintainer").get("email")
    assert re.fullmatch(r"[^@\s]+@[^@\s]+\.[a-z]{2,}", email) and email != "a@b.c"
    versions = {root.findtext("version")}
    versions.add(re.search(r'version="([^"]+)"', (ROOT / "setup.py").read_text()).group(1))
    import featmap_ros

    versions.add(featmap_ros.__version__)
    assert len(versions) == 1, f"package.xml, setup.py and __init__ disagree on the version: {versions}"


def test_cmake_generates_every_message_and_installs_python_into_the_generated_package():
    cmake = (ROOT / "CMakeLists.txt").read_text()
    for msg in sorted((ROOT / "msg").glob("*.msg")):
        assert f'"msg/{msg.name}"' in cmake
    assert "rosidl_generate_interfaces" in cmake
    assert "ament_python_install_package(" not in cmake.replace("# ", "").split("rosidl_python#141")[-1]
    assert "ament_get_python_install_dir" in cmake
    assert not (ROOT / "featmap_ros" / "msg").exists(), "featmap_ros/msg is the name rosidl generates"
    for folder in ("launch", "config", "msg", "test", "scripts"):
        assert (ROOT / folder).is_dir()


def test_package_init_stays_light():
    """On ROS our __init__ replaces rosidl's: importing it must not pull torch, rclpy or cv2."""
    code = "import sys, featmap_ros; print(','.join(m for m in ('torch', 'rclpy', 'cv2') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == ""


@pytest.mark.parametrize("distro", sorted(DISTROS))
def test_our_messages_load_into_the_rosbags_type_stores(distro):
    ts = typestore(distro)
    names = set(message_definitions())
    assert {"featmap_ros/msg/HandJoints", "featmap_ros/msg/HandJointsArray"} <= names
    T = ts.types
    Header, Time, Point = T["std_msgs/msg/Header"], T["builtin_interfaces/msg/Time"], T["geometry_msgs/msg/Point"]
    hand = T["featmap_ros/msg/HandJoints"](
        header=Header(stamp=Time(sec=3, nanosec=7), frame_id="camera_depth_optical_frame"),
        hand_id="hand0",
        joint_names=["palm", "wrist_1"],
        positions=[Point(x=0.1, y=-0.2, z=0.7), Point(x=0.0, y=0.0, z=0.75)],
        confidences=np.array([0.9, 0.5], dtype=np.float32),
        center=Point(x=0.1, y=-0.2, z=0.7),
        cube_size=0.3,
        score=0.8,
        out_of_domain=1.5,
    )
    msg = T["featmap_ros/msg/HandJointsArray"](header=hand.header, hands=[hand])
    raw = ts.serialize_cdr(msg, "featmap_ros/msg/HandJointsArray")
    back = ts.deserialize_cdr(raw, "featmap_ros/msg/HandJointsArray")
    assert back.hands[0].joint_names == ["palm", "wrist_1"]
    assert back.hands[0].positions[0].y == -0.2 and back.header.stamp.nanosec == 7
    assert np.allclose(back.hands[0].confidences, [0.9, 0.5])
    assert "vision_msgs/msg/Detection3DArray" in T and "vision_msgs/msg/Detection2DArray" in T
