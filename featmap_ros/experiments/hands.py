"""`featmap experiment hands`: every method on one budget on simulated sensor hands, then one table.

Domains: synthetic = clean depth renders of the nominal hand (what h(f_S(x)) learns from);
"real" training frames = another person's hand (HandShape.sample, seed 1) in cluttered scenes
seen by the structured-light sensor model (SensorConfig.nominal()), each paired with the clean
nominal render at its pose; test = a third person (seed 1001), other poses (seed 2002) and a
different sensor (SensorConfig.test_time()): neither the hand nor the sensor of the test frames
was seen in training.

Scoring (NYU protocol): crops at the located hand centre (the palm plus 1 cm noise when
localisation misses by more than 6 cm, as for the training pairs), mean 3D joint error (mm),
per-joint errors and the fraction of frames whose largest joint error is within 20/30/40/50/80 mm.
Also the run-time path (HandEstimator on the full frame: locate, crop, joints) on a subset, and
the real NYU frame in ../shared/data/nyu through the fm model.

Budget (default full run, about 45 minutes on an otherwise idle 2-core CPU): DeepPrior++-like
ResNet, input 64, width 8 (stages 16/32/64/64), feature 256, batch 32, stage 1 2500 + stage 2 2500
= 5000 steps per method; 2000 "real" frames; synthetic crops come from a pool of 12000 clean
renders made once (online rendering at about 65 crops/s would be the bottleneck on a CPU).
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from featmap_ros import evaluation as ev
from featmap_ros import geometry as geo
from featmap_ros.datasets import nyu
from featmap_ros.datasets.hand_streams import HandStreamConfig, SensorHandSet
from featmap_ros.estimator import HandEstimator, load_estimator
from featmap_ros.experiments import data as xdata
from featmap_ros.model import checkpoint
from featmap_ros.model.nets import NetConfig
from featmap_ros.render import sensor
from featmap_ros.report import markdown_table, plot_bars, plot_curves
from featmap_ros.train import METHODS, OptimConfig, TrainConfig

HAND_METHODS = ("synthetic", "real", "mixed", "finetune", "fm", "fm_mmd")
THRESHOLDS = ("20mm", "30mm", "40mm", "50mm", "80mm")
DEFAULT_NYU = Path(__file__).resolve().parents[3] / "shared" / "data" / "nyu"


@dataclass(frozen=True)
class HandsBudget:
    """Sizes of one hands experiment: net, steps, batch, frames."""

    input_size: int = 64
    width: int = 8
    feature_dim: int = 256
    dropout: float = 0.3
    batch_size: int = 32
    stage1_steps: int = 2500
    stage2_steps: int = 2500
    lr: float = 1e-3
    warmup_steps: int = 100
    n_real: int = 2000
    n_test: int = 500
    runtime_frames: int = 150  # test frames also run through the full run-time path (locate + crop)
    synthetic_pool: int = 12000  # 0: render online (the paper's way), slower on a CPU


QUICK = HandsBudget(input_size=32, width=4, feature_dim=32, dropout=0.1, batch_size=4, stage1_steps=4,
                    stage2_steps=3, warmup_steps=2, n_real=8, n_test=6, runtime_frames=2, synthetic_pool=16)


def hands_train_config(budget: HandsBudget, device: str = "cpu") -> TrainConfig:
    """The TrainConfig every method of the experiment shares (method is set per run)."""
    net = NetConfig(task="hands", input_size=budget.input_size, width=budget.width, feature_dim=budget.feature_dim,
                    dropout=budget.dropout)
    return TrainConfig(method="fm", net=net, optim=OptimConfig(lr=budget.lr, warmup_steps=budget.warmup_steps),
                       batch_size=budget.batch_size, stage1_steps=budget.stage1_steps,
                       stage2_steps=budget.stage2_steps, checkpoint_every=500, log_every=50, device=device,
                       tensorboard=False)


# --------------------------------------------------------------------------------------------
# Scoring


@torch.inference_mode()
def predict_crops(model_json: Path, crops: torch.Tensor, centres: np.ndarray, cube_m: float,
                  device: str = "cpu") -> np.ndarray:
    """Joints (F, 14, 3) metres from crops (F, 1, S, S) around centres (F, 3): h(g(f_R(x))) per checkpoint."""
    model, _ = checkpoint.load(model_json, device=device)
    out = torch.cat([model.predict_real(crops[i:i + 256].to(device)).outputs.float().cpu()
                     for i in range(0, len(crops), 256)])
    return out.numpy().astype(np.float64).reshape(len(crops), -1, 3) * (cube_m / 2.0) + centres[:, None, :]


def runtime_path(estimators: dict[str, HandEstimator], test: SensorHandSet, n: int) -> dict[str, dict[str, Any]]:
    """Run each estimator on the first n full test frames (locate, crop, joints); found fraction and errors."""
    from tqdm import tqdm

    K = test.intrinsics
    errs: dict[str, list[float]] = {m: [] for m in estimators}
    for i in tqdm(range(n), desc="run-time path", unit="frame", mininterval=5.0):
        depth, joints, _ = test.frame(i)
        for m, est in estimators.items():
            hands = est.estimate(depth, K)
            errs[m].append(float(np.linalg.norm(hands[0].joints_xyz - joints, axis=1).mean()) if hands else np.nan)
    out = {}
    for m, e in errs.items():
        a = np.asarray(e)
        found = np.isfinite(a)
        out[m] = {"frames": int(n), "found": float(found.mean()) if n else float("nan"),
                  "mean_error_mm_found": 1000.0 * float(a[found].mean()) if found.any() else float("nan")}
    return out


def nyu_frame_check(model_json: Path, nyu_dir: Path, device: str = "cpu") -> dict[str, Any]:
    """NYU test frame 1 through a model's HandEstimator: error, centre vs palm, whether the crop holds all joints."""
    depth_path = nyu_dir / "test" / "depth_1_0000001.png"
    joints_path = nyu_dir / "test" / "depth_1_0000001_joints_uvd.txt"
    if not (depth_path.is_file() and joints_path.is_file()):
        return {"available": False, "reason": f"{depth_path} or its joints file is missing"}
    depth = nyu.read_depth(depth_path)
    gt = nyu.joints_uvd_to_xyz(nyu.read_joints_uvd_txt(joints_path))
    est = load_estimator(model_json, device=device)
    hands = est.estimate(depth, nyu.NYU_INTRINSICS)
    if not hands:
        return {"available": True, "found": False}
    hand = hands[0]
    _, cube = geo.crop_depth_cube(depth, nyu.NYU_INTRINSICS.K, hand.centre, cube_m=est.cube_m, out=est.crop_size)
    centre_err = float(np.linalg.norm(hand.centre - gt[nyu.PALM]))
    per_joint = np.linalg.norm(hand.joints_xyz - gt, axis=1)
    return {"available": True, "found": True, "mean_error_mm": 1000.0 * float(per_joint.mean()),
            "max_error_mm": 1000.0 * float(per_joint.max()), "centre_to_palm_mm": 1000.0 * centre_err,
            "centre_within_40mm": bool(centre_err <= 0.04), "crop_holds_all_joints": bool(cube.contains(gt).all()),
            "out_of_domain": float(hand.out_of_domain)}


