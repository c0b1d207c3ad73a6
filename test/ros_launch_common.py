"""Pieces the ROS-only launch tests share: a tiny hand model and the node under test (imported after their skips)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any


def tiny_hand_checkpoint(folder: Path) -> str:
    """Write a tiny untrained hands checkpoint (enough to run the whole path) and return its path."""
    from featmap_ros.datasets.nyu import JOINT_NAMES
    from featmap_ros.model import checkpoint
    from featmap_ros.model.nets import FeatureMappingModel, NetConfig

    model = FeatureMappingModel(NetConfig(task="hands", input_size=32, width=4, feature_dim=32, dropout=0.0))
    meta = {"hands": {"joint_names": list(JOINT_NAMES), "cube_m": 0.3}, "crop": {"size": 32}}
    return str(checkpoint.save(folder / "tiny", model, meta))


def hand_node() -> Any:
    """The featmap node on CPU, hands without detections, inputs on /test/depth and /test/camera_info.

    The model is FEATMAP_TEST_MODEL when set, else a tiny checkpoint written to a temporary folder.
    """
    import launch_ros.actions

    model = os.environ.get("FEATMAP_TEST_MODEL") or tiny_hand_checkpoint(Path(tempfile.mkdtemp()))
    return launch_ros.actions.Node(
        package="featmap_ros", executable="featmap_node", name="featmap", output="screen",
        parameters=[{"task": "hands", "model_path": model, "device": "cpu", "use_detections": False}],
        remappings=[("image", "/test/depth"), ("camera_info", "/test/camera_info")],
    )
