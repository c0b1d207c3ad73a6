"""Run-time inference: image + intrinsics (+ 2D detections) -> object poses or hand joints.

Pure Python, no ROS. The node, the bag replay and `featmap evaluate` all call these classes, so
what is scored off the robot is what runs on it. The network runs on a backend (featmap_ros.backends):
torch on a checkpoint, or ONNX Runtime on its export (`featmap export`); this module imports neither
torch nor onnxruntime itself, so the ONNX Runtime path runs where torch is not installed.

Checkpoint metadata this module reads (written by featmap_ros.train):
- objects: meta["objects"] = [{"obj_id", "name", "corners_m" (8x3), "extent_m" (3), "symmetric", optional
  "silhouette_m" (Mx3: the model's extreme vertices, whose projected box the training windows were
  cut around; what ObjectEstimator's recrop needs)}],
  meta["crop"] = {"size": S, "window_scale": s}; the head (net.head) has, per object in this order,
  16 outputs (bb8: corners, PnP) or 4 channels of a dense map (dense: visibility and model
  coordinates, PnP-RANSAC; heads/dense.py).
- hands: meta["hands"] = {"joint_names": [...], "cube_m": 0.3, optional "refiner": {"input_size",
  "iterations", "cube_m", ...} (model/refiner.py: its network runs on the backend's refine())},
  meta["crop"] = {"size": S}.
- both, optional: meta["feature_stats"] = {"mean": [D], "std": [D]} of synthetic features (f_S),
  for the out-of-domain score.
"""

from __future__ import annotations

import logging
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from featmap_ros import geometry as geo
from featmap_ros.backends import (
    BACKENDS,
    HAND_RECENTRE,
    MAX_RECENTRE,
    MAX_RECROP,
    PRECISIONS,
    BackendError,
    onnx_net,
)
from featmap_ros.errors import FeatmapError
from featmap_ros.heads.dense import DENSE_CHANNELS, DenseDecodeConfig
from featmap_ros.heads.dense import decode as decode_dense
from featmap_ros.heads.keypoints import KeypointDecodeConfig, keypoint_channels
from featmap_ros.heads.keypoints import decode as decode_keypoints
from featmap_ros.preprocess import depth_to_input, rgb_to_input
from featmap_ros.results import Detection2D, HandPose, ObjectPose

if TYPE_CHECKING:  # imports torch: the estimator reaches it only for the torch backend
    from featmap_ros.model.nets import FeatureMappingModel

log = logging.getLogger(__name__)


class EstimatorError(FeatmapError, ValueError):
    """The estimator got input it cannot use (the message says what was expected)."""


DEFAULT_MAX_DETECTIONS = 32
NETWORK_CHUNK = 16  # crops per forward pass: bounds the memory of one frame whatever the detection count
BB8_OUTPUTS = 16  # per object: 8 corners (u, v) normalised to the crop


@dataclass(frozen=True)
class ObjectModelInfo:
    """What the estimator knows of one object: id, name, box corners (8, 3) and extent (3,) in metres,
    and the keypoint head's model keypoints (n, 3) where the checkpoint has them."""

    obj_id: int
    name: str
    corners: np.ndarray
    extent: np.ndarray
    symmetric: bool
    keypoints: np.ndarray | None = None
    silhouette: np.ndarray | None = None  # (M, 3) extreme vertices: their projected box is a training window's box


def _network(model: Any, meta: dict[str, Any], device: str) -> Any:
    """A backend network as it is (it has run()), or a torch FeatureMappingModel put on `device`."""
    if hasattr(model, "run"):
        return model
    from featmap_ros.backends.torch_net import TorchNetwork, resolve_device

    return TorchNetwork(model, meta, resolve_device(device))


def _check_int(name: str, n: Any, low: int, high: int | None = None) -> int:
    """n itself if it is an int (not a bool) in [low, high] (high None: no upper bound), else EstimatorError."""
    if isinstance(n, bool) or not isinstance(n, int) or n < low or (high is not None and n > high):
        bounds = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise EstimatorError(f"{name} must be an integer {bounds}, got {n!r}")
    return n


