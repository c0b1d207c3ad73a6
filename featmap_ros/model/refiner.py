"""The hand-centre refiner (DeepPrior++'s refinement step): a small CNN that moves a located centre to the palm.

geometry.locate_hand returns the centre of mass of the closest object, which the forearm pulls away
from the palm. The refiner looks at a metric cube crop around that centre (the joints network's
normalisation: geometry.crop_depth_cube, preprocess.depth_to_input) and regresses the offset from
the crop's centre to the palm joint (datasets.nyu.PALM) divided by half its cube. Applied
`iterations` times at run time (estimator.HandEstimator), each step re-cropping at the moved centre.

Its weights live in the hand checkpoint under REFINER_PREFIX and its RefinerConfig in
meta['hands']['refiner'] (model.checkpoint.attach_refiner, load_refiner).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from featmap_ros.errors import FeatmapError
from featmap_ros.model.nets import _conv_block

log = logging.getLogger(__name__)

REFINER_PREFIX = "refiner."  # the refiner's tensors in a hand checkpoint's safetensors
OFFSET_DIM = 3  # (x, y, z) of the palm from the crop centre, over cube_m / 2
_STAGES = 4  # stride-2 stages: the map is input_size / 16 on a side before the FC
HUBER_BETA = 0.05  # of the loss on normalised offsets: quadratic below 7.5 mm at a 0.3 m cube


class RefinerError(FeatmapError, ValueError):
    """A refiner's training pool or run does not fit (the message says what was expected)."""


@dataclass(frozen=True)
class RefinerConfig:
    """Architecture and crop of the centre refiner; metres and pixels.

    input_size: crop side in pixels (a multiple of 16). width: channels of the first stage (the
    stages have w, 2w, 4w, 4w). iterations: crop-and-move steps at run time. cube_m: edge of the
    refiner's crop cube (its offsets are in units of cube_m / 2).
    """

    input_size: int = 64
    width: int = 8
    # 3 since session 11: 0.2-0.5 mm better than 2 for each of four main-job hand models on their
    # validation bag, 4 no better (docs/results.md); each step is one more small network pass.
    iterations: int = 3
    cube_m: float = 0.3

    def __post_init__(self) -> None:
        for name in ("input_size", "width", "iterations"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{name} must be an integer, got {value!r}")
        if self.input_size < 16 or self.input_size % 16 != 0:
            raise ValueError(f"input_size must be a multiple of 16 (4 halvings), got {self.input_size}")
        if self.width < 1:
            raise ValueError(f"width must be >= 1, got {self.width}")
        if self.iterations < 1:
            raise ValueError(f"iterations must be >= 1, got {self.iterations}")
        cube = self.cube_m
        if isinstance(cube, bool) or not isinstance(cube, (int, float)) or not (0 < float(cube) < float("inf")):
            raise ValueError(f"cube_m must be a positive number of metres, got {cube!r}")
        object.__setattr__(self, "cube_m", float(cube))

    def to_dict(self) -> dict[str, Any]:
        """The fields as plain JSON values."""
        return asdict(self)

    @classmethod
    def from_dict(cls, doc: Any) -> RefinerConfig:
        """Rebuild from to_dict()'s mapping; every field must be there (a default may change, a checkpoint not).

        Raises:
            ValueError: not a mapping, unknown or missing fields, wrong types or values out of range.
        """
        if not isinstance(doc, dict):
            raise ValueError(f"a refiner description must be a mapping of RefinerConfig fields, got {doc!r:.80}")
        fields = set(cls.__dataclass_fields__)
        unknown, missing = sorted(set(doc) - fields), sorted(fields - set(doc))
        if unknown or missing:
            raise ValueError(f"RefinerConfig fields: unknown {unknown}, missing {missing}")
        return cls(**doc)


class CentreRefiner(nn.Module):
    """(B, 1, S, S) normalised depth crops -> (B, 3) palm offsets from the crop centre over cube_m / 2.

    Four stride-2 convolution stages (GroupNorm, ReLU) keep a (4w, S/16, S/16) map; a two-layer FC
    reads it whole, since where the palm lies in the crop is the answer (global pooling would
    discard it). About 1 M multiply-adds at 64 px, width 8.
    """

    def __init__(self, config: RefinerConfig = RefinerConfig()) -> None:
        super().__init__()
        self.config = config
        w = config.width
        chans = (1, w, 2 * w, 4 * w, 4 * w)
        self.features = nn.Sequential(*[
            _conv_block(chans[i], chans[i + 1], 5 if i == 0 else 3, 2, "group") for i in range(_STAGES)
        ])
        side = config.input_size // 2**_STAGES
        hidden = 16 * w
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(chans[-1] * side * side, hidden), nn.ReLU(inplace=True),
                                  nn.Linear(hidden, OFFSET_DIM))
        # Start at "no move": the first steps of training see the identity, not a random jump.
        nn.init.zeros_(self.head[-1].weight)
        nn.init.zeros_(self.head[-1].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, S, S) float32 -> (B, 3) float32."""
        return self.head(self.features(x)).float()


def _pool_tensors(pool: Mapping[str, Any], config: RefinerConfig) -> dict[str, torch.Tensor]:
    """The pool's image (N, 1, S, S), offset (N, 3) and centre (N, 3) as CPU tensors, checked."""
    missing = [k for k in ("image", "offset", "centre") if k not in pool]
    if missing:
        raise RefinerError(f"a refiner pool needs 'image', 'offset' and 'centre'; {missing} missing")
    x = torch.as_tensor(np.asarray(pool["image"]), dtype=torch.float32)
    y = torch.as_tensor(np.asarray(pool["offset"]), dtype=torch.float32)
    c = torch.as_tensor(np.asarray(pool["centre"]), dtype=torch.float32)
    s = config.input_size
    if x.dim() != 4 or tuple(x.shape[1:]) != (1, s, s) or len(x) == 0:
        raise RefinerError(f"pool images must be (N, 1, {s}, {s}) with N >= 1, got {tuple(x.shape)}")
    if tuple(y.shape) != (len(x), OFFSET_DIM) or tuple(c.shape) != (len(x), 3):
        raise RefinerError(f"pool offsets and centres must be ({len(x)}, 3), got {tuple(y.shape)}, {tuple(c.shape)}")
    if not (torch.isfinite(x).all() and torch.isfinite(y).all() and torch.isfinite(c).all()):
        raise RefinerError("the pool holds non-finite images, offsets or centres")
    return {"image": x, "offset": y, "centre": c}


