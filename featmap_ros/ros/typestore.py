"""rosbags type stores that know our messages and vision_msgs, for off-ROS code and tests.

Our msg/ files are the single source of truth: they are read from the source tree, from an
installed share/featmap_ros/msg (pip data_files or a colcon install), or from FEATMAP_MSG_DIR.
vision_msgs (4.1.1 on Humble and Jazzy, identical fields) is not in rosbags' stores, so its
definitions are registered from the text below.
"""

from __future__ import annotations

import os
import sys
from functools import cache
from pathlib import Path

from rosbags.typesys import Stores, get_types_from_msg, get_typestore

from featmap_ros.errors import FeatmapError

PACKAGE = "featmap_ros"
DISTROS = {"humble": Stores.ROS2_HUMBLE, "jazzy": Stores.ROS2_JAZZY}

# vision_msgs 4.1.1 (github.com/ros-perception/vision_msgs), the messages we read and write.
VISION_MSGS = {
    "Point2D": "float64 x\nfloat64 y\n",
    "Pose2D": "vision_msgs/Point2D position\nfloat64 theta\n",
    "BoundingBox2D": "vision_msgs/Pose2D center\nfloat64 size_x\nfloat64 size_y\n",
    "BoundingBox3D": "geometry_msgs/Pose center\ngeometry_msgs/Vector3 size\n",
    "ObjectHypothesis": "string class_id\nfloat64 score\n",
    "ObjectHypothesisWithPose": "vision_msgs/ObjectHypothesis hypothesis\ngeometry_msgs/PoseWithCovariance pose\n",
    "Detection2D": (
        "std_msgs/Header header\nvision_msgs/ObjectHypothesisWithPose[] results\n"
        "vision_msgs/BoundingBox2D bbox\nstring id\n"
    ),
    "Detection2DArray": "std_msgs/Header header\nvision_msgs/Detection2D[] detections\n",
    "Detection3D": (
        "std_msgs/Header header\nvision_msgs/ObjectHypothesisWithPose[] results\n"
        "vision_msgs/BoundingBox3D bbox\nstring id\n"
    ),
    "Detection3DArray": "std_msgs/Header header\nvision_msgs/Detection3D[] detections\n",
}


class TypestoreError(FeatmapError, RuntimeError):
    """Our message definitions could not be found or registered."""


def msg_dir() -> Path:
    """Find the folder holding our .msg files."""
    candidates = []
    if os.environ.get("FEATMAP_MSG_DIR"):
        candidates.append(Path(os.environ["FEATMAP_MSG_DIR"]))
    candidates.append(Path(__file__).resolve().parents[2] / "msg")  # source tree / editable install
    candidates.append(Path(sys.prefix) / "share" / PACKAGE / "msg")  # pip data_files
    for prefix in os.environ.get("AMENT_PREFIX_PATH", "").split(os.pathsep):
        if prefix:
            candidates.append(Path(prefix) / "share" / PACKAGE / "msg")  # colcon install
    for c in candidates:
        if (c / "HandJoints.msg").is_file():
            return c
    raise TypestoreError(f"cannot find {PACKAGE} message files; looked in {[str(c) for c in candidates]}")


def message_definitions() -> dict[str, str]:
    """Return {'featmap_ros/msg/Name': text} for every .msg file of ours."""
    return {f"{PACKAGE}/msg/{p.stem}": p.read_text() for p in sorted(msg_dir().glob("*.msg"))}


@cache
def typestore(distro: str = "humble"):
    """A rosbags Typestore for `distro` (humble or jazzy) with vision_msgs and our messages added."""
    if distro not in DISTROS:
        raise TypestoreError(f"unknown ROS distro {distro!r}; expected one of {sorted(DISTROS)}")
    ts = get_typestore(DISTROS[distro])
    types = {}
    for name, text in VISION_MSGS.items():
        types.update(get_types_from_msg(text, f"vision_msgs/msg/{name}"))
    for name, text in message_definitions().items():
        types.update(get_types_from_msg(text, name))
    ts.register(types)
    return ts
