"""Plug the synthetic streams and real/synthetic pairs into the trainer (train.TaskData), per task.

Each stream is a factory of endless batch iterators: it gets its rank's share of the batch, its
seed and how many batches it already delivered (a resumed run starts a fresh, differently seeded
sequence instead of replaying the first batches).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from featmap_ros.train import Batch, StreamContext, TaskData

LMO_NAMES = {1: "ape", 5: "can", 6: "cat", 8: "driller", 9: "duck", 10: "eggbox", 11: "glue", 12: "holepuncher"}


def _seed(ctx: StreamContext, salt: int) -> int:
    """A seed for one rank's stream that differs per resume point and per stream."""
    return int(np.random.SeedSequence([ctx.seed, ctx.rank, ctx.start_step, salt]).generate_state(1)[0])


def endless_batches(dataset: Dataset, batch_size: int, seed: int, keys: dict[str, str]) -> Iterator[Batch]:
    """Reshuffled passes over a finite dataset, forever, as batches renamed by keys {dataset key: batch key}."""
    rng = np.random.default_rng(seed)
    n = len(dataset)  # type: ignore[arg-type]
    if n == 0:
        raise ValueError("the real training set is empty: check the frame range and visibility threshold")
    order: list[int] = []
    while True:
        if len(order) < batch_size:
            order += rng.permutation(n).tolist()
        picked, order = order[:batch_size], order[batch_size:]
        items = [dataset[i] for i in picked]
        yield {dst: torch.stack([torch.as_tensor(it[src]) for it in items]) for src, dst in keys.items()}


def _stream_batches(dataset: Any, batch_size: int, keys: dict[str, str], num_workers: int = 0) -> Iterator[Batch]:
    from featmap_ros.datasets.streams import object_loader

    loader: DataLoader = object_loader(dataset, batch_size=batch_size, num_workers=num_workers)
    for batch in loader:
        yield {dst: batch[src] for src, dst in keys.items()}


def object_meta(infos: dict, obj_ids: Sequence[int], names: dict[int, str], crop: int, window_scale: float) -> dict:
    """What the estimator needs to turn the head's outputs into poses (see featmap_ros/estimator.py)."""
    return {
        "objects": [{"obj_id": int(i), "name": names.get(i, str(i)), "corners_m": infos[i].corners.tolist(),
                     "extent_m": infos[i].size_xyz.tolist(), "symmetric": infos[i].symmetric} for i in obj_ids],
        "crop": {"size": int(crop), "window_scale": float(window_scale)},
    }


def objects_task_data(bop_root: Path, scene_id: int, train_ids: Sequence[int], obj_ids: Sequence[int],
                      stream_cfg: Any = None, pair_cfg: Any = None, num_workers: int = 0,
                      names: dict[int, str] | None = None, min_visib: float | None = None) -> TaskData:
    """Synthetic crops of obj_ids from their BOP models, and pairs from the real frames train_ids only."""
    from featmap_ros.datasets.bop import load_models_info
    from featmap_ros.datasets.streams import ObjectStreamConfig, PairConfig, RealSyntheticPairs, SyntheticObjectStream
    from featmap_ros.preprocess import RGB_NORMALISATION

    obj_ids = tuple(int(i) for i in obj_ids)
    stream_cfg = dataclasses.replace(stream_cfg or ObjectStreamConfig(), obj_ids=obj_ids)
    pair_cfg = pair_cfg or PairConfig(crop=stream_cfg.crop, jitter=True)
    if min_visib is not None:
        pair_cfg = dataclasses.replace(pair_cfg, min_visib=min_visib)
    if pair_cfg.crop != stream_cfg.crop or pair_cfg.window_margin != stream_cfg.window_margin:
        raise ValueError("synthetic and real crops must share the crop size and window margin "
                         f"({stream_cfg.crop}/{stream_cfg.window_margin} vs {pair_cfg.crop}/{pair_cfg.window_margin})")
    infos = load_models_info(Path(bop_root) / "models" / "models_info.json")
    names = {**LMO_NAMES, **(names or {})}

    def synthetic(ctx: StreamContext) -> Iterator[Batch]:
        cfg = dataclasses.replace(stream_cfg, seed=_seed(ctx, 1) % 2**31)
        stream = SyntheticObjectStream.from_bop(bop_root, cfg, rank=ctx.rank)
        return _stream_batches(stream, ctx.batch_size, {"image": "image", "target": "target",
                                                         "obj_index": "obj_index"}, num_workers)

    pairs_ds: list[Any] = []  # built on first use (loads models, reads images)

    def pairs(ctx: StreamContext) -> Iterator[Batch]:
        if not pairs_ds:
            pairs_ds.append(RealSyntheticPairs.from_bop(bop_root, scene_id, list(train_ids), obj_ids, pair_cfg))
        return endless_batches(pairs_ds[0], ctx.batch_size, _seed(ctx, 2),
                               {"real": "real", "syn": "syn", "target": "target", "obj_index": "obj_index"})

    return TaskData(
        synthetic=synthetic, pairs=pairs, labels=tuple(names.get(i, str(i)) for i in obj_ids),
        normalisation=f"{RGB_NORMALISATION}; targets: box corners in crop pixels mapped to [-1, 1]",
        meta=object_meta(infos, obj_ids, names, stream_cfg.crop, stream_cfg.window_margin),
    )


