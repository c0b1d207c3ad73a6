"""Trained object images per second, before and after the pools, in one run (LM-O models, stage-1 steps).

Usage: python3 bench/bench_object_training.py [--steps 40] [--bop ../shared/data/lmo] [--threads 2]

Rows, each a stage-1 training step (forward, backward, AdamW) at batch 32, input 64, measured
over --steps steps after 5 warm-up steps, with the data time and the step time apart:
  online/bb8   the synthetic stream rendered online by one DataLoader worker (the old pipeline)
  pool/bb8     the same net fed from a pool rendered once and augmented in torch
  pool/dense   the dense correspondence head (the new default) from the pool
  pool/dense16 the same with its model coordinates over 16 bins (LM-O's default since session 17)
  pool/dense channels_last   the same in channels_last memory format
  pool/*, bf16 autocast      the extractor in bf16 (train.TrainConfig.amp; only where the CPU has bf16)
Pool rendering is timed once, apart (it is paid once per experiment, shared by every method).
Run it alone: on 2 cores a second torch process slows both many times.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import torch
from timing import time_steps

from featmap_ros.backends.torch_net import bf16_native
from featmap_ros.datasets.bop import load_models_info, load_ply, model_path
from featmap_ros.datasets.pool import AugmentConfig, augment_synthetic, background_bank, render_object_pool, shape_bank
from featmap_ros.datasets.streams import LMO_OBJ_IDS, ObjectStreamConfig, SyntheticObjectStream, object_loader
from featmap_ros.heads.dense_train import dense_loss
from featmap_ros.model.losses import pose_loss
from featmap_ros.model.nets import DENSE_CHANNELS, FeatureMappingModel, NetConfig
from featmap_ros.train import select_outputs


def net(head: str, n: int) -> FeatureMappingModel:
    if head.startswith("dense"):  # "dense16": model coordinates over 16 bins (NetConfig.coord_bins)
        cfg = NetConfig(task="objects", input_size=64, width=16, feature_dim=32, n_outputs=DENSE_CHANNELS * n,
                        head="dense", dropout=0.0, coord_bins=int(head[5:] or 0))
    else:
        cfg = NetConfig(task="objects", input_size=64, width=16, feature_dim=256, n_outputs=16 * n, dropout=0.3)
    return FeatureMappingModel(cfg).train()


def measure(model: FeatureMappingModel, batches, steps: int, channels_last: bool = False, bf16: bool = False
            ) -> tuple[float, float, float]:
    """(images/s, data ms per batch, step ms per batch)."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)

    def step(b) -> int:
        x = b["image"].contiguous(memory_format=torch.channels_last) if channels_last else b["image"]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            features = model.features_syn(x)
        if model.cfg.head == "dense":  # as train.py: only each sample's object's channels
            out = model.h.train_outputs(features, b["obj_index"])
            loss = dense_loss(out, b["coords"], b["visibility"], b["obj_index"], coord_bins=model.cfg.coord_bins)
        else:
            loss = pose_loss(select_outputs(model.h(features), b["obj_index"], 16), b["target"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return len(x)

    return time_steps(batches, step, steps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--bop", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "lmo"))
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--pool", type=int, default=300, help="pool crops per object")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    root = Path(args.bop)
    ids = LMO_OBJ_IDS
    infos = load_models_info(root / "models" / "models_info.json")
    meshes = {i: load_ply(model_path(root, i)) for i in ids}
    cfg = ObjectStreamConfig(obj_ids=ids, crop=64, noise_std=3.0, blur_prob=0.3)
    print(f"torch {torch.__version__}, CPU threads {torch.get_num_threads()}, batch 32, input 64, 8 LM-O objects")

    t0 = time.perf_counter()
    pool = render_object_pool(infos, meshes, cfg, args.pool, 1.25)
    render_s = time.perf_counter() - t0
    print(f"pool: {len(pool['rgb'])} crops rendered in {render_s:.1f} s ({len(pool['rgb']) / render_s:.0f} crops/s), "
          "once per experiment")
    bg, shapes = background_bank(512, 64, cfg), shape_bank(256, 64)
    g = torch.Generator().manual_seed(0)
    aug = AugmentConfig()

    def pool_batches():
        while True:
            yield augment_synthetic(pool, torch.randint(len(pool["rgb"]), (32,), generator=g), bg, shapes, 64, 1.25,
                                    aug, g)

    def online_batches():
        stream = SyntheticObjectStream(infos, meshes, dataclasses.replace(cfg, seed=1))
        return iter(object_loader(stream, 32, num_workers=1))

    print("| pipeline | head | images/s | data ms/batch | step ms/batch |\n|---|---|---|---|---|")
    rows = [("online (1 render worker)", "bb8", online_batches, False, False),
            ("pool + torch augmentation", "bb8", pool_batches, False, False),
            ("pool + torch augmentation", "dense", pool_batches, False, False),
            ("pool + torch augmentation, 16 coordinate bins", "dense16", pool_batches, False, False),
            ("pool + torch augmentation, channels_last", "dense", pool_batches, True, False)]
    if bf16_native(torch.device("cpu")):
        rows += [("pool + torch augmentation, bf16 autocast", "bb8", pool_batches, False, True),
                 ("pool + torch augmentation, bf16 autocast", "dense", pool_batches, False, True)]
    else:
        print("(no bf16 rows: this CPU has neither AMX-BF16 nor AVX512-BF16)")
    for name, head, source, cl, bf16 in rows:
        torch.manual_seed(0)
        ips, data_ms, step_ms = measure(net(head, len(ids)), source(), args.steps, cl, bf16)
        print(f"| {name} | {head} | {ips:.0f} | {data_ms:.1f} | {step_ms:.1f} |", flush=True)


if __name__ == "__main__":
    main()
