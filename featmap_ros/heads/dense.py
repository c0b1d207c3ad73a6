"""The dense correspondence head: per-location visibility and model coordinates, pose by PnP-RANSAC.

What it predicts: at every location of an (S/2, S/2) map over the crop, DENSE_CHANNELS per object:
a visibility logit (is this location on the visible object?) and the object's model coordinates
there, normalised to [-1, 1] over the object's 3D box (as Pix2Pose / DPOD / GDR-Net do).

How its targets are made: from a render, for free. The depth of the object's own render, back
projected through the crop camera and moved into the model frame (R^T (X_cam - t)), gives the model
coordinates at each pixel; the mask of what is visible after occluders gives visibility. Targets
are averaged over each stride x stride block of pixels (coordinates over the visible pixels only).

How it decodes: the locations whose visibility passes a threshold give 2D points (block centres,
mapped from the crop to the image) and 3D points (the predicted coordinates, de-normalised);
OpenCV's PnP-RANSAC gives the pose; the inlier ratio is the confidence.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from featmap_ros import geometry as geo
from featmap_ros.model.nets import DENSE_CHANNELS, DENSE_STRIDE


@dataclass(frozen=True)
class DenseDecodeConfig:
    """How visibility maps and coordinates become a pose."""

    min_visibility: float = 0.5  # sigmoid of the logit
    min_points: int = 6  # fewer than this above threshold: take the most visible locations instead
    max_points: int = 400  # RANSAC samples at most this many (the most visible) correspondences
    ransac_threshold_crop_px: float = 1.5  # inlier threshold in crop pixels (scaled to image pixels)
    ransac_iterations: int = 60
    ransac_confidence: float = 0.995


def model_coordinates(depth_m: np.ndarray, K_crop: np.ndarray, R: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Model-frame points (H, W, 3) metres of a render's depth (H, W, NaN off the object) seen through K_crop."""
    h, w = depth_m.shape
    u, v = np.meshgrid(np.arange(w, dtype=np.float64), np.arange(h, dtype=np.float64))
    rays = np.stack([u, v, np.ones_like(u)], -1) @ np.linalg.inv(K_crop).T
    cam = rays * depth_m[..., None].astype(np.float64)
    return (cam - np.asarray(t, np.float64).reshape(1, 1, 3)) @ np.asarray(R, np.float64)


def normalise_coordinates(xyz_m: np.ndarray, min_xyz: np.ndarray, size_xyz: np.ndarray) -> np.ndarray:
    """Model points (..., 3) metres -> [-1, 1] over the object's box (min corner min_xyz, extent size_xyz)."""
    return 2.0 * (xyz_m - min_xyz) / size_xyz - 1.0


def denormalise_coordinates(c: np.ndarray, min_xyz: np.ndarray, size_xyz: np.ndarray) -> np.ndarray:
    """Inverse of normalise_coordinates."""
    return (np.asarray(c, np.float64) + 1.0) / 2.0 * size_xyz + min_xyz


