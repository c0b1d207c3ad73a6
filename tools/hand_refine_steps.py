"""A hand model's error on the main job's hand validation bag for 0-4 centre-refiner steps, no retraining.

Usage: python3 tools/hand_refine_steps.py MODEL.json [BAG]   (BAG: tools/hands_main_tuning.py's, by default)
The steps are set on each loaded estimator (HandEstimator.refine_iterations), so one trained refiner
is scored with every count.
"""

import argparse
from pathlib import Path
from unittest import mock

from featmap_ros import estimator
from featmap_ros.bag import replay

ap = argparse.ArgumentParser()
ap.add_argument("model", type=Path, help="a hand checkpoint with a centre refiner (model.json)")
ap.add_argument("bag", type=Path, nargs="?", default=Path("/tmp/handmain/val_bag"))
a = ap.parse_args()
model, bag = a.model, a.bag
if not (estimator.model_meta(model).get("hands") or {}).get("refiner"):
    raise SystemExit(f"{model} has no centre refiner: every step count would score the same")
original_init = estimator.HandEstimator.__init__
print("| refiner steps | mean joint error (mm) | palm (mm) | max err <= 40 mm |\n|---|---|---|---|")
for steps in range(5):
    def init(self, *args, _steps=steps, **kwargs):
        original_init(self, *args, **kwargs)
        self.refine_iterations = _steps

    with mock.patch.object(estimator.HandEstimator, "__init__", init):
        result = replay.eval_bag(bag, model, Path(f"/tmp/hand_refine_steps/{steps}"), device="cpu",
                                 write_output_bag=False)
    m = result.metrics
    print(f"| {steps} | {m['mean_error_mm']:.2f} | {m['per_joint_mm']['palm']:.2f} | "
          f"{100 * m['max_error_fraction']['40mm']:.0f}% |")