def hands_task_data(n_real: int, real_shape: Any, sensor_cfg: Any, seed: int = 0, stream_cfg: Any = None,
                    sampled_shapes: bool = False) -> TaskData:
    """Clean synthetic hand crops, and n_real sensor-domain frames of real_shape paired with clean renders."""
    from featmap_ros.datasets.hand_streams import HandStreamConfig, SensorHandSet, SyntheticHandStream
    from featmap_ros.datasets.nyu import JOINT_NAMES
    from featmap_ros.preprocess import DEPTH_NORMALISATION

    cfg = stream_cfg or HandStreamConfig()
    if sampled_shapes:
        cfg = dataclasses.replace(cfg, sampled_shapes=True)
    real = SensorHandSet(n_real, real_shape, sensor_cfg, seed=seed, config=cfg)

    def synthetic(ctx: StreamContext) -> Iterator[Batch]:
        stream = SyntheticHandStream(seed=_seed(ctx, 3) % 2**31, config=cfg)
        loader = DataLoader(stream, batch_size=ctx.batch_size, num_workers=0)
        return ({"image": b["image"], "target": b["target"]} for b in loader)

    def pairs(ctx: StreamContext) -> Iterator[Batch]:
        return endless_batches(real, ctx.batch_size, _seed(ctx, 4), {"real": "real", "syn": "syn", "target": "target"})

    return TaskData(
        synthetic=synthetic, pairs=pairs, labels=tuple(JOINT_NAMES),
        normalisation=f"{DEPTH_NORMALISATION}; targets: joints minus the cube centre over half the cube",
        meta={"hands": {"joint_names": list(JOINT_NAMES), "cube_m": cfg.cube_m}, "crop": {"size": cfg.crop_px}},
    )


def train_from_cli(task: str, config: str | None, method: str | None, out: Path, bop_root: str | None = None,
                   scene_id: int = 2, train_frames: str | None = None, n_real: int = 2000) -> Path:
    """`featmap train objects|hands`: one config file, one method, one checkpoint."""
    from featmap_ros.train import load_config, save_config, train

    cfg = load_config(config, task=task)
    if method:
        cfg = dataclasses.replace(cfg, method=method)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    if task == "objects":
        from featmap_ros.datasets.bop import BopScene, load_models_info, select_ids
        from featmap_ros.datasets.streams import ObjectStreamConfig, PairConfig

        if not bop_root:
            raise SystemExit("featmap train objects needs --bop (a BOP dataset root with the real training frames)")
        scene = BopScene(bop_root, scene_id)
        ids = select_ids(train_frames, scene.image_ids)
        obj_ids = tuple(sorted(load_models_info(Path(bop_root) / "models" / "models_info.json")))
        size = cfg.net.input_size
        if cfg.net.n_outputs != 16 * len(obj_ids):
            cfg = dataclasses.replace(cfg, net=dataclasses.replace(cfg.net, n_outputs=16 * len(obj_ids)))
        data = objects_task_data(Path(bop_root), scene_id, ids, obj_ids, ObjectStreamConfig(crop=size),
                                 PairConfig(crop=size, jitter=True))
    else:
        from featmap_ros.datasets.hand_streams import HandStreamConfig
        from featmap_ros.render.hand import HandShape
        from featmap_ros.render.sensor import SensorConfig

        data = hands_task_data(n_real, HandShape.sample(np.random.default_rng(1)), SensorConfig.nominal(), seed=1,
                               stream_cfg=HandStreamConfig(crop_px=cfg.net.input_size))
    return train(cfg, data, out)
