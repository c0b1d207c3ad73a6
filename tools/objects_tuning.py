"""Validation runs of the main job's object model on its built-in scene, never on its test frames.

Trains the main job's object model (MainJobSize, with the changes given) on its training frames
(0-99) and scores validation frames (jittered ground-truth boxes, as the main job's bag) that the
main job never makes: the built-in scene written with --val more frames (same seed, so frames
0-159 are the main job's own, with the same table), scored on frames 160 onwards. The main job's
test frames (100-159) are not touched. --holdout N instead trains on 0-(99-N) and scores the last
N training frames (the session-5 protocol, 20 instances).

Usage: DEV_THREADS=1 python3 tools/objects_tuning.py --tag NAME [--method fm] [--lr 1e-3]
       [--s1 1200 --s2 1200] [--width 16] [--batch 8] [--blocks 12223] [--bins 16] [--no-amp] [--val 100 | --holdout 20]
Assets go to /tmp/objdev/assets_val<N> (made once); every run appends a JSON line to /tmp/objdev/results.jsonl
(the arguments as given and the resolved MainJobSize). Scored without recrop (the main job replays with 1).
"""

import argparse
import dataclasses
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from featmap_ros import assets
from featmap_ros.bop_scoring import load_object_models, run_bop
from featmap_ros.estimator import load_estimator
from featmap_ros.evaluation import score_objects
from featmap_ros.experiments.main_job import MainJobSize, train_objects
from featmap_ros.metrics import accuracy

torch.set_num_threads(int(os.environ.get("DEV_THREADS", "1")))
ROOT = Path("/tmp/objdev")
ap = argparse.ArgumentParser()
ap.add_argument("--tag", required=True)
ap.add_argument("--method", default="fm")
ap.add_argument("--lr", type=float, default=1e-3)
ap.add_argument("--s1", type=int, default=None, help="stage-1 steps (default: the main job's)")
ap.add_argument("--s2", type=int, default=None, help="stage-2 steps (default: the main job's)")
ap.add_argument("--width", type=int, default=16)
ap.add_argument("--batch", type=int, default=None, help="images per step (default: the main job's)")
ap.add_argument("--blocks", default=None,
                help="object encoder's convolutions per stage, 5 digits, e.g. 22333 (default: the main job's, 12223)")
ap.add_argument("--no-amp", action="store_true", help="float32 training (no bf16 autocast)")
ap.add_argument("--bins", type=int, default=None, help="MainJobSize.object_coord_bins (default: the main job's)")
ap.add_argument("--ema", type=float, default=None, help="OptimConfig.ema_decay (default: the main job's)")
group = ap.add_mutually_exclusive_group()
group.add_argument("--val", type=int, default=100, help="validation frames after the main job's test frames")
group.add_argument("--holdout", type=int, default=0, help="score the last N training frames instead")
a = ap.parse_args()

base = MainJobSize()
steps = (base.object_steps[0] if a.s1 is None else a.s1, base.object_steps[1] if a.s2 is None else a.s2)
size = dataclasses.replace(base, object_method=a.method, object_lr=a.lr, object_steps=steps,
                           width=a.width, amp=not a.no_amp, object_batch=a.batch or base.object_batch,
                           object_ema=base.object_ema if a.ema is None else a.ema,
                           object_coord_bins=base.object_coord_bins if a.bins is None else a.bins,
                           object_blocks=tuple(int(c) for c in a.blocks) if a.blocks else base.object_blocks)
n_val = 0 if a.holdout else a.val
root = ROOT / f"assets_val{n_val}"
if not (root / "test" / "000001" / "scene_gt.json").is_file():
    assets.write_object_models(root)
    assets.write_real_scene(root, base.real_frames + n_val, seed=0)
fit = list(range(base.train_frames - a.holdout))
scored = (f"{fit[-1] + 1}-{base.train_frames - 1}" if a.holdout
          else f"{base.real_frames}-{base.real_frames + n_val - 1}")
t0 = time.perf_counter()
model = train_objects(root, ROOT / "runs" / a.tag, size, "cpu", fit)
wall = time.perf_counter() - t0
infos, meshes = load_object_models(root / "models")
records, _ = run_bop(load_estimator(model, device="cpu"), root, 1, scored, detections="gt-jitter")
metrics, rows = score_objects(records, infos, meshes, {assets.OBJ_ID: assets.OBJ_NAME})
proj = np.array([r["proj_px"] for r in rows])
mean = metrics["all"]["mean_over_objects"]
row = {"tag": a.tag, "args": vars(a), "size": dataclasses.asdict(size), "train_s": round(wall, 1),
       "val_instances": metrics["all"]["n_instances"],
       "scored_frames": scored, "val_proj_5px": mean["proj_5px"], "val_add_10": mean["add_10"],
       "val_proj_10px": accuracy(proj, 10.0), "val_proj_median_px": float(np.median(proj))}
with open(ROOT / "results.jsonl", "a") as f:
    f.write(json.dumps(row) + "\n")
print(json.dumps(row))
