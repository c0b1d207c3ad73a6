"""The centre refiner's training pool: crops of full depth frames at located, jittered and near-palm centres.

What the refiner (model/refiner.py) sees at run time: a metric cube crop around geometry.locate_hand's
centre c0 (first step), then around wherever its previous step moved the centre (near the palm).
So from each full frame this renders crops at c0 itself, at c0 plus jitter, and at the palm plus
a few centimetres of noise, each with its target (palm - c) / (cube_m / 2). Two kinds of frame:
clean renders of the nominal hand (the synthetic domain, forearm included) and sensor-domain
frames (SensorHandSet.frame: another person's hand in a scene, through the simulated sensor).
Rendered once into memory: crops are cheap, frames are not.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from tqdm import tqdm

from featmap_ros.datasets.hand_streams import SensorHandSet
from featmap_ros.datasets.nyu import NYU_INTRINSICS, PALM
from featmap_ros.errors import FeatmapError
from featmap_ros.geometry import GeometryError, Intrinsics, crop_depth_cube, locate_hand
from featmap_ros.model.refiner import RefinerConfig
from featmap_ros.preprocess import depth_to_input
from featmap_ros.render.hand import HandRenderer, HandShape, PoseSamplerConfig, sample_poses

SOURCES = ("synthetic", "sensor")  # pool['source'] indexes this
STARTS = ("located", "near_palm", "fallback")  # pool['start']: which centre a crop's jitter is around

log = logging.getLogger(__name__)


class RefinePoolError(FeatmapError, ValueError):
    """A refiner pool is misconfigured."""


@dataclass(frozen=True)
class RefinePoolConfig:
    """How crops are drawn from each frame; metres.

    located_crops: crops around the located centre c0 (the first at c0 itself, the others at c0 plus
    N(0, jitter_m) per axis). near_palm_crops: crops at the palm plus N(0, near_palm_m) per axis (the
    start of a second iteration). A located centre further than max_start_error_m from the palm (the
    palm would lie outside the crop) or no blob at all counts as failed: its crops are around the
    palm plus N(0, fallback_m) instead.
    """

    located_crops: int = 4
    near_palm_crops: int = 2
    jitter_m: float = 0.02
    near_palm_m: float = 0.02
    fallback_m: float = 0.03
    max_start_error_m: float = 0.15
    min_pixels: int = 200  # locate_hand's, as HandEstimator's default
    max_depth_m: float = 1.5
    render_batch: int = 16  # synthetic poses rendered together
    poses: PoseSamplerConfig = field(default_factory=PoseSamplerConfig)

    def __post_init__(self) -> None:
        if min(self.located_crops, self.near_palm_crops) < 0 or self.located_crops + self.near_palm_crops < 1:
            raise RefinePoolError(f"need >= 0 crops of each kind and >= 1 in all, got located_crops "
                                  f"{self.located_crops}, near_palm_crops {self.near_palm_crops}")
        if self.render_batch < 1:
            raise RefinePoolError(f"render_batch must be >= 1, got {self.render_batch}")
        for name in ("jitter_m", "near_palm_m", "fallback_m", "max_start_error_m"):
            if not getattr(self, name) >= 0:
                raise RefinePoolError(f"{name} must be >= 0 metres, got {getattr(self, name)}")


class _Collector:
    """Crops and their targets, appended frame by frame."""

    def __init__(self, config: RefinerConfig, pool: RefinePoolConfig) -> None:
        self.config, self.pool = config, pool
        self.rows: dict[str, list[Any]] = {k: [] for k in ("image", "centre", "palm", "source", "start", "frame")}
        self.located = self.failed = self.skipped = 0

    def add_frame(self, depth_m: np.ndarray, K: np.ndarray, palm: np.ndarray, source: int, frame: int,
                  rng: np.random.Generator) -> None:
        """Locate the hand in one frame and add its crops."""
        p = self.pool
        try:
            c0 = locate_hand(depth_m, K, cube_m=self.config.cube_m, min_pixels=p.min_pixels, max_depth_m=p.max_depth_m)
            failed = bool(np.linalg.norm(c0 - palm) > p.max_start_error_m)
        except GeometryError:
            c0, failed = palm, True
        self.located += 1
        self.failed += failed
        if failed:
            starts = [(palm + p.fallback_m * rng.standard_normal(3), 2) for _ in range(p.located_crops)]
        else:
            starts = [(c0 + (p.jitter_m * rng.standard_normal(3) if k else 0.0), 0) for k in range(p.located_crops)]
        starts += [(palm + p.near_palm_m * rng.standard_normal(3), 1) for _ in range(p.near_palm_crops)]
        for centre, start in starts:
            try:
                crop, _ = crop_depth_cube(depth_m, K, centre, cube_m=self.config.cube_m, out=self.config.input_size)
            except GeometryError:  # a centre too close to the camera for the cube
                self.skipped += 1
                continue
            for key, value in (("image", depth_to_input(crop)), ("centre", centre), ("palm", palm),
                               ("source", source), ("start", start), ("frame", frame)):
                self.rows[key].append(value)

    def extend(self, other: _Collector, frame_offset: int) -> None:
        """Append another collector's crops and counts, its frame ids shifted by frame_offset."""
        for key, values in other.rows.items():
            self.rows[key].extend([v + frame_offset for v in values] if key == "frame" else values)
        self.located += other.located
        self.failed += other.failed
        self.skipped += other.skipped

    def arrays(self) -> dict[str, np.ndarray]:
        r = self.rows
        if not r["image"]:
            raise RefinePoolError("no crop could be made: the pool is empty")
        centre = np.asarray(r["centre"], dtype=np.float64)
        palm = np.asarray(r["palm"], dtype=np.float64)
        return {
            "image": np.stack(r["image"]).astype(np.float32),
            "offset": ((palm - centre) / (self.config.cube_m / 2.0)).astype(np.float32),
            "centre": centre, "palm": palm,
            "source": np.asarray(r["source"], dtype=np.int8), "start": np.asarray(r["start"], dtype=np.int8),
            "frame": np.asarray(r["frame"], dtype=np.int64),
            "cube_m": np.asarray(self.config.cube_m, dtype=np.float64),
        }