def _finite_score(score: float) -> float:
    s = float(score)
    return s if np.isfinite(s) else -np.inf


def usable_box(det: Detection2D, width: int, height: int) -> np.ndarray | None:
    """The detection's (x, y, w, h) as float64 when finite, larger than a pixel and on a width x height image."""
    try:
        box = np.asarray(det.box_xywh, dtype=np.float64).reshape(4)
    except (TypeError, ValueError):
        log.debug("skipping detection with malformed box %r", det.box_xywh)
        return None
    x, y, w, h = box
    if not (np.isfinite(box).all() and w > 1 and h > 1):
        log.debug("skipping detection with degenerate box %s", box)
        return None
    if x + w <= 0 or y + h <= 0 or x >= width or y >= height:
        log.debug("skipping detection with box %s off the image", box)
        return None
    return box


def run_chunked(net: Any, crops: list[np.ndarray], chunk: int = NETWORK_CHUNK,
                objects: list[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """net.run() over crops (C, S, S) in chunks of at most `chunk`; outputs and scores concatenated.

    objects: each crop's object index (object models): the outputs are then each crop's own object's.
    """
    index = None if objects is None else np.asarray(objects, dtype=np.int64)
    parts = [net.run(np.stack(crops[i:i + chunk]), *(() if index is None else (index[i:i + chunk],)))
             for i in range(0, len(crops), chunk)]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def _check_intrinsics(shape: tuple[int, ...], intrinsics: geo.Intrinsics, what: str) -> None:
    h, w = shape[:2]
    if (w, h) != (intrinsics.width, intrinsics.height):
        raise EstimatorError(
            f"{what} is {w}x{h} but camera_info says {intrinsics.width}x{intrinsics.height}"
        )


class ObjectEstimator:
    """Objects with Feature Mapping: crops on 2D detections -> h(g(f_R(crop))) -> pose.

    The checkpoint's head decides the decoding: 8 corners -> PnP (bb8), dense correspondences ->
    PnP with the inlier ratio as confidence (dense), or keypoint vector fields -> RANSAC voting,
    then PnP, with the voters' agreement as confidence (keypoints).
    """

    task = "objects"

    def __init__(self, model: FeatureMappingModel | Any, meta: dict[str, Any], device: str = "auto",
                 pnp_method: str = "epnp", ransac: bool = False, dense_cfg: DenseDecodeConfig | None = None,
                 max_detections: int = DEFAULT_MAX_DETECTIONS, decode_threads: int = 1,
                 keypoint_cfg: KeypointDecodeConfig | None = None, recrop: int = 0) -> None:
        """model: a torch FeatureMappingModel (run on `device`) or a backend network (featmap_ros.backends).

        recrop: after the first pose, cut each crop again around the box that pose projects the object
        to (as the training windows were cut around the rendered object) and estimate again, this many
        times (0 to MAX_RECROP; needs the checkpoint's silhouette_m). It undoes the detector's box error
        at the cost of one more network pass and decode per pass; a pass that fails keeps the pose before.

        decode_threads > 1 solves the detections' PnP in that many threads (OpenCV releases the GIL), with
        the poses and counts of one thread; on the project's 2-core CPU it gave no reliable gain
        (docs/results.md), so 1 is the default.
        """
        if meta.get("task") != "objects":
            raise EstimatorError(f"checkpoint is for task {meta.get('task')!r}, not 'objects'")
        self.net = _network(model, meta, device)
        self.device = str(self.net.device)
        self.objects = [
            ObjectModelInfo(int(o["obj_id"]), str(o["name"]), np.asarray(o["corners_m"], dtype=np.float64),
                            np.asarray(o["extent_m"], dtype=np.float64), bool(o.get("symmetric", False)),
                            np.asarray(o["keypoints_m"], dtype=np.float64) if "keypoints_m" in o else None,
                            np.asarray(o["silhouette_m"], dtype=np.float64) if "silhouette_m" in o else None)
            for o in meta["objects"]
        ]
        _check_int("recrop", recrop, 0, MAX_RECROP)
        if recrop and any(o.silhouette is None for o in self.objects):
            raise EstimatorError("recrop needs every object's silhouette_m in the checkpoint (models trained "
                                 "before it was recorded have none): retrain, or set recrop 0")
        self.recrop = recrop
        self.index = {o.obj_id: i for i, o in enumerate(self.objects)}
        self.by_name = {o.name: i for i, o in enumerate(self.objects)}
        self.crop_size = int(meta["crop"]["size"])
        self.window_scale = float(meta["crop"].get("window_scale", 1.0))
        self.pnp_method, self.ransac = pnp_method, ransac
        self.head = self.net.head
        self.max_detections = _check_int("max_detections", max_detections, 1)
        self.decode_threads = _check_int("decode_threads", decode_threads, 1)
        self._pool = (ThreadPoolExecutor(decode_threads, thread_name_prefix="featmap-pnp")
                      if decode_threads > 1 else None)
        self.skipped: Counter[str] = Counter()
        self.dense_cfg = dense_cfg or DenseDecodeConfig()
        self.keypoint_cfg = keypoint_cfg or KeypointDecodeConfig()
        self.per_object = DENSE_CHANNELS if self.head == "dense" else BB8_OUTPUTS
        if self.head == "keypoints":
            counts = {None if o.keypoints is None else len(o.keypoints) for o in self.objects}
            if None in counts or len(counts) != 1:
                raise EstimatorError("a keypoint head needs every object's keypoints_m, all of one count")
            self.per_object = keypoint_channels(counts.pop())
        if self.net.n_outputs != self.per_object * len(self.objects):
            raise EstimatorError(
                f"{self.head} head has {self.net.n_outputs} outputs for {len(self.objects)} objects; "
                f"expected {self.per_object} each"
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
            box = usable_box(det, intrinsics.width, intrinsics.height)
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
        found = self._estimate_windows(rgb, intrinsics.K, chosen, count=True)
        for _ in range(self.recrop):
            windows = [(i, k, self._window_of(p, intrinsics)) for i, k, p in found]
            again = [(i, k, win) for i, k, win in windows if win is not None]
            better = {i: p for i, _, p in self._estimate_windows(rgb, intrinsics.K, again, count=False)}
            found = [(i, k, better.get(i, p)) for i, k, p in found]
        for i, _, p in found:
            # The score is the detection's, times the pose's own confidence (dense head: the RANSAC inlier
            # ratio, scaled down when few locations are visible).
            p.score *= float(detections[i].score)
        return [p for _, _, p in found]

    def _window_of(self, pose: ObjectPose, intrinsics: geo.Intrinsics) -> geo.CropWindow | None:
        """The crop window around the box pose projects the object's silhouette to, or None when unusable."""
        info = self.objects[self.index[pose.obj_id]]
        try:
            uv = geo.project_model(info.silhouette, pose.R, pose.t, intrinsics.K)
        except geo.GeometryError:
            return None
        lo, hi = uv.min(axis=0), uv.max(axis=0)
        box = usable_box(Detection2D(np.r_[lo, hi - lo], obj_id=pose.obj_id), intrinsics.width, intrinsics.height)
        return None if box is None else geo.CropWindow.around_box(box, self.crop_size, self.window_scale)

    def _estimate_windows(self, rgb: np.ndarray, K: np.ndarray, chosen: list[tuple[int, int, geo.CropWindow]],
                          count: bool) -> list[tuple[int, int, ObjectPose]]:
        """(detection index, object index, pose) of each window that gives a finite pose in front of the
        camera, its score the pose's confidence alone; count: add what is dropped to self.skipped."""
        if not chosen:
            return []
        skipped: Counter[str] = self.skipped if count else Counter()
        # Each crop's own object's outputs only (the dense head then computes no other object's channels).
        outputs, ood = run_chunked(self.net, [rgb_to_input(win.crop(rgb)) for _, _, win in chosen],
                                   objects=[k for _, k, _ in chosen])
        if outputs.shape[1] != self.per_object:
            raise EstimatorError(f"the network gave {outputs.shape[1]} outputs per crop for one object; "
                                 f"expected {self.per_object}")
        todo = []
        for row, (i, k, win) in enumerate(chosen):
            if not np.isfinite(outputs[row]).all():
                skipped["non_finite_output"] += 1
                log.debug("network output for object %d is not finite; dropped", self.objects[k].obj_id)
                continue
            todo.append((row, i, k, win))

        def attempt(item: tuple[int, int, int, geo.CropWindow]) -> tuple | geo.GeometryError:
            row, _, k, win = item
            try:
                return self.solve(outputs[row], k, win, K)
            except geo.GeometryError as err:
                return err

        solved = (list(self._pool.map(attempt, todo)) if self._pool is not None and len(todo) > 1
                  else [attempt(item) for item in todo])
        poses = []
        for (row, i, k, _), found in zip(todo, solved, strict=True):
            info = self.objects[k]
            if isinstance(found, geo.GeometryError):
                skipped["pnp_failed"] += 1
                log.debug("PnP failed for object %d: %s", info.obj_id, found)
                continue
            R, t, uv, confidence = found
            if not (np.isfinite(R).all() and np.isfinite(t).all() and np.isfinite(uv).all()):
                skipped["non_finite_output"] += 1
                continue
            if t[2] <= 0:
                skipped["behind_camera"] += 1
                log.debug("PnP put object %d behind the camera; skipped", info.obj_id)
                continue
            poses.append((i, k, ObjectPose(obj_id=info.obj_id, name=info.name, R=R, t=t, corners_uv=uv,
                                           corners_3d=info.corners, extent=info.extent, score=float(confidence),
                                           out_of_domain=float(ood[row]))))
        return poses

    def solve(self, out: np.ndarray, k: int, win: geo.CropWindow, K: np.ndarray
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
        """(R, t, corners' image points, confidence) from object k's finite head output (its per_object
        channels) in crop window win of the camera K, decoded as the checkpoint's head; raises geo.GeometryError."""
        info = self.objects[k]
        if self.head == "dense":
            found = decode_dense(out, win, K, info.corners.min(axis=0), info.extent, self.dense_cfg)
            return found.R, found.t, geo.project_model(info.corners, found.R, found.t, K), found.confidence
        if self.head == "keypoints":
            found = decode_keypoints(out, win, K, info.keypoints, self.keypoint_cfg)
            return found.R, found.t, geo.project_model(info.corners, found.R, found.t, K), found.confidence
        uv = win.to_image(geo.denormalise_uv(out.reshape(8, 2), self.crop_size))
        R, t = geo.solve_pnp(info.corners, uv, K, method=self.pnp_method, ransac=self.ransac)
        return R, t, uv, 1.0

    # The Estimator protocol of featmap_ros.ros.processor.
    def estimate_objects(self, rgb, intrinsics, detections):  # noqa: D102
        return self.estimate(rgb, intrinsics, detections)

    def estimate_hands(self, depth_m, intrinsics, detections):  # noqa: D102
        raise EstimatorError("this is an object model; it cannot estimate hands")


class HandEstimator:
    """DeepPrior++ with Feature Mapping: locate the hand, refine the centre, cube crop, h(g(f_R(crop))) -> joints.

    The centre refiner runs when the checkpoint carries one (meta hands.refiner) and `refine` is on:
    from the located centre, `iterations` times, crop the refiner's cube there and move the centre
    by its predicted offset to the palm (DeepPrior++'s refinement step). After the joints, `recentre`
    passes crop again around the palm they found and run the joints network there.
    """

    task = "hands"

    def __init__(self, model: FeatureMappingModel | Any, meta: dict[str, Any], device: str = "auto",
                 max_depth_m: float = 1.5, min_pixels: int = 200, max_detections: int = DEFAULT_MAX_DETECTIONS,
                 refine: bool = True, recentre: int = HAND_RECENTRE) -> None:
        """model: a torch FeatureMappingModel (run on `device`) or a backend network (featmap_ros.backends).

        refine: use the checkpoint's centre refiner, where it has one (False: the located centre, as
        without one).
        recentre: passes that crop each hand again around the palm its joints put it at and run the
        joints network there (0 to MAX_RECENTRE, one network pass each): the joints network was trained
        on crops about its palm, and the refined centre is still ~1 cm off it. A hand whose pass
        fails keeps its pose (counted as 'non_finite_recentre' or 'recentre_out_of_range').

        Raises:
            EstimatorError: another task, a head that does not fit the joints, or a refiner the
                network cannot run (a bare torch model: load it with load_estimator).
        """
        if meta.get("task") != "hands":
            raise EstimatorError(f"checkpoint is for task {meta.get('task')!r}, not 'hands'")
        self.net = _network(model, meta, device)
        self.device = str(self.net.device)
        self.joint_names = tuple(meta["hands"]["joint_names"])
        self.cube_m = float(meta["hands"]["cube_m"])
        self.crop_size = int(meta["crop"]["size"])
        self.max_depth_m, self.min_pixels = max_depth_m, min_pixels
        self.max_detections = _check_int("max_detections", max_detections, 1)
        self.skipped: Counter[str] = Counter()
        self.recentre = _check_int("recentre", recentre, 0, MAX_RECENTRE)
        if self.net.n_outputs != 3 * len(self.joint_names):
            raise EstimatorError(f"head has {self.net.n_outputs} outputs for {len(self.joint_names)} joints")
        self.palm = self.joint_names.index("palm") if "palm" in self.joint_names else None
        if self.palm is None and self.recentre:
            log.warning("recentre needs a 'palm' joint and this checkpoint's joints have none: recentre off")
            self.recentre = 0
        refiner = meta["hands"].get("refiner")
        self.refine = bool(refine) and refiner is not None
        self.refine_iterations = int(refiner["iterations"]) if refiner else 0
        self.refine_cube_m = float(refiner["cube_m"]) if refiner else self.cube_m
        self.refine_size = int(refiner["input_size"]) if refiner else 0
        if self.refine and not getattr(self.net, "has_refiner", False):
            raise EstimatorError("the checkpoint describes a centre refiner but this network cannot run it (a bare "
                                 "torch model or an export made before it was attached): load the model with "
                                 "load_estimator, export it again, or pass refine=False")

    def refine_centres(self, depth_m: np.ndarray, K: np.ndarray, centres: list[np.ndarray]) -> list[np.ndarray]:
        """Move each located centre (3,) metres towards the palm with the refiner, `iterations` crop-and-move steps.

        A hand whose offset is non-finite keeps its last finite centre and is not moved again (counted
        as skipped 'non_finite_refine'); so is one whose step would put the centre too close to the
        camera for a cube ('refine_out_of_range').
        """
        current = [np.asarray(c, dtype=np.float64) for c in centres]
        moving = list(range(len(current)))
        half = self.refine_cube_m / 2.0
        nearest = max(self.cube_m, self.refine_cube_m) / 2.0
        for _ in range(self.refine_iterations):
            if not moving:
                break
            crops, croppable = [], []
            for k in moving:
                try:
                    crop, _ = geo.crop_depth_cube(depth_m, K, current[k], cube_m=self.refine_cube_m,
                                                  out=self.refine_size)
                except geo.GeometryError as err:  # a located centre closer than the refiner's half cube
                    self.skipped["refine_out_of_range"] += 1
                    log.debug("no refiner crop at %s: %s", current[k], err)
                    continue
                crops.append(depth_to_input(crop))
                croppable.append(k)
            if not crops:
                break
            moving = croppable
            offsets = np.concatenate([self.net.refine(np.stack(crops[i:i + NETWORK_CHUNK]))
                                      for i in range(0, len(crops), NETWORK_CHUNK)])
            still = []
            for k, offset in zip(moving, offsets, strict=True):
                moved = current[k] + offset * half
                if not np.isfinite(offset).all():
                    self.skipped["non_finite_refine"] += 1
                    log.debug("refiner offset for the hand at %s is not finite; keeping that centre", current[k])
                elif moved[2] <= nearest:
                    self.skipped["refine_out_of_range"] += 1
                    log.debug("refiner moved the hand at %s to %s, too close for a cube; keeping it", current[k], moved)
                else:
                    current[k] = moved
                    still.append(k)
            moving = still
        return current

    def locate(self, depth_m: np.ndarray, intrinsics: geo.Intrinsics,
               detections: list[Detection2D] | None) -> list[np.ndarray]:
        """Hand centres (3,) metres: the closest object, inside each detection box when boxes are given."""
        if not detections:
            return [geo.locate_hand(depth_m, intrinsics.K, cube_m=self.cube_m, min_pixels=self.min_pixels,
                                    max_depth_m=self.max_depth_m)]
        centres = []
        h_img, w_img = depth_m.shape[:2]
        boxes = [usable_box(d, w_img, h_img) for d in detections]
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
        if self.refine:
            centres = self.refine_centres(depth_m, intrinsics.K, centres)
        hands = self._joints_at(depth_m, intrinsics.K, centres)
        self._recentre(depth_m, intrinsics.K, hands)  # no passes where the joints have no palm (recentre 0)
        if None in hands:
            self.skipped["non_finite_output"] += hands.count(None)
        return [h for h in hands if h is not None]

    def _recentre(self, depth_m: np.ndarray, K: np.ndarray, hands: list[HandPose | None]) -> None:
        """`recentre` times, replace each hand by the joints network's pass on the cube crop at its palm, in place.

        A hand stops at its last pose when its palm leaves the first pass's cube (where the hand was
        located and refined: a pass never wanders further, onto a neighbour) or comes nearer the camera
        than half a cube (both counted 'recentre_out_of_range'), or when the new pass is not finite
        ('non_finite_recentre').
        """
        half = self.cube_m / 2.0
        first = {i: h.centre for i, h in enumerate(hands) if h is not None}

        def croppable(i: int, palm: np.ndarray) -> bool:
            return bool(palm[2] > half and np.all(np.abs(palm - first[i]) <= half))

        moving = list(first)
        for _ in range(self.recentre):
            palms = {i: hands[i].joints_xyz[self.palm].copy() for i in moving}  # type: ignore[union-attr]
            usable = [i for i in moving if croppable(i, palms[i])]
            if len(usable) < len(moving):
                self.skipped["recentre_out_of_range"] += len(moving) - len(usable)
            if not usable:
                return
            moving = []
            for i, pose in zip(usable, self._joints_at(depth_m, K, [palms[i] for i in usable]), strict=True):
                if pose is None:
                    self.skipped["non_finite_recentre"] += 1
                else:
                    hands[i] = pose
                    moving.append(i)

    def _joints_at(self, depth_m: np.ndarray, K: np.ndarray, centres: list[np.ndarray]) -> list[HandPose | None]:
        """One network pass on the cube crops at `centres`: a HandPose each, None where the output is not finite."""
        crops, cubes = [], []
        for c in centres:
            crop, cube = geo.crop_depth_cube(depth_m, K, c, cube_m=self.cube_m, out=self.crop_size)
            crops.append(depth_to_input(crop))
            cubes.append(cube)
        outputs, ood = run_chunked(self.net, crops)
        hands: list[HandPose | None] = []
        for row, cube in enumerate(cubes):
            joints = cube.denormalise_joints(outputs[row].reshape(-1, 3))
            if not np.isfinite(joints).all():
                log.debug("network output for the hand at %s is not finite; dropped", cube.centre)
                hands.append(None)
                continue
            conf = joint_confidence(joints, depth_m, K)
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


def model_meta(model_path: str | Path) -> dict[str, Any]:
    """The metadata of a checkpoint or of an ONNX export (task, objects, crop, ...), without loading weights.

    Raises:
        featmap_ros.model.checkpoint.CheckpointError or BackendError: a missing or foreign JSON.
    """
    if onnx_net.is_export(model_path):
        return onnx_net.read_export(model_path, verify=False)
    from featmap_ros.model.checkpoint import read_meta  # imports torch: checkpoints are torch's

    return read_meta(model_path)


def choose_backend(model_path: str | Path, backend: str = "auto") -> str:
    """'torch' or 'onnxruntime' for a model path; 'auto' takes onnxruntime when installed and the model has an
    export (the path is one, or one made from the same weights lies beside the checkpoint), else torch.

    Raises:
        BackendError: an unknown backend, or one that cannot run this model.
    """
    if backend not in BACKENDS:
        raise BackendError(f"backend {backend!r} is unknown; expected one of {list(BACKENDS)}")
    if backend == "torch":
        if onnx_net.is_export(model_path):
            raise BackendError(f"{model_path} is an ONNX export; backend torch needs the checkpoint it was made "
                               "from (or use backend onnxruntime)")
        return "torch"
    export = onnx_net.find_export(model_path)
    if backend == "auto":
        # An export's own path has no torch alternative: without onnxruntime it fails naming the package.
        usable = onnx_net.is_export(model_path) or onnx_net.onnxruntime_available()
        return "onnxruntime" if export is not None and usable else "torch"
    if export is None:
        raise BackendError(f"backend onnxruntime needs an ONNX export of {model_path}: run `featmap export "
                           f"--model {model_path} --out DIR` and give DIR/<stem>{onnx_net.EXPORT_SUFFIX}")
    return "onnxruntime"


def load_estimator(model_path: str | Path, device: str = "auto", cpu_threads: int = 0,
                   max_detections: int = DEFAULT_MAX_DETECTIONS,
                   backend: str | None = None, refine: bool = True,
                   decode_threads: int = 1, precision: str = "auto", recrop: int = 0,
                   recentre: int = HAND_RECENTRE) -> ObjectEstimator | HandEstimator:
    """Rebuild the right estimator from a checkpoint or its ONNX export alone (its JSON says the task).

    backend: 'torch', 'onnxruntime' or 'auto' (choose_backend: what the node and the CLI default to);
    None, for library callers: onnxruntime for an export's path, torch for a checkpoint's, whatever
    lies beside it. cpu_threads > 0 caps the network's intra-op threads: with other busy processes
    on the same cores, a default thread pool can stall for many times the work (seen with torch:
    10-40x slower). refine: hands only, use the checkpoint's centre refiner where it has one.
    decode_threads: objects only, threads that solve the detections' PnP (ObjectEstimator).
    recrop: objects only, passes that cut the crop again around the pose found (ObjectEstimator).
    recentre: hands only, passes that crop again around the palm found (HandEstimator).
    precision: the torch backend's (backends.torch_net.TorchNetwork): "auto" (half on CUDA, float32 on a
    CPU), "float32" or "bf16" (bf16 autocast where the device has native bf16); not for onnxruntime.

    Raises:
        featmap_ros.model.checkpoint.CheckpointError: missing, foreign, tampered or corrupt checkpoint.
        BackendError: the backend cannot run here (package, device) or the export is foreign or corrupt.
    """
    if precision not in PRECISIONS:
        raise BackendError(f"precision must be one of {list(PRECISIONS)}, got {precision!r}")
    if backend is None:
        backend = "onnxruntime" if onnx_net.is_export(model_path) else "torch"
    if choose_backend(model_path, backend) == "onnxruntime":
        if precision != "auto":
            raise BackendError(f"precision {precision!r} is the torch backend's; onnxruntime runs its export as "
                               "exported (float32): use backend torch, or precision auto")
        export = onnx_net.find_export(model_path)
        assert export is not None  # choose_backend said so
        net: Any = onnx_net.OnnxNetwork(export, device, cpu_threads=cpu_threads, max_batch=NETWORK_CHUNK)
    else:
        from featmap_ros.backends import torch_net

        net = torch_net.load(model_path, device, cpu_threads=cpu_threads, precision=precision)
    if net.meta["task"] == "objects":
        return ObjectEstimator(net, net.meta, device=device, max_detections=max_detections,
                               decode_threads=decode_threads, recrop=recrop)
    return HandEstimator(net, net.meta, device=device, max_detections=max_detections, refine=refine,
                         recentre=recentre)
