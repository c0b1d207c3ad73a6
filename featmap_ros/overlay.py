"""Draw estimates on images: projected object boxes, hand skeletons, and depth as colour.

Inputs and outputs are HxWx3 uint8 RGB; inputs are never modified.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np

from featmap_ros.geometry import BOX_EDGES, project
from featmap_ros.results import HandPose, ObjectPose, bone_indices

# RGB colours: estimates green, ground truth blue, BB8's raw corner predictions yellow.
EST_RGB = (40, 220, 60)
GT_RGB = (60, 120, 255)
CORNER_RGB = (255, 220, 0)
HAND_RGB = (255, 70, 50)
JOINT_RGB = (255, 255, 255)
MIN_Z_M = 1e-3  # points closer than this to the camera plane do not project


def depth_to_colormap(depth_m: np.ndarray, near_m: float | None = None, far_m: float | None = None) -> np.ndarray:
    """Colour an HxW depth image in metres (NaN invalid) as HxWx3 uint8 RGB; invalid pixels are black.

    near_m / far_m default to the 1st and 99th percentile of the valid depth.
    """
    depth = np.asarray(depth_m, dtype=np.float32)
    valid = np.isfinite(depth) & (depth > 0)
    if not valid.any():
        return np.zeros((*depth.shape, 3), dtype=np.uint8)
    lo = float(np.percentile(depth[valid], 1)) if near_m is None else near_m
    hi = float(np.percentile(depth[valid], 99)) if far_m is None else far_m
    hi = max(hi, lo + 1e-6)
    grey = np.clip((np.where(valid, depth, hi) - lo) / (hi - lo) * 255.0, 0, 255).astype(np.uint8)
    rgb = cv2.cvtColor(cv2.applyColorMap(grey, cv2.COLORMAP_TURBO), cv2.COLOR_BGR2RGB)
    rgb[~valid] = 0
    return rgb


def _as_rgb(image: np.ndarray) -> np.ndarray:
    """Copy an RGB, grey or depth (float, metres) image into a fresh HxWx3 uint8 RGB canvas."""
    img = np.asarray(image)
    if img.dtype != np.uint8:
        return depth_to_colormap(img)
    if img.ndim == 2:
        return np.repeat(img[..., None], 3, axis=2)
    return np.ascontiguousarray(img[..., :3]).copy()


def _px(uv: np.ndarray) -> tuple[int, int]:
    """Round a (2,) pixel position for OpenCV drawing."""
    return int(round(float(uv[0]))), int(round(float(uv[1])))


def _draw_box(canvas: np.ndarray, obj: ObjectPose, K: np.ndarray, rgb: tuple[int, int, int], label: str) -> None:
    """Draw the 12 projected edges of an object's box under its pose, with a label at its top corner."""
    corners = obj.corners_cam()
    if not np.isfinite(corners).all() or (corners[:, 2] <= MIN_Z_M).any():
        return  # a box behind the camera has no sensible projection
    uv = project(corners, K)
    for a, b in BOX_EDGES:
        cv2.line(canvas, _px(uv[a]), _px(uv[b]), rgb, 2, cv2.LINE_AA)
    top = uv[np.argmin(uv[:, 1])]
    cv2.putText(canvas, label, (_px(top)[0], _px(top)[1] - 6), cv2.FONT_HERSHEY_SIMPLEX, 0.5, rgb, 1, cv2.LINE_AA)


def draw_objects(
    rgb: np.ndarray, objects: Sequence[ObjectPose], K: np.ndarray, gt: Sequence[ObjectPose] | None = None
) -> np.ndarray:
    """Return a copy of an HxWx3 uint8 RGB image with estimated (green) and ground-truth (blue) boxes.

    Boxes are the model boxes projected under each pose; BB8's raw corner predictions (corners_uv),
    where finite, are marked as small yellow dots so the PnP fit can be judged against them.
    """
    canvas = _as_rgb(rgb)
    for obj in gt or ():
        _draw_box(canvas, obj, K, GT_RGB, f"{obj.name} gt")
    for obj in objects:
        _draw_box(canvas, obj, K, EST_RGB, f"{obj.name} {obj.score:.2f}")
        corners_uv = np.asarray(obj.corners_uv, dtype=np.float64).reshape(-1, 2)
        for uv in corners_uv[np.isfinite(corners_uv).all(axis=1)]:
            cv2.circle(canvas, _px(uv), 3, CORNER_RGB, -1, cv2.LINE_AA)
    return canvas


def draw_hands(image: np.ndarray, hands: Sequence[HandPose], K: np.ndarray) -> np.ndarray:
    """Return an HxWx3 uint8 RGB copy of an RGB or depth (HxW float metres) image with hand skeletons."""
    canvas = _as_rgb(image)
    for i, hand in enumerate(hands):
        joints = np.asarray(hand.joints_xyz, dtype=np.float64).reshape(-1, 3)
        ok = np.isfinite(joints).all(axis=1) & (joints[:, 2] > MIN_Z_M)
        uv = np.zeros((len(joints), 2))
        if ok.any():
            uv[ok] = project(joints[ok], K)
        for a, b in bone_indices(hand.joint_names):
            if ok[a] and ok[b]:
                cv2.line(canvas, _px(uv[a]), _px(uv[b]), HAND_RGB, 2, cv2.LINE_AA)
        for j in np.flatnonzero(ok):
            cv2.circle(canvas, _px(uv[j]), 3, JOINT_RGB, -1, cv2.LINE_AA)
        if ok.any():
            top = uv[ok][np.argmin(uv[ok][:, 1])]
            cv2.putText(canvas, f"hand{i} {hand.score:.2f}", (_px(top)[0], _px(top)[1] - 8),
                        cv2.FONT_HERSHEY_SIMPLEX, 0.5, HAND_RGB, 1, cv2.LINE_AA)
    return canvas
