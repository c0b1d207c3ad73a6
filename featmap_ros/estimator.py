"""Run-time inference: image + intrinsics (+ 2D detections) -> object poses or hand joints.

Pure Python and torch, no ROS. The node, the bag replay and `featmap evaluate` all call these
classes, so what is scored off the robot is what runs on it.

Checkpoint metadata this module reads (written by featmap_ros.train):
- objects: meta["objects"] = [{"obj_id", "name", "corners_m" (8x3), "extent_m" (3), "symmetric"}],
  meta["crop"] = {"size": S, "window_scale": s}; the head (net.head) has, per object in this order,
  16 outputs (bb8: corners, PnP) or 4 channels of a dense map (dense: visibility and model
  coordinates, PnP-RANSAC; heads/dense.py).
- hands: meta["hands"] = {"joint_names": [...], "cube_m": 0.3}, meta["crop"] = {"size": S}.
- both, optional: meta["feature_stats"] = {"mean": [D], "std": [D]} of synthetic features (f_S),
  for the out-of-domain score.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from featmap_ros import geometry as geo
from featmap_ros.errors import FeatmapError
from featmap_ros.heads.dense import DenseDecodeConfig
from featmap_ros.heads.dense import decode as decode_dense
from featmap_ros.model import checkpoint
from featmap_ros.model.nets import DENSE_CHANNELS, FeatureMappingModel, pooled_features
from featmap_ros.preprocess import depth_to_input, rgb_to_input
from featmap_ros.results import Detection2D, HandPose, ObjectPose

log = logging.getLogger(__name__)


class EstimatorError(FeatmapError, ValueError):
    """The estimator got input it cannot use (the message says what was expected)."""


DEFAULT_MAX_DETECTIONS = 32
NETWORK_CHUNK = 16  # crops per forward pass: bounds the memory of one frame whatever the detection count


def resolve_device(device: str = "auto") -> torch.device:
    """'auto' -> CUDA when available, else CPU with one warning; 'cuda' without a GPU is an error."""
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        log.warning("no CUDA device found: running the network on the CPU")
        return torch.device("cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise EstimatorError(f"device {device!r} asked for, but torch sees no CUDA device")
    return torch.device(device)


@dataclass(frozen=True)
class ObjectModelInfo:
    """What the estimator knows of one object: id, name, box corners (8, 3) and extent (3,) in metres."""

    obj_id: int
    name: str
    corners: np.ndarray
    extent: np.ndarray
    symmetric: bool


class _Network:
    """A loaded checkpoint on a device, with the out-of-domain statistics of its synthetic features."""

    def __init__(self, model: FeatureMappingModel, meta: dict[str, Any], device: torch.device) -> None:
        self.meta = meta
        self.device = device
        self.half = device.type == "cuda"
        self.model = model.to(device).eval()
        if self.half:
            self.model = self.model.half()
        stats = meta.get("feature_stats") or {}
        self.feat_mean = torch.tensor(stats["mean"], device=device) if "mean" in stats else None
        self.feat_std = torch.tensor(stats["std"], device=device).clamp_min(1e-6) if "std" in stats else None

    @torch.inference_mode()
    def run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(B, C, S, S) float32 -> outputs (B, K) and out-of-domain scores (B,), both float64 numpy."""
        x = torch.from_numpy(batch).to(self.device, non_blocking=True)
        x = x.half() if self.half else x
        pred = self.model.predict_real(x)
        feats = pooled_features(pred.features).float()
        if self.feat_mean is not None and self.feat_std is not None:
            # RMS z-score of the mapped feature under the synthetic feature distribution (diagonal Gaussian):
            # about 1 in domain, growing as the image leaves what the network was trained on.
            ood = (((feats - self.feat_mean) / self.feat_std) ** 2).mean(dim=1).sqrt()
        else:
            ood = torch.full((len(feats),), float("nan"), device=feats.device)
        return pred.outputs.float().cpu().numpy().astype(np.float64), ood.cpu().numpy().astype(np.float64)


