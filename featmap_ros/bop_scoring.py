"""Scoring on a BOP scene: run an object estimator on a scene's frames, score the annotated instances
(or the BOP19 test targets) and write the report: metrics.json, the BOP results CSV, instances.csv,
accuracy curves and overlays. `featmap evaluate`, bag replay and the experiments share it.

The scores themselves are evaluation.py's; this module adds the BOP scene around them: which
detections seed the estimator, which instances are scored, and the files a run leaves behind.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import cv2
import numpy as np
from tqdm import tqdm

from featmap_ros import evaluation as ev
from featmap_ros.datasets import bop
from featmap_ros.overlay import draw_objects
from featmap_ros.report import plot_curves
from featmap_ros.results import Detection2D, ObjectPose

if TYPE_CHECKING:  # the estimator is only called here, never built: no torch import for the scorer
    from featmap_ros.estimator import ObjectEstimator

DETECTION_MODES = ("gt", "gt-jitter")
TARGET_SETS = {"all": "every annotated instance", "bop19": "the BOP19 test targets (test_targets_bop19.json)"}


@dataclass(frozen=True)
class JitterConfig:
    """Ground-truth boxes disturbed like a detector's: centre shift and size change (fractions of the box)."""

    shift_sigma: float = 0.08
    scale_sigma: float = 0.08
    seed: int = 0


def jitter_box(box_xywh: np.ndarray, rng: np.random.Generator, cfg: JitterConfig) -> np.ndarray:
    """A detector-like box around a true (x, y, w, h) box."""
    x, y, w, h = box_xywh
    cx = x + w / 2 + rng.normal(0, cfg.shift_sigma) * w
    cy = y + h / 2 + rng.normal(0, cfg.shift_sigma) * h
    s = float(np.exp(rng.normal(0, cfg.scale_sigma)))
    return np.array([cx - s * w / 2, cy - s * h / 2, s * w, s * h])


def detections_for_frame(frame: bop.Frame, mode: str, rng: np.random.Generator,
                         jitter: JitterConfig = JitterConfig(), from_file: dict | None = None) -> list[Detection2D]:
    """The 2D detections that seed the estimator for one frame: GT boxes, jittered GT boxes, or a file's."""
    if from_file is not None:
        return from_file.get((frame.scene_id, frame.im_id), [])
    dets = []
    for inst in frame.instances:
        box = inst.bbox_obj if mode == "gt" else jitter_box(inst.bbox_obj, rng, jitter)
        dets.append(Detection2D(box, score=1.0, obj_id=inst.obj_id))
    return dets


def read_detections_file(path: Path) -> dict[tuple[int, int], list[Detection2D]]:
    """Read BOP/COCO-style 2D detections: a JSON list of {scene_id, image_id, category_id, bbox, score}."""
    try:
        raw = json.loads(Path(path).read_text())
        out: dict[tuple[int, int], list[Detection2D]] = {}
        for d in raw:
            key = (int(d["scene_id"]), int(d["image_id"]))
            det = Detection2D(d["bbox"], float(d.get("score", 1.0)), obj_id=int(d["category_id"]))
            out.setdefault(key, []).append(det)
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise bop.BopError(f"cannot read detections from {path}: {err}") from err
    return out


def gt_pose(inst: bop.Instance, info: bop.ObjectInfo, name: str) -> ObjectPose:
    """A ground-truth instance as an ObjectPose for overlays and messages (the snapped rotation R)."""
    return ObjectPose(obj_id=inst.obj_id, name=name, R=inst.R, t=inst.t, corners_uv=np.full((8, 2), np.nan),
                      corners_3d=info.corners, extent=info.size_xyz, score=1.0)


def load_object_models(models_dir: Path | None) -> tuple[dict[int, bop.ObjectInfo], dict[int, bop.Mesh]]:
    """models_info and the meshes used for metrics (models_eval/ when it lies beside models/)."""
    if models_dir is None:
        raise bop.BopError("scoring objects needs the object models: pass models_dir (a BOP models/ folder)")
    models_dir = Path(models_dir)
    infos = bop.load_models_info(models_dir / "models_info.json")
    eval_dir = models_dir.parent / "models_eval"
    src = eval_dir if eval_dir.is_dir() else models_dir
    return infos, {i: bop.load_ply(src / f"obj_{i:06d}.ply") for i in infos}


def target_instances(frame: bop.Frame, targets: dict[tuple[int, int, int], int] | None) -> list[bop.Instance]:
    """The instances of a frame to score: all of them, or per BOP target its inst_count most visible ones."""
    if targets is None:
        return list(frame.instances)
    kept: list[bop.Instance] = []
    for obj_id in dict.fromkeys(i.obj_id for i in frame.instances):
        count = targets.get((frame.scene_id, frame.im_id, obj_id), 0)
        same = sorted((i for i in frame.instances if i.obj_id == obj_id), key=lambda i: -i.visib_fract)
        kept += same[:count]
    return [i for i in frame.instances if any(i is k for k in kept)]


def load_target_set(name: str, root: Path, scene: bop.BopScene) -> dict[tuple[int, int, int], int] | None:
    """The targets of a named set: None for "all", the targets file's entries for "bop19"."""
    if name not in TARGET_SETS:
        raise bop.BopError(f"target set {name!r} is unknown; expected one of {sorted(TARGET_SETS)}")
    return None if name == "all" else bop.load_targets(bop.find_targets(root, scene.dir))


