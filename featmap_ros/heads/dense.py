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
OpenCV's EPnP on all of them, then Levenberg-Marquardt on shrinking inlier sets, gives the pose
(PnP-RANSAC with DenseDecodeConfig.ransac_iterations > 0); the confidence is the inlier ratio,
scaled down when few locations are visible (DenseDecodeConfig.full_evidence).

This module is numpy and OpenCV only, so run time (the ONNX Runtime backend included) needs no
torch; the training half (block targets, the loss) is heads/dense_train.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from featmap_ros import geometry as geo

DENSE_CHANNELS = 4  # per object: visibility logit, then x, y, z model coordinates in [-1, 1] of the box
DENSE_STRIDE = 2  # input pixels per output location


@dataclass(frozen=True)
class DenseDecodeConfig:
    """How visibility maps and coordinates become a pose."""

    min_visibility: float = 0.5  # sigmoid of the logit
    min_points: int = 6  # fewer than this above threshold: take the most visible locations instead
    # At most this many correspondences, spread evenly over the visible locations (spread_visible). Session 20,
    # training frames only: 200 spread scored as 400 most visible (LM-O validation frames, four models: +0.4
    # points; fit frames -0.15; the main job's validation frames 54/53% against 53/53%) in 0.65-0.82x the decode time;
    # 200 *most visible* lost 11 points on the main job's model (they crowd where the object is surest).
    max_points: int = 200
    ransac_threshold_crop_px: float = 1.5  # inlier threshold in crop pixels (scaled to image pixels)
    # 0 (the default): no RANSAC: EPnP on every kept correspondence, then Levenberg-Marquardt on the
    # ones within a shrinking reprojection threshold (lm_scales), a few OpenCV calls instead of
    # hypotheses. On the LM-O validation frames (bench/bench_dense_decode.py, docs/results.md) it
    # scored 38.1% 2D-proj@5px at 3.4 ms per object, RANSAC with 150 AP3P hypotheses 36.5% at 5.6 ms.
    ransac_iterations: int = 0
    # Without RANSAC: the multiples of the inlier threshold of the Levenberg-Marquardt rounds, widest first.
    # Two rounds since session 24 (four, 8-4-2-1, before): 1.4-1.6x faster decodes at the same accuracy on
    # training frames only (three models, 356 instances: 50.5% against 50.7% 2D-proj@5px in the mean;
    # bench/bench_dense_decode.py, docs/results.md). A round is a solvePnPRefineLM call: ~0.25 ms on 200.
    lm_scales: tuple[float, ...] = (4.0, 1.0)
    # Where those rounds leave fewer than 4 correspondences within the threshold: these rounds from the EPnP
    # pose instead, before giving up (the four-round schedule of before, wider first, which finds a pose in more
    # noisy outputs: an early model's, a hard object's); () gives up at once. Costs time on such failures only.
    lm_fallback: tuple[float, ...] = (8.0, 4.0, 2.0, 1.0)
    ransac_confidence: float = 0.999
    # The minimal solver inside RANSAC: "ap3p" (4 points, about 3x faster than EPnP's 5-point
    # samples at equal accuracy) or "epnp"; Levenberg-Marquardt on all inliers polishes either.
    ransac_solver: str = "ap3p"
    # Confidence = inlier ratio x min(1, visible locations / full_evidence): a handful of locations
    # (a false detection, a hidden object) fits any pose, so it cannot give full confidence.
    full_evidence: int = 24

    def __post_init__(self) -> None:
        if not 4 <= self.min_points <= self.max_points:
            raise ValueError(f"need 4 <= min_points <= max_points (PnP takes 4 or more), got {self.min_points} "
                             f"and {self.max_points}")
        for name, allow_empty in (("lm_scales", False), ("lm_fallback", True)):
            scales = tuple(float(v) for v in getattr(self, name))
            if (not scales and not allow_empty) or not all(np.isfinite(v) and v > 0 for v in scales):
                raise ValueError(f"{name} must be positive finite multiples of the threshold, got "
                                 f"{getattr(self, name)!r}")
            object.__setattr__(self, name, scales)


_SOLVERS = {"ap3p": cv2.SOLVEPNP_AP3P, "epnp": cv2.SOLVEPNP_EPNP}


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


def location_centres(side: int, stride: float = DENSE_STRIDE) -> np.ndarray:
    """(side*side, 2) crop-pixel (u, v) of the centres of the output locations, row-major."""
    c = np.arange(side, dtype=np.float64) * stride + (stride - 1) / 2.0
    u, v = np.meshgrid(c, c)
    return np.stack([u.ravel(), v.ravel()], 1)


@dataclass(frozen=True)
class DenseDecoded:
    """A decoded pose: R (3, 3), t (3,) metres, inlier ratio, correspondences used, confidence in [0, 1]."""

    R: np.ndarray
    t: np.ndarray
    inlier_ratio: float
    n_points: int
    confidence: float


