"""Readers for the NYU Hand Pose dataset (Tompson et al. 2014).

NYU stores depth in millimetres as (G << 8) | B of an 8-bit RGB PNG, joints as (u, v, d mm) and
as (x, y, z mm) with y pointing up. Everything leaving this module is in metres and in the
OpenCV camera frame (y down): this is the only place those conventions are converted.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from featmap_ros.errors import FeatmapError
from featmap_ros.geometry import Intrinsics, uvd_to_xyz

MM = 1e-3

# The NYU Kinect camera (640x480).
NYU_INTRINSICS = Intrinsics(fx=588.03, fy=587.07, cx=320.0, cy=240.0, width=640, height=480)

# The 14 evaluation joints: their ids among NYU's 36, and our names for them, in the standard order.
EVAL_JOINT_IDS = (0, 3, 6, 9, 12, 15, 18, 21, 24, 25, 27, 30, 31, 32)
JOINT_NAMES = (
    "pinky_tip", "pinky_mid", "ring_tip", "ring_mid", "middle_tip", "middle_mid", "index_tip",
    "index_mid", "thumb_tip", "thumb_mid", "thumb_base", "wrist_1", "wrist_2", "palm",
)

# The NYU 14-joint skeleton as (parent, child) joint names: each finger runs tip - mid - palm, the
# thumb tip - mid - base - palm, and both wrist points hang off the palm. Names, not indices, so a
# hand model with another joint order or subset still draws (see bone_indices).
HAND_BONES: tuple[tuple[str, str], ...] = (
    ("palm", "pinky_mid"), ("pinky_mid", "pinky_tip"),
    ("palm", "ring_mid"), ("ring_mid", "ring_tip"),
    ("palm", "middle_mid"), ("middle_mid", "middle_tip"),
    ("palm", "index_mid"), ("index_mid", "index_tip"),
    ("palm", "thumb_base"), ("thumb_base", "thumb_mid"), ("thumb_mid", "thumb_tip"),
    ("palm", "wrist_1"), ("palm", "wrist_2"),
)

PALM = JOINT_NAMES.index("palm")

# Depth value that marks background in the shipped NYU frames (segmented-out pixels).
NYU_BACKGROUND_MM = 2001


class NyuError(FeatmapError, ValueError):
    """An NYU file is missing or not in the expected format."""


def read_depth(path: str | Path, background_mm: int | None = NYU_BACKGROUND_MM) -> np.ndarray:
    """Read an NYU depth PNG as HxW float32 metres, NaN where invalid (0 or the background value)."""
    bgr = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if bgr is None:
        raise NyuError(f"cannot read depth image {path}")
    if bgr.ndim != 3 or bgr.shape[2] < 3 or bgr.dtype != np.uint8:
        raise NyuError(f"{path}: expected an 8-bit RGB PNG, got shape {bgr.shape} dtype {bgr.dtype}")
    # OpenCV gives BGR: B is channel 0, G channel 1.
    mm = (bgr[..., 1].astype(np.uint16) << 8) | bgr[..., 0].astype(np.uint16)
    invalid = mm == 0
    if background_mm is not None:
        invalid |= mm == background_mm
    depth = mm.astype(np.float32) * np.float32(MM)
    depth[invalid] = np.nan
    return depth


def write_depth(path: str | Path, depth_m: np.ndarray) -> None:
    """Write HxW metres as an NYU depth PNG (NaN becomes 0); the inverse of read_depth."""
    mm = np.where(np.isfinite(depth_m), np.round(np.asarray(depth_m) / MM), 0).astype(np.uint16)
    bgr = np.zeros(mm.shape + (3,), dtype=np.uint8)
    bgr[..., 0] = mm & 0xFF
    bgr[..., 1] = mm >> 8
    if not cv2.imwrite(str(path), bgr):
        raise NyuError(f"cannot write {path}")


def read_joints_uvd_txt(path: str | Path) -> np.ndarray:
    """Read one line of 14 x (u px, v px, d mm) as a (14, 3) array of (u, v, depth metres)."""
    try:
        values = np.loadtxt(path, dtype=np.float64).reshape(-1)
    except (OSError, ValueError) as err:
        raise NyuError(f"cannot read joints from {path}: {err}") from err
    if values.size != 3 * len(EVAL_JOINT_IDS):
        raise NyuError(f"{path}: expected {3 * len(EVAL_JOINT_IDS)} numbers (14 joints x uvd), got {values.size}")
    uvd = values.reshape(-1, 3).copy()
    uvd[:, 2] *= MM
    return uvd


def joints_uvd_to_xyz(uvd_m: np.ndarray, intrinsics: Intrinsics = NYU_INTRINSICS) -> np.ndarray:
    """(J, 3) (u, v, depth metres) -> (J, 3) camera-frame metres (OpenCV frame)."""
    return uvd_to_xyz(uvd_m, intrinsics.K)


@dataclass(frozen=True)
class NyuSplit:
    """Ground truth of one NYU split folder (train/ or test/) for one Kinect view.

    joints_xyz: (F, 14, 3) metres in the OpenCV camera frame; joints_uvd: (F, 14, 3) with depth
    in metres; depth_paths: the F depth PNGs.
    """

    joints_xyz: np.ndarray
    joints_uvd: np.ndarray
    depth_paths: list[Path]


def read_split(folder: str | Path, kinect: int = 1) -> NyuSplit:
    """Read joint_data.mat of an NYU split folder (via scipy.io) and list its depth images."""
    import scipy.io

    folder = Path(folder)
    mat_path = folder / "joint_data.mat"
    try:
        mat = scipy.io.loadmat(str(mat_path))
    except (FileNotFoundError, OSError, ValueError) as err:
        raise NyuError(f"cannot read {mat_path}: {err}") from err
    for key in ("joint_uvd", "joint_xyz"):
        if key not in mat or np.asarray(mat[key]).ndim != 4 or np.asarray(mat[key]).shape[-1] != 3:
            raise NyuError(f"{mat_path}: expected '{key}' of shape (kinects, frames, 36, 3)")
    k = kinect - 1
    uvd = np.asarray(mat["joint_uvd"], dtype=np.float64)[k][:, EVAL_JOINT_IDS, :].copy()
    xyz = np.asarray(mat["joint_xyz"], dtype=np.float64)[k][:, EVAL_JOINT_IDS, :].copy()
    uvd[..., 2] *= MM
    xyz *= MM
    xyz[..., 1] *= -1.0  # NYU's y points up; ours points down.
    paths = [folder / f"depth_{kinect}_{i + 1:07d}.png" for i in range(len(uvd))]
    return NyuSplit(joints_xyz=xyz, joints_uvd=uvd, depth_paths=paths)
