"""`featmap evaluate objects`: score an object model on every annotated instance of a BOP scene."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from featmap_ros import evaluation as ev
from featmap_ros.datasets import bop
from featmap_ros.estimator import ObjectEstimator
from featmap_ros.overlay import draw_objects
from featmap_ros.report import plot_curves
from featmap_ros.results import Detection2D, ObjectPose

DETECTION_MODES = ("gt", "gt-jitter")


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
    """A ground-truth instance as an ObjectPose (for overlays and messages)."""
    return ObjectPose(obj_id=inst.obj_id, name=name, R=inst.R, t=inst.t, corners_uv=np.full((8, 2), np.nan),
                      corners_3d=info.corners, extent=info.size_xyz, score=1.0)


def run_bop(estimator: ObjectEstimator, root: Path, scene_id: int, frames: str | None = None,
            detections: str = "gt", min_visib: float = 0.0) -> tuple[list[ev.ObjectRecord], dict]:
    """Run the estimator on every annotated instance of a scene's frames; return (records, context)."""
    scene = bop.BopScene(root, scene_id)
    ids = bop.select_ids(frames, scene.image_ids)
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
        for inst in frame.instances:
            if inst.obj_id in known and inst.visib_fract >= min_visib:
                records.append(ev.ObjectRecord(scene_id, im_id, inst.obj_id, inst.R, inst.t, inst.visib_fract,
                                               frame.intrinsics.K, best.get(inst.obj_id), dt))
    return records, {"image_ids": ids}


def write_object_report(out: Path, records: list[ev.ObjectRecord], infos: dict[int, bop.ObjectInfo],
                        meshes: dict[int, bop.Mesh], names: dict[int, str], extra: dict | None = None) -> dict:
    """metrics.json, results.csv (BOP format), instances.csv and accuracy curves; return the metrics."""
    out.mkdir(parents=True, exist_ok=True)
    metrics, rows = ev.score_objects(records, infos, meshes, names)
    metrics.update(extra or {})
    curves = ev.object_curves(rows, infos)
    metrics["curves"] = curves
    ev.write_json(out / "metrics.json", metrics)
    ev.write_bop_csv(out / "results.csv", records)
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
    import cv2

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
