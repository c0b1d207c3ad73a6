"""Network input normalisation shared by training streams and the run-time estimator.

Kept in one place, free of torch and GL, so what the network saw in training is exactly what
the robot feeds it.
"""

from __future__ import annotations

import numpy as np

# BB8: pixel / 128 - 1; we centre exactly with 127.5 so 0 -> -1 and 255 -> 1.
RGB_NORMALISATION = "rgb uint8 -> x / 127.5 - 1, channels first (3, S, S), RGB order"
DEPTH_NORMALISATION = "depth metres -> (d - z_centre) / (cube / 2) clipped to [-1, 1]; invalid and behind -> 1"


def rgb_to_input(rgb: np.ndarray) -> np.ndarray:
    """(H, W, 3) or (N, H, W, 3) uint8 RGB -> float32 (3, H, W) or (N, 3, H, W) in [-1, 1]."""
    x = np.asarray(rgb)
    if x.dtype != np.uint8 or x.shape[-1] != 3 or x.ndim not in (3, 4):
        raise ValueError(f"expected uint8 RGB of shape (H, W, 3) or (N, H, W, 3), got {x.dtype} {x.shape}")
    x = x.astype(np.float32) / np.float32(127.5) - np.float32(1.0)
    return np.ascontiguousarray(np.moveaxis(x, -1, -3))


def depth_to_input(crop_norm: np.ndarray) -> np.ndarray:
    """(S, S) normalised depth crop (geometry.crop_depth_cube) -> (1, S, S) float32."""
    crop_norm = np.asarray(crop_norm, dtype=np.float32)
    if crop_norm.ndim != 2:
        raise ValueError(f"expected a 2D depth crop, got shape {crop_norm.shape}")
    return crop_norm[None]
