"""Do the synthetic viewpoints cover poses the real training frames do not? LM-O training frames only.

The LM-O scene is a video of a camera going round a table: the training frames (0-300) see the
objects from about half of the circle. This splits the training frames by the camera's azimuth
about the scene (measured in ape's model frame, z up): the anchors and backgrounds come from the
frames on one side ("seen", azimuth < -40 deg), and the synthetic-only model (h(f_S(x)), the
ceiling of Feature Mapping) is scored on the real frames of the other side ("unseen", azimuth >
-25 deg) and on the seen ones. The test frames are not read. --method mixed / fm_joint (with --s2
steps more) also trains on the seen side's real frames (the pairs), as the experiment trains on
every training frame: the seen side is then trained on, and the unseen side asks what the
synthetic viewpoints add where no real frame is.

Usage: python3 tools/lmo_viewpoints.py --tag NAME [--azimuth 0|360] [--spread 25] [--steps 1800]
                                       [--method synthetic|mixed|fm_joint] [--s2 0] [--set FIELD=VALUE]
Every run appends a JSON line to /tmp/lmodev/results.jsonl; `--plot OUT.png` draws those lines instead.
"""

import argparse
import dataclasses
import json
import math
import time
from pathlib import Path

import numpy as np

from featmap_ros.bop_scoring import load_object_models, run_bop
from featmap_ros.datasets import bop
from featmap_ros.datasets.streams import LMO_OBJ_IDS
from featmap_ros.estimator import load_estimator
from featmap_ros.evaluation import score_objects
from featmap_ros.experiments import data as xdata
from featmap_ros.experiments.lmo import (
    DEFAULT_TRAIN_FRAMES,
    LmoBudget,
    lmo_pool_config,
    lmo_stream_config,
    lmo_train_config,
    synthetic_crop_accuracy,
    synthetic_validation_crops,
)
from featmap_ros.train import TrainError, dataclass_from_overrides, train

ROOT = Path("/tmp/lmodev")
ap = argparse.ArgumentParser()
ap.add_argument("--tag", required=True)
ap.add_argument("--bop", default="../shared/data/lmo")
ap.add_argument("--azimuth", type=float, default=0.0, help="LmoBudget.anchor_azimuth_deg")
ap.add_argument("--spread", type=float, default=25.0, help="LmoBudget.anchor_spread_deg")
ap.add_argument("--steps", type=int, default=1800, help="the budget's stage1_steps (synthetic only: every step)")
ap.add_argument("--method", default="synthetic", choices=["synthetic", "mixed", "fm_joint"],
                help="what trains: synthetic only, or with the seen side's real frames (one stage of --steps + --s2)")
ap.add_argument("--s2", type=int, default=0, help="the budget's stage2_steps (the methods with real frames)")
ap.add_argument("--pool", type=int, default=LmoBudget().pool_per_object, help="renders per object")
ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                help="another LmoBudget field, its value in YAML (repeatable)")
ap.add_argument("--plot", default=None, help="draw /tmp/lmodev/results.jsonl's runs into this PNG and stop")
a = ap.parse_args()
try:
    budget, changes = dataclass_from_overrides(LmoBudget, a.set)
except TrainError as err:
    ap.error(str(err))


def plot(out: Path) -> None:
    """Bars per run: the seen side, the unseen side (real frames, visib >= 0.5) and fresh synthetic crops."""
    from featmap_ros.report import plot_bars

    rows = [json.loads(line) for line in (ROOT / "results.jsonl").read_text().splitlines() if line.strip()]
    rows = sorted((r for r in rows if r["steps"] >= 100), key=lambda r: r["azimuth"])  # smoke runs left out
    labels = [r["tag"] for r in rows]
    groups = {"seen side (real)": [r["seen_proj_5px"] for r in rows],
              "unseen side (real)": [r["unseen_proj_5px"] for r in rows],
              "synthetic crops": [r["synthetic_proj_5px"] for r in rows]}
    plot_bars(out, labels, groups, "2D-proj@5px (%)",
              title="anchors (and the methods' real frames) from one side (LM-O training frames)")
    print(f"plot: {out}")