def write_hands_table(out: Path, table: dict[str, Any], header: dict[str, Any]) -> str:
    """table.md: methods side by side (mean error, success fractions, run-time path), then per-joint errors."""
    cols = ["method", "mean error (mm)"] + [f"max err <= {t} (%)" for t in THRESHOLDS] + [
        "run-time path: found (%)", "run-time path: mean (mm)", "train s"]
    rows = [[m, t["mean_error_mm"]] + [100.0 * t["max_error_fraction"][k] for k in THRESHOLDS]
            + [100.0 * t["runtime"]["found"], t["runtime"]["mean_error_mm_found"], f"{t['train_s']:.0f}"]
            for m, t in table.items()]
    joints = list(nyu.JOINT_NAMES)
    per = [[j] + [table[m]["per_joint_mm"][j] for m in table] for j in joints]
    text = ["# Hands: every method on one budget (simulated sensor frames)\n",
            f"Training: {header['n_real']} sensor frames of person A (nominal sensor) + clean renders of the nominal "
            f"hand. Test: {header['n_test']} frames of person B, other poses, test-time sensor. Crops at the located "
            f"centre ({header['test_fallbacks']} of {header['n_test']} test frames fell back to the palm + 1 cm "
            f"noise). Run-time path: HandEstimator on {header['runtime_frames']} full frames.\n",
            f"Budget: {header['budget']}\n", markdown_table(cols, rows),
            "\n## Per-joint mean error (mm)\n", markdown_table(["joint", *table], per)]
    frame = header.get("nyu_frame", {})
    if frame.get("found"):
        text += ["\n## Real NYU test frame 1 through the fm model\n",
                 markdown_table(["mean error (mm)", "max error (mm)", "centre to palm (mm)", "centre within 40 mm",
                                 "crop holds all 14 joints"],
                                [[frame["mean_error_mm"], frame["max_error_mm"], frame["centre_to_palm_mm"],
                                  frame["centre_within_40mm"], frame["crop_holds_all_joints"]]])]
    elif frame:
        text += [f"\nReal NYU frame: {frame}\n"]
    md = "\n".join(text)
    (out / "table.md").write_text(md)
    return md


