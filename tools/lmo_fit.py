"""How well one LM-O model fits, per object: held-out synthetic crops and the validation frames. Training frames only.

Trains one method on the experiment's fit frames (the LmoBudget with the fields given by --set) and
scores, per object, the held-out synthetic crops (2D projection error in image pixels, the median
also in crop pixels: a big object is seen through fewer crop pixels per image pixel) and the
validation frames (the last LmoBudget.validation_frames training frames, visib >= 0.5). The test
frames are not read.

Usage: python3 tools/lmo_fit.py --tag NAME [--method synthetic] [--set stage1_steps=1800 --set input_size=96 ...]
Every run appends a JSON line to /tmp/lmofit/results.jsonl and prints a per-object table.
"""

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np

from featmap_ros.bop_scoring import load_object_models, run_bop
from featmap_ros.datasets import bop
from featmap_ros.datasets.streams import LMO_K, LMO_OBJ_IDS
from featmap_ros.estimator import load_estimator
from featmap_ros.evaluation import json_safe, score_objects
from featmap_ros.experiments import data as xdata
from featmap_ros.experiments.lmo import (
    DEFAULT_TRAIN_FRAMES,
    LmoBudget,
    lmo_pool_config,
    lmo_stream_config,
    lmo_train_config,
    split_validation,
    synthetic_crop_accuracy,
    synthetic_validation_crops,
)
from featmap_ros.train import TrainError, dataclass_from_overrides, train

ROOT = Path("/tmp/lmofit")
ap = argparse.ArgumentParser()
ap.add_argument("--tag", required=True)
ap.add_argument("--bop", default="../shared/data/lmo")
ap.add_argument("--method", default="synthetic")
ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                help="an LmoBudget field, its value in YAML as in a --budget file (repeatable)")
a = ap.parse_args()

try:
    budget, changes = dataclass_from_overrides(LmoBudget, a.set)
except TrainError as err:
    ap.error(str(err))

run_dir = ROOT / "runs" / a.tag
if run_dir.exists():  # train() would resume (or return) the old run whatever the settings now say
    ap.error(f"{run_dir} exists: give another --tag or remove it")
bop_root = Path(a.bop)
scene = bop.BopScene(bop_root, 2)
train_ids = bop.select_ids(DEFAULT_TRAIN_FRAMES, scene.image_ids)
fit_ids, val_ids = split_validation(train_ids, budget.validation_frames)
present = {i.obj_id for f in scene.frames(fit_ids) for i in f.instances}
obj_ids = tuple(i for i in LMO_OBJ_IDS if i in present)
stream_cfg = lmo_stream_config(budget, scene, fit_ids, obj_ids)
data = xdata.objects_pool_task_data(bop_root, 2, fit_ids, obj_ids, stream_cfg,
                                    lmo_pool_config(budget), names=dict(xdata.LMO_NAMES),
                                    head=budget.head)
total = budget.stage1_steps + budget.stage2_steps
cfg = dataclasses.replace(lmo_train_config(budget, len(obj_ids)), max_steps=total)
t0 = time.perf_counter()
model_json = train(cfg, data, run_dir, a.method)
wall = time.perf_counter() - t0

infos, meshes = load_object_models(bop_root / "models")
names = dict(xdata.LMO_NAMES)
est = load_estimator(model_json)
records, _ = run_bop(est, bop_root, 2, ",".join(map(str, val_ids)), detections="gt")
metrics, _ = score_objects(records, infos, meshes, names)
val = metrics["visib>=0.5"]
crops = synthetic_validation_crops(bop_root, stream_cfg, budget.synthetic_probe_per_object)
syn = synthetic_crop_accuracy(model_json, crops, obj_ids, meshes)
# Image pixels per crop pixel of each held-out crop (image fx / crop fx), per object.
scale = LMO_K[0][0] / crops["K"][:, 0, 0].numpy()
obj_of = np.asarray([obj_ids[int(k)] for k in crops["obj_index"]])
row = {"tag": a.tag, "method": a.method, "budget": changes, "train_s": round(wall, 1),
       "steps_per_s": round(total / wall, 2),
       "val_proj_5px": round(100 * val["mean_over_objects"]["proj_5px"], 1),
       "synthetic_proj_5px": round(100 * syn["proj_5px"], 1), "synthetic_median_px": round(syn["median_px"], 2),
       "per_object": {}}
for o in obj_ids:
    if o not in syn["per_object"]:
        continue
    s = syn["per_object"][o]
    v = val["per_object"].get(str(o), {})
    row["per_object"][names[o]] = {
        "synthetic_proj_5px": round(100 * s["proj_5px"], 1), "synthetic_median_px": round(s["median_px"], 2),
        "image_px_per_crop_px": round(float(np.median(scale[obj_of == o])), 2),
        "val_proj_5px": round(100 * float(v["proj_5px"] or 0.0), 1) if v.get("n") else None, "val_n": v.get("n", 0)}
ROOT.mkdir(parents=True, exist_ok=True)
with open(ROOT / "results.jsonl", "a") as f:
    f.write(json.dumps(json_safe(row)) + "\n")
print(f"{a.tag}: {a.method} {changes}, {wall:.0f} s training ({row['steps_per_s']} steps/s)")
print(f"{'object':12s} {'syn@5px':>8s} {'syn med px':>10s} {'img px/crop px':>14s} {'val@5px':>8s} {'val n':>6s}")
for name, r in row["per_object"].items():
    val_txt = "-" if r["val_proj_5px"] is None else f"{r['val_proj_5px']:.1f}"
    print(f"{name:12s} {r['synthetic_proj_5px']:8.1f} {r['synthetic_median_px']:10.2f} "
          f"{r['image_px_per_crop_px']:14.2f} {val_txt:>8s} {r['val_n']:6d}")
print(f"{'mean':12s} {row['synthetic_proj_5px']:8.1f} {row['synthetic_median_px']:10.2f} {'':14s} "
      f"{row['val_proj_5px']:8.1f}")
