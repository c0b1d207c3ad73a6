"""The hands experiment's trained models on its run-time path again, once per recentre count (no retraining).

Usage: python3 tools/hands_runtime_rescore.py OUT [--recentre 0 2] [--frames N]
OUT is a `featmap experiment hands --out` folder (default budget): every OUT/<method>/model.json and
OUT/fc/<method>/model.json (their refiners attached) runs through experiments.hands.runtime_path, the
experiment's own run-time scoring, on the same test person's first N frames (the budget's runtime_frames).
Prints a table and writes OUT/runtime_recentre.json.
"""

import argparse
import json
from pathlib import Path

import torch

from featmap_ros.datasets.hand_streams import HandStreamConfig
from featmap_ros.estimator import load_estimator
from featmap_ros.experiments import data as xdata
from featmap_ros.experiments.hands import HandsBudget, runtime_path

ap = argparse.ArgumentParser()
ap.add_argument("out", type=Path)
ap.add_argument("--recentre", type=int, nargs="+", default=[0, 2])
ap.add_argument("--frames", type=int, default=None)
a = ap.parse_args()
torch.set_num_threads(2)
budget = HandsBudget()
models = {p.parent.name: p for p in sorted(a.out.glob("*/model.json")) if p.parent.name != "stage1"}
models |= {f"{p.parent.name}_fc": p for p in sorted(a.out.glob("fc/*/model.json")) if p.parent.name != "stage1"}
if not models:
    raise SystemExit(f"no */model.json under {a.out}")
test = xdata.hand_test_set(budget.n_test, stream_cfg=HandStreamConfig(crop_px=budget.input_size))
n = min(a.frames or budget.runtime_frames, budget.n_test)
estimators = {(m, r): load_estimator(p, device="cpu", recentre=r) for m, p in models.items() for r in a.recentre}
runtime = runtime_path({f"{m} recentre {r}": e for (m, r), e in estimators.items()}, test, n)
head = " | ".join(f"recentre {r} (mm)" for r in a.recentre)
print(f"{n} test frames, run-time path, mean joint error of the frames found\n| method | {head} | found |")
print("|---|" + "---|" * len(a.recentre) + "---|")
for m in models:
    cells = " | ".join(f"{runtime[f'{m} recentre {r}']['mean_error_mm_found']:.2f}" for r in a.recentre)
    print(f"| {m} | {cells} | {runtime[f'{m} recentre {a.recentre[0]}']['found']:.0%} |")
(a.out / "runtime_recentre.json").write_text(json.dumps({"frames": n, "runtime": runtime}, indent=1))
