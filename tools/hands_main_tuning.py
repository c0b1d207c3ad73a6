"""Validation runs of the main job's hand model, never on its test bag.

Trains the main job's hand model (MainJobSize, with the changes given) and replays a validation bag
through the node's path: hands of two other people (seeds 8 and 9; the main job's test hand is
seed 7) under the test-time sensor, a new pose every 5 frames, so 120 frames hold ~26 poses
(the main job's 60-frame bag holds 5). Every run appends a JSON line to /tmp/handmain/results.jsonl.

Usage: DEV_THREADS=2 python3 tools/hands_main_tuning.py --tag NAME [--s1 1000 --s2 600] [--batch 16]
       [--pairs 400] [--pool 1200] [--width 8] [--method fm_joint] [--refine-steps 1500] [--lr 3e-3]
       [--lambda-feat 0.1] [--feat-g-only | --feat-through-f] [--seed 0]
"""

import argparse
import dataclasses
import itertools
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from featmap_ros.bag import make as bag
from featmap_ros.bag.replay import eval_bag
from featmap_ros.datasets.nyu import NYU_INTRINSICS
from featmap_ros.experiments.main_job import MainJobSize, _train_hands
from featmap_ros.render.hand import HandShape

torch.set_num_threads(int(os.environ.get("DEV_THREADS", "1")))
ROOT = Path("/tmp/handmain")
ap = argparse.ArgumentParser()
ap.add_argument("--tag", required=True)
ap.add_argument("--method", default=None)
ap.add_argument("--s1", type=int, default=None)
ap.add_argument("--s2", type=int, default=None)
ap.add_argument("--batch", type=int, default=None)
ap.add_argument("--pairs", type=int, default=None)
ap.add_argument("--pool", type=int, default=None)
ap.add_argument("--width", type=int, default=None)
ap.add_argument("--refine-steps", type=int, default=None)
ap.add_argument("--lr", type=float, default=None)
ap.add_argument("--refine-synthetic", type=int, default=None, help="the refiner's clean renders")
ap.add_argument("--refine-sensor", type=int, default=None, help="the refiner's crops of the sensor pairs' frames")
ap.add_argument("--pair-centre", default=None, choices=["located", "palm"], help="where the sensor pairs are cropped")
ap.add_argument("--shift", type=float, default=None, help="centre-offset augmentation, xy and z, half-cube units")
ap.add_argument("--lambda-feat", type=float, default=None, help="the feature loss's weight")
feat = ap.add_mutually_exclusive_group()  # neither: MainJobSize's default (g only)
feat.add_argument("--feat-g-only", dest="through_f", action="store_const", const=False,
                  help="fm_joint's feature loss trains g only")
feat.add_argument("--feat-through-f", dest="through_f", action="store_const", const=True,
                  help="fm_joint's feature loss reaches f too")
ap.add_argument("--seed", type=int, default=None, help="the hand model's TrainConfig.seed")
ap.add_argument("--ema", type=float, default=None, help="the hand model's OptimConfig.ema_decay (0: off)")
a = ap.parse_args()

base = MainJobSize()
steps = None
if a.s1 is not None or a.s2 is not None:
    steps = (base.hand_steps[0] if a.s1 is None else a.s1, base.hand_steps[1] if a.s2 is None else a.s2)
changes = {"hand_method": a.method, "hand_steps": steps, "hand_batch": a.batch,
           "hand_pairs": a.pairs, "hand_pool": a.pool, "hand_width": a.width, "refine_steps": a.refine_steps,
           "hand_lr": a.lr, "refine_synthetic_frames": a.refine_synthetic, "refine_sensor_frames": a.refine_sensor,
           "hand_pair_centre": a.pair_centre, "hand_shift_sigma": a.shift,
           "hand_lambda_feat": a.lambda_feat, "hand_feat_through_f": a.through_f,
           "hand_seed": a.seed, "hand_ema": a.ema}
size = dataclasses.replace(base, **{k: v for k, v in changes.items() if v is not None})
val_bag = ROOT / "val_bag"
if not (val_bag / "metadata.yaml").is_file():
    seqs = [bag.hand_sequence(60, seed=s, shape=HandShape.sample(np.random.default_rng(s)), keyframe_every=5)
            for s in (8, 9)]
    bag.write_hand_frames(val_bag, itertools.chain(*seqs), NYU_INTRINSICS, total=120)
t0 = time.perf_counter()
model = _train_hands(ROOT / "runs" / a.tag, size, "cpu")
wall = time.perf_counter() - t0
res = eval_bag(val_bag, model, ROOT / "runs" / a.tag / "eval", device="cpu", write_output_bag=False)
m = res.metrics
row = {"tag": a.tag, "changes": {k: v for k, v in changes.items() if v is not None},
       "size": dataclasses.asdict(size), "train_s": round(wall, 1),
       "frames_scored": m.get("frames_scored"), "mean_error_mm": m.get("mean_error_mm"),
       "max_40mm": m.get("max_error_fraction", {}).get("40mm"), "palm_mm": m.get("per_joint_mm", {}).get("palm")}
ROOT.mkdir(parents=True, exist_ok=True)
with open(ROOT / "results.jsonl", "a") as f:
    f.write(json.dumps(row) + "\n")
print(json.dumps(row))