# --------------------------------------------------------------------------------------------
# The experiment


def run_hands_experiment(
    out: Path = Path("out/hands"),
    quick: bool = False,
    n_real: int | None = None,
    methods: Sequence[str] | None = None,
    budget: HandsBudget | None = None,
    nyu_dir: Path | None = None,
    device: str = "cpu",
) -> dict[str, Any]:
    """Train every method with the same budget, score each on the test person, write table.md/json and plots.

    quick: a tiny net, a few frames and steps (a check of the pipeline and the table's shape, not of
    accuracy). Returns the table dict (also written as table.json).
    """
    t_start = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    budget = budget or (QUICK if quick else HandsBudget())
    if n_real is not None:
        budget = dataclasses.replace(budget, n_real=n_real)
    methods = tuple(methods or HAND_METHODS)
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise ValueError(f"unknown methods {unknown}; choose from {METHODS}")
    stream_cfg = HandStreamConfig(crop_px=budget.input_size)
    data = xdata.hands_task_data(budget.n_real, xdata.hand_train_shape(), sensor.SensorConfig.nominal(),
                                 stream_cfg=stream_cfg, synthetic_pool=budget.synthetic_pool)
    cfg = hands_train_config(budget, device)
    paths, wall = xdata.train_all(cfg, data, out, methods)

    test = xdata.hand_test_set(budget.n_test, stream_cfg=stream_cfg)
    items = xdata.stack_items(test, ("real", "centre", "joints"), "test frames")
    centres, gt = items["centre"].numpy().astype(np.float64), items["joints"].numpy().astype(np.float64)
    estimators = {m: load_estimator(p, device=device) for m, p in paths.items()}
    runtime = runtime_path(estimators, test, min(budget.runtime_frames, budget.n_test))  # type: ignore[arg-type]

    table: dict[str, Any] = {}
    curves = {}
    for m, p in paths.items():
        t0 = time.perf_counter()
        est = predict_crops(p, items["real"], centres, stream_cfg.cube_m, device)
        scores = ev.score_hands(est, gt, nyu.JOINT_NAMES)
        curve = ev.hand_curve(est, gt)
        curves[m] = (curve["threshold_mm"], curve["fraction"])
        folder = out / m / "eval"
        folder.mkdir(parents=True, exist_ok=True)
        ev.write_json(folder / "metrics.json", {**scores, "curve": curve, "runtime_path": runtime[m]})
        table[m] = {**scores, "runtime": runtime[m], "train_s": wall.get(m, 0.0), "eval_s": time.perf_counter() - t0}

    nyu_dir = Path(nyu_dir) if nyu_dir is not None else DEFAULT_NYU
    nyu_check = nyu_frame_check(paths["fm"], nyu_dir, device) if "fm" in paths else {}
    header = {"n_real": budget.n_real, "n_test": budget.n_test, "test_fallbacks": test.fallbacks,
              "train_fallbacks": data.meta["data"].get("pair_fallbacks"),
              "runtime_frames": min(budget.runtime_frames, budget.n_test),
              "budget": ", ".join(f"{k}={v}" for k, v in dataclasses.asdict(budget).items()),
              "stage1_s": wall.get("stage1", 0.0), "nyu_frame": nyu_check}
    write_hands_table(out, table, header)
    plot_curves(out / "curves_max_error.png", curves, "max joint error threshold (mm)", "fraction of frames",
                title="Hands: frames within a max joint error")
    plot_bars(out / "bars_per_joint.png", list(nyu.JOINT_NAMES),
              {m: [t["per_joint_mm"][j] for j in nyu.JOINT_NAMES] for m, t in table.items()}, "mean error (mm)",
              title="Hands: per-joint error")
    doc = {"header": header, "methods": table, "quick": quick, "budget": dataclasses.asdict(budget),
           "train_config": json.loads(json.dumps(dataclasses.asdict(cfg), default=list)),
           "wall_s": time.perf_counter() - t_start}
    ev.write_json(out / "table.json", doc)
    return doc
