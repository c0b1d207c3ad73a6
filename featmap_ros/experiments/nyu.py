"""`featmap experiment nyu`: the paper's hand protocol on the real NYU Hand Pose dataset.

Real = NYU train frames (Kinect 1), synthetic = our renderer's nominal hand, test = NYU test
frames, 14 joints. The pair of a real frame is our nominal hand rendered at that frame's pose,
which NYU does not give as model parameters: fit_hand_pose fits the articulation and the 6-DoF
pose of the nominal hand to the 14 annotated joints (least squares within the joint limits), and
the fits are cached in out/nyu_fits.npz. Crops are centred on the located hand (geometry.locate_hand),
or on the annotated palm when localisation misses it by more than 6 cm.

Written for users who have the dataset (train/ and test/ with depth_1_XXXXXXX.png and
joint_data.mat); tested on a tiny fixture in that format. The default budget is the paper-like
net on a GPU; fitting costs roughly 0.1-0.3 s per training frame on one CPU core (once).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from featmap_ros import evaluation as ev
from featmap_ros import geometry as geo
from featmap_ros.datasets import nyu
from featmap_ros.datasets.hand_streams import HandStreamConfig
from featmap_ros.experiments import data as xdata
from featmap_ros.experiments.hands import hands_train_config, predict_crops
from featmap_ros.render.hand import (
    JOINT_LIMITS,
    HandPose,
    HandRenderer,
    HandShape,
    forward_kinematics,
)
from featmap_ros.report import markdown_table, plot_curves
from featmap_ros.train import METHODS, Batch, StreamContext, TaskData

NYU_METHODS = ("synthetic", "real", "mixed", "finetune", "fm")
LOCATE_MAX_ERROR_M = 0.06


@dataclass(frozen=True)
class NyuBudget:
    """Sizes of the NYU experiment (paper-like defaults: a GPU job)."""

    input_size: int = 128
    width: int = 32
    feature_dim: int = 1024
    dropout: float = 0.3
    batch_size: int = 128
    stage1_steps: int = 20000
    stage2_steps: int = 20000
    lr: float = 1e-3
    warmup_steps: int = 500
    max_train: int | None = None  # NYU train frames used (None: all 72,757)
    max_test: int | None = None  # NYU test frames scored (None: all 8,252)
    synthetic_pool: int = 0  # online renders, as in the paper
    num_workers: int = 4


QUICK = NyuBudget(input_size=32, width=4, feature_dim=32, dropout=0.1, batch_size=4, stage1_steps=3, stage2_steps=2,
                  warmup_steps=1, synthetic_pool=8, num_workers=0)


# --------------------------------------------------------------------------------------------
# Poses of the nominal hand for annotated frames


def _rotvec_to_matrix(r: np.ndarray) -> np.ndarray:
    import cv2

    return cv2.Rodrigues(np.asarray(r, dtype=np.float64).reshape(3, 1))[0]


def _kabsch(src: np.ndarray, dst: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """R, t minimising |R src + t - dst| over (N, 3) point sets."""
    cs, cd = src.mean(0), dst.mean(0)
    U, _, Vt = np.linalg.svd((src - cs).T @ (dst - cd))
    D = np.diag([1.0, 1.0, np.sign(np.linalg.det(Vt.T @ U.T))])
    R = Vt.T @ D @ U.T
    return R, cd - R @ cs


def fit_hand_pose(joints_xyz: np.ndarray, shape: HandShape | None = None) -> tuple[HandPose, float]:
    """Fit articulation (within JOINT_LIMITS) and 6-DoF pose of a hand to (14, 3) NYU joints (metres).

    Returns the pose (B = 1) and the RMS joint residual in metres (the shapes differ, so it is not 0).
    """
    import cv2
    from scipy.optimize import least_squares

    shape = shape or HandShape.nominal()
    target = np.asarray(joints_xyz, dtype=np.float64).reshape(-1, 3)
    lo, hi = JOINT_LIMITS[:, 0], JOINT_LIMITS[:, 1]
    q0 = np.clip(0.0, lo, hi)
    rest = forward_kinematics(shape, HandPose(q0[None], np.eye(3)[None], np.zeros((1, 3)))).nyu_joints[0]
    R0, t0 = _kabsch(rest, target)

    def unpack(x: np.ndarray) -> HandPose:
        return HandPose(x[None, :22], _rotvec_to_matrix(x[22:25])[None], x[None, 25:28])

    def residual(x: np.ndarray) -> np.ndarray:
        return (forward_kinematics(shape, unpack(x)).nyu_joints[0] - target).ravel()

    x0 = np.concatenate([q0, cv2.Rodrigues(R0)[0].ravel(), t0])
    big = np.full(6, np.inf)
    res = least_squares(residual, x0, bounds=(np.r_[lo, -big], np.r_[hi, big]), max_nfev=100)
    return unpack(res.x), float(np.sqrt(np.mean(res.fun.reshape(-1, 3) ** 2 * 3)))


def crop_centre(depth_m: np.ndarray, joints_xyz: np.ndarray, cube_m: float) -> np.ndarray:
    """The located hand centre, or the annotated palm when localisation fails or misses by > 6 cm."""
    palm = joints_xyz[nyu.PALM]
    try:
        c = geo.locate_hand(depth_m, nyu.NYU_INTRINSICS.K, cube_m=cube_m)
        if np.linalg.norm(c - palm) <= LOCATE_MAX_ERROR_M:
            return c
    except geo.GeometryError:
        pass
    return palm


def fit_split(split: nyu.NyuSplit, n: int, cache: Path, cube_m: float) -> dict[str, np.ndarray]:
    """Fitted nominal-hand poses and crop centres of the first n frames, cached in an .npz."""
    from tqdm import tqdm

    if cache.is_file():
        got = dict(np.load(cache))
        if len(got["centre"]) >= n:
            return {k: v[:n] for k, v in got.items()}
    q, R, t, rms, centre = [], [], [], [], []
    for i in tqdm(range(n), desc="fit nominal hand to NYU joints", unit="frame", mininterval=5.0):
        joints = split.joints_xyz[i]
        pose, err = fit_hand_pose(joints)
        q.append(pose.articulation[0])
        R.append(pose.R_h2c[0])
        t.append(pose.t_h2c[0])
        rms.append(err)
        centre.append(crop_centre(nyu.read_depth(split.depth_paths[i]), joints, cube_m))
    out = {"articulation": np.array(q), "R_h2c": np.array(R), "t_h2c": np.array(t), "rms_m": np.array(rms),
           "centre": np.array(centre)}
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.savez(cache, **out)
    return out


class NyuPairs(Dataset):
    """NYU training frames as pairs: real crop, the nominal hand rendered at its fitted pose, and targets."""

    def __init__(self, split: nyu.NyuSplit, fits: dict[str, np.ndarray], config: HandStreamConfig) -> None:
        self.split, self.fits, self.config = split, fits, config
        self.renderer: HandRenderer | None = None  # made in the process that uses it (DataLoader workers)

    def __len__(self) -> int:
        return len(self.fits["centre"])

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        cfg, K = self.config, nyu.NYU_INTRINSICS.K
        if self.renderer is None:
            self.renderer = HandRenderer(nyu.NYU_INTRINSICS)
        centre = self.fits["centre"][i]
        real, cube = geo.crop_depth_cube(nyu.read_depth(self.split.depth_paths[i]), K, centre, cube_m=cfg.cube_m,
                                         out=cfg.crop_px)
        pose = HandPose(self.fits["articulation"][i][None], self.fits["R_h2c"][i][None], self.fits["t_h2c"][i][None])
        syn, _ = geo.crop_depth_cube(self.renderer.render(HandShape.nominal(), pose).depth[0], K, centre,
                                     cube_m=cfg.cube_m, out=cfg.crop_px)
        target = cube.normalise_joints(self.split.joints_xyz[i]).reshape(-1)
        return {"real": torch.from_numpy(real[None]), "syn": torch.from_numpy(syn[None]),
                "target": torch.from_numpy(target.astype(np.float32))}


def nyu_task_data(nyu_dir: Path, out: Path, budget: NyuBudget, seed: int = 0) -> TaskData:
    """Synthetic nominal-hand stream + NYU train pairs (real frame, nominal render at its fitted pose)."""
    cfg = HandStreamConfig(crop_px=budget.input_size)
    split = nyu.read_split(Path(nyu_dir) / "train")
    n = len(split.depth_paths) if budget.max_train is None else min(budget.max_train, len(split.depth_paths))
    fits = fit_split(split, n, Path(out) / "nyu_fits.npz", cfg.cube_m)
    pairs_ds = NyuPairs(split, fits, cfg)

    def pairs(ctx: StreamContext) -> Iterator[Batch]:
        sampler = xdata.endless_indices(len(pairs_ds), seed, ctx)
        return iter(DataLoader(pairs_ds, batch_size=ctx.batch_size, sampler=sampler, num_workers=budget.num_workers))

    meta = {**xdata.hands_meta(cfg), "data": {"nyu_dir": str(nyu_dir), "n_train": n,
                                             "fit_rms_mm_mean": 1000.0 * float(fits["rms_m"].mean())}}
    return TaskData(synthetic=xdata.hand_synthetic_factory(cfg, seed, budget.synthetic_pool, budget.num_workers),
                    pairs=pairs, labels=tuple(nyu.JOINT_NAMES), normalisation=xdata.HAND_NORMALISATION, meta=meta)


def nyu_test_crops(nyu_dir: Path, n: int | None, crop_px: int, cube_m: float
               ) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """NYU test crops (F, 1, S, S) at the located centre, the centres (F, 3) and ground-truth joints (F, 14, 3)."""
    from tqdm import tqdm

    split = nyu.read_split(Path(nyu_dir) / "test")
    n = len(split.depth_paths) if n is None else min(n, len(split.depth_paths))
    crops, centres = [], []
    for i in tqdm(range(n), desc="NYU test crops", unit="frame", mininterval=5.0):
        depth = nyu.read_depth(split.depth_paths[i])
        c = crop_centre(depth, split.joints_xyz[i], cube_m)
        crop, _ = geo.crop_depth_cube(depth, nyu.NYU_INTRINSICS.K, c, cube_m=cube_m, out=crop_px)
        crops.append(crop[None])
        centres.append(c)
    return torch.from_numpy(np.stack(crops)), np.array(centres), split.joints_xyz[:n]


def run_nyu_experiment(
    nyu_dir: Path,
    out: Path = Path("out/nyu"),
    quick: bool = False,
    methods: Sequence[str] | None = None,
    budget: NyuBudget | None = None,
    device: str = "auto",
) -> dict[str, Any]:
    """Train every method on NYU train + synthetic, score on NYU test (mean error, fractions), write table.md/json."""
    t_start = time.perf_counter()
    nyu_dir, out = Path(nyu_dir), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    budget = budget or (QUICK if quick else NyuBudget())
    methods = tuple(methods or NYU_METHODS)
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise ValueError(f"unknown methods {unknown}; choose from {METHODS}")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    data = nyu_task_data(nyu_dir, out, budget)
    # The hands experiment's config with this budget's sizes (the NYU budget has the same fields).
    shared = {f.name: getattr(budget, f.name) for f in dataclasses.fields(budget)}
    from featmap_ros.experiments.hands import HandsBudget

    hb = HandsBudget(**{k: v for k, v in shared.items() if k in {f.name for f in dataclasses.fields(HandsBudget)}})
    cfg = hands_train_config(hb, device)
    paths, wall = xdata.train_all(cfg, data, out, methods)

    crops, centres, gt = nyu_test_crops(nyu_dir, budget.max_test, budget.input_size, HandStreamConfig().cube_m)
    table: dict[str, Any] = {}
    curves = {}
    for m, p in paths.items():
        est = predict_crops(p, crops, centres, HandStreamConfig().cube_m, device)
        scores = ev.score_hands(est, gt, nyu.JOINT_NAMES)
        curve = ev.hand_curve(est, gt)
        curves[m] = (curve["threshold_mm"], curve["fraction"])
        ev.write_json(out / m / "metrics.json", {**scores, "curve": curve})
        table[m] = {**scores, "train_s": wall.get(m, 0.0)}
    thresholds = ("20mm", "30mm", "40mm", "50mm", "80mm")
    rows = [[m, t["mean_error_mm"]] + [100.0 * t["max_error_fraction"][k] for k in thresholds]
            for m, t in table.items()]
    md = ["# NYU Hand Pose: every method on one budget\n",
          f"{data.meta['data']['n_train']} NYU train frames (nominal-hand fit RMS "
          f"{data.meta['data']['fit_rms_mm_mean']:.1f} mm), {len(gt)} NYU test frames, 14 joints. Paper: Feature "
          "Mapping 7.44 mm, DeepPrior++ 12.24 mm.\n",
          markdown_table(["method", "mean error (mm)"] + [f"max err <= {k} (%)" for k in thresholds], rows)]
    (out / "table.md").write_text("\n".join(md))
    plot_curves(out / "curves_max_error.png", curves, "max joint error threshold (mm)", "fraction of frames",
                title="NYU: frames within a max joint error")
    doc = {"methods": table, "n_train": data.meta["data"]["n_train"], "n_test": len(gt),
           "budget": dataclasses.asdict(budget), "quick": quick, "wall_s": time.perf_counter() - t_start}
    ev.write_json(out / "table.json", doc)
    return doc