class SensorCropRecorder:
    """The refiner crops of a SensorHandSet's first n_frames frames, made while the set renders them.

    Attach it to the set (SensorHandSet.on_render) that makes the training pairs: each frame is then
    rendered once, for its pair and its refiner crops together, and refine_pool(recorded=...) takes
    these crops instead of rendering the frames a second time. The crops are the ones refine_pool
    would make itself (the same per-frame random streams), whatever order the frames come in.
    """

    def __init__(self, n_frames: int, config: RefinerConfig = RefinerConfig(),
                 pool: RefinePoolConfig = RefinePoolConfig(), seed: int = 0) -> None:
        if n_frames < 0:
            raise RefinePoolError(f"n_frames must be >= 0, got {n_frames}")
        self.n_frames, self.config, self.pool, self.seed = int(n_frames), config, pool, int(seed)
        self.frames: dict[int, _Collector] = {}

    def __call__(self, index: int, depth_m: np.ndarray, K: np.ndarray, joints: np.ndarray) -> None:
        """SensorHandSet's render hook: frame `index`'s noisy depth (metres), camera matrix and (14, 3) joints."""
        if index < self.n_frames and index not in self.frames:
            one = _Collector(self.config, self.pool)
            one.add_frame(depth_m, K, joints[PALM], 1, index, np.random.default_rng([self.seed, 1, index]))
            self.frames[index] = one


