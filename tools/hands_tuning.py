"""The hand settings' validation runs (docs/results.md): one fm (or other) run on cached data, scored on
held-out frames of the training person; never on the test person.

Usage: python3 tools/hands_tuning.py --tag NAME [--head vote|fc] [--method fm] [--s1 800 --s2 800]
       [--rot 30 --shift 0.05 --dshift 0.05 --scale 0.1] [--loss smooth_l1] [--lr 3e-3] [--seed 0]
       [--map-blocks 2] [--sampled-shapes]
The first run renders 6,000 clean crops and 1,200 sensor frames of person A into /tmp/handdev/cache
(the last 200 frames are the validation split); every run appends one JSON line to
/tmp/handdev/results.jsonl. DEV_THREADS (default 1) sets torch's threads, so two runs fit 2 cores.
"""

import argparse
import dataclasses
import json
import os
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from featmap_ros.datasets.hand_augment import HandAugmentConfig, augmented
from featmap_ros.datasets.hand_streams import HandStreamConfig
from featmap_ros.experiments import data as xd
from featmap_ros.model import checkpoint
from featmap_ros.model.nets import NetConfig
from featmap_ros.render import sensor
from featmap_ros.train import LossConfig, OptimConfig, TaskData, TrainConfig, train

torch.set_num_threads(int(os.environ.get("DEV_THREADS", "1")))
C = Path("/tmp/handdev/cache")
ap = argparse.ArgumentParser()
ap.add_argument("--pool", type=int, default=6000)
ap.add_argument("--real", type=int, default=1200)
ap.add_argument("--holdout", type=int, default=200)
ap.add_argument("--head", default="vote")
ap.add_argument("--method", default="fm")
ap.add_argument("--s1", type=int, default=800)
ap.add_argument("--s2", type=int, default=800)
ap.add_argument("--width", type=int, default=8)
ap.add_argument("--fdim", type=int, default=32)
ap.add_argument("--stride", type=int, default=4)
ap.add_argument("--rot", type=float, default=0)
ap.add_argument("--shift", type=float, default=0)
ap.add_argument("--dshift", type=float, default=0)
ap.add_argument("--scale", type=float, default=0)
ap.add_argument("--loss", default="mse")
ap.add_argument("--lr", type=float, default=1e-3)
ap.add_argument("--batch", type=int, default=32)
ap.add_argument("--tag", default="run")
ap.add_argument("--lambda-feat", type=float, default=1.0)
ap.add_argument("--n-fit", type=int, default=0, help="train on only the first N of the fit frames (0: all)")
ap.add_argument("--pair-shape", default="nominal", choices=["nominal", "same"])
ap.add_argument("--feat-g-only", action="store_true",
                help="LossConfig(feat_through_f=False): the feature loss trains g only")
ap.add_argument("--seed", type=int, default=0, help="TrainConfig.seed: initial weights and batch draws")
ap.add_argument("--map-blocks", type=int, default=2, help="NetConfig.mapping_blocks: g's residual blocks")
ap.add_argument("--sampled-shapes", action="store_true",
                help="HandStreamConfig.sampled_shapes: the pool's renders use a new sampled hand every render batch")
a = ap.parse_args()
cfgs = HandStreamConfig(crop_px=64, pair_shape=a.pair_shape)
if a.pair_shape != "nominal":
    C = C.with_name(f"cache_{a.pair_shape}")
C.mkdir(parents=True, exist_ok=True)
POOL = C / f"pool{'_shapes' if a.sampled_shapes else ''}{'' if a.pool == 6000 else f'_{a.pool}'}.safetensors"
if not POOL.exists():
    pool = xd.render_synthetic_pool(a.pool, 123, dataclasses.replace(cfgs, sampled_shapes=a.sampled_shapes))
    save_file({k: v.contiguous() for k, v in pool.items()}, POOL)
if not (C / "pairs.safetensors").exists():
    ds = xd.hand_validation_set(
        a.real, a.real, xd.hand_train_shape(), sensor.SensorConfig.nominal(), xd.HAND_TRAIN_SEED, cfgs
    )
    items = xd.stack_items(ds, ("real", "syn", "target", "centre", "joints"), "pairs")
    save_file({k: v.contiguous() for k, v in items.items()}, C / "pairs.safetensors")
pool = load_file(POOL)
pairs = load_file(C / "pairs.safetensors")
n_fit = len(pairs["real"]) - a.holdout
fit = {k: pairs[k][: min(n_fit, a.n_fit or n_fit)] for k in ("real", "syn", "target")}
val = {k: pairs[k][n_fit:] for k in ("real", "target", "centre", "joints")}
aug = HandAugmentConfig(rotation_deg=a.rot, shift_sigma=a.shift, depth_sigma=a.dshift, scale=a.scale)


def syn(ctx):
    return augmented(
        xd.batches_from_memory(pool, 8, ctx), aug, (0, ctx.seed, 2), ctx.start_step, ("image",), ("target",)
    )


def prs(ctx):
    return augmented(
        xd.batches_from_memory(fit, 9, ctx), aug, (0, ctx.seed, 1), ctx.start_step, ("real", "syn"), ("target",)
    )


data = TaskData(
    synthetic=syn,
    pairs=prs,
    labels=tuple(xd.JOINT_NAMES),
    normalisation=xd.HAND_NORMALISATION,
    meta=xd.hands_meta(cfgs),
)
net = NetConfig(
    task="hands",
    input_size=64,
    width=a.width,
    feature_dim=a.fdim if a.head == "vote" else 256,
    dropout=0.1 if a.head == "vote" else 0.3,
    head=a.head,
    stride=a.stride if a.head == "vote" else None,
    mapping_blocks=a.map_blocks,
)
tc = TrainConfig(
    method=a.method,
    net=net,
    optim=OptimConfig(lr=a.lr, warmup_steps=100),
    loss=LossConfig(pose=a.loss, lambda_feat=a.lambda_feat, feat_through_f=not a.feat_g_only),
    batch_size=a.batch,
    stage1_steps=a.s1,
    stage2_steps=a.s2,
    checkpoint_every=100000,
    log_every=200,
    device="cpu",
    tensorboard=False,
    seed=a.seed,
)
out = Path(f"/tmp/handdev/runs/{a.tag}")
t0 = time.perf_counter()
path = train(tc, data, out, a.method)
wall = time.perf_counter() - t0
model, _ = checkpoint.load(path)
model.eval()
with torch.inference_mode():
    p = torch.cat([model.predict_real(val["real"][i : i + 128]).outputs for i in range(0, len(val["real"]), 128)])
err = (p - val["target"]).reshape(len(p), -1, 3).norm(dim=-1) * 150.0
with torch.inference_mode():
    ps = torch.cat([model.predict_syn(pool["image"][-400:][i : i + 128]).outputs for i in range(0, 400, 128)])
errs = (ps - pool["target"][-400:]).reshape(400, -1, 3).norm(dim=-1) * 150.0
res = {
    "tag": a.tag,
    "args": vars(a),
    "wall_s": round(wall, 1),
    "val_mm": round(float(err.mean()), 2),
    "val_max_le_40": round(float((err.max(1).values <= 40).float().mean()), 3),
    "syn_pool_tail_mm": round(float(errs.mean()), 2),
}
print(json.dumps(res))
open("/tmp/handdev/results.jsonl", "a").write(json.dumps(res) + "\n")