def _check_max_detections(n: int) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise EstimatorError(f"max_detections must be an integer >= 1, got {n!r}")
    return n


def _finite_score(score: float) -> float:
    s = float(score)
    return s if np.isfinite(s) else -np.inf


def usable_box(det: Detection2D, intrinsics: geo.Intrinsics) -> np.ndarray | None:
    """The detection's (x, y, w, h) as float64 when finite, larger than a pixel and on the image; else None."""
    try:
        box = np.asarray(det.box_xywh, dtype=np.float64).reshape(4)
    except (TypeError, ValueError):
        log.debug("skipping detection with malformed box %r", det.box_xywh)
        return None
    x, y, w, h = box
    if not (np.isfinite(box).all() and w > 1 and h > 1):
        log.debug("skipping detection with degenerate box %s", box)
        return None
    if x + w <= 0 or y + h <= 0 or x >= intrinsics.width or y >= intrinsics.height:
        log.debug("skipping detection with box %s off the image", box)
        return None
    return box


def run_chunked(net: Any, crops: list[np.ndarray], chunk: int = NETWORK_CHUNK) -> tuple[np.ndarray, np.ndarray]:
    """net.run() over crops (C, S, S) in chunks of at most `chunk`; outputs and scores concatenated."""
    parts = [net.run(np.stack(crops[i:i + chunk])) for i in range(0, len(crops), chunk)]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def _check_intrinsics(shape: tuple[int, ...], intrinsics: geo.Intrinsics, what: str) -> None:
    h, w = shape[:2]
    if (w, h) != (intrinsics.width, intrinsics.height):
        raise EstimatorError(
            f"{what} is {w}x{h} but camera_info says {intrinsics.width}x{intrinsics.height}"
        )


