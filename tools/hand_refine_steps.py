"""A hand model's error on the main job's hand validation bag for each run-time pass count, no retraining.

Usage: python3 tools/hand_refine_steps.py MODEL.json [BAG] [--steps 0 1 2 3 4] [--recentre 0]
   (BAG: tools/hands_main_tuning.py's, by default)
--steps: the centre refiner's crop-and-move steps (HandEstimator.refine_iterations, set on each loaded
estimator: the checkpoint carries its own count); --recentre: the joints network's passes again around
the palm it found (the node parameter recentre). One trained model is scored with every count.
"""

import argparse
import dataclasses
import itertools
from pathlib import Path
from unittest import mock

from featmap_ros import estimator
from featmap_ros.bag import replay

ap = argparse.ArgumentParser()
ap.add_argument("model", type=Path, help="a hand checkpoint with a centre refiner (model.json)")
ap.add_argument("bag", type=Path, nargs="?", default=Path("/tmp/handmain/val_bag"))
ap.add_argument("--steps", type=int, nargs="+", default=[0, 1, 2, 3, 4])
ap.add_argument("--recentre", type=int, nargs="+", default=[0])
a = ap.parse_args()
model, bag = a.model, a.bag
if len(a.steps) > 1 and not (estimator.model_meta(model).get("hands") or {}).get("refiner"):
    raise SystemExit(f"{model} has no centre refiner: every step count would score the same")
base = replay.default_node_config("hands", str(model), estimator.model_meta(model))
original_init = estimator.HandEstimator.__init__
print("| refiner steps | recentre | mean joint error (mm) | palm (mm) | max err <= 40 mm |\n|---|---|---|---|---|")
for steps, recentre in itertools.product(a.steps, a.recentre):
    def init(self, *args, _steps=steps, **kwargs):
        original_init(self, *args, **kwargs)
        self.refine_iterations = _steps

    config = dataclasses.replace(base, recentre=recentre)  # refuses a count outside [0, MAX_RECENTRE]
    with mock.patch.object(estimator.HandEstimator, "__init__", init):
        result = replay.eval_bag(bag, model, Path(f"/tmp/hand_refine_steps/{steps}_{recentre}"), config=config,
                                 device="cpu", write_output_bag=False)
    m = result.metrics
    print(f"| {steps} | {recentre} | {m['mean_error_mm']:.2f} | {m['per_joint_mm']['palm']:.2f} | "
          f"{100 * m['max_error_fraction']['40mm']:.0f}% |", flush=True)
