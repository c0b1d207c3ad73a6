"""The dense head's training half, in torch: targets at the head's resolution and the loss (heads/dense.py)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from featmap_ros.heads.dense import DENSE_CHANNELS, DENSE_STRIDE


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


def select_object_channels(out: torch.Tensor, obj_index: torch.Tensor | None, per: int = DENSE_CHANNELS
                           ) -> torch.Tensor:
    """(B, per * n_objects, H, W) -> (B, per, H, W): each sample's own object's channels."""
    if out.shape[1] == per:
        return out
    if obj_index is None:
        raise ValueError(f"spatial output has {out.shape[1]} channels for several objects, but no obj_index")
    idx = obj_index.long().view(-1, 1) * per + torch.arange(per, device=out.device)
    return out.gather(1, idx.view(-1, per, 1, 1).expand(-1, -1, *out.shape[2:]))


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