class ObjectEstimator:
    """Objects with Feature Mapping: crops on 2D detections -> h(g(f_R(crop))) -> pose.

    The checkpoint's head decides the decoding: 8 corners -> PnP (bb8), or dense correspondences ->
    PnP-RANSAC with the inlier ratio as confidence (dense).
    """

    task = "objects"

    def __init__(self, model: FeatureMappingModel, meta: dict[str, Any], device: str = "auto",
                 pnp_method: str = "epnp", ransac: bool = False, dense_cfg: DenseDecodeConfig | None = None,
                 max_detections: int = DEFAULT_MAX_DETECTIONS) -> None:
        if meta.get("task") != "objects":
            raise EstimatorError(f"checkpoint is for task {meta.get('task')!r}, not 'objects'")
        self.net = _Network(model, meta, resolve_device(device))
        self.device = str(self.net.device)
        self.objects = [
            ObjectModelInfo(int(o["obj_id"]), str(o["name"]), np.asarray(o["corners_m"], dtype=np.float64),
                            np.asarray(o["extent_m"], dtype=np.float64), bool(o.get("symmetric", False)))
            for o in meta["objects"]
        ]
        self.index = {o.obj_id: i for i, o in enumerate(self.objects)}
        self.by_name = {o.name: i for i, o in enumerate(self.objects)}
        self.crop_size = int(meta["crop"]["size"])
        self.window_scale = float(meta["crop"].get("window_scale", 1.0))
        self.pnp_method, self.ransac = pnp_method, ransac
        self.head = model.cfg.head
        self.max_detections = _check_max_detections(max_detections)
        self.skipped: Counter[str] = Counter()
        self.dense_cfg = dense_cfg or DenseDecodeConfig()
        per_object = DENSE_CHANNELS if self.head == "dense" else 16
        if model.cfg.n_outputs != per_object * len(self.objects):
            raise EstimatorError(
                f"{self.head} head has {model.cfg.n_outputs} outputs for {len(self.objects)} objects; "
                f"expected {per_object} each"
            )

    def object_index(self, det: Detection2D) -> int | None:
        """Index of the detection's object in the head (by obj_id, or by name as class_id), or None."""
        if det.obj_id is not None and det.obj_id in self.index:
            return self.index[det.obj_id]
        return self.by_name.get(det.class_id)

    def windows(
        self, detections: list[Detection2D], intrinsics: geo.Intrinsics
    ) -> list[tuple[int, int, geo.CropWindow]]:
        """(detection index, object index, crop window) of each usable detection; others are skipped."""
        out = []
        for i, det in enumerate(detections):
            k = self.object_index(det)
            if k is None:
                self.skipped["unknown_object"] += 1
                log.debug("skipping detection of unknown object %r", det.class_id)
                continue
            box = usable_box(det, intrinsics)
            if box is None:
                self.skipped["bad_box"] += 1
                continue
            out.append((i, k, geo.CropWindow.around_box(box, self.crop_size, self.window_scale)))
        return out

    def estimate(self, rgb: np.ndarray, intrinsics: geo.Intrinsics, detections: list[Detection2D]) -> list[ObjectPose]:
        """One pose per usable detection, all crops in one batch.

        Raises:
            EstimatorError: the image is not HxWx3 uint8 or does not match the intrinsics.
        """
        rgb = np.asarray(rgb)
        if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
            raise EstimatorError(f"objects need an HxWx3 uint8 RGB image, got shape {rgb.shape} dtype {rgb.dtype}")
        _check_intrinsics(rgb.shape, intrinsics, "image")
        chosen = self.windows(detections, intrinsics)
        if len(chosen) > self.max_detections:
            # The most confident detections are kept; the others are counted, never silently lost.
            self.skipped["max_detections"] += len(chosen) - self.max_detections
            keep = sorted(range(len(chosen)), key=lambda j: -_finite_score(detections[chosen[j][0]].score))
            chosen = [chosen[j] for j in sorted(keep[: self.max_detections])]
        if not chosen:
            return []
        outputs, ood = run_chunked(self.net, [rgb_to_input(win.crop(rgb)) for _, _, win in chosen])
        K = intrinsics.K
        poses = []
        for row, (i, k, win) in enumerate(chosen):
            det = detections[i]
            info = self.objects[k]
            confidence = 1.0
            per = DENSE_CHANNELS if self.head == "dense" else 16
            if not np.isfinite(outputs[row, per * k: per * (k + 1)]).all():
                self.skipped["non_finite_output"] += 1
                log.debug("network output for object %d is not finite; dropped", info.obj_id)
                continue
            try:
                if self.head == "dense":
                    channels = outputs[row, DENSE_CHANNELS * k: DENSE_CHANNELS * (k + 1)]
                    lo = info.corners.min(axis=0)
                    found = decode_dense(channels, win, K, lo, info.extent, self.dense_cfg)
                    R, t, confidence = found.R, found.t, found.inlier_ratio
                    uv = geo.project_model(info.corners, R, t, K)
                else:
                    uv_norm = outputs[row, 16 * k: 16 * (k + 1)].reshape(8, 2)
                    uv = win.to_image(geo.denormalise_uv(uv_norm, self.crop_size))
                    R, t = geo.solve_pnp(info.corners, uv, K, method=self.pnp_method, ransac=self.ransac)
            except geo.GeometryError as err:
                self.skipped["pnp_failed"] += 1
                log.debug("PnP failed for object %d: %s", info.obj_id, err)
                continue
            if not (np.isfinite(R).all() and np.isfinite(t).all() and np.isfinite(uv).all()):
                self.skipped["non_finite_output"] += 1
                continue
            if t[2] <= 0:
                self.skipped["behind_camera"] += 1
                log.debug("PnP put object %d behind the camera; skipped", info.obj_id)
                continue
            # The score is the detection's, times the pose's own confidence (dense head: RANSAC inlier ratio).
            poses.append(ObjectPose(obj_id=info.obj_id, name=info.name, R=R, t=t, corners_uv=uv,
                                    corners_3d=info.corners, extent=info.extent,
                                    score=float(det.score) * float(confidence), out_of_domain=float(ood[row])))
        return poses

    # The Estimator protocol of featmap_ros.ros.processor.
    def estimate_objects(self, rgb, intrinsics, detections):  # noqa: D102
        return self.estimate(rgb, intrinsics, detections)

    def estimate_hands(self, depth_m, intrinsics, detections):  # noqa: D102
        raise EstimatorError("this is an object model; it cannot estimate hands")


