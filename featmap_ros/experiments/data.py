"""TaskData builders: the streams train() draws from, for LM-O objects and for simulated hands.

Objects: either pools rendered once and augmented on the fly (objects_pool_task_data, the
experiments' default), or the online SyntheticObjectStream (DataLoader workers by forkserver) with
RealSyntheticPairs of the training frames drawn by an endless reshuffling sampler.
Hands: the synthetic stream is clean renders of the nominal hand (or a
pre-rendered pool of them, for CPU budgets); the pairs are SensorHandSet frames of another hand
seen by the simulated sensor, each with the clean nominal render at the same pose.

Every stream factory honours its StreamContext: per-rank batch size, seed and rank (ranks draw
different samples) and start_step (a resumed run does not replay the batches it already saw).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Subset

from featmap_ros.datasets.hand_augment import HandAugmentConfig, augmented
from featmap_ros.datasets.hand_streams import HandStreamConfig, SensorHandSet, SyntheticHandStream
from featmap_ros.datasets.nyu import JOINT_NAMES
from featmap_ros.datasets.pool import (
    ArrayPhotos,
    PoolConfig,
    add_keypoints,
    augment_pairs,
    augment_synthetic,
    background_bank,
    endless_batches,
    photos_without_objects,
    render_object_pool,
    render_pair_pool,
    shape_bank,
)
from featmap_ros.datasets.streams import (
    ObjectStreamConfig,
    PairConfig,
    RealSyntheticPairs,
    SyntheticObjectStream,
    extreme_vertices,
    object_loader,
)
from featmap_ros.errors import FeatmapError
from featmap_ros.heads.keypoints import object_keypoints
from featmap_ros.model.nets import OBJECT_HEADS, SPATIAL_OBJECT_HEADS, object_head_channels
from featmap_ros.render import sensor
from featmap_ros.render.hand import HandShape
from featmap_ros.train import Batch, StreamContext, TaskData

# BOP ids of the Linemod-Occluded objects and the names the estimator, node and tables use.
LMO_NAMES = {1: "ape", 5: "can", 6: "cat", 8: "driller", 9: "duck", 10: "eggbox", 11: "glue", 12: "holepuncher"}
OBJECT_NORMALISATION = "rgb_to_input: pixel / 127.5 - 1; targets: 8 box corners in the crop, geometry.normalise_uv"
HAND_NORMALISATION = "crop_depth_cube: (d - z_centre) / (cube / 2) in [-1, 1]; targets: (joints - centre) / (cube / 2)"

# Seeds of the simulated hand data: training "real" hand and frames, and the test person and frames.
HAND_TRAIN_SHAPE_SEED = 1
HAND_TRAIN_SEED = 1
HAND_TEST_SHAPE_SEED = 1001
HAND_TEST_SEED = 2002


class DataError(FeatmapError, ValueError):
    """A task's data cannot be built from the given arguments."""


