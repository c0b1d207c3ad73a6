"""Losses of Feature Mapping: pose regression, feature matching and an optional MMD term.

Pure functions on tensors; each returns a scalar tensor that is a mean over the batch, so a
data-parallel average of per-rank losses equals the loss of the whole batch (MMD excepted).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

POSE_LOSSES = ("mse", "smooth_l1")


def pose_loss(pred: torch.Tensor, target: torch.Tensor, kind: str = "mse", beta: float = 0.05) -> torch.Tensor:
    """Mean regression loss between (B, D) normalised pose outputs and targets.

    Args:
        pred: (B, D) predicted outputs (crop-normalised corners or cube-normalised joints).
        target: (B, D) ground truth in the same units.
        kind: 'mse' (mean squared error per output) or 'smooth_l1' (Huber, quadratic below beta).
        beta: smooth-L1 transition point, in normalised units.

    Returns:
        () scalar loss.
    """
    if pred.shape != target.shape:
        raise ValueError(f"pred is {tuple(pred.shape)} but target is {tuple(target.shape)}")
    if kind == "mse":
        return F.mse_loss(pred, target)
    if kind == "smooth_l1":
        return F.smooth_l1_loss(pred, target, beta=beta)
    raise ValueError(f"pose loss must be one of {POSE_LOSSES}, got {kind!r}")


def feature_loss(mapped: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Squared distance ||g(f_R(x_real)) - f_S(x_syn)||^2 averaged over batch and feature dimensions.

    Args:
        mapped: (B, D) mapped real features.
        target: (B, D) synthetic features of the paired renders (the caller detaches them).

    Returns:
        () scalar; divided by D so that lambda_feat does not depend on feature_dim.
    """
    if mapped.shape != target.shape:
        raise ValueError(f"mapped is {tuple(mapped.shape)} but target is {tuple(target.shape)}")
    return (mapped - target).pow(2).mean()


def mmd(x: torch.Tensor, y: torch.Tensor, scales: Sequence[float] = (0.25, 0.5, 1.0, 2.0, 4.0)) -> torch.Tensor:
    """Biased squared MMD between two feature samples with a sum of Gaussian kernels.

    Args:
        x: (N, D) sample of one distribution (e.g. mapped real features).
        y: (M, D) sample of the other (e.g. synthetic features).
        scales: multipliers of the bandwidth; the base bandwidth is the median squared pairwise
            distance of the pooled sample (detached), so the term adapts to the feature scale.

    Returns:
        () scalar >= 0; near 0 when x and y come from the same distribution.
    """
    if x.dim() != 2 or y.dim() != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"expected (N, D) and (M, D), got {tuple(x.shape)} and {tuple(y.shape)}")
    z = torch.cat([x, y]).float()
    d2 = torch.cdist(z, z).pow(2)
    n = x.shape[0]
    off_diag = d2[~torch.eye(len(z), dtype=torch.bool, device=z.device)]
    base = off_diag.detach().median().clamp_min(1e-12)
    k = sum(torch.exp(-d2 / (base * s)) for s in scales) / len(scales)
    kxx, kyy, kxy = k[:n, :n], k[n:, n:], k[:n, n:]
    return (kxx.mean() + kyy.mean() - 2 * kxy.mean()).clamp_min(0.0)
