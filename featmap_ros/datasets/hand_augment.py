"""On-the-fly augmentation of hand depth crops: in-plane rotation, centre offset and scale, in torch.

A crop (geometry.crop_depth_cube) views the metric cube nearly orthographically: crop coordinates
in [-1, 1] are the cube's x, y over its half edge, and the normalised depth is z over the same
half edge. Moving the hand inside the cube is therefore a 2D affine warp of the crop plus an
affine map of its depth values, and the joints (cube-normalised, (x, y, z) per joint) move with it:

    joint' = s * (R(theta) (x, y), z) + (tx, ty, tz)

theta is a rotation about the crop's centre ray (the roll a hand makes in front of a camera),
(tx, ty, tz) the localisation error of the crop centre, s a change of hand size (DeepPrior++'s
augmentations). Background (1, nothing in the cube) stays background. One transform is drawn per
sample and applied to every image of the sample (a real crop and its paired render move together),
so a pool of crops rendered once serves as an endless, varied stream at the cost of one grid_sample.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from featmap_ros.errors import FeatmapError

BACKGROUND = 1.0  # normalised depth of "nothing in the cube" (preprocess.DEPTH_NORMALISATION)


class HandAugmentError(FeatmapError, ValueError):
    """A hand augmentation is misconfigured or given mismatched tensors."""


@dataclass(frozen=True)
class HandAugmentConfig:
    """Ranges of the random transform; lengths in units of half the cube edge (0.15 m for a 0.3 m cube)."""

    rotation_deg: float = 0.0  # uniform in +-this
    shift_sigma: float = 0.0  # Gaussian xy offset of the hand in the crop
    depth_sigma: float = 0.0  # Gaussian z offset
    scale: float = 0.0  # uniform in [1 - scale, 1 + scale]
    probability: float = 1.0  # share of samples transformed (the rest pass unchanged)

    def __post_init__(self) -> None:
        values = (self.rotation_deg, self.shift_sigma, self.depth_sigma, self.scale, self.probability)
        if not all(math.isfinite(v) and v >= 0 for v in values):
            raise HandAugmentError(f"augmentation ranges must be finite and >= 0: {self}")
        if self.scale >= 1.0 or self.probability > 1.0:
            raise HandAugmentError(f"scale must be < 1 and probability <= 1: {self}")

    @property
    def enabled(self) -> bool:
        """True when any transform is drawn at all."""
        ranges = (self.rotation_deg, self.shift_sigma, self.depth_sigma, self.scale)
        return self.probability > 0 and any(v > 0 for v in ranges)


@dataclass(frozen=True)
class HandTransform:
    """Per-sample transforms: angle (B,) radians, shift (B, 3) in half-cube units, scale (B,)."""

    angle: torch.Tensor
    shift: torch.Tensor
    scale: torch.Tensor

    @classmethod
    def sample(cls, n: int, cfg: HandAugmentConfig, generator: torch.Generator) -> HandTransform:
        """n transforms drawn from cfg's ranges; samples left unchanged by cfg.probability get the identity."""
        def uniform(half: float) -> torch.Tensor:
            return (torch.rand(n, generator=generator) * 2.0 - 1.0) * half

        angle = uniform(math.radians(cfg.rotation_deg))
        shift = torch.randn(n, 3, generator=generator) * torch.tensor(
            [cfg.shift_sigma, cfg.shift_sigma, cfg.depth_sigma])
        scale = 1.0 + uniform(cfg.scale)
        keep = torch.rand(n, generator=generator) < cfg.probability
        return cls(angle * keep, shift * keep[:, None], torch.where(keep, scale, torch.ones_like(scale)))

    def joints(self, targets: torch.Tensor) -> torch.Tensor:
        """(B, 3J) cube-normalised joints -> the joints of the transformed crops."""
        b = len(targets)
        j = targets.reshape(b, -1, 3).float()
        c, s = torch.cos(self.angle)[:, None], torch.sin(self.angle)[:, None]
        x = c * j[..., 0] - s * j[..., 1]
        y = s * j[..., 0] + c * j[..., 1]
        out = torch.stack([x, y, j[..., 2]], dim=-1) * self.scale[:, None, None] + self.shift[:, None, :]
        return out.reshape(b, -1).to(targets.dtype)

    def images(self, crops: torch.Tensor) -> torch.Tensor:
        """(B, 1, S, S) normalised depth crops -> the transformed crops; outside the crop is background.

        Nearest-neighbour, as crop_depth_cube samples: depth must not blend across the hand's edges.
        """
        b = len(crops)
        c, s = torch.cos(self.angle), torch.sin(self.angle)
        # affine_grid maps output coordinates to input ones: p_in = R(-theta) (p_out - t) / s.
        inv = torch.stack([torch.stack([c, s], -1), torch.stack([-s, c], -1)], 1) / self.scale[:, None, None]
        t = self.shift[:, :2, None]
        theta = torch.cat([inv, -inv @ t], dim=2).to(crops.dtype)
        grid = F.affine_grid(theta, list(crops.shape), align_corners=False)
        # Sampling (crop - background) with zero padding pads with background.
        warped = F.grid_sample(crops - BACKGROUND, grid, mode="nearest", padding_mode="zeros",
                               align_corners=False) + BACKGROUND
        depth = warped * self.scale.view(b, 1, 1, 1).to(crops.dtype) + self.shift[:, 2].view(b, 1, 1, 1).to(crops.dtype)
        # Background stays background; what the shift pushes out of the cube is clipped like the crop does.
        return torch.where(warped >= BACKGROUND - 1e-4, warped, depth).clamp(-1.0, 1.0)


def augment_hand_batch(batch: dict[str, torch.Tensor], cfg: HandAugmentConfig, generator: torch.Generator,
                       image_keys: Sequence[str], target_keys: Sequence[str]) -> dict[str, torch.Tensor]:
    """A copy of batch with one random transform per sample applied to every image and target key."""
    if not cfg.enabled:
        return batch
    n = {len(batch[k]) for k in (*image_keys, *target_keys)}
    if len(n) != 1:
        raise HandAugmentError(f"keys {[*image_keys, *target_keys]} have different batch sizes {sorted(n)}")
    tf = HandTransform.sample(n.pop(), cfg, generator)
    out = dict(batch)
    for k in image_keys:
        out[k] = tf.images(batch[k])
    for k in target_keys:
        out[k] = tf.joints(batch[k])
    return out


def augmented(batches: Iterator[dict[str, torch.Tensor]], cfg: HandAugmentConfig, seed: Sequence[int],
              start: int, image_keys: Sequence[str], target_keys: Sequence[str]) -> Iterator[dict[str, torch.Tensor]]:
    """batches with augment_hand_batch applied; batch k's transform is seeded by (seed, start + k), so a run
    resumed at step `start` draws the same transforms as an uninterrupted one."""
    from numpy.random import SeedSequence

    for k, batch in enumerate(batches, start=start):
        gen = torch.Generator().manual_seed(int(SeedSequence([*map(int, seed), k]).generate_state(1)[0]))
        yield augment_hand_batch(batch, cfg, gen, image_keys, target_keys)