def block_targets(coords: torch.Tensor, mask: torch.Tensor, stride: int = DENSE_STRIDE
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Full-resolution targets -> the head's resolution.

    Args:
        coords: (B, 3, S, S) normalised model coordinates (any value where mask is False).
        mask: (B, S, S) visible-object pixels (bool or float in [0, 1]).

    Returns:
        coords (B, 3, S/stride, S/stride): mean over each block's visible pixels; visibility
        (B, S/stride, S/stride) float: the block's visible share.
    """
    m = mask.float().unsqueeze(1)
    share = F.avg_pool2d(m, stride)
    mean = F.avg_pool2d(torch.nan_to_num(coords) * m, stride) / share.clamp_min(1e-6)
    return mean, share.squeeze(1)


def select_object_channels(out: torch.Tensor, obj_index: torch.Tensor | None) -> torch.Tensor:
    """(B, 4 * n_objects, H, W) -> (B, 4, H, W): each sample's own object's channels."""
    if out.shape[1] == DENSE_CHANNELS:
        return out
    if obj_index is None:
        raise ValueError(f"dense output has {out.shape[1]} channels for several objects, but no obj_index")
    idx = obj_index.long().view(-1, 1) * DENSE_CHANNELS + torch.arange(DENSE_CHANNELS, device=out.device)
    return out.gather(1, idx.view(-1, DENSE_CHANNELS, 1, 1).expand(-1, -1, *out.shape[2:]))


def dense_loss(out: torch.Tensor, coords: torch.Tensor, visibility: torch.Tensor,
               obj_index: torch.Tensor | None, beta: float = 0.05) -> torch.Tensor:
    """Visibility BCE everywhere plus smooth-L1 of the coordinates on visible locations; () scalar.

    Args:
        out: (B, 4 * n_objects, H, W) head output.
        coords: (B, 3, H, W) target coordinates (block_targets).
        visibility: (B, H, W) target visible share in [0, 1] (block_targets).
        obj_index: (B,) object of each sample, or None for one object.
    """
    o = select_object_channels(out, obj_index).float()
    vis_loss = F.binary_cross_entropy_with_logits(o[:, 0], visibility.float())
    on = (visibility >= 0.5).float().unsqueeze(1)
    err = F.smooth_l1_loss(o[:, 1:], coords.float(), beta=beta, reduction="none") * on
    coord_loss = err.sum() / (3.0 * on.sum()).clamp_min(1.0)
    return vis_loss + coord_loss


def location_centres(side: int, stride: float = DENSE_STRIDE) -> np.ndarray:
    """(side*side, 2) crop-pixel (u, v) of the centres of the output locations, row-major."""
    c = np.arange(side, dtype=np.float64) * stride + (stride - 1) / 2.0
    u, v = np.meshgrid(c, c)
    return np.stack([u.ravel(), v.ravel()], 1)


@dataclass(frozen=True)
class DenseDecoded:
    """A decoded pose: R (3, 3), t (3,) metres, inlier ratio, number of correspondences used."""

    R: np.ndarray
    t: np.ndarray
    inlier_ratio: float
    n_points: int


def decode(channels: np.ndarray, window: geo.CropWindow, K: np.ndarray, min_xyz: np.ndarray, size_xyz: np.ndarray,
           cfg: DenseDecodeConfig = DenseDecodeConfig()) -> DenseDecoded:
    """One object's (4, H, W) head output in a crop window -> pose in the camera of K.

    Raises:
        geo.GeometryError: non-finite output, too few correspondences, or PnP found no pose.
    """
    channels = np.asarray(channels, dtype=np.float64)
    if channels.ndim != 3 or channels.shape[0] != DENSE_CHANNELS or not np.isfinite(channels).all():
        raise geo.GeometryError(f"dense output must be finite ({DENSE_CHANNELS}, H, W), got {channels.shape}")
    side = channels.shape[1]
    vis = 1.0 / (1.0 + np.exp(-channels[0].ravel()))
    order = np.argsort(-vis)
    n_on = int((vis >= cfg.min_visibility).sum())
    keep = order[: min(max(n_on, cfg.min_points), cfg.max_points)]
    stride = window.out / side
    uv = window.to_image(location_centres(side, stride)[keep])
    xyz = denormalise_coordinates(channels[1:].reshape(3, -1).T[keep], min_xyz, size_xyz)
    threshold = cfg.ransac_threshold_crop_px / window.scale
    ok, rvec, tvec, inliers = cv2.solvePnPRansac(
        np.ascontiguousarray(xyz), np.ascontiguousarray(uv), np.asarray(K, np.float64), np.zeros(4),
        flags=cv2.SOLVEPNP_EPNP, reprojectionError=threshold, iterationsCount=cfg.ransac_iterations,
        confidence=cfg.ransac_confidence)
    if not ok or inliers is None or len(inliers) < 4:
        raise geo.GeometryError(f"PnP-RANSAC found no pose from {len(keep)} correspondences")
    idx = inliers[:, 0]
    rvec, tvec = cv2.solvePnPRefineLM(xyz[idx], uv[idx], np.asarray(K, np.float64), np.zeros(4), rvec, tvec)
    R, _ = cv2.Rodrigues(rvec)
    t = tvec.reshape(3)
    if not (np.isfinite(R).all() and np.isfinite(t).all()):
        raise geo.GeometryError("PnP-RANSAC gave a non-finite pose")
    return DenseDecoded(R=R, t=t, inlier_ratio=len(idx) / len(keep), n_points=len(keep))
