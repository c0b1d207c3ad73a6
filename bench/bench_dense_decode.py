"""The dense head's decoding settings: accuracy on LM-O validation frames against PnP-RANSAC time, in one run.

Usage: python3 bench/bench_dense_decode.py MODEL_JSON [--bop ../shared/data/lmo]
       [--frames 249,254,258,263,266,268,277,283] [--threads 1] [--scene 2] [--detections gt]
The main job's object model on its validation frames (tools/objects_tuning.py writes them and its models):
       python3 bench/bench_dense_decode.py /tmp/objdev/runs/TAG/model.json --bop /tmp/objdev/assets_val100 \
           --scene 1 --frames 160-259 --detections gt-jitter

MODEL_JSON: a trained dense-head object checkpoint (e.g. out/lmo/fm/model.json of `featmap experiment
lmo`). The network runs once per frame; each row decodes the same outputs with other settings
(most correspondences kept, RANSAC iterations; the correspondences chosen as the decode chooses them:
since session 20 spread evenly over the visible locations, before that the most visible, so rows of
earlier sessions' tables do not repeat) and reports the mean 2D-proj@5px over the objects
(visib >= 0.5) and the decode time per object. The default frames are the experiment's
validation frames (the last 8 training frames): settings are never chosen on the test frames.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import torch

from featmap_ros import estimator as est_mod
from featmap_ros.bop_scoring import run_bop
from featmap_ros.estimator import load_estimator
from featmap_ros.evaluation import score_objects
from featmap_ros.experiments.lmo import _eval_models
from featmap_ros.heads.dense import DenseDecodeConfig

# (most correspondences, RANSAC iterations; 0: no RANSAC, EPnP then LM on shrinking inlier sets whose
# thresholds are the given multiples of the inlier threshold: four rounds, the default until session 24, or two;
# each row keeps the decode's fallback to four rounds where its own find no pose, DenseDecodeConfig.lm_fallback)
FOUR, TWO = (8.0, 4.0, 2.0, 1.0), (4.0, 1.0)
SWEEP = [(400, 150, FOUR), (200, 150, FOUR), (100, 150, FOUR), (200, 60, FOUR), (100, 60, FOUR), (400, 0, FOUR),
         (200, 0, FOUR), (150, 0, FOUR), (100, 0, FOUR), (400, 0, TWO), (400, 0, (2.0, 1.0)), (200, 0, (8.0, 2.0, 1.0)),
         (200, 0, TWO), (150, 0, TWO), (100, 0, TWO)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--bop", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "lmo"))
    parser.add_argument("--frames", default="249,254,258,263,266,268,277,283")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--scene", type=int, default=2, help="the BOP scene (the main job's built-in one: 1)")
    parser.add_argument("--detections", default="gt", help="run_bop's boxes: gt (LM-O's protocol) or gt-jitter "
                                                           "(the main job's)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    root = Path(args.bop)
    infos, meshes = _eval_models(root)
    names = {int(o["obj_id"]): str(o["name"]) for o in est_mod.model_meta(args.model)["objects"]}
    est = load_estimator(args.model, device="cpu", cpu_threads=args.threads, backend="torch")
    decode = est_mod.decode_dense
    spent = {"s": 0.0, "n": 0}

    def timed(*a, **kw):  # the decode alone, per object
        t0 = time.perf_counter()
        try:
            return decode(*a, **kw)
        finally:
            spent["s"] += time.perf_counter() - t0
            spent["n"] += 1

    est_mod.decode_dense = timed
    print(f"torch {torch.__version__}, {args.threads} thread(s); frames {args.frames}")
    print("| max points | RANSAC iterations | LM thresholds (x inlier threshold) | 2D-proj@5px (visib >= 0.5) "
          "| decode ms per object |\n|---|---|---|---|---|")
    for max_points, iters, scales in SWEEP:
        est.dense_cfg = dataclasses.replace(DenseDecodeConfig(), max_points=max_points, ransac_iterations=iters,
                                            lm_scales=scales)
        spent.update(s=0.0, n=0)
        records, _ = run_bop(est, root, args.scene, args.frames, detections=args.detections)
        metrics, _ = score_objects(records, infos, meshes, names)
        acc = metrics["visib>=0.5"]["mean_over_objects"]["proj_5px"]
        lm = "-" if iters else ", ".join(f"{v:g}" for v in scales)
        print(f"| {max_points} | {iters} | {lm} | {100 * acc:.1f}% | {1e3 * spent['s'] / max(spent['n'], 1):.2f} |",
              flush=True)
    est_mod.decode_dense = decode


if __name__ == "__main__":
    main()
