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


def bin_centres(bins: int, device: torch.device | None = None) -> torch.Tensor:
    """(bins,) centres of the coordinate bins: evenly spaced from -1 to 1, both included."""
    return torch.linspace(-1.0, 1.0, bins, device=device)


def expected_coordinates(prob: torch.Tensor, dim: int) -> torch.Tensor:
    """The expectation of bin probabilities along dim (the bins' axis): a coordinate in [-1, 1]."""
    shape = [1] * prob.dim()
    shape[dim] = prob.shape[dim]
    return (prob * bin_centres(prob.shape[dim], prob.device).view(shape)).sum(dim)


def softmax_expectation(logits: torch.Tensor, dim: int) -> torch.Tensor:
    """expected_coordinates(softmax(logits, dim), dim), written as exp(logits - max) and two sums.

    The same numbers (to float rounding), but ONNX Runtime runs a softmax over a middle axis as
    transposes around it: 7 ms against 0.6 ms for 8 crops' 3 x 16 bins at 32 x 32 locations (session 19).
    The largest term is exp(0) = 1, so the denominator is at least 1.
    """
    e = torch.exp(logits - logits.amax(dim, keepdim=True))
    return expected_coordinates(e, dim) / e.sum(dim)


def binned_to_coordinates(logits: torch.Tensor, bins: int) -> torch.Tensor:
    """(B, n_objects * (1 + 3 * bins), H, W) -> (B, n_objects * DENSE_CHANNELS, H, W), float32.

    Per object: the visibility logit as it is, then each coordinate as the expectation of the softmax
    over its bins (a value in [-1, 1]).
    """
    b, c, h, w = logits.shape
    per = 1 + 3 * bins
    if c % per:
        raise ValueError(f"{c} channels are not a whole number of objects of 1 + 3 x {bins} bins")
    x = logits.float().view(b, c // per, per, h, w)
    coords = softmax_expectation(x[:, :, 1:].reshape(b, c // per, 3, bins, h, w), 3)
    return torch.cat([x[:, :, :1], coords], 2).reshape(b, c // per * DENSE_CHANNELS, h, w)


def two_hot_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of (B, 3, bins, H, W) logits against (B, 3, H, W) coordinates in [-1, 1], per location.

    The target's mass is split between its two nearest bins in proportion to its distance to each (as
    Distribution Focal Loss does), so the expectation of the ideal distribution is the target itself.
    Returns (B, 3, H, W).
    """
    return _two_hot_nll(torch.log_softmax(logits, dim=2), target)


def _two_hot_nll(logp: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """two_hot_cross_entropy of log-probabilities logp (B, 3, bins, H, W) already normalised over the bins."""
    bins = logp.shape[2]
    pos = (target.clamp(-1.0, 1.0) + 1.0) / 2.0 * (bins - 1)
    low = pos.floor().clamp(max=bins - 2)
    w_high = (pos - low).unsqueeze(2)
    low_i = low.long().unsqueeze(2)
    return -((1.0 - w_high) * logp.gather(2, low_i) + w_high * logp.gather(2, low_i + 1)).squeeze(2)


def dense_loss(out: torch.Tensor, coords: torch.Tensor, visibility: torch.Tensor,
               obj_index: torch.Tensor | None, beta: float = 0.05, coord_weight: float = 1.0,
               coord_bins: int = 0) -> torch.Tensor:
    """Visibility BCE everywhere plus smooth-L1 of the coordinates on visible locations; () scalar.

    Args:
        out: (B, per * n_objects, H, W) training outputs (DenseHead.train_outputs; per = 4, or 1 + 3 x coord_bins),
            or only each sample's own object's (B, per, H, W).
        coords: (B, 3, H, W) target coordinates (block_targets).
        visibility: (B, H, W) target visible share in [0, 1] (block_targets).
        obj_index: (B,) object of each sample, or None for one object.
        coord_weight: weight of the coordinate term (the visibility term has weight 1).
        coord_bins: 0: out holds the coordinates (smooth-L1); N: out holds N logits per coordinate
            (DenseHead.train_outputs), trained by two_hot_cross_entropy plus smooth-L1 of their expectation.
    """
    per = DENSE_CHANNELS if not coord_bins else 1 + 3 * coord_bins
    o = select_object_channels(out, obj_index, per).float()
    vis_loss = F.binary_cross_entropy_with_logits(o[:, 0], visibility.float())
    on = (visibility >= 0.5).float().unsqueeze(1)
    target = coords.float()
    if coord_bins:
        logp = torch.log_softmax(o[:, 1:].reshape(o.shape[0], 3, coord_bins, *o.shape[2:]), dim=2)
        expect = expected_coordinates(logp.exp(), 2)
        err = _two_hot_nll(logp, target) + F.smooth_l1_loss(expect, target, beta=beta, reduction="none")
    else:
        err = F.smooth_l1_loss(o[:, 1:], target, beta=beta, reduction="none")
    coord_loss = (err * on).sum() / (3.0 * on.sum()).clamp_min(1.0)
    return vis_loss + coord_weight * coord_loss