class HandEstimator:
    """DeepPrior++ with Feature Mapping: locate the hand, metric cube crop, h(g(f_R(crop))) -> joints."""

    task = "hands"

    def __init__(self, model: FeatureMappingModel, meta: dict[str, Any], device: str = "auto",
                 max_depth_m: float = 1.5, min_pixels: int = 200, max_detections: int = DEFAULT_MAX_DETECTIONS) -> None:
        if meta.get("task") != "hands":
            raise EstimatorError(f"checkpoint is for task {meta.get('task')!r}, not 'hands'")
        self.net = _Network(model, meta, resolve_device(device))
        self.device = str(self.net.device)
        self.joint_names = tuple(meta["hands"]["joint_names"])
        self.cube_m = float(meta["hands"]["cube_m"])
        self.crop_size = int(meta["crop"]["size"])
        self.max_depth_m, self.min_pixels = max_depth_m, min_pixels
        self.max_detections = _check_max_detections(max_detections)
        self.skipped: Counter[str] = Counter()
        if model.cfg.n_outputs != 3 * len(self.joint_names):
            raise EstimatorError(f"head has {model.cfg.n_outputs} outputs for {len(self.joint_names)} joints")

    def locate(self, depth_m: np.ndarray, intrinsics: geo.Intrinsics,
               detections: list[Detection2D] | None) -> list[np.ndarray]:
        """Hand centres (3,) metres: the closest object, inside each detection box when boxes are given."""
        if not detections:
            return [geo.locate_hand(depth_m, intrinsics.K, cube_m=self.cube_m, min_pixels=self.min_pixels,
                                    max_depth_m=self.max_depth_m)]
        centres = []
        h_img, w_img = depth_m.shape[:2]
        intr = geo.Intrinsics(1.0, 1.0, 0.0, 0.0, w_img, h_img)
        boxes = [b for b in (usable_box(d, intr) for d in detections)]
        self.skipped["bad_box"] += sum(b is None for b in boxes)
        order = sorted((i for i, b in enumerate(boxes) if b is not None),
                       key=lambda i: -_finite_score(detections[i].score))
        if len(order) > self.max_detections:
            self.skipped["max_detections"] += len(order) - self.max_detections
            order = sorted(order[: self.max_detections])
        for i in order:
            det = detections[i]
            x, y, w, h = (int(round(v)) for v in boxes[i])
            x0, y0 = max(x, 0), max(y, 0)
            x1, y1 = min(x + w, w_img), min(y + h, h_img)
            if x1 <= x0 or y1 <= y0:
                self.skipped["bad_box"] += 1
                log.debug("skipping hand box %s off the image", det.box_xywh)
                continue
            masked = np.full_like(depth_m, np.nan)
            masked[y0:y1, x0:x1] = depth_m[y0:y1, x0:x1]
            try:
                centres.append(geo.locate_hand(masked, intrinsics.K, cube_m=self.cube_m,
                                               min_pixels=self.min_pixels, max_depth_m=self.max_depth_m))
            except geo.GeometryError as err:
                log.debug("no hand in box %s: %s", det.box_xywh, err)
        return centres

    def estimate(self, depth_m: np.ndarray, intrinsics: geo.Intrinsics,
                 detections: list[Detection2D] | None = None) -> list[HandPose]:
        """Named 3D joints (metres, camera frame) with per-joint confidences for each located hand.

        Raises:
            EstimatorError: wrong shape/dtype, size mismatch, or no hand found in the depth image.
        """
        depth_m = np.asarray(depth_m)
        if depth_m.ndim != 2 or not np.issubdtype(depth_m.dtype, np.floating):
            raise EstimatorError(f"hands need an HxW float depth image in metres, got {depth_m.shape} {depth_m.dtype}")
        _check_intrinsics(depth_m.shape, intrinsics, "depth image")
        if not np.any(np.isfinite(depth_m) & (depth_m > 0)):
            raise EstimatorError("depth image has no valid pixel (all NaN, zero or negative)")
        try:
            centres = self.locate(depth_m, intrinsics, detections)
        except geo.GeometryError as err:
            # An empty scene is not an error: no hand, no output.
            log.debug("no hand found: %s", err)
            return []
        if not centres:
            return []
        crops, cubes = [], []
        for c in centres:
            crop, cube = geo.crop_depth_cube(depth_m, intrinsics.K, c, cube_m=self.cube_m, out=self.crop_size)
            crops.append(depth_to_input(crop))
            cubes.append(cube)
        outputs, ood = run_chunked(self.net, crops)
        hands = []
        for row, cube in enumerate(cubes):
            joints = cube.denormalise_joints(outputs[row].reshape(-1, 3))
            if not np.isfinite(joints).all():
                self.skipped["non_finite_output"] += 1
                log.debug("network output for the hand at %s is not finite; dropped", cube.centre)
                continue
            conf = joint_confidence(joints, depth_m, intrinsics.K)
            hands.append(HandPose(joints_xyz=joints, confidences=conf, centre=cube.centre, cube_m=self.cube_m,
                                  joint_names=self.joint_names, score=float(conf.mean()),
                                  out_of_domain=float(ood[row])))
        return hands

    def estimate_objects(self, rgb, intrinsics, detections):  # noqa: D102
        raise EstimatorError("this is a hand model; it cannot estimate objects")

    def estimate_hands(self, depth_m, intrinsics, detections):  # noqa: D102
        return self.estimate(depth_m, intrinsics, detections)