def refine_pool(
    synthetic_frames: int,
    sensor: SensorHandSet | None = None,
    sensor_frames: int | None = None,
    config: RefinerConfig = RefinerConfig(),
    pool: RefinePoolConfig = RefinePoolConfig(),
    seed: int = 0,
    intrinsics: Intrinsics = NYU_INTRINSICS,
    progress: bool = True,
    recorded: SensorCropRecorder | None = None,
) -> dict[str, np.ndarray]:
    """Render the refiner's training crops once.

    Args:
        synthetic_frames: clean renders of the nominal hand (poses from pool.poses), on `intrinsics`.
        sensor: sensor-domain frames (SensorHandSet.frame(i), on its own intrinsics), or None.
        sensor_frames: how many of them (the first ones; None: all).
        config: the refiner's crop (input_size, cube_m).
        pool: how crops are drawn from each frame.
        seed: poses of the synthetic frames and every jitter.
        progress: show a tqdm bar per source.
        recorded: crops of sensor frames made while `sensor` rendered them (SensorCropRecorder, with
            this config, pool and seed); only the frames it lacks are rendered here.

    Returns:
        {'image': (N, 1, S, S) float32 crops, 'offset': (N, 3) float32 (palm - centre) / (cube_m / 2),
        'centre', 'palm': (N, 3) float64 metres, 'source': (N,) int8 index into SOURCES,
        'start': (N,) int8 index into STARTS, 'frame': (N,) int64 (synthetic frames first, then
        sensor frames; for held-out splits by frame), 'cube_m': () float64}.

    Raises:
        RefinePoolError: negative counts, a recorder made with other settings, or not one crop made.
    """
    if recorded is not None and (recorded.config, recorded.pool, recorded.seed) != (config, pool, seed):
        raise RefinePoolError(f"the recorded crops were made with {recorded.config}, {recorded.pool}, seed "
                              f"{recorded.seed}; this pool asks for {config}, {pool}, seed {seed}")
    have = 0 if sensor is None else len(sensor)
    n_sensor = have if sensor_frames is None else int(sensor_frames)
    if synthetic_frames < 0 or not 0 <= n_sensor <= have:
        raise RefinePoolError(f"need synthetic_frames >= 0 and 0 <= sensor_frames <= {have} (the sensor set's "
                              f"frames), got {synthetic_frames} and {sensor_frames}")
    out = _Collector(config, pool)
    if synthetic_frames:
        renderer = HandRenderer(intrinsics, "cpu")
        shape = HandShape.nominal()
        bar = tqdm(total=synthetic_frames, desc="refiner pool: synthetic", unit="frame", disable=not progress,
                   mininterval=5.0)
        for b, first in enumerate(range(0, synthetic_frames, pool.render_batch)):
            n = min(pool.render_batch, synthetic_frames - first)
            rng = np.random.default_rng([seed, 0, b])
            poses = sample_poses(rng, n, shape, intrinsics, pool.poses)
            render = renderer.render(shape, poses)
            palms = render.geometry.nyu_joints[:, PALM]
            for i in range(n):
                out.add_frame(render.depth[i], intrinsics.K, palms[i], 0, first + i, rng)
            bar.update(n)
        bar.close()
    if sensor is not None:
        have_crops = recorded.frames if recorded is not None else {}
        todo = [i for i in range(n_sensor) if i not in have_crops]
        rendered = SensorCropRecorder(n_sensor, config, pool, seed)  # the frames the recorder lacks
        for i in tqdm(todo, desc="refiner pool: sensor", unit="frame", disable=not progress or not todo,
                      mininterval=5.0):
            depth, joints, _ = sensor.frame(i)
            rendered(i, depth, sensor.intrinsics.K, joints)
        for i in range(n_sensor):  # in frame order, wherever the crops came from
            out.extend(have_crops[i] if i in have_crops else rendered.frames[i], synthetic_frames)
        log.info("refiner pool: %d sensor frames' crops recorded with their pairs, %d rendered here",
                 n_sensor - len(todo), len(todo))
    # Not an error: a located centre that missed is trained from the palm instead, as SensorHandSet does.
    log.info("refiner pool: %d crops; %d of %d frames fell back to the palm, %d crops skipped",
             len(out.rows["image"]), out.failed, out.located, out.skipped)
    return out.arrays()
