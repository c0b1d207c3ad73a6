"""Score an LM-O model on blocks of training frames: the held-out later blocks, a proxy for the test gap.

The experiment's validation frames (the last 8 training frames, 249-283) follow the last fit frame and
score 61-65% where the test frames score 26-28%. A model fit on the earlier training frames only
(`tools/lmo_fit.py --set validation_frames=22`: fit on 3-153) scores the blocks after them, the nearer
and the further, from the same distance as a test frame is further on (docs/results.md, session 22).
Ground-truth boxes, visib >= 0.5, the mean over the objects a block holds. Frames of the test split
(> 300) are refused: they are for the final table only.

Usage: python3 tools/lmo_blocks.py /tmp/lmofit/runs/TAG/model.json [--blocks 156-248 249-283] [--bop DIR]
"""

import argparse
import json
from pathlib import Path

from featmap_ros.bop_scoring import load_object_models, run_bop
from featmap_ros.datasets import bop
from featmap_ros.estimator import load_estimator
from featmap_ros.evaluation import score_objects
from featmap_ros.experiments import data as xdata
from featmap_ros.experiments.lmo import DEFAULT_TRAIN_FRAMES

ap = argparse.ArgumentParser()
ap.add_argument("model", type=Path)
ap.add_argument("--bop", type=Path, default=Path("../shared/data/lmo"))
ap.add_argument("--blocks", nargs="+", default=["156-248", "249-283"], help="frame id ranges, each scored alone")
a = ap.parse_args()

scene = bop.BopScene(a.bop, 2)
train_ids = set(bop.select_ids(DEFAULT_TRAIN_FRAMES, scene.image_ids))
est = load_estimator(a.model)
infos, meshes = load_object_models(a.bop / "models")
rows = {}
for block in a.blocks:
    ids = bop.select_ids(block, scene.image_ids)
    if not ids or not set(ids) <= train_ids:
        ap.error(f"block {block} must hold training frames ({DEFAULT_TRAIN_FRAMES}) only, and at least one")
    records, _ = run_bop(est, a.bop, 2, ",".join(map(str, ids)), detections="gt")
    metrics, _ = score_objects(records, infos, meshes, dict(xdata.LMO_NAMES))
    m = metrics["visib>=0.5"]
    mean = m["mean_over_objects"]
    rows[block] = {"frames": len(ids), "instances": m.get("n_instances"),
                   "proj_5px": round(100 * mean["proj_5px"], 1), "add_10": round(100 * mean["add_10"], 1)}
    print(f"{block:>10s}: {len(ids)} frames, {rows[block]['instances']} instances, "
          f"2D-proj@5px {rows[block]['proj_5px']:.1f}%, ADD(-S)@10% {rows[block]['add_10']:.1f}%", flush=True)
print(json.dumps({"model": str(a.model), "blocks": rows}))
