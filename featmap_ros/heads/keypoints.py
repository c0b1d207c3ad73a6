"""The keypoint vector-field head (PVNet): per-location visibility and unit vectors to keypoints, RANSAC voting, PnP.

What it predicts: at every location of an (S/2, S/2) map over the crop, 1 + 2 n channels per
object: a visibility logit and, for each of the object's n keypoints, a 2D direction from the
location to where that keypoint projects (PVNet, Peng et al. 2019). The keypoints are the centre of
the object's box and KEYPOINT_FPS surface points chosen by farthest-point sampling from it
(object_keypoints), so they lie on the object, unlike the box corners of BB8; they are stored in
the checkpoint (objects[].keypoints_m) and the run time never recomputes them.

How its targets are made: from the pose of a render, for free: the keypoints projected with the
crop camera, warped with the crop's augmentation like BB8's corners; the unit vectors from each
location are computed in the loss (heads/keypoints_train.py), on the dense head's visibility.

How it decodes: for each keypoint, hypotheses are intersections of the lines of two random
visible locations; each is scored by the locations whose direction points at it (cosine above
inlier_cos); the best hypothesis's voters give the keypoint as the least-squares intersection of
their lines. EPnP then Levenberg-Marquardt on the keypoints give the pose; the confidence is the
keypoints' mean share of agreeing voters, scaled down when few locations are visible.

Like heads/dense.py this module is numpy and OpenCV only (no torch at run time).
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from featmap_ros import geometry as geo
from featmap_ros.heads.dense import DenseDecoded, location_centres, most_visible

KEYPOINT_FPS = 8  # surface keypoints per object (PVNet's choice), after the box centre


def keypoint_channels(n_keypoints: int) -> int:
    """Output channels per object: the visibility logit and (dx, dy) per keypoint."""
    return 1 + 2 * int(n_keypoints)


def farthest_points(points: np.ndarray, n: int, start: np.ndarray) -> np.ndarray:
    """(n, 3) of points (N, 3): each the farthest from start and those chosen before it."""
    pts = np.asarray(points, np.float64).reshape(-1, 3)
    pts = pts[np.isfinite(pts).all(1)]
    if len(pts) < n:
        raise geo.GeometryError(f"farthest-point sampling needs >= {n} finite points, got {len(pts)}")
    nearest = np.linalg.norm(pts - np.asarray(start, np.float64).reshape(1, 3), axis=1)
    chosen = []
    for _ in range(n):
        k = int(np.argmax(nearest))
        chosen.append(pts[k])
        nearest = np.minimum(nearest, np.linalg.norm(pts - pts[k], axis=1))
    return np.stack(chosen)


def object_keypoints(vertices: np.ndarray, min_xyz: np.ndarray, size_xyz: np.ndarray,
                     n_surface: int = KEYPOINT_FPS) -> np.ndarray:
    """(1 + n_surface, 3) model-frame keypoints: the box centre, then farthest-point samples of the vertices."""
    centre = np.asarray(min_xyz, np.float64) + np.asarray(size_xyz, np.float64) / 2.0
    return np.vstack([centre, farthest_points(vertices, n_surface, centre)])


@dataclass(frozen=True)
class KeypointDecodeConfig:
    """How visibility and direction maps become keypoints, then a pose."""

    min_visibility: float = 0.5  # sigmoid of the logit
    min_points: int = 6  # fewer than this above threshold: take the most visible locations instead
    max_points: int = 400  # at most this many (the most visible) locations vote
    hypotheses: int = 64  # line intersections tried per keypoint
    vote_points: int = 128  # hypotheses are scored on at most this many voters (all of them refine the winner)
    inlier_cos: float = 0.99  # a location votes for a point when its direction is within ~8 degrees of it
    min_votes: int = 3  # a keypoint with fewer agreeing voters is left out of the PnP
    full_evidence: int = 24  # as DenseDecodeConfig.full_evidence
    seed: int = 0  # the hypotheses' random pairs (fixed: the same output decodes to the same pose)

    def __post_init__(self) -> None:
        if not 0.0 < self.inlier_cos < 1.0:
            raise ValueError(f"inlier_cos must be in (0, 1), got {self.inlier_cos}")
        if min(self.min_points, self.max_points, self.hypotheses, self.vote_points, self.min_votes) < 1:
            raise ValueError(f"point, hypothesis and vote counts must be >= 1: {self}")


def _cross(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return a[..., 0] * b[..., 1] - a[..., 1] * b[..., 0]


def _agree(points: np.ndarray, p: np.ndarray, d: np.ndarray, cos: float) -> np.ndarray:
    """Does each location (p, d: (n, M, 2)) point at each point (n, H, 2)? -> (n, H, M) bool."""
    diff = points[:, :, None, :] - p[:, None, :, :]
    dist = np.linalg.norm(diff, axis=-1)
    return (diff * d[:, None, :, :]).sum(-1) > cos * np.maximum(dist, 1e-9)


def vote_keypoints(p: np.ndarray, d: np.ndarray, cfg: KeypointDecodeConfig = KeypointDecodeConfig()
                   ) -> tuple[np.ndarray, np.ndarray]:
    """RANSAC voting: locations p (M, 2) with unit directions d (n, M, 2) -> keypoints (n, 2), voter share (n,)."""
    n, M = d.shape[0], d.shape[1]
    rng = np.random.default_rng(cfg.seed)
    i, j = rng.integers(M, size=(2, n, cfg.hypotheses))
    pi, pj = p[i], p[j]
    di, dj = np.take_along_axis(d, i[..., None], 1), np.take_along_axis(d, j[..., None], 1)
    den = _cross(di, dj)
    s = _cross(pj - pi, dj) / np.where(np.abs(den) < 1e-6, np.nan, den)
    hyp = pi + s[..., None] * di  # NaN where the two lines are parallel (or the same location)
    voters = rng.permutation(M)[: cfg.vote_points]
    pv = np.broadcast_to(p[voters], (n, len(voters), 2))
    votes = _agree(np.nan_to_num(hyp, nan=1e9), pv, d[:, voters], cfg.inlier_cos).sum(-1)
    votes[~np.isfinite(hyp).all(-1)] = -1
    best = hyp[np.arange(n), votes.argmax(1)]  # (n, 2)
    pa = np.broadcast_to(p, (n, M, 2))
    inl = _agree(np.nan_to_num(best, nan=1e9)[:, None, :], pa, d, cfg.inlier_cos)[:, 0]  # (n, M)
    # The least-squares intersection of the voters' lines: sum(A) x = sum(A p), A = I - d d^T, so
    # A p = p - d (d . p); written out, without (n, M) stacks of 2x2 matrix products.
    w = inl.astype(np.float64)  # (n, M)
    wd = w[..., None] * d
    lhs = w.sum(1)[:, None, None] * np.eye(2) - np.einsum("nmi,nmj->nij", wd, d)
    rhs = w @ p - (wd * (d * p[None]).sum(-1, keepdims=True)).sum(1)
    ok = (inl.sum(1) >= 2) & (np.abs(np.linalg.det(lhs)) > 1e-9)
    solved = np.linalg.solve(np.where(ok[:, None, None], lhs, np.eye(2)), rhs[..., None])[..., 0]
    refined = np.where(ok[:, None], solved, best)
    return refined, inl.mean(1)


def decode(channels: np.ndarray, window: geo.CropWindow, K: np.ndarray, keypoints_m: np.ndarray,
           cfg: KeypointDecodeConfig = KeypointDecodeConfig()) -> DenseDecoded:
    """One object's (1 + 2 n, H, W) head output in a crop window -> pose in the camera of K.

    Raises:
        geo.GeometryError: non-finite output, too few voters or keypoints, or PnP found no pose.
    """
    kp3d = np.asarray(keypoints_m, dtype=np.float64).reshape(-1, 3)
    n = len(kp3d)
    channels = np.asarray(channels, dtype=np.float64)
    if (channels.ndim != 3 or channels.shape[0] != keypoint_channels(n) or channels.shape[1] != channels.shape[2]
            or not np.isfinite(channels).all()):
        raise geo.GeometryError(f"keypoint output must be finite ({keypoint_channels(n)}, H, H), got {channels.shape}")
    side = channels.shape[1]
    keep, n_on = most_visible(channels[0], cfg.min_visibility, cfg.min_points, cfg.max_points)
    p = location_centres(side, window.out / side)[keep]
    d = channels[1:].reshape(n, 2, -1)[:, :, keep].transpose(0, 2, 1)
    d = d / np.maximum(np.linalg.norm(d, axis=-1, keepdims=True), 1e-9)
    uv_crop, share = vote_keypoints(p, d, cfg)
    use = np.flatnonzero((share * len(keep) >= cfg.min_votes) & np.isfinite(uv_crop).all(1))
    if len(use) < 4:
        raise geo.GeometryError(f"only {len(use)} of {n} keypoints found {cfg.min_votes} agreeing voters")
    uv = np.ascontiguousarray(window.to_image(uv_crop[use]))
    xyz = np.ascontiguousarray(kp3d[use])
    K = np.asarray(K, np.float64)
    try:
        ok, rvec, tvec = cv2.solvePnP(xyz, uv, K, np.zeros(4), flags=cv2.SOLVEPNP_EPNP)
        if not ok:
            raise geo.GeometryError(f"EPnP found no pose from {len(use)} keypoints")
        rvec, tvec = cv2.solvePnPRefineLM(xyz, uv, K, np.zeros(4), rvec, tvec)
    except cv2.error as err:  # degenerate keypoints (all voted to one place, early in training)
        raise geo.GeometryError(f"OpenCV PnP failed on {len(use)} keypoints: {err}") from err
    R, _ = cv2.Rodrigues(rvec)
    t = tvec.reshape(3)
    if not (np.isfinite(R).all() and np.isfinite(t).all()):
        raise geo.GeometryError("PnP gave a non-finite pose")
    ratio = float(share[use].mean())
    evidence = min(1.0, n_on / max(cfg.full_evidence, 1))
    return DenseDecoded(R=R, t=t, inlier_ratio=ratio, n_points=len(keep), confidence=ratio * evidence)