if a.plot:
    plot(Path(a.plot))
    raise SystemExit(0)


def camera_azimuth(frame: bop.Frame) -> float | None:
    """The camera's azimuth (degrees) about ape's model z axis, None without ape in the frame."""
    for inst in frame.instances:
        if inst.obj_id == 1:
            c = -inst.R.T @ inst.t.ravel()
            return math.degrees(math.atan2(c[1], c[0]))
    return None


bop_root = Path(a.bop)
scene = bop.BopScene(bop_root, 2)
train_ids = bop.select_ids(DEFAULT_TRAIN_FRAMES, scene.image_ids)
frames = dict(zip(train_ids, scene.frames(train_ids)))
az = {i: camera_azimuth(f) for i, f in frames.items()}
seen = [i for i, v in az.items() if v is not None and v < -40.0]
unseen = [i for i, v in az.items() if v is not None and -25.0 < v < 150.0]
budget = dataclasses.replace(budget, anchor_azimuth_deg=a.azimuth, anchor_spread_deg=a.spread,
                             stage1_steps=a.steps, stage2_steps=a.s2, pool_per_object=a.pool)
present = {i.obj_id for k in seen for i in frames[k].instances}
obj_ids = tuple(i for i in LMO_OBJ_IDS if i in present)
stream_cfg = lmo_stream_config(budget, scene, seen, obj_ids)
data = xdata.objects_pool_task_data(bop_root, 2, seen, obj_ids, stream_cfg,
                                    lmo_pool_config(budget), names=dict(xdata.LMO_NAMES),
                                    head=budget.head)
cfg = dataclasses.replace(lmo_train_config(budget, len(obj_ids)), max_steps=a.steps + a.s2)
t0 = time.perf_counter()
model_json = train(cfg, data, ROOT / "runs" / a.tag, a.method)
wall = time.perf_counter() - t0

infos, meshes = load_object_models(bop_root / "models")
names = dict(xdata.LMO_NAMES)
row = {"tag": a.tag, "set": changes, "method": a.method, "azimuth": a.azimuth, "spread": a.spread,
       "steps": a.steps + a.s2,
       "train_s": round(wall, 1), "n_seen": len(seen), "n_unseen": len(unseen)}
est = load_estimator(model_json)
for name, ids in (("seen", seen), ("unseen", unseen)):
    records, _ = run_bop(est, bop_root, 2, ",".join(map(str, ids)), detections="gt")
    metrics, _ = score_objects(records, infos, meshes, names)
    m = metrics["visib>=0.5"]
    row[f"{name}_proj_5px"] = round(100 * m["mean_over_objects"]["proj_5px"], 1)
    row[f"{name}_add_10"] = round(100 * m["mean_over_objects"]["add_10"], 1)
    row[f"{name}_per_object"] = {names[int(o)]: round(100 * float(v["proj_5px"] or 0.0), 1)
                                 for o, v in m["per_object"].items() if v.get("n")}
syn = synthetic_crop_accuracy(model_json, synthetic_validation_crops(bop_root, stream_cfg, 48), obj_ids, meshes)
row["synthetic_proj_5px"] = round(100 * syn["proj_5px"], 1)
row["synthetic_median_px"] = round(syn["median_px"], 2)
print(json.dumps(row))
ROOT.mkdir(parents=True, exist_ok=True)
with open(ROOT / "results.jsonl", "a") as f:
    f.write(json.dumps(row) + "\n")
print(f"unseen side {row['unseen_proj_5px']}% / seen side {row['seen_proj_5px']}% 2D-proj@5px "
      f"(synthetic crops {row['synthetic_proj_5px']}%), {wall:.0f} s training; median angle gap "
      f"{np.median([min(abs(az[u] - az[s]) for s in seen) for u in unseen]):.0f} deg")
