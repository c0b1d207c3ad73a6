"""The keypoint head's training half, in torch: unit vectors to projected keypoints, the loss (heads/keypoints.py)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from featmap_ros.heads.dense_train import select_object_channels


def location_grid(side: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """(side, side, 2) normalised crop coordinates (u, v) of the output locations' centres.

    As geometry.normalise_uv of heads.dense.location_centres: -1 and 1 are the crop's edges.
    """
    c = (2 * torch.arange(side, device=device, dtype=torch.float32) + 1) / side - 1
    v, u = torch.meshgrid(c, c, indexing="ij")
    return torch.stack([u, v], -1)


def vector_targets(keypoints: torch.Tensor, side: int) -> torch.Tensor:
    """(B, 2 n) normalised keypoint projections -> (B, n, side, side, 2) unit vectors from each location."""
    kp = keypoints.float().view(len(keypoints), -1, 1, 1, 2)
    diff = kp - location_grid(side, keypoints.device)
    return diff / diff.norm(dim=-1, keepdim=True).clamp_min(1e-6)


def keypoint_loss(out: torch.Tensor, keypoints: torch.Tensor, visibility: torch.Tensor,
                  obj_index: torch.Tensor | None, beta: float = 0.05) -> torch.Tensor:
    """Visibility BCE everywhere plus smooth-L1 of the directions on visible locations (PVNet); () scalar.

    Args:
        out: (B, (1 + 2 n) * n_objects, H, H) head output.
        keypoints: (B, 2 n) the sample's own object's keypoints, normalised over the crop (pool 'keypoints').
        visibility: (B, H, H) target visible share in [0, 1] (dense_train.block_targets).
        obj_index: (B,) object of each sample, or None for one object.
    """
    per = 1 + keypoints.shape[1]
    o = select_object_channels(out, obj_index, per).float()
    b, _, side, _ = o.shape
    vis_loss = F.binary_cross_entropy_with_logits(o[:, 0], visibility.float())
    target = vector_targets(keypoints, side)  # (B, n, H, W, 2)
    pred = o[:, 1:].reshape(b, -1, 2, side, side).permute(0, 1, 3, 4, 2)
    on = (visibility >= 0.5).float()[:, None, :, :, None]
    err = F.smooth_l1_loss(pred, target, beta=beta, reduction="none") * on
    return vis_loss + err.sum() / (on.sum() * 2 * target.shape[1]).clamp_min(1.0)
