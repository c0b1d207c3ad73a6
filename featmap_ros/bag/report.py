"""Scoring a bag replay and writing its report: per frame, the estimates against the bag's ground
truth (objects: BOP-toolkit scores through bop_scoring; hands: NYU joint errors), then metrics.json,
the BOP CSV, plots and report.md. Frames are added one at a time, so only the scores are kept."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from featmap_ros import evaluation as ev
from featmap_ros.bag.io import SyncedFrame, bop_image_id, gt_hand, gt_objects
from featmap_ros.bop_scoring import TARGET_SETS, load_target_set, target_instances, write_object_report
from featmap_ros.datasets import bop
from featmap_ros.report import markdown_table, plot_curves, plot_series
from featmap_ros.ros.messages import camera_info_to_intrinsics
from featmap_ros.ros.processor import ProcessorOutput

GT_ROTATION = {"annotated": "the BOP annotation (cam_R_m2c as stored, as the BOP toolkit scores)",
               "bag": "the bag's quaternion (the annotation snapped to the nearest rotation)"}


class ObjectReplayScore:
    """Object records of a replay, frame by frame, scored against the annotated BOP rotations where found.

    Args:
        root: the BOP dataset root the bag was made from (models_dir's parent): its scene_gt holds
            the annotated rotations; without it (or for a bag without BOP ids) the bag's
            quaternions are scored, and the report says so.
        known: the object ids the model estimates.
        targets: "all" or "bop19" (needs the bag's BOP ids and the targets file).
    """

    def __init__(self, root: Path, known: set[int], targets: str = "all") -> None:
        if targets not in TARGET_SETS:
            raise bop.BopError(f"target set {targets!r} is unknown; expected one of {sorted(TARGET_SETS)}")
        self.root, self.known, self.targets = Path(root), known, targets
        self.records: list[ev.ObjectRecord] = []
        self.times_s: list[float] = []  # bag time of each record's frame
        self.ids: dict | None = None  # dataset and split of the first frame with BOP ids
        self.rotation_sources: dict[str, int] = {"annotated": 0, "bag": 0}
        self.warnings: list[str] = []
        self._scenes: dict[tuple[str, int], bop.BopScene | None] = {}
        self._targets: dict[tuple[int, int, int], int] | None = None

    def _scene(self, ids: dict) -> bop.BopScene | None:
        key = (ids["split"], ids["scene_id"])
        if key not in self._scenes:
            try:
                self._scenes[key] = bop.BopScene(self.root, ids["scene_id"], ids["split"])
            except bop.BopError as err:
                self._scenes[key] = None
                self.warnings.append(f"BOP scene {ids['scene_id']} not found under {self.root} ({err}): "
                                     "scoring the bag's ground-truth quaternions")
            scene = self._scenes[key]
            if scene is not None and self.targets != "all" and self._targets is None:
                self._targets = load_target_set(self.targets, self.root, scene)
        return self._scenes[key]

    def add(self, k: int, fr: SyncedFrame, out: ProcessorOutput | None, t_s: float) -> None:
        """Add the records of frame k (bag time t_s); a skipped frame (out None) leaves its instances unfound."""
        if fr.ground_truth is None or fr.camera_info is None:
            return
        K = camera_info_to_intrinsics(fr.camera_info)[0].K
        best = ev.best_per_object(out.result.objects if out is not None else [])
        time_s = out.result.timings.get("total", -1.0) if out is not None else -1.0
        gts = gt_objects(fr.ground_truth)
        ids = bop_image_id(fr.image_id)
        if ids is None and self.targets != "all":
            raise bop.BopError(f"frame {k} of the bag carries no BOP image id: cannot score the {self.targets} targets")
        self.ids = self.ids or ids
        annotated = None
        if ids is not None and (scene := self._scene(ids)) is not None and ids["im_id"] in scene.image_ids:
            frame = scene.frame(ids["im_id"])
            same = len(frame.instances) == len(gts) and all(
                i.obj_id == g[0] and np.allclose(i.t, g[2], atol=1e-9) for i, g in zip(frame.instances, gts))
            annotated = frame if same else None
            if not same:
                self.warnings.append(f"scene {ids['scene_id']} image {ids['im_id']}: the bag's ground truth differs "
                                     "from the BOP annotation; scoring the bag's")
        keep = None
        if self.targets != "all":
            if annotated is None:
                raise bop.BopError(f"scoring the {self.targets} targets needs the BOP annotation of frame {k}")
            chosen = target_instances(annotated, self._targets)
            keep = {j for j, i in enumerate(annotated.instances) if any(i is c for c in chosen)}
        scene_id, im_id = (ids["scene_id"], ids["im_id"]) if ids is not None else (0, k)
        for j, (obj_id, R, t, visib) in enumerate(gts):
            if obj_id not in self.known or (keep is not None and j not in keep):
                continue
            R_gt = annotated.instances[j].R_annot if annotated is not None else R
            self.rotation_sources["annotated" if annotated is not None else "bag"] += 1
            self.records.append(ev.ObjectRecord(scene_id, im_id, obj_id, R_gt, t, visib, K, best.get(obj_id), time_s))
            self.times_s.append(t_s)

    def write(self, out: Path, infos: dict[int, bop.ObjectInfo], meshes: dict[int, bop.Mesh],
              names: dict[int, str], summary: dict) -> dict:
        """metrics.json, the BOP CSV (true ids), instances.csv, curves and the error-over-time plot."""
        if self.ids is None:
            self.warnings.append("the bag carries no BOP image ids: the CSV holds scene 0 and the frame index")
        used = [GT_ROTATION[k] for k, n in self.rotation_sources.items() if n]
        extra = {**summary, "gt_rotation": used or [GT_ROTATION["bag"]],
                 "warnings": summary["warnings"] + self.warnings}
        metrics = write_object_report(out, self.records, infos, meshes, names, extra=extra, targets=self.targets,
                                      dataset=self.ids["dataset"] if self.ids else None,
                                      split=self.ids["split"] if self.ids else "test")
        series = {}
        for oid in sorted({r.obj_id for r in self.records}):
            sel = [(t, r) for t, r in zip(self.times_s, self.records) if r.obj_id == oid]
            errs = [min(ev.score_instance(r, infos[oid], meshes[oid].vertices)["proj_px"], 100.0) for _, r in sel]
            series[names.get(oid, str(oid))] = ([t for t, _ in sel], errs)
        if series:
            plot_series(out / "error_over_time.png", series, "2D projection error (px, clipped at 100)",
                        "error per frame")
        return metrics


class HandReplayScore:
    """Hand joints of a replay, frame by frame: estimates and ground truth of the frames that have both."""

    def __init__(self) -> None:
        self.est: list[np.ndarray] = []
        self.gt: list[np.ndarray] = []
        self.times_s: list[float] = []
        self.frames_with_gt = 0

    def add(self, k: int, fr: SyncedFrame, out: ProcessorOutput | None, t_s: float) -> None:
        """Add frame k (bag time t_s) when it has ground truth and an estimated hand."""
        if fr.ground_truth is None:
            return
        self.frames_with_gt += 1
        g = gt_hand(fr.ground_truth)
        if g is None or out is None or not out.result.hands:
            return
        self.est.append(out.result.hands[0].joints_xyz)
        self.gt.append(g)
        self.times_s.append(t_s)

    def write(self, out: Path, joint_names: tuple[str, ...], summary: dict) -> dict:
        """metrics.json, the max-error curve and the error-over-time plot."""
        shape = (0, 14, 3)
        est_j = np.array(self.est) if self.est else np.zeros(shape)
        gt_j = np.array(self.gt) if self.gt else np.zeros(shape)
        metrics = {**summary, "frames_with_hand_gt": self.frames_with_gt, "frames_scored": len(gt_j)}
        if len(gt_j):
            metrics.update(ev.score_hands(est_j, gt_j, joint_names))
            curve = ev.hand_curve(est_j, gt_j)
            metrics["curve"] = curve
            plot_curves(out / "max_error_curve.png", {"fm": (curve["threshold_mm"], curve["fraction"])},
                        "max joint error threshold (mm)", "fraction of frames", "hand: max-error success")
            err_mm = 1000 * np.linalg.norm(est_j - gt_j, axis=-1).mean(1)
            plot_series(out / "error_over_time.png", {"mean joint error": (self.times_s, err_mm)},
                        "mm", "hand error per frame")
        ev.write_json(out / "metrics.json", metrics)
        return metrics


def write_report_md(out: Path, metrics: dict, task: str, out_bag: Path | None) -> Path:
    """A short human report of a bag replay."""
    lines = [f"# Bag replay: {task}", "", f"- bag: `{metrics.get('bag')}`", f"- model: `{metrics.get('model')}`",
             f"- frames: {metrics.get('frames')}, processed: {metrics.get('processed')}, "
             f"skipped: {metrics.get('skipped')}, dropped within frames: {metrics.get('dropped', {})}",
             f"- device: {metrics.get('device')}, latency median {metrics.get('latency_median_ms', 0.0):.1f} ms, "
             f"p95 {metrics.get('latency_p95_ms', 0.0):.1f} ms"]
    if task == "objects":
        targets = metrics.get("targets", {})
        lines += [f"- scored: {targets.get('scored')} ({targets.get('n_instances')} instances)",
                  f"- ground-truth rotation: {'; '.join(metrics.get('gt_rotation', []))}",
                  f"- BOP results: `{metrics.get('bop_csv')}`"]
    lines.append("")
    for w in metrics.get("warnings", []):
        lines.append(f"- warning: {w}")
    if task == "objects":
        rows: list[list[Any]] = []
        for split in ("all", f"visib>={ev.VISIB_SPLIT}"):
            for oid, v in metrics[split]["per_object"].items():
                rows.append([split, f"{v['name']} ({oid})", v["n"], 100 * v["proj_5px"], 100 * v["add_10"],
                             100 * v["cm5_deg5"]])
            mean = metrics[split]["mean_over_objects"]
            rows.append([split, "**mean**", metrics[split]["n_instances"], 100 * mean["proj_5px"],
                         100 * mean["add_10"], 100 * mean["cm5_deg5"]])
        lines.append(markdown_table(["instances", "object", "n", "2D proj @5px (%)", "ADD(-S) @10% (%)",
                                     "5cm 5deg (%)"], rows))
        lines += ["", "![2D projection](proj2d_curve.png) ![ADD](add_curve.png) ![over time](error_over_time.png)"]
    else:
        if "mean_error_mm" in metrics:
            frac = metrics.get("max_error_fraction", {})
            lines.append(markdown_table(["frames scored", "mean joint error (mm)", *[f"max err <= {k}" for k in frac]],
                                        [[metrics["frames_scored"], metrics["mean_error_mm"],
                                          *[100 * v for v in frac.values()]]]))
        lines += ["", "![curve](max_error_curve.png) ![over time](error_over_time.png)"]
    if out_bag:
        lines += ["", f"Annotated bag: `{out_bag}` (input topics + /tf, markers, poses, overlay)."]
    p = out / "report.md"
    p.write_text("\n".join(lines) + "\n")
    return p
