"""Scoring estimates against ground truth: the one implementation behind `featmap evaluate`,
`featmap bag eval` and the experiments.

Objects: per-instance records -> 2D projection @ 5 px, ADD(-S) @ 10% of the diameter, 5 cm 5 deg,
per object and mean, all instances and those with visib_fract >= 0.5; BOP results CSV.
Hands: per-frame joints -> mean 3D joint error, per-joint errors, max-error success fractions.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from featmap_ros import metrics as m
from featmap_ros.datasets.bop import Mesh, ObjectInfo
from featmap_ros.results import ObjectPose

PROJ_PX = 5.0
ADD_FRACTION = 0.10
VISIB_SPLIT = 0.5
PROJ_CURVE_PX = np.linspace(0, 50, 51)
ADD_CURVE_FRACTION = np.linspace(0, 0.5, 51)
HAND_THRESHOLDS_M = (0.02, 0.03, 0.04, 0.05, 0.08)


@dataclass
class ObjectRecord:
    """One annotated instance and what the estimator made of it (None: no estimate = failure).

    R_gt is the rotation as annotated (BOP: cam_R_m2c, not snapped to a rotation), as the BOP toolkit
    scores; scene_id and im_id are the dataset's ids, so the results CSV lines up with its ground truth.
    """

    scene_id: int
    im_id: int
    obj_id: int
    R_gt: np.ndarray
    t_gt: np.ndarray
    visib_fract: float
    K: np.ndarray
    estimate: ObjectPose | None
    time_s: float = -1.0


def best_per_object(poses: list[ObjectPose]) -> dict[int, ObjectPose]:
    """The highest-scoring estimate of each object id (LM-O has one instance per object)."""
    best: dict[int, ObjectPose] = {}
    for p in poses:
        if p.obj_id not in best or p.score > best[p.obj_id].score:
            best[p.obj_id] = p
    return best


def score_instance(rec: ObjectRecord, info: ObjectInfo, points: np.ndarray) -> dict:
    """The errors of one record: proj_px, add_m (ADD-S when symmetric), re_deg, te_m (inf when missing)."""
    if rec.estimate is None:
        return {"proj_px": np.inf, "add_m": np.inf, "re_deg": np.inf, "te_m": np.inf}
    R, t = rec.estimate.R, rec.estimate.t
    return {
        "proj_px": m.proj_2d(R, t, rec.R_gt, rec.t_gt, rec.K, points),
        "add_m": m.add_or_adi(R, t, rec.R_gt, rec.t_gt, points, info.symmetric),
        "re_deg": m.re(R, rec.R_gt),
        "te_m": m.te(t, rec.t_gt),
    }


def _summary(errors: list[dict], diameters: np.ndarray) -> dict:
    if not errors:
        return {"n": 0, "proj_5px": float("nan"), "add_10": float("nan"), "cm5_deg5": float("nan")}
    proj = np.array([e["proj_px"] for e in errors])
    add = np.array([e["add_m"] for e in errors]) / diameters
    cm_deg = np.array([e["te_m"] < 0.05 and e["re_deg"] < 5.0 for e in errors])
    return {"n": len(errors), "proj_5px": m.accuracy(proj, PROJ_PX), "add_10": m.accuracy(add, ADD_FRACTION),
            "cm5_deg5": float(cm_deg.mean())}


def score_objects(records: list[ObjectRecord], infos: dict[int, ObjectInfo], meshes: dict[int, Mesh],
                  names: dict[int, str] | None = None) -> tuple[dict, list[dict]]:
    """Score every record; return (metrics dict for metrics.json, per-instance rows).

    The metrics hold, for "all" and "visib>=0.5": per object and the mean over objects of
    proj_5px, add_10 and cm5_deg5 (fractions in [0, 1]), with instance counts.
    """
    rows = []
    for rec in records:
        err = score_instance(rec, infos[rec.obj_id], meshes[rec.obj_id].vertices)
        rows.append({"scene_id": rec.scene_id, "im_id": rec.im_id, "obj_id": rec.obj_id,
                     "visib_fract": rec.visib_fract, "found": rec.estimate is not None, **err})
    out: dict = {"thresholds": {"proj_px": PROJ_PX, "add_fraction_of_diameter": ADD_FRACTION,
                                "cm_deg": [5, 5], "visib_split": VISIB_SPLIT},
                 "symmetric_objects_scored_with_add_s": sorted(i for i, f in infos.items() if f.symmetric)}
    obj_ids = sorted({r["obj_id"] for r in rows})
    for split, keep in (("all", lambda r: True), (f"visib>={VISIB_SPLIT}", lambda r: r["visib_fract"] >= VISIB_SPLIT)):
        per_obj = {}
        for oid in obj_ids:
            sel = [r for r in rows if r["obj_id"] == oid and keep(r)]
            per_obj[str(oid)] = {"name": (names or {}).get(oid, str(oid)),
                                 **_summary(sel, np.full(len(sel), infos[oid].diameter))}
        scored = [v for v in per_obj.values() if v["n"] > 0]
        mean = {k: float(np.mean([v[k] for v in scored])) if scored else float("nan")
                for k in ("proj_5px", "add_10", "cm5_deg5")}
        out[split] = {"per_object": per_obj, "mean_over_objects": mean, "n_instances": sum(v["n"] for v in scored)}
    return out, rows


def object_curves(rows: list[dict], infos: dict[int, ObjectInfo]) -> dict:
    """Accuracy-vs-threshold curves: 2D projection (px) and ADD(-S) (fraction of the diameter)."""
    proj = [r["proj_px"] for r in rows]
    add = [r["add_m"] / infos[r["obj_id"]].diameter for r in rows]
    return {"proj_px": PROJ_CURVE_PX.tolist(), "proj_acc": m.success_curve(proj, PROJ_CURVE_PX).tolist(),
            "add_fraction": ADD_CURVE_FRACTION.tolist(), "add_acc": m.success_curve(add, ADD_CURVE_FRACTION).tolist()}


def bop_csv_name(method: str, dataset: str, split: str = "test") -> str:
    """The results file name the BOP toolkit's scripts parse: METHOD_DATASET-SPLIT.csv.

    The toolkit splits the name at "_" (method, then dataset-split), so an underscore in the method
    becomes "-"; dataset and split must not hold one.
    """
    for what, v in (("dataset", dataset), ("split", split)):
        if not v or "_" in v or "." in v:
            raise ValueError(f"BOP {what} name {v!r} must be non-empty without '_' or '.' (the toolkit splits on them)")
    return f"{(method or 'featmap').replace('_', '-').replace('.', '-')}_{dataset}-{split}.csv"


def write_bop_csv(path: Path, records: list[ObjectRecord]) -> None:
    """BOP results format: scene_id,im_id,obj_id,score,R (9 row-major),t (mm),time (s, -1 unknown)."""
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["scene_id", "im_id", "obj_id", "score", "R", "t", "time"])
        for r in records:
            if r.estimate is None:
                continue
            w.writerow([r.scene_id, r.im_id, r.obj_id, f"{r.estimate.score:.6f}",
                        " ".join(f"{v:.8f}" for v in r.estimate.R.ravel()),
                        " ".join(f"{v * 1000.0:.6f}" for v in r.estimate.t), f"{r.time_s:.6f}"])


def score_hands(joints_est: np.ndarray, joints_gt: np.ndarray, joint_names: tuple[str, ...]) -> dict:
    """Hand metrics (NYU protocol) for (F, J, 3) metres: mean error (mm), per joint (mm), fractions."""
    if len(joints_gt) == 0:
        return {"n_frames": 0, "mean_error_mm": float("nan")}
    fractions = m.max_error_fraction(joints_est, joints_gt, HAND_THRESHOLDS_M)
    return {
        "n_frames": int(len(joints_gt)),
        "mean_error_mm": 1000.0 * m.mean_joint_error(joints_est, joints_gt),
        "per_joint_mm": {n: 1000.0 * float(e) for n, e in zip(joint_names, m.per_joint_error(joints_est, joints_gt))},
        "max_error_fraction": {f"{round(t * 1000)}mm": float(f) for t, f in zip(HAND_THRESHOLDS_M, fractions)},
    }


def hand_curve(joints_est: np.ndarray, joints_gt: np.ndarray) -> dict:
    """Fraction of frames with max joint error <= threshold, 0-80 mm."""
    th = np.linspace(0, 0.08, 81)
    return {"threshold_mm": (th * 1000).tolist(), "fraction": m.max_error_fraction(joints_est, joints_gt, th).tolist()}


def json_safe(v: Any) -> Any:
    """v with NaN/inf as None (JSON has neither; strings would break consumers) and numpy scalars as Python's."""
    if isinstance(v, float) and not np.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: json_safe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [json_safe(x) for x in v]
    if isinstance(v, np.generic):
        return json_safe(v.item())
    return v


def write_json(path: Path, data: dict) -> None:
    """Write JSON with NaN/inf as null (json_safe)."""
    Path(path).write_text(json.dumps(json_safe(data), indent=2))
