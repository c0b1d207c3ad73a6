"""Typed results of the estimator, shared by metrics, the message layer, overlays and bag replay.

Plain dataclasses of numpy arrays: no ROS, no torch. Units are metres and pixels; poses are
model-to-camera (x_cam = R @ x_model + t) in the OpenCV camera frame (= ROS optical frame).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from featmap_ros.datasets.nyu import HAND_BONES, JOINT_NAMES


def bone_indices(joint_names: tuple[str, ...] | list[str]) -> np.ndarray:
    """Return the (B, 2) joint-index pairs of HAND_BONES whose two joints are both in joint_names."""
    pos = {n: i for i, n in enumerate(joint_names)}
    pairs = [(pos[a], pos[b]) for a, b in HAND_BONES if a in pos and b in pos]
    return np.array(pairs, dtype=np.int64).reshape(-1, 2)


@dataclass
class Detection2D:
    """A 2D detection that seeds the estimator: box (x, y, w, h) in pixels, top-left corner first.

    class_id is the detector's label; obj_id is the dataset object id when the label is one (BOP).
    """

    box_xywh: np.ndarray
    score: float = 1.0
    class_id: str = ""
    obj_id: int | None = None

    def __post_init__(self) -> None:
        self.box_xywh = np.asarray(self.box_xywh, dtype=np.float64).reshape(4)
        # Either name fills the other, so consumers can rely on class_id and, for BOP, obj_id.
        if not self.class_id and self.obj_id is not None:
            self.class_id = str(self.obj_id)
        if self.obj_id is None and self.class_id.isdigit():
            self.obj_id = int(self.class_id)


@dataclass
class ObjectPose:
    """One object's 6-DoF pose estimate (BB8 corners + PnP)."""

    obj_id: int
    name: str
    R: np.ndarray  # (3, 3) model-to-camera rotation
    t: np.ndarray  # (3,) model-to-camera translation, metres
    corners_uv: np.ndarray  # (8, 2) predicted box corners, pixels (NaN when not predicted, e.g. ground truth)
    corners_3d: np.ndarray  # (8, 3) box corners in the model frame, metres (geometry.box_corners order)
    extent: np.ndarray  # (3,) box size along the model axes, metres
    score: float = 1.0
    out_of_domain: float = 0.0  # distance of the mapped feature to the synthetic feature distribution

    def corners_cam(self) -> np.ndarray:
        """Return the (8, 3) box corners in the camera frame, metres."""
        return np.asarray(self.corners_3d) @ np.asarray(self.R).T + np.asarray(self.t).reshape(1, 3)


@dataclass
class HandPose:
    """One hand's 3D joints estimated from a depth image, camera frame, metres."""

    joints_xyz: np.ndarray  # (J, 3) metres, camera frame
    confidences: np.ndarray  # (J,) in [0, 1]
    centre: np.ndarray  # (3,) centre of the metric cube crop, metres
    cube_m: float  # edge length of the cube crop, metres
    joint_names: tuple[str, ...] = JOINT_NAMES
    score: float = 1.0
    out_of_domain: float = 0.0


@dataclass
class FrameResult:
    """Everything estimated on one image: stamp (ns) and camera frame id come from the image header."""

    stamp_ns: int
    frame_id: str
    objects: list[ObjectPose] = field(default_factory=list)
    hands: list[HandPose] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)  # stage name -> seconds