def run_bop(estimator: ObjectEstimator, root: Path, scene_id: int, frames: str | None = None,
            detections: str = "gt", min_visib: float = 0.0, targets: str = "all",
            split: str = "test") -> tuple[list[ev.ObjectRecord], dict]:
    """Run the estimator on a scene's frames and score the chosen instances; return (records, context).

    Args:
        targets: "all" (every annotated instance) or "bop19" (test_targets_bop19.json of the split
            folder or the dataset root; frames without a target are skipped).

    Returns:
        The records (ground truth = the annotated rotation, as the BOP toolkit scores) and a context
        dict: image_ids, targets, dataset (the root folder's name) and split.
    """
    scene = bop.BopScene(root, scene_id, split)
    chosen = load_target_set(targets, Path(root), scene)
    ids = bop.select_ids(frames, scene.image_ids)
    if chosen is not None:
        ids = [i for i in ids if any(k[:2] == (scene.scene_id, i) for k in chosen)]
    from_file = None
    if detections not in DETECTION_MODES:
        from_file = read_detections_file(Path(detections))
    rng = np.random.default_rng(JitterConfig().seed)
    known = set(estimator.index)
    records: list[ev.ObjectRecord] = []
    for im_id in tqdm(ids, desc="evaluate", unit="frame"):
        frame = scene.frame(im_id)
        rgb = bop.read_rgb(frame.rgb_path)
        dets = [d for d in detections_for_frame(frame, detections, rng, from_file=from_file) if d.obj_id in known]
        t0 = time.perf_counter()
        poses = estimator.estimate(rgb, frame.intrinsics, dets)
        dt = time.perf_counter() - t0
        best = ev.best_per_object(poses)
        for inst in target_instances(frame, chosen):
            if inst.obj_id in known and inst.visib_fract >= min_visib:
                records.append(ev.ObjectRecord(scene_id, im_id, inst.obj_id, inst.R_annot, inst.t, inst.visib_fract,
                                               frame.intrinsics.K, best.get(inst.obj_id), dt))
    return records, {"image_ids": ids, "targets": targets, "dataset": Path(root).resolve().name, "split": split}


def write_object_report(out: Path, records: list[ev.ObjectRecord], infos: dict[int, bop.ObjectInfo],
                        meshes: dict[int, bop.Mesh], names: dict[int, str], extra: dict | None = None, *,
                        targets: str = "all", dataset: str | None = None, split: str = "test") -> dict:
    """metrics.json, the BOP results CSV, instances.csv and accuracy curves; return the metrics.

    The CSV is METHOD_DATASET-SPLIT.csv (the BOP toolkit's name; METHOD is extra["method"] or
    "featmap"); without a dataset name it falls back to results.csv. metrics["targets"] says which
    instances were scored.
    """
    out.mkdir(parents=True, exist_ok=True)
    metrics, rows = ev.score_objects(records, infos, meshes, names)
    metrics.update(extra or {})
    metrics["targets"] = {"set": targets, "scored": TARGET_SETS.get(targets, targets), "n_instances": len(records)}
    csv_name = ev.bop_csv_name(str(metrics.get("method", "featmap")), dataset, split) if dataset else "results.csv"
    metrics["bop_csv"] = csv_name
    curves = ev.object_curves(rows, infos)
    metrics["curves"] = curves
    ev.write_json(out / "metrics.json", metrics)
    ev.write_bop_csv(out / csv_name, records)
    with open(out / "instances.csv", "w") as fh:
        keys = list(rows[0]) if rows else []
        fh.write(",".join(keys) + "\n")
        for r in rows:
            fh.write(",".join(str(r[k]) for k in keys) + "\n")
    plot_curves(out / "proj2d_curve.png", {"all": (curves["proj_px"], curves["proj_acc"])},
                "2D projection threshold (px)", title="2D projection accuracy", vline=ev.PROJ_PX)
    plot_curves(out / "add_curve.png", {"all": (curves["add_fraction"], curves["add_acc"])},
                "ADD(-S) threshold (fraction of diameter)", title="ADD(-S) accuracy", vline=ev.ADD_FRACTION)
    return metrics


def write_overlays(out: Path, root: Path, scene_id: int, records: list[ev.ObjectRecord],
                   infos: dict[int, bop.ObjectInfo], names: dict[int, str], n: int = 4) -> list[Path]:
    """Overlay PNGs (ground truth blue, estimate green) for a sample of evaluated frames."""
    scene = bop.BopScene(root, scene_id)
    ids = sorted({r.im_id for r in records})
    pick = [ids[i] for i in np.linspace(0, len(ids) - 1, min(n, len(ids))).astype(int)] if ids else []
    paths = []
    for im_id in pick:
        frame = scene.frame(im_id)
        rgb = bop.read_rgb(frame.rgb_path)
        recs = [r for r in records if r.im_id == im_id]
        gts = [gt_pose(i, infos[i.obj_id], names.get(i.obj_id, str(i.obj_id))) for i in frame.instances
               if i.obj_id in {r.obj_id for r in recs}]
        canvas = draw_objects(rgb, [r.estimate for r in recs if r.estimate is not None], frame.intrinsics.K, gt=gts)
        p = out / f"overlay_{im_id:06d}.png"
        cv2.imwrite(str(p), cv2.cvtColor(canvas, cv2.COLOR_RGB2BGR))
        paths.append(p)
    return paths