def flip_batch(image: torch.Tensor, offset: torch.Tensor, centre: torch.Tensor, flip_u: torch.Tensor,
               flip_v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mirror crops left-right (flip_u) and/or up-down (flip_v) (B,) bool, with their exact targets.

    A crop mirrored about its centre pixel shows each pixel's depth Z along the mirrored ray:
    X/Z -> 2 cx/cz - X/Z (the crop window is symmetric about the centre's projection). The palm
    (P = c + o * h) goes to Px' = 2 (cx/cz) Pz - Px, so o_x' = -o_x + 2 (cx/cz) o_z; likewise y.
    """
    ratio = centre[:, :2] / centre[:, 2:3]
    flipped = torch.stack([flip_u, flip_v], dim=1)
    new_xy = torch.where(flipped, -offset[:, :2] + 2.0 * ratio * offset[:, 2:3], offset[:, :2])
    image = torch.where(flip_u[:, None, None, None], image.flip(-1), image)
    image = torch.where(flip_v[:, None, None, None], image.flip(-2), image)
    return image, torch.cat([new_xy, offset[:, 2:]], dim=1)


def train_refiner(pool: Mapping[str, Any], config: RefinerConfig = RefinerConfig(), steps: int = 2000,
                  batch: int = 64, lr: float = 1e-3, seed: int = 0, flip: bool = False,
                  channels_last: bool = True, on_step: Callable[[int], None] | None = None) -> CentreRefiner:
    """Fit a CentreRefiner to a pool of crops (datasets.hand_refine.refine_pool) on the CPU; deterministic for a seed.

    Adam with a cosine decay to zero, Huber loss on the normalised offsets. flip: mirror crops at
    random with their exact targets (flip_batch); off by default, since a mirrored right hand is a
    left one (on 1,080 crops of 180 frames it gave 15.0 mm median held-out error against 14.0
    without, at 1,500 steps). Torch's global random state is left as it was.

    Args:
        pool: {'image': (N, 1, S, S), 'offset': (N, 3), 'centre': (N, 3) metres}, numpy or torch.
        config: the refiner's architecture; its input_size must be the pool's S.
        steps, batch, lr: the optimisation (batches drawn with replacement).
        seed: initialisation and batch order.
        channels_last: train in that memory format (1.17x faster steps at one thread here, as
            TrainConfig.channels_last); the returned model is in the default format either way.
        on_step: called with each step's index before it runs (in this thread: e.g. the main job's
            take_freed_cores, which changes this thread's torch threads).

    Raises:
        RefinerError: a malformed pool, bad steps or batch, or a non-finite loss (naming the step).
    """
    if steps < 1 or batch < 1:
        raise RefinerError(f"steps and batch must be >= 1, got {steps} and {batch}")
    data = _pool_tensors(pool, config)
    n = len(data["image"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CentreRefiner(config)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    gen = torch.Generator().manual_seed(seed + 1)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 0.5 * (1.0 + math.cos(math.pi * min(i / steps, 1.0))))
    model.train()
    for step in range(steps):
        if on_step is not None:
            on_step(step)
        idx = torch.randint(0, n, (batch,), generator=gen)
        x, y = data["image"][idx], data["offset"][idx]
        if flip:
            fu, fv = (torch.rand(2, batch, generator=gen) < 0.5).unbind(0)
            x, y = flip_batch(x, y, data["centre"][idx], fu, fv)
        loss = F.smooth_l1_loss(model(x.contiguous(memory_format=fmt)), y, beta=HUBER_BETA)
        if not torch.isfinite(loss):
            raise RefinerError(f"refiner loss is {loss.item()} at step {step} of {steps}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 500 == 0 or step == steps - 1:
            log.info("refiner step %d/%d: loss %.4f", step + 1, steps, loss.item())
    return model.to(memory_format=torch.contiguous_format).eval()


@torch.inference_mode()
def predict_offsets(refiner: CentreRefiner, images: Any, chunk: int = 512) -> np.ndarray:
    """(N, 1, S, S) crops -> (N, 3) float64 offsets over cube_m / 2, on the refiner's device."""
    x = torch.as_tensor(np.asarray(images), dtype=torch.float32)
    dev = next(refiner.parameters()).device
    refiner = refiner.eval()
    out = [refiner(x[i:i + chunk].to(dev)).cpu() for i in range(0, len(x), chunk)]
    return torch.cat(out).numpy().astype(np.float64) if out else np.zeros((0, OFFSET_DIM))


def centre_errors_m(refiner: CentreRefiner, pool: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """Distances (N,) metres from each pool crop's centre to the palm before and after one refinement step."""
    half = refiner.config.cube_m / 2.0
    target = np.asarray(pool["offset"], dtype=np.float64)
    before = np.linalg.norm(target, axis=1) * half
    after = np.linalg.norm(target - predict_offsets(refiner, pool["image"]), axis=1) * half
    return before, after