def _shrinking_lm(xyz: np.ndarray, uv: np.ndarray, K: np.ndarray, threshold: float, n: int,
                  scales: tuple[float, ...], fallback: tuple[float, ...] = ()
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """EPnP on all correspondences, then LM on those within scales x threshold; (rvec, tvec, inlier indices).

    Where those rounds leave fewer than 4 correspondences within the threshold, the `fallback` rounds run from
    the same EPnP pose before giving up (DenseDecodeConfig.lm_fallback).
    """
    xyz, uv = np.ascontiguousarray(xyz), np.ascontiguousarray(uv)
    ok, rvec0, tvec0 = cv2.solvePnP(xyz, uv, K, np.zeros(4), flags=cv2.SOLVEPNP_EPNP)
    if not ok:
        raise geo.GeometryError(f"EPnP found no pose from {n} correspondences")

    def within(rvec: np.ndarray, tvec: np.ndarray, limit: float) -> np.ndarray:
        proj, _ = cv2.projectPoints(xyz, rvec, tvec, K, np.zeros(4))
        return np.flatnonzero(np.linalg.norm(proj.reshape(-1, 2) - uv, axis=1) < limit)

    for schedule in (scales, fallback) if fallback and fallback != scales else (scales,):
        rvec, tvec = rvec0, tvec0
        for scale in schedule:
            idx = within(rvec, tvec, scale * threshold)
            if len(idx) < 4:
                break
            rvec, tvec = cv2.solvePnPRefineLM(xyz[idx], uv[idx], K, np.zeros(4), rvec, tvec)
        idx = within(rvec, tvec, threshold)
        if len(idx) >= 4:
            return rvec, tvec, idx
    raise geo.GeometryError(f"no pose fits 4 of {n} correspondences within {threshold:.2f} px")


def most_visible(logits: np.ndarray, min_visibility: float, min_points: int, max_points: int
                 ) -> tuple[np.ndarray, int]:
    """Flat indices of the locations a decode uses, most visible first, and how many pass min_visibility.

    Those above the threshold, at least min_points (the most visible, whatever their score) and
    at most max_points.
    """
    vis = 1.0 / (1.0 + np.exp(-np.asarray(logits, np.float64).ravel()))
    n_on = int((vis >= min_visibility).sum())
    return np.argsort(-vis)[: min(max(n_on, min_points), max_points)], n_on


def spread_visible(logits: np.ndarray, min_visibility: float, min_points: int, max_points: int
                   ) -> tuple[np.ndarray, int]:
    """Flat indices of the locations a dense decode uses, and how many pass min_visibility.

    Those above the threshold, thinned evenly in raster order to at most max_points, so they keep
    covering the whole visible object (PnP's geometry); fewer than min_points above it: the min_points
    most visible, whatever their score (most_visible's choice).
    """
    keep, n_on = most_visible(logits, min_visibility, min_points, np.size(logits))
    if n_on < min_points:
        return keep, n_on
    on = np.sort(keep)  # every location above the threshold, in raster order
    if len(on) > max_points:
        on = on[np.linspace(0, len(on) - 1, max_points).round().astype(np.int64)]
    return on, n_on


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
    keep, n_on = spread_visible(channels[0], cfg.min_visibility, cfg.min_points, cfg.max_points)
    stride = window.out / side
    uv = window.to_image(location_centres(side, stride)[keep])
    xyz = denormalise_coordinates(channels[1:].reshape(3, -1).T[keep], min_xyz, size_xyz)
    threshold = cfg.ransac_threshold_crop_px / window.scale
    K = np.asarray(K, np.float64)
    try:
        if cfg.ransac_iterations > 0:
            ok, rvec, tvec, inliers = cv2.solvePnPRansac(
                np.ascontiguousarray(xyz), np.ascontiguousarray(uv), K, np.zeros(4),
                flags=_SOLVERS[cfg.ransac_solver], reprojectionError=threshold,
                iterationsCount=cfg.ransac_iterations, confidence=cfg.ransac_confidence)
            if not ok or inliers is None or len(inliers) < 4:
                raise geo.GeometryError(f"PnP-RANSAC found no pose from {len(keep)} correspondences")
            idx = inliers[:, 0]
            rvec, tvec = cv2.solvePnPRefineLM(xyz[idx], uv[idx], K, np.zeros(4), rvec, tvec)
        else:
            rvec, tvec, idx = _shrinking_lm(xyz, uv, K, threshold, len(keep), cfg.lm_scales, cfg.lm_fallback)
    except cv2.error as err:  # degenerate correspondences (all 3D points equal, early in training)
        raise geo.GeometryError(f"OpenCV PnP-RANSAC failed on {len(keep)} correspondences: {err}") from err
    R, _ = cv2.Rodrigues(rvec)
    t = tvec.reshape(3)
    if not (np.isfinite(R).all() and np.isfinite(t).all()):
        raise geo.GeometryError("PnP-RANSAC gave a non-finite pose")
    evidence = min(1.0, n_on / max(cfg.full_evidence, 1))
    return DenseDecoded(R=R, t=t, inlier_ratio=len(idx) / len(keep), n_points=len(keep),
                        confidence=len(idx) / len(keep) * evidence)
