"""Pose metrics for objects (LINEMOD protocol) and hands (NYU protocol).

Small pure functions in the manner of the BOP toolkit's pose_error.py. Poses are
model-to-camera (R (3, 3), t (3,) metres); errors come out in metres, pixels or degrees as named.
"""

from __future__ import annotations

import numpy as np
from scipy.spatial import cKDTree

from featmap_ros.geometry import project_model, transform


def proj_2d(R_est, t_est, R_gt, t_gt, K, points) -> float:
    """Mean 2D distance between the model projected with the estimated and true poses.

    Args:
        R_est, t_est: estimated pose.
        R_gt, t_gt: ground-truth pose.
        K: (3, 3) camera matrix.
        points: (N, 3) model vertices, metres.

    Returns:
        Mean reprojection distance, pixels.
    """
    uv_est = project_model(points, R_est, t_est, K)
    uv_gt = project_model(points, R_gt, t_gt, K)
    return float(np.linalg.norm(uv_est - uv_gt, axis=1).mean())


def add(R_est, t_est, R_gt, t_gt, points) -> float:
    """ADD: mean distance between corresponding model points under both poses, metres."""
    return float(np.linalg.norm(transform(points, R_est, t_est) - transform(points, R_gt, t_gt), axis=1).mean())


def adi(R_est, t_est, R_gt, t_gt, points) -> float:
    """ADD-S (ADI): mean distance from each true-pose point to the nearest estimated-pose point, metres."""
    est = transform(points, R_est, t_est)
    gt = transform(points, R_gt, t_gt)
    dist, _ = cKDTree(est).query(gt, k=1)
    return float(dist.mean())


def re(R_est, R_gt) -> float:
    """Rotation error: angle of R_est inv(R_gt), degrees (the BOP toolkit's formula).

    The inverse, not the transpose: an annotated R_gt is off orthonormal by up to 2e-3 and the
    toolkit scores it as stored, so the two differ on 1.6% of LM-O's 5cm5deg decisions.
    """
    c = (np.trace(np.asarray(R_est, dtype=np.float64) @ np.linalg.inv(np.asarray(R_gt, dtype=np.float64))) - 1.0) / 2.0
    return float(np.degrees(np.arccos(np.clip(c, -1.0, 1.0))))


def te(t_est, t_gt) -> float:
    """Translation error: Euclidean distance, metres."""
    return float(np.linalg.norm(np.asarray(t_est).reshape(3) - np.asarray(t_gt).reshape(3)))


def cm_deg(R_est, t_est, R_gt, t_gt, cm: float = 5.0, deg: float = 5.0) -> bool:
    """True when the translation error is under `cm` centimetres and the rotation error under `deg`."""
    return te(t_est, t_gt) < cm / 100.0 and re(R_est, R_gt) < deg


def add_or_adi(R_est, t_est, R_gt, t_gt, points, symmetric: bool) -> float:
    """ADD(-S): ADD-S for symmetric objects, ADD otherwise, metres."""
    return (adi if symmetric else add)(R_est, t_est, R_gt, t_gt, points)


def accuracy(errors, threshold: float) -> float:
    """Fraction of errors strictly below the threshold (NaN errors count as failures); 0 if empty."""
    e = np.asarray(errors, dtype=np.float64)
    if e.size == 0:
        return 0.0
    return float(np.mean(np.nan_to_num(e, nan=np.inf) < threshold))


def success_curve(errors, thresholds) -> np.ndarray:
    """Accuracy at each threshold: a non-decreasing curve for increasing thresholds."""
    return np.array([accuracy(errors, th) for th in np.asarray(thresholds, dtype=np.float64)])


# --------------------------------------------------------------------------------------------
# Hands


def joint_errors(joints_est, joints_gt) -> np.ndarray:
    """Per-frame per-joint 3D distances.

    Args:
        joints_est, joints_gt: (F, J, 3) joint positions, metres.

    Returns:
        (F, J) distances, metres.
    """
    est, gt = np.asarray(joints_est, dtype=np.float64), np.asarray(joints_gt, dtype=np.float64)
    if est.shape != gt.shape or est.ndim != 3 or est.shape[-1] != 3:
        raise ValueError(f"expected two (F, J, 3) arrays of one shape, got {est.shape} and {gt.shape}")
    return np.linalg.norm(est - gt, axis=-1)


def mean_joint_error(joints_est, joints_gt) -> float:
    """Mean 3D joint error over all frames and joints, metres."""
    return float(joint_errors(joints_est, joints_gt).mean())


def per_joint_error(joints_est, joints_gt) -> np.ndarray:
    """(J,) mean error of each joint over the frames, metres."""
    return joint_errors(joints_est, joints_gt).mean(axis=0)


def max_error_fraction(joints_est, joints_gt, thresholds) -> np.ndarray:
    """Fraction of frames whose largest joint error is at most each threshold (DeepPrior curves)."""
    worst = joint_errors(joints_est, joints_gt).max(axis=1)
    return np.array([float(np.mean(worst <= th)) for th in np.asarray(thresholds, dtype=np.float64)])