def joint_confidence(joints_xyz: np.ndarray, depth_m: np.ndarray, K: np.ndarray,
                     inside_m: tuple[float, float] = (-0.01, 0.04), falloff_m: float = 0.03) -> np.ndarray:
    """(J,) in [0, 1]: how well each joint agrees with the measured surface.

    A joint should lie a little behind the surface it projects onto (inside the finger: 0-40 mm
    on NYU). Confidence is 1 inside `inside_m` and falls linearly to 0 over `falloff_m` beyond it;
    a joint projecting onto invalid depth or off the image gets 0.5 (no evidence either way).
    """
    uvd = geo.xyz_to_uvd(joints_xyz, K)
    u = np.round(uvd[:, 0]).astype(int)
    v = np.round(uvd[:, 1]).astype(int)
    h, w = depth_m.shape
    conf = np.full(len(joints_xyz), 0.5)
    ok = (u >= 0) & (u < w) & (v >= 0) & (v < h)
    surface = np.full(len(joints_xyz), np.nan)
    surface[ok] = depth_m[v[ok], u[ok]]
    have = np.isfinite(surface) & (surface > 0)
    gap = uvd[:, 2] - surface
    outside = np.maximum(inside_m[0] - gap, gap - inside_m[1])
    conf[have] = np.clip(1.0 - np.maximum(outside[have], 0.0) / falloff_m, 0.0, 1.0)
    return conf


def load_estimator(model_path: str | Path, device: str = "auto", cpu_threads: int = 0,
                   max_detections: int = DEFAULT_MAX_DETECTIONS) -> ObjectEstimator | HandEstimator:
    """Rebuild the right estimator from a checkpoint alone (its JSON says the task).

    cpu_threads > 0 caps torch's intra-op threads: with other busy processes on the same cores,
    torch's default thread pool can stall for many times the work (seen here: 10-40x slower).

    Raises:
        featmap_ros.model.checkpoint.CheckpointError: missing, foreign, tampered or corrupt checkpoint.
    """
    if cpu_threads > 0:
        torch.set_num_threads(cpu_threads)
    model, meta = checkpoint.load(model_path, device="cpu", require_estimator_meta=True)
    cls = ObjectEstimator if meta["task"] == "objects" else HandEstimator
    return cls(model, meta, device=device, max_detections=max_detections)
