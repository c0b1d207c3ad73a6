"""Torch datasets of hand crops: an endless clean synthetic stream and a fixed set of "real" pairs.

Crops follow DeepPrior++ (geometry.crop_depth_cube): a metric cube around a 3D centre, depth in
[-1, 1], joints as offsets from the centre over half the cube. The synthetic stream is the
domain h(f(x)) is trained on; SensorHandSet simulates annotated real frames (another person's
hand seen by a structured-light sensor) each paired with the clean nominal render of its pose,
which is what Feature Mapping's g is trained on.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from featmap_ros.datasets.nyu import NYU_INTRINSICS, PALM
from featmap_ros.errors import FeatmapError
from featmap_ros.geometry import GeometryError, Intrinsics, crop_depth_cube, locate_hand
from featmap_ros.render import sensor
from featmap_ros.render.hand import (
    HandPose,
    HandRenderer,
    HandShape,
    PoseSamplerConfig,
    pin_malloc_mmap_threshold,
    sample_poses,
)


class HandStreamError(FeatmapError, ValueError):
    """A hand data stream is misconfigured."""


@dataclass(frozen=True)
class HandStreamConfig:
    """Defaults of the hand crops and streams; metres and degrees."""

    cube_m: float = 0.3  # DeepPrior++ cube edge
    crop_px: int = 128
    centre_sigma_m: float = 0.005  # random offset of the synthetic crop centre from the palm (DeepPrior++)
    rotation_deg: float = 0.0  # in-plane rotation augmentation, uniform in +-this (0: off; the sampler rolls)
    sampled_shapes: bool = False  # synthetic stream: nominal hand (paper) or a new person per render batch
    render_batch: int = 16  # poses rendered together (batched ray casting amortises overhead)
    device: str = "cpu"  # where the renderer runs
    locate_max_error_m: float = 0.06  # a located centre further than this from the palm counts as failed
    fallback_sigma_m: float = 0.01  # offset of the fallback centre (GT palm + noise)
    # The shape of a pair's clean render: "nominal" (the synthetic stream's hand, as so far) or "same"
    # (the frame's own hand: what a hand model fitted to the real person gives, as in the paper).
    pair_shape: str = "nominal"
    # Where a SensorHandSet frame is cropped: "located" (geometry.locate_hand on the noisy frame, falling back
    # to the palm + fallback_sigma_m noise) or "palm" (the palm + pair_centre_sigma_m noise per axis: about where
    # the run-time refiner and recentre passes put the crop; 2.3 mm worse as training pairs, docs/results.md).
    # Every SensorHandSet made with this config follows it: evaluation sets cut at "palm" use the ground truth.
    pair_centre: str = "located"
    pair_centre_sigma_m: float = 0.0075
    poses: PoseSamplerConfig = field(default_factory=PoseSamplerConfig)
    scene: sensor.SceneConfig = field(default_factory=sensor.SceneConfig)

    def __post_init__(self) -> None:
        if self.pair_shape not in ("nominal", "same"):
            raise HandStreamError(f"pair_shape must be 'nominal' or 'same', got {self.pair_shape!r}")
        if self.pair_centre not in ("located", "palm"):
            raise HandStreamError(f"pair_centre must be 'located' or 'palm', got {self.pair_centre!r}")
        if not (math.isfinite(self.pair_centre_sigma_m) and self.pair_centre_sigma_m >= 0):
            raise HandStreamError(f"pair_centre_sigma_m must be finite and >= 0, got {self.pair_centre_sigma_m}")


def _sample(crop: np.ndarray, cube_target: np.ndarray, centre: np.ndarray, joints: np.ndarray) -> dict[str, Any]:
    return {
        "image": torch.from_numpy(np.ascontiguousarray(crop[None], dtype=np.float32)),
        "target": torch.from_numpy(np.ascontiguousarray(cube_target, dtype=np.float32).reshape(-1)),
        "centre": torch.from_numpy(np.asarray(centre, dtype=np.float32)),
        "joints": torch.from_numpy(np.asarray(joints, dtype=np.float32)),
    }


class SyntheticHandStream(IterableDataset):
    """Endless clean renders of sampled hand poses, cropped around the palm (DeepPrior++).

    Yields {'image': (1, 128, 128) float32 in [-1, 1], 'target': (42,) normalised joints, 'centre':
    (3,) metres, 'joints': (14, 3) metres}. Worker w of a DataLoader draws from seed (seed, w), so
    the stream is reproducible for a given seed and number of workers.
    """

    def __init__(
        self, seed: int = 0, config: HandStreamConfig = HandStreamConfig(), intrinsics: Intrinsics = NYU_INTRINSICS
    ) -> None:
        if config.render_batch < 1:
            raise HandStreamError(f"render_batch must be >= 1, got {config.render_batch}")
        self.seed = int(seed)
        self.config = config
        self.intrinsics = intrinsics

    def __iter__(self):  # noqa: ANN204 - a generator of dicts
        info = get_worker_info()
        rng = np.random.default_rng([self.seed, 0 if info is None else info.id])
        cfg, K = self.config, self.intrinsics.K
        renderer = HandRenderer(self.intrinsics, cfg.device)
        while True:
            shape = HandShape.sample(rng) if cfg.sampled_shapes else HandShape.nominal()
            n = cfg.render_batch
            pose = sample_poses(rng, n, shape, self.intrinsics, cfg.poses)
            palm = pose.t_h2c + pose.R_h2c @ shape.palm_centre()
            centre = palm + cfg.centre_sigma_m * rng.standard_normal((n, 3))
            if cfg.rotation_deg > 0:
                # Rotating the hand itself about the ray through the crop centre is exact, unlike a 2D warp.
                angle = np.deg2rad(rng.uniform(-cfg.rotation_deg, cfg.rotation_deg, n))
                pose = pose.rotated_about_ray(centre, angle)
            out = renderer.render(shape, pose)
            joints = out.geometry.nyu_joints
            for i in range(n):
                crop, cube = crop_depth_cube(out.depth[i], K, centre[i], cube_m=cfg.cube_m, out=cfg.crop_px)
                yield _sample(crop, cube.normalise_joints(joints[i]), centre[i], joints[i])


class SensorHandSet(Dataset):
    """N fixed simulated "real" frames, each paired with the clean nominal-hand render of its pose.

    Frame i is made from rng (seed, i): a pose of `shape`, composed into a scene and passed through
    the sensor; the crop centre is geometry.locate_hand on the noisy frame, or the palm plus noise
    when that fails or lands further than locate_max_error_m away (counted in `fallbacks`). Items:
    {'real', 'syn': (1, 128, 128), 'target': (42,) the real hand's joints in the cube, 'syn_target':
    (42,) the nominal hand's, 'centre': (3,), 'joints': (14, 3), 'fallback': bool}. Frames are
    cached per process after their first use. on_render: callables (index, noisy depth, K, joints)
    run when an item's frame is rendered (e.g. hand_refine.SensorCropRecorder, so the full frame
    serves other crops without a second render).
    """

    def __init__(
        self,
        n: int,
        shape: HandShape,
        sensor_config: sensor.SensorConfig | None = None,
        seed: int = 0,
        config: HandStreamConfig = HandStreamConfig(),
        intrinsics: Intrinsics = NYU_INTRINSICS,
    ) -> None:
        if n < 1:
            raise HandStreamError(f"need at least one frame, got n={n}")
        self.n = int(n)
        self.shape = shape
        self.sensor_config = sensor_config if sensor_config is not None else sensor.SensorConfig.nominal()
        self.seed = int(seed)
        self.config = config
        self.intrinsics = intrinsics
        self._renderer = HandRenderer(intrinsics, config.device)
        # Every frame is cached: without this the kept crops fragment the heap (see the function).
        pin_malloc_mmap_threshold()
        self._cache: dict[int, dict[str, Any]] = {}
        self._fallback: dict[int, bool] = {}
        self.on_render: list[Callable[[int, np.ndarray, np.ndarray, np.ndarray], None]] = []

    def __len__(self) -> int:
        return self.n

    @property
    def fallbacks(self) -> int:
        """How many of the frames made so far in this process fell back to the ground-truth centre."""
        return sum(self._fallback.values())

    def frame(self, index: int) -> tuple[np.ndarray, np.ndarray, HandPose]:
        """Return frame `index`'s noisy HxW depth (metres, NaN invalid), its (14, 3) joints and its pose."""
        rng = np.random.default_rng([self.seed, index])
        cfg, K = self.config, self.intrinsics.K
        pose = sample_poses(rng, 1, self.shape, self.intrinsics, cfg.poses)
        out = self._renderer.render(self.shape, pose)
        joints = out.geometry.nyu_joints[0]
        scene = sensor.compose_scene(out.depth[0], K, rng, cfg.scene, hand_centre_xyz=joints[PALM])
        return sensor.apply(scene, K, rng, self.sensor_config), joints, pose

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < self.n:
            raise IndexError(f"frame {index} out of range for {self.n} frames")
        if index in self._cache:
            return self._cache[index]
        cfg, K = self.config, self.intrinsics.K
        noisy, joints, pose = self.frame(index)
        for hook in self.on_render:
            hook(index, noisy, K, joints)
        palm = joints[PALM]
        rng = np.random.default_rng([self.seed, index, 1])
        failed = False
        if cfg.pair_centre == "palm":
            centre = palm + cfg.pair_centre_sigma_m * rng.standard_normal(3)
        else:
            try:
                centre = locate_hand(noisy, K, cube_m=cfg.cube_m)
                failed = bool(np.linalg.norm(centre - palm) > cfg.locate_max_error_m)
            except GeometryError:
                failed = True
            if failed:
                centre = palm + cfg.fallback_sigma_m * rng.standard_normal(3)
        self._fallback[index] = failed
        real, cube = crop_depth_cube(noisy, K, centre, cube_m=cfg.cube_m, out=cfg.crop_px)
        nominal = HandShape.nominal() if cfg.pair_shape == "nominal" else self.shape
        # The same articulation and orientation on the pair's hand, with its palm where the real palm is.
        syn_pose = HandPose(pose.articulation, pose.R_h2c, palm[None] - pose.R_h2c @ nominal.palm_centre())
        syn_out = self._renderer.render(nominal, syn_pose)
        syn, _ = crop_depth_cube(syn_out.depth[0], K, centre, cube_m=cfg.cube_m, out=cfg.crop_px)
        item = _sample(real, cube.normalise_joints(joints), centre, joints)
        item["real"] = item.pop("image")
        item["syn"] = torch.from_numpy(syn[None].astype(np.float32))
        item["syn_target"] = torch.from_numpy(
            cube.normalise_joints(syn_out.geometry.nyu_joints[0]).reshape(-1).astype(np.float32)
        )
        item["fallback"] = torch.tensor(failed)
        self._cache[index] = item
        return item


def write_hand_sheet(path: str, n: int = 8, seed: int = 0, config: HandStreamConfig = HandStreamConfig()) -> str:
    """Write a PNG of n (sensor-domain "real" crop | clean nominal render) pairs with the joints drawn."""
    import cv2

    from featmap_ros.geometry import denormalise_uv

    pairs = SensorHandSet(n, HandShape.sample(np.random.default_rng(seed)), seed=seed, config=config)
    tiles = []
    for i in range(n):
        item = pairs[i]
        joints = item["target"].numpy().reshape(-1, 3)
        for key in ("real", "syn"):
            grey = ((1.0 - item[key][0].numpy()) * 127.5).clip(0, 255).astype(np.uint8)
            tile = cv2.applyColorMap(grey, cv2.COLORMAP_VIRIDIS)
            # joints (x, y) over half the cube map linearly onto the crop (an orthographic view of the cube)
            for u, v in denormalise_uv(joints[:, :2], config.crop_px):
                cv2.circle(tile, (int(round(u)), int(round(v))), 2, (0, 0, 255), -1)
            tiles.append(tile)
    from featmap_ros.report import tile_grid

    cv2.imwrite(str(path), tile_grid(tiles, cols=4))
    return str(path)