def _derived_seed(*parts: int) -> int:
    """One 31-bit seed from several integers (stream seed, run seed, rank, start step)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0] & 0x7FFFFFFF)


def endless_indices(n: int, seed: int, ctx: StreamContext) -> Iterator[int]:
    """Indices into n items, reshuffled every epoch, seeded by (seed, ctx.seed, ctx.rank), from ctx.start_step."""
    if n < 1:
        raise DataError("an endless sampler needs at least one item")
    k = ctx.start_step * ctx.batch_size  # items this rank already drew: skip them arithmetically
    epoch, pos = divmod(k, n)
    while True:
        perm = np.random.default_rng([seed, ctx.seed, ctx.rank, epoch]).permutation(n)
        for i in perm[pos:]:
            yield int(i)
        epoch, pos = epoch + 1, 0


def _select(batches: Iterator[dict[str, Any]], keys: Sequence[str]) -> Iterator[Batch]:
    """Keep only the keys train() uses (a batch of tensors)."""
    for b in batches:
        yield {k: b[k] for k in keys}


# --------------------------------------------------------------------------------------------
# Objects


def objects_meta(infos: dict, obj_ids: Sequence[int], names: dict[int, str], crop: int,
                 window_scale: float, meshes: dict | None = None) -> dict[str, Any]:
    """The checkpoint metadata ObjectEstimator reads: objects in head order, crop size and window scale.

    With meshes, every object also gets silhouette_m: the extreme vertices whose projected box the
    training windows are cut around (ObjectEstimator's recrop cuts its windows the same way).
    """
    objects = [{"obj_id": int(i), "name": names.get(int(i), str(i)), "corners_m": infos[i].corners.tolist(),
                "extent_m": infos[i].size_xyz.tolist(), "symmetric": bool(infos[i].symmetric)} for i in obj_ids]
    for obj in objects if meshes is not None else ():
        obj["silhouette_m"] = np.round(extreme_vertices(meshes[obj["obj_id"]]), 6).tolist()
    return {"objects": objects, "crop": {"size": int(crop), "window_scale": float(window_scale)}}


def objects_task_data(
    bop_root: str | Path,
    scene_id: int,
    train_ids: Sequence[int],
    obj_ids: Sequence[int],
    stream_cfg: ObjectStreamConfig | None = None,
    pair_cfg: PairConfig | None = None,
    num_workers: int = 0,
    names: dict[int, str] | None = None,
    feature_stats_batches: int = 8,
) -> TaskData:
    """Synthetic crops of obj_ids and real/synthetic pairs of the training frames train_ids of one BOP scene.

    The head has 16 outputs per object in obj_ids order (batches carry obj_index). The pairs'
    window_margin is the estimator's window_scale, so training crops and run-time crops agree.
    Models are loaded once; each stream factory call builds its own stream, seeded from its context.
    """
    from featmap_ros.datasets.bop import BopScene, load_models_info, load_ply, model_path
    from featmap_ros.render.objects import ObjectRenderer

    root = Path(bop_root)
    obj_ids = tuple(int(i) for i in obj_ids)
    stream_cfg = dataclasses.replace(stream_cfg or ObjectStreamConfig(), obj_ids=obj_ids)
    pair_cfg = pair_cfg or PairConfig(crop=stream_cfg.crop, window_margin=stream_cfg.window_margin, jitter=True)
    if pair_cfg.crop != stream_cfg.crop:
        raise DataError(f"pair crop {pair_cfg.crop} differs from the synthetic crop {stream_cfg.crop}")
    names = {**LMO_NAMES, **(names or {})}
    infos = load_models_info(root / "models" / "models_info.json")
    missing = [i for i in obj_ids if i not in infos]
    if missing:
        raise DataError(f"objects {missing} are not in {root / 'models' / 'models_info.json'}")
    meshes = {i: load_ply(model_path(root, i)) for i in obj_ids}
    train_ids = [int(i) for i in train_ids]
    shared: dict[str, Any] = {}  # the pairs' scene and renderer, made on first use and kept for later runs

    def synthetic(ctx: StreamContext) -> Iterator[Batch]:
        cfg = dataclasses.replace(stream_cfg, seed=_derived_seed(stream_cfg.seed, ctx.seed, ctx.start_step))
        stream = SyntheticObjectStream(infos, meshes, cfg, rank=ctx.rank)
        return _select(iter(object_loader(stream, ctx.batch_size, num_workers)), ("image", "target", "obj_index"))

    def pairs(ctx: StreamContext) -> Iterator[Batch]:
        if not shared:
            shared["scene"] = BopScene(root, scene_id)
            shared["renderer"] = ObjectRenderer(meshes, max_faces=stream_cfg.max_faces)
        # The jitter draws depend on the pair config's seed: a resumed or second rank's run draws new ones.
        cfg = dataclasses.replace(pair_cfg, seed=_derived_seed(pair_cfg.seed, ctx.seed, ctx.rank, ctx.start_step))
        ds = RealSyntheticPairs(shared["scene"], infos, shared["renderer"], train_ids, obj_ids, cfg)
        if len(ds) == 0:
            raise DataError(f"no annotated instances of {obj_ids} in frames {train_ids[:5]}... of scene {scene_id}")
        sampler = endless_indices(len(ds), pair_cfg.seed, ctx)
        loader = object_loader(ds, ctx.batch_size, num_workers, sampler=sampler)
        return _select(iter(loader), ("real", "syn", "target", "obj_index"))

    meta = objects_meta(infos, obj_ids, names, stream_cfg.crop, pair_cfg.window_margin, meshes)
    meta["data"] = {"bop_root": str(root), "scene_id": int(scene_id), "train_ids": train_ids}
    return TaskData(synthetic=synthetic, pairs=pairs, labels=tuple(names.get(i, str(i)) for i in obj_ids),
                    normalisation=OBJECT_NORMALISATION, meta=meta, feature_stats_batches=feature_stats_batches)


def objects_pool_task_data(
    bop_root: str | Path,
    scene_id: int,
    train_ids: Sequence[int],
    obj_ids: Sequence[int],
    stream_cfg: ObjectStreamConfig,
    pool_cfg: PoolConfig | None = None,
    names: dict[int, str] | None = None,
    head: str = "bb8",
    seed: int = 0,
    with_keypoints: bool = False,
) -> TaskData:
    """As objects_task_data, but every batch comes from pools rendered once (datasets/pool.py).

    The synthetic pool, the pair pool and the background bank are rendered on the first call of
    a stream factory and kept, so every method trained from this TaskData sees the same images.
    Batches carry both heads' targets: corners ('target') and the dense maps ('coords', 'visibility');
    with head "keypoints" (or with_keypoints, for a TaskData that trains several heads) also the
    keypoints' projections ('keypoints'), whose model points (heads/keypoints.object_keypoints) the
    metadata keeps (objects[].keypoints_m).
    """
    from featmap_ros.datasets.bop import BopScene, load_models_info, load_ply, model_path
    from featmap_ros.render.objects import ObjectRenderer

    root = Path(bop_root)
    obj_ids = tuple(int(i) for i in obj_ids)
    pool_cfg = pool_cfg or PoolConfig()
    stream_cfg = dataclasses.replace(stream_cfg, obj_ids=obj_ids)
    names = {**LMO_NAMES, **(names or {})}
    infos = load_models_info(root / "models" / "models_info.json")
    missing = [i for i in obj_ids if i not in infos]
    if missing:
        raise DataError(f"objects {missing} are not in {root / 'models' / 'models_info.json'}")
    train_ids = [int(i) for i in train_ids]
    if head not in OBJECT_HEADS:
        raise DataError(f"pool batches serve the object heads {OBJECT_HEADS}, not {head!r}")
    S, aug = stream_cfg.crop, pool_cfg.augment
    pools: dict[str, Any] = {}
    meshes: dict[int, Any] = {}
    keypoints = None
    if head == "keypoints" or with_keypoints:
        # PVNet's keypoints (the box centre and farthest-point surface samples), fixed here and kept in the checkpoint.
        meshes.update({i: load_ply(model_path(root, i)) for i in obj_ids})
        keypoints = [object_keypoints(meshes[i].vertices, infos[i].min_xyz, infos[i].size_xyz) for i in obj_ids]

    def ensure() -> dict[str, Any]:
        if not pools:
            meshes.update({i: load_ply(model_path(root, i)) for i in obj_ids if i not in meshes})
            renderer = ObjectRenderer(meshes, max_faces=stream_cfg.max_faces)
            pools["syn"] = render_object_pool(infos, meshes, stream_cfg, pool_cfg.n_per_object, pool_cfg.oversize,
                                              seed=seed, renderer=renderer)
            scene = BopScene(root, scene_id)
            pools["pairs"] = render_pair_pool(scene, train_ids, infos, renderer, obj_ids, S, stream_cfg.window_margin,
                                              pool_cfg.pair_oversize, canonical_symmetry=stream_cfg.canonical_symmetry)
            if keypoints is not None:
                add_keypoints(pools["syn"], keypoints)
                add_keypoints(pools["pairs"], keypoints)
            # Photos that are the scene's own training frames get their annotated objects painted out.
            by_path = {str(f.rgb_path): f.im_id for f in scene.frames(train_ids)}
            photos = None
            if stream_cfg.photo_paths and set(stream_cfg.photo_paths) <= set(by_path):
                photos = ArrayPhotos(photos_without_objects(scene, [by_path[p] for p in stream_cfg.photo_paths],
                                                            renderer))
            pools["backgrounds"] = background_bank(pool_cfg.n_backgrounds, S, stream_cfg, seed=seed, photos=photos)
            pools["shapes"] = shape_bank(pool_cfg.n_shapes, S, seed=seed)
        return pools

    def synthetic(ctx: StreamContext) -> Iterator[Batch]:
        p = ensure()

        def make(idx: torch.Tensor, g: torch.Generator) -> Batch:
            return augment_synthetic(p["syn"], idx, p["backgrounds"], p["shapes"], S, pool_cfg.oversize, aug, g)

        return endless_batches(len(p["syn"]["rgb"]), ctx.batch_size, _derived_seed(seed, ctx.seed, ctx.rank, 1),
                               ctx.start_step, make)

    def pairs(ctx: StreamContext) -> Iterator[Batch]:
        p = ensure()

        def make(idx: torch.Tensor, g: torch.Generator) -> Batch:
            return augment_pairs(p["pairs"], idx, S, pool_cfg.pair_oversize, aug, g, (p["syn"], p["shapes"]),
                                 pool_cfg.oversize)

        return endless_batches(len(p["pairs"]["real"]), ctx.batch_size, _derived_seed(seed, ctx.seed, ctx.rank, 2),
                               ctx.start_step, make)

    meshes.update({i: load_ply(model_path(root, i)) for i in obj_ids if i not in meshes})
    meta = objects_meta(infos, obj_ids, names, S, stream_cfg.window_margin, meshes)
    meta["head"] = head
    for obj, kp in zip(meta["objects"], keypoints or (), strict=False):
        obj["keypoints_m"] = kp.tolist()
    meta["data"] = {"bop_root": str(root), "scene_id": int(scene_id), "train_ids": train_ids, "pool": True}
    return TaskData(synthetic=synthetic, pairs=pairs, labels=tuple(names.get(i, str(i)) for i in obj_ids),
                    normalisation=OBJECT_NORMALISATION, meta=meta)


def single_object_synthetic(data_root: str | Path, obj_id: int, stream_cfg: ObjectStreamConfig) -> TaskData:
    """A TaskData with only a synthetic stream of one object (for per-object exemplar banks)."""
    from featmap_ros.datasets.bop import load_models_info, load_ply, model_path

    root = Path(data_root)
    infos = load_models_info(root / "models" / "models_info.json")
    meshes = {obj_id: load_ply(model_path(root, obj_id))}
    cfg = dataclasses.replace(stream_cfg, obj_ids=(obj_id,))

    def synthetic(ctx: StreamContext) -> Iterator[Batch]:
        stream = SyntheticObjectStream(infos, meshes, dataclasses.replace(cfg, seed=_derived_seed(cfg.seed, ctx.seed)),
                                       rank=ctx.rank)
        return _select(iter(object_loader(stream, ctx.batch_size, 0)), ("image", "target"))

    return TaskData(synthetic=synthetic)


# --------------------------------------------------------------------------------------------
# Hands


def hands_meta(config: HandStreamConfig) -> dict[str, Any]:
    """The checkpoint metadata HandEstimator reads: the 14 NYU joint names, cube edge and crop size."""
    return {"hands": {"joint_names": list(JOINT_NAMES), "cube_m": float(config.cube_m)},
            "crop": {"size": int(config.crop_px)}}


def stack_items(dataset: Any, keys: Sequence[str], desc: str) -> dict[str, torch.Tensor]:
    """Make every item of a map-style dataset once (tqdm) and copy the chosen keys into stacked tensors."""
    from tqdm import tqdm

    return _fill((dataset[i] for i in range(len(dataset))), len(dataset), keys,
                 lambda it: tqdm(it, total=len(dataset), desc=desc, unit="frame", mininterval=5.0))


def _fill(items: Iterator[dict[str, Any]], n: int, keys: Sequence[str], progress: Any) -> dict[str, torch.Tensor]:
    """Copy n items' keys into preallocated (n, ...) tensors, dropping each item at once.

    Keeping thousands of small per-item tensors alive between the renderer's large temporaries
    fragments the heap (measured: about 1.5 GB per 1000 hand renders); one copy per item does not.
    """
    out: dict[str, torch.Tensor] = {}
    for i, item in enumerate(progress(items)):
        for k in keys:
            v = torch.as_tensor(item[k])
            if k not in out:
                out[k] = torch.empty((n, *v.shape), dtype=v.dtype)
            out[k][i] = v
    return out


def batches_from_memory(tensors: dict[str, torch.Tensor], seed: int, ctx: StreamContext) -> Iterator[Batch]:
    """Endless reshuffled batches of in-memory tensors (all the same length)."""
    n = len(next(iter(tensors.values())))
    idx = endless_indices(n, seed, ctx)
    while True:
        pick = torch.tensor([next(idx) for _ in range(ctx.batch_size)])
        yield {k: v[pick] for k, v in tensors.items()}


def render_synthetic_pool(n: int, seed: int, config: HandStreamConfig) -> dict[str, torch.Tensor]:
    """n clean synthetic hand crops {'image': (n, 1, S, S), 'target': (n, 42)} rendered once."""
    from itertools import islice

    from tqdm import tqdm

    items = islice(iter(SyntheticHandStream(seed, config)), n)
    return _fill(items, n, ("image", "target"),
                 lambda it: tqdm(it, total=n, desc="synthetic hand pool", unit="crop", mininterval=5.0))


def hands_task_data(
    n_real: int,
    real_shape: HandShape,
    sensor_cfg: sensor.SensorConfig | None = None,
    seed: int = HAND_TRAIN_SEED,
    stream_cfg: HandStreamConfig | None = None,
    synthetic_pool: int = 0,
    num_workers: int = 0,
    feature_stats_batches: int = 8,
    augment: HandAugmentConfig | None = None,
    holdout: int = 0,
    on_render: Sequence[Callable[[int, Any, Any, Any], None]] = (),
) -> TaskData:
    """Clean synthetic hands and n_real sensor-domain "real" frames of real_shape paired with nominal renders.

    synthetic: online SyntheticHandStream renders (synthetic_pool = 0, the paper's way) or a pool of
    synthetic_pool crops rendered once and reshuffled (a CPU budget: rendering is the bottleneck).
    pairs: {'real', 'syn', 'target'} with target = the real hand's joints in its cube; all frames are
    made on first use and kept in memory, so every method trains on the very same frames.
    augment: one random rotation / offset / scale per sample (datasets.hand_augment), the same for a
    pair's real crop and render; applied to the pool and the pairs, not to online renders.
    holdout: the last `holdout` of the n_real frames are left out of the pairs (a validation split of
    the training person: `validation_frames`).
    on_render: hooks run as each pair's full frame is rendered (SensorHandSet.on_render).
    """
    cfg = stream_cfg or HandStreamConfig()
    if not 0 <= holdout < n_real:
        raise DataError(f"holdout must be in [0, n_real), got {holdout} of {n_real}")
    augment = augment or HandAugmentConfig()
    real_set = SensorHandSet(n_real, real_shape, sensor_cfg or sensor.SensorConfig.nominal(), seed, cfg)
    real_set.on_render.extend(on_render)
    n_fit = n_real - holdout
    shared: dict[str, Any] = {}

    def pairs(ctx: StreamContext) -> Iterator[Batch]:
        if "pairs" not in shared:
            shared["pairs"] = stack_items(Subset(real_set, range(n_fit)), ("real", "syn", "target"),
                                         "sensor hand pairs")
            # Recorded in every checkpoint trained on these pairs: frames whose crop centre is the palm + noise.
            meta["data"]["pair_fallbacks"] = real_set.fallbacks
        batches = batches_from_memory(shared["pairs"], seed, ctx)
        return augmented(batches, augment, (seed, ctx.seed, ctx.rank, 1), ctx.start_step, ("real", "syn"),
                         ("target",))

    meta = {**hands_meta(cfg), "data": {"n_real": int(n_real), "holdout": int(holdout), "seed": int(seed),
                                        "synthetic_pool": synthetic_pool, "augment": dataclasses.asdict(augment),
                                        "real_shape": dataclasses.asdict(real_shape)}}
    return TaskData(synthetic=hand_synthetic_factory(cfg, seed, synthetic_pool, num_workers, augment), pairs=pairs,
                    labels=tuple(JOINT_NAMES), normalisation=HAND_NORMALISATION, meta=meta,
                    feature_stats_batches=feature_stats_batches)


def hand_validation_set(n_real: int, holdout: int, real_shape: HandShape,
                        sensor_cfg: sensor.SensorConfig | None = None, seed: int = HAND_TRAIN_SEED,
                        stream_cfg: HandStreamConfig | None = None) -> Any:
    """The `holdout` frames hands_task_data(n_real, ..., holdout=holdout) leaves out (frames are made from
    (seed, index), so these are exactly the held-out ones): a map-style dataset of SensorHandSet items."""
    real_set = SensorHandSet(n_real, real_shape, sensor_cfg or sensor.SensorConfig.nominal(), seed,
                             stream_cfg or HandStreamConfig())
    return Subset(real_set, range(n_real - holdout, n_real))


def hand_synthetic_factory(cfg: HandStreamConfig, seed: int, pool: int = 0, num_workers: int = 0,
                           augment: HandAugmentConfig | None = None) -> Callable[[StreamContext], Iterator[Batch]]:
    """The synthetic hand stream: online renders (pool = 0) or a pool of `pool` renders made on first use.

    augment applies to the pool's batches (online renders already vary without end).
    """
    shared: dict[str, Any] = {}
    augment = augment or HandAugmentConfig()

    def synthetic(ctx: StreamContext) -> Iterator[Batch]:
        if pool > 0:
            if "pool" not in shared:
                shared["pool"] = render_synthetic_pool(pool, _derived_seed(seed, 7), cfg)
            batches = batches_from_memory(shared["pool"], _derived_seed(seed, 8), ctx)
            return augmented(batches, augment, (seed, ctx.seed, ctx.rank, 2), ctx.start_step, ("image",), ("target",))
        stream = SyntheticHandStream(_derived_seed(seed, ctx.seed, ctx.rank, ctx.start_step), cfg)
        loader = torch.utils.data.DataLoader(stream, batch_size=ctx.batch_size, num_workers=num_workers)
        return _select(iter(loader), ("image", "target"))

    return synthetic


def hand_test_set(n: int, seed: int = HAND_TEST_SEED, shape_seed: int = HAND_TEST_SHAPE_SEED,
                  sensor_cfg: sensor.SensorConfig | None = None,
                  stream_cfg: HandStreamConfig | None = None) -> SensorHandSet:
    """Test frames of another person (a different sampled shape), other poses and the test-time sensor."""
    shape = HandShape.sample(np.random.default_rng(shape_seed))
    sensor_cfg = sensor_cfg or sensor.SensorConfig.test_time()
    return SensorHandSet(n, shape, sensor_cfg, seed, stream_cfg or HandStreamConfig())


def hand_train_shape() -> HandShape:
    """The simulated training person's hand (differs from the nominal synthetic hand and the test person)."""
    return HandShape.sample(np.random.default_rng(HAND_TRAIN_SHAPE_SEED))


# --------------------------------------------------------------------------------------------
# `featmap train objects|hands`


def train_from_cli(task: str, config: str | None = None, method: str | None = None, out: Path = Path("out/train"),
                   bop_root: str | None = None, scene_id: int = 2, train_frames: str | None = None,
                   n_real: int = 2000, num_workers: int = 0) -> Path:
    """Train one method for a task from a YAML of differences; objects need a BOP root and training frames."""
    from featmap_ros.train import load_config, train

    cfg = load_config(config, task)
    size = cfg.net.input_size
    data: TaskData
    if task == "objects":
        from featmap_ros.datasets.bop import BopScene, select_ids

        if bop_root is None:
            raise DataError("featmap train objects needs --bop (a BOP dataset root with the real training frames)")
        scene = BopScene(Path(bop_root), scene_id)
        ids = select_ids(train_frames or "0-300", scene.image_ids)
        # Every object annotated in the training frames, so any BOP dataset trains, not only LM-O.
        obj_ids = tuple(sorted({n.obj_id for f in scene.frames(ids) for n in f.instances}))
        per = object_head_channels(cfg.net.head)
        if cfg.net.n_outputs != per * len(obj_ids):
            cfg = dataclasses.replace(cfg, net=dataclasses.replace(cfg.net, n_outputs=per * len(obj_ids)))
        if cfg.net.head in SPATIAL_OBJECT_HEADS:
            # The spatial heads' targets (model coordinates or keypoints, visibility) come with the pools.
            frames = scene.frames(ids)
            stream_cfg = ObjectStreamConfig(crop=size, photo_paths=tuple(str(f.rgb_path) for f in frames),
                                            photo_prob=0.5)
            data = objects_pool_task_data(bop_root, scene_id, ids, obj_ids, stream_cfg, head=cfg.net.head)
        else:
            data = objects_task_data(bop_root, scene_id, ids, obj_ids, ObjectStreamConfig(crop=size),
                                     num_workers=num_workers)
    else:
        data = hands_task_data(n_real, hand_train_shape(), sensor.SensorConfig.nominal(),
                               stream_cfg=HandStreamConfig(crop_px=size), num_workers=num_workers)
    return train(cfg, data, out, method)



# --------------------------------------------------------------------------------------------
# Every method on one budget, stage 1 trained once


SHARED_STAGE1 = ("finetune", "fm", "fm_mmd", "synthetic")


def seed_from_stage1(stage1_json: Path, out_dir: Path, cfg: Any, method: str) -> Path:
    """Write a checkpoint of `method` at step stage1_steps holding stage 1's f_S and h, for train() to resume.

    train() refuses to resume another method's checkpoint (its net differs: fm adds f_R and g), so
    the stage-1 weights are copied into a fresh model of the method, with a fresh optimiser (Adam
    moments restart at the stage boundary; each stage warms its learning rate up anyway). f_R is
    set from f_S by train() itself when the mapping stage starts.
    """
    from featmap_ros.model import checkpoint as ckpt
    from featmap_ros.model.nets import FeatureMappingModel
    from featmap_ros.train import config_to_dict, method_net

    src, doc = ckpt.load(stage1_json, expect_task=cfg.net.task)
    if int(doc["step"]) != cfg.stage1_steps:
        raise DataError(f"{stage1_json} is at step {doc['step']}, not at the end of stage 1 ({cfg.stage1_steps})")
    torch.manual_seed(cfg.seed)
    model = FeatureMappingModel(method_net(cfg.net, method))
    missing, unexpected = model.load_state_dict(src.state_dict(), strict=False)
    if unexpected or any(not (k.startswith("f_R.") or k.startswith("g.")) for k in missing):
        raise DataError(f"stage-1 weights do not fit a {method} model: missing {missing[:3]}, "
                        f"unexpected {unexpected[:3]}")
    o = cfg.optim
    optimizer = torch.optim.AdamW(model.parameters(), lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps,
                                  weight_decay=o.weight_decay)
    meta = {"method": method, "step": int(cfg.stage1_steps), "seeded_from": str(stage1_json),
            "config": config_to_dict(dataclasses.replace(cfg, method=method))}
    return ckpt.save(Path(out_dir) / "model", model, meta, optimizer)


def train_all(cfg: Any, data: TaskData, out: Path, methods: Sequence[str], share_stage1: bool = True,
              every: int = 0, probe: Callable[[Path, int], dict[str, float]] | None = None,
              curves: dict[str, list[dict[str, float]]] | None = None) -> tuple[dict[str, Path], dict[str, float]]:
    """Train each method into out/<method>/ with cfg's budget; return checkpoints and wall seconds per method.

    With share_stage1, stage 1 (stage1_steps synthetic steps) is trained once into out/stage1 (the
    first part of a finetune run) and copied into finetune, fm, fm_mmd and synthetic
    (seed_from_stage1); each method still spends stage1_steps + stage2_steps steps. synthetic then
    continues on its own single-stage schedule from that step. Stage 1's seconds are counted once,
    under "stage1". Reruns resume.

    Learning curves: with every > 0 and a probe, training runs in segments of `every` steps
    (train()'s time-boxed resume, so the schedule is an uninterrupted run's) and probe(checkpoint,
    step) after each fills curves[method] (and curves["stage1"]); wall seconds exclude the probes.
    """
    import time

    from featmap_ros.train import train

    out = Path(out)
    curves = {} if curves is None else curves
    total = cfg.stage1_steps + cfg.stage2_steps

    def run(folder: Path, method: str, start: int, end: int, curve: list[dict[str, float]]) -> tuple[Path, float]:
        stops = sorted({*range(start + every, end, every), end}) if every > 0 and probe else [end]
        spent, path = 0.0, folder / "model.json"
        for stop in stops:
            t0 = time.perf_counter()
            path = train(dataclasses.replace(cfg, max_steps=stop), data, folder, method)
            spent += time.perf_counter() - t0
            if every > 0 and probe:
                curve.append(probe(path, stop))
        return path, spent

    paths: dict[str, Path] = {}
    wall: dict[str, float] = {}
    shared = [m for m in methods if m in SHARED_STAGE1] if share_stage1 and cfg.stage1_steps > 0 else []
    if shared and cfg.stage2_steps < 1:
        # A seeded copy of stage 1 is not a finished checkpoint (no task metadata, no feature statistics).
        raise DataError(f"stage2_steps is {cfg.stage2_steps}: {', '.join(shared)} would have no step of their own "
                        "after the shared stage 1; give stage 2 at least one step")
    stage1 = None
    if shared:
        curves["stage1"] = []
        stage1, wall["stage1"] = run(out / "stage1", "finetune", 0, cfg.stage1_steps, curves["stage1"])
    for method in methods:
        folder = out / method
        start = 0
        curves[method] = []
        if method in shared:
            curves[method] = list(curves["stage1"])
            start = cfg.stage1_steps
            if not (folder / "model.json").is_file():
                seed_from_stage1(stage1, folder, cfg, method)
        paths[method], wall[method] = run(folder, method, start, total, curves[method])
    return paths, wall
