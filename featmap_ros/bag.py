"""rosbag2 tools: make replay bags (BOP scenes, synthetic hand sequences, NYU frames), replay them
through the node's processing path and score the output against the ground truth in the bag.

Bags are written with rosbags (version 8: they play on Humble and Jazzy; MCAP by default, sqlite3
on request). Ground truth travels in the bag itself:
- objects: vision_msgs/Detection3DArray on /ground_truth/objects, one detection per annotated
  instance: results[0].pose.pose = the model-to-camera pose, hypothesis.class_id = the object id,
  hypothesis.score = the instance's visib_fract (how much of it is visible); also TF frames gt/<name>.
- hands: featmap_ros/HandJointsArray on /ground_truth/hands (joints in the camera frame, metres).
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from rosbags.highlevel import AnyReader
from rosbags.rosbag2 import StoragePlugin, Writer
from tqdm import tqdm

from featmap_ros import evaluation as ev
from featmap_ros.datasets import bop
from featmap_ros.geometry import Intrinsics, matrix_from_quat
from featmap_ros.results import Detection2D, FrameResult, HandPose
from featmap_ros.ros.config import NodeConfig
from featmap_ros.ros.messages import MessageFactory, stamp_ns_of
from featmap_ros.ros.processor import FrameProcessor, ProcessorOutput
from featmap_ros.ros.typestore import typestore

log = logging.getLogger(__name__)

START_NS = 1_700_000_000_000_000_000  # an arbitrary, plausible wall-clock start for made bags
STORAGES = {"mcap": StoragePlugin.MCAP, "sqlite3": StoragePlugin.SQLITE3}


class BagError(RuntimeError):
    """A bag cannot be written, read or evaluated (the message names what was found)."""


@dataclass(frozen=True)
class BagTopics:
    """Topic names of one task's bag; detections is None when the task runs without them."""

    image: str
    camera_info: str
    detections: str | None
    ground_truth: str
    camera_frame: str


TOPICS = {
    "objects": BagTopics("/camera/color/image_raw", "/camera/color/camera_info", "/camera/color/detections",
                         "/ground_truth/objects", "camera_color_optical_frame"),
    "hands": BagTopics("/camera/depth/image_raw", "/camera/depth/camera_info", None, "/ground_truth/hands",
                       "camera_depth_optical_frame"),
}
GT_TYPES = {"objects": "vision_msgs/msg/Detection3DArray", "hands": "featmap_ros/msg/HandJointsArray"}


# --------------------------------------------------------------------------------------------
# Writing


class BagWriter:
    """A rosbag2 writer that serialises our message objects; connections are added on first use."""

    def __init__(self, path: Path, storage: str = "mcap", distro: str = "humble") -> None:
        if storage not in STORAGES:
            raise BagError(f"storage {storage!r} is unknown; expected one of {sorted(STORAGES)}")
        self.path = Path(path)
        if self.path.exists():
            shutil.rmtree(self.path)
        self.ts = typestore(distro)
        self.factory = MessageFactory.for_rosbags(self.ts)
        self.writer = Writer(self.path, version=8, storage_plugin=STORAGES[storage])
        self.connections: dict[tuple[str, str], Any] = {}

    def __enter__(self) -> BagWriter:
        self.writer.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.writer.close()

    def _connection(self, topic: str, msgtype: str, msgdef: str | None = None, rihs01: str | None = None) -> Any:
        key = (topic, msgtype)
        if key not in self.connections:
            if msgtype in self.ts.fielddefs:  # our store knows it: the definition we write is the canonical one
                self.connections[key] = self.writer.add_connection(topic, msgtype, typestore=self.ts)
            else:  # a foreign type copied from an input bag keeps the definition it came with
                self.connections[key] = self.writer.add_connection(topic, msgtype, msgdef=msgdef, rihs01=rihs01)
        return self.connections[key]

    def write(self, topic: str, msgtype: str, t_ns: int, msg: Any) -> None:
        """Serialise and write one message at log time t_ns."""
        self.writer.write(self._connection(topic, msgtype), t_ns, self.ts.serialize_cdr(msg, msgtype))

    def write_raw(self, topic: str, msgtype: str, t_ns: int, data: bytes, msgdef: str | None = None,
                  rihs01: str | None = None) -> None:
        """Copy one already-serialised message (e.g. from an input bag)."""
        self.writer.write(self._connection(topic, msgtype, msgdef, rihs01), t_ns, data)


def object_name_map(infos: dict[int, bop.ObjectInfo], names: dict[int, str] | None) -> dict[int, str]:
    """Object id -> name (the id as text where no name is known)."""
    return {i: (names or {}).get(i, str(i)) for i in infos}


def _disturb(dets: list[Detection2D], intr: Intrinsics, rng: np.random.Generator, miss_rate: float,
             false_rate: float, ids: list[int]) -> list[Detection2D]:
    """Drop some detections and add false ones (random boxes labelled with a random object)."""
    kept = [d for d in dets if rng.random() >= miss_rate]
    if rng.random() < false_rate:
        w, h = rng.uniform(30, 120, 2)
        x, y = rng.uniform(0, intr.width - w), rng.uniform(0, intr.height - h)
        kept.append(Detection2D([x, y, w, h], score=float(rng.uniform(0.3, 0.9)), obj_id=int(rng.choice(ids))))
    return kept


def make_bop_bag(root: Path, scene_id: int, out: Path, frames: str | None = None, storage: str = "mcap",
                 distro: str = "humble", detections: str = "gt", miss_rate: float = 0.0, false_rate: float = 0.0,
                 seed: int = 0, period_s: float = 0.1, names: dict[int, str] | None = None,
                 topics: BagTopics = TOPICS["objects"]) -> Path:
    """Write a replay bag of a BOP scene: rgb8 images, camera_info, 2D detections and ground truth."""
    from featmap_ros.experiments.bop_eval import JitterConfig, detections_for_frame, gt_pose

    scene = bop.BopScene(root, scene_id)
    infos = bop.load_models_info(Path(root) / "models" / "models_info.json")
    names = object_name_map(infos, names)
    ids = bop.select_ids(frames, scene.image_ids)
    rng = np.random.default_rng(seed)
    with BagWriter(out, storage, distro) as bw:
        f = bw.factory
        for k, im_id in enumerate(tqdm(ids, desc="bag make", unit="frame")):
            frame = scene.frame(im_id)
            t = START_NS + int(round(k * period_s * 1e9))
            rgb = bop.read_rgb(frame.rgb_path)
            dets = detections_for_frame(frame, detections, rng, JitterConfig(seed=seed))
            dets = _disturb(dets, frame.intrinsics, rng, miss_rate, false_rate, sorted(infos))
            gts = [replace(gt_pose(i, infos[i.obj_id], names[i.obj_id]), score=i.visib_fract)
                   for i in frame.instances]
            gt = FrameResult(stamp_ns=t, frame_id=topics.camera_frame, objects=gts)
            bw.write(topics.image, "sensor_msgs/msg/Image", t, f.image_rgb(rgb, t, topics.camera_frame))
            bw.write(topics.camera_info, "sensor_msgs/msg/CameraInfo", t,
                     f.camera_info(frame.intrinsics, t, topics.camera_frame))
            if topics.detections:
                bw.write(topics.detections, "vision_msgs/msg/Detection2DArray", t,
                         f.detection2d_array(dets, t, topics.camera_frame))
            bw.write(topics.ground_truth, GT_TYPES["objects"], t, f.detection3d_array(gt))
            bw.write("/tf", "tf2_msgs/msg/TFMessage", t, f.tf_message(f.transforms(gt, prefix="gt/")))
    return Path(out)


def write_hand_frames(out: Path, frames: Iterator[tuple[np.ndarray, np.ndarray]], intr: Intrinsics,
                      storage: str = "mcap", distro: str = "humble", period_s: float = 1 / 30,
                      cube_m: float = 0.3, topics: BagTopics = TOPICS["hands"], total: int | None = None) -> Path:
    """Write (depth metres, joints (14, 3) metres) frames as 16UC1 images + camera_info + ground truth."""
    from featmap_ros.datasets.nyu import JOINT_NAMES, PALM

    with BagWriter(out, storage, distro) as bw:
        f = bw.factory
        for k, (depth, joints) in enumerate(tqdm(frames, desc="bag make", unit="frame", total=total)):
            t = START_NS + int(round(k * period_s * 1e9))
            gt = HandPose(joints_xyz=joints, confidences=np.ones(len(joints)), centre=joints[PALM], cube_m=cube_m,
                          joint_names=JOINT_NAMES)
            bw.write(topics.image, "sensor_msgs/msg/Image", t, f.image_depth(depth, t, topics.camera_frame, "16UC1"))
            bw.write(topics.camera_info, "sensor_msgs/msg/CameraInfo", t, f.camera_info(intr, t, topics.camera_frame))
            bw.write(topics.ground_truth, GT_TYPES["hands"], t,
                     f.hand_joints_array(FrameResult(stamp_ns=t, frame_id=topics.camera_frame, hands=[gt])))
    return Path(out)


def hand_sequence(n_frames: int, seed: int = 0, shape: Any = None, sensor_config: Any = None,
                  keyframe_every: int = 15) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """A smoothly moving synthetic hand in the depth-sensor domain: (noisy depth, joints) per frame.

    Poses are drawn every `keyframe_every` frames and interpolated (articulation linearly, rotation
    by slerp, position linearly); the background scene stays fixed, the sensor noise does not.
    """
    from scipy.spatial.transform import Rotation, Slerp

    from featmap_ros.datasets.nyu import NYU_INTRINSICS, PALM
    from featmap_ros.render import sensor
    from featmap_ros.render.hand import HandPose as HandPoseParams
    from featmap_ros.render.hand import HandRenderer, HandShape, sample_poses

    rng = np.random.default_rng(seed)
    shape = shape if shape is not None else HandShape.nominal()
    sensor_config = sensor_config if sensor_config is not None else sensor.SensorConfig.test_time()
    K = NYU_INTRINSICS.K
    n_keys = max(2, int(np.ceil(n_frames / keyframe_every)) + 1)
    keys = sample_poses(rng, n_keys, shape, NYU_INTRINSICS)
    key_t = np.arange(n_keys) * keyframe_every
    slerp = Slerp(key_t, Rotation.from_matrix(keys.R_h2c))
    renderer = HandRenderer(NYU_INTRINSICS)
    scene_seed = int(rng.integers(2**31))
    for k in range(n_frames):
        i = min(k // keyframe_every, n_keys - 2)
        a = (k - key_t[i]) / keyframe_every
        pose = HandPoseParams(
            articulation=((1 - a) * keys.articulation[i] + a * keys.articulation[i + 1])[None],
            R_h2c=slerp([k]).as_matrix(),
            t_h2c=((1 - a) * keys.t_h2c[i] + a * keys.t_h2c[i + 1])[None],
        )
        out = renderer.render(shape, pose)
        joints = out.geometry.nyu_joints[0]
        scene = sensor.compose_scene(out.depth[0], K, np.random.default_rng(scene_seed), hand_centre_xyz=joints[PALM])
        yield sensor.apply(scene, K, rng, sensor_config), joints


def nyu_frames(nyu_dir: Path, split: str = "test", max_frames: int | None = None
               ) -> tuple[Iterator[tuple[np.ndarray, np.ndarray]], int]:
    """(depth, joints) of NYU-format frames: a split with joint_data.mat, or depth PNGs with *_joints_uvd.txt."""
    from featmap_ros.datasets import nyu

    folder = Path(nyu_dir) / split if (Path(nyu_dir) / split).is_dir() else Path(nyu_dir)
    if (folder / "joint_data.mat").is_file():
        s = nyu.read_split(folder)
        pairs = list(zip(s.depth_paths, s.joints_xyz))
    else:
        pairs = [(p, nyu.joints_uvd_to_xyz(nyu.read_joints_uvd_txt(p.with_name(p.stem + "_joints_uvd.txt"))))
                 for p in sorted(folder.glob("depth_*.png")) if p.with_name(p.stem + "_joints_uvd.txt").is_file()]
    if not pairs:
        raise BagError(f"no NYU frames in {folder}: expected joint_data.mat or depth_*.png with *_joints_uvd.txt")
    pairs = pairs[:max_frames] if max_frames else pairs
    return ((nyu.read_depth(p), j) for p, j in pairs), len(pairs)


# --------------------------------------------------------------------------------------------
# Reading and synchronising


@dataclass
class SyncedFrame:
    """One image with the messages of the same stamp (None where a topic had nothing close enough)."""

    stamp_ns: int
    image: Any
    camera_info: Any | None
    detections: Any | None
    ground_truth: Any | None


@dataclass
class BagContents:
    """What was read from a bag: synchronised frames, every raw message (for copying), warnings."""

    frames: list[SyncedFrame]
    topics: dict[str, str]  # topic -> msgtype of every connection
    raw: list[tuple[str, str, int, bytes, str, str]] = field(default_factory=list)  # topic, type, t, data, def, hash
    warnings: list[str] = field(default_factory=list)


def _nearest(stamps: np.ndarray, msgs: list[Any], t: int, slop_ns: int) -> Any | None:
    if len(stamps) == 0:
        return None
    i = int(np.argmin(np.abs(stamps - t)))
    return msgs[i] if abs(int(stamps[i]) - t) <= slop_ns else None


class _MessageSource:
    """Messages of a bag as (topic, msgtype, log time, CDR bytes, definition, hash), with a deserialiser."""

    def __init__(self, topics: dict[str, str], messages: Any, deserialize: Any, close: Any) -> None:
        self.topics, self.messages, self.deserialize, self.close = topics, messages, deserialize, close


def _open_messages(path: Path, warnings: list[str]) -> _MessageSource:
    """Open a bag with rosbags; an MCAP file without its summary (truncated) is read record by record instead."""
    try:
        reader = AnyReader([path])
        reader.open()
    except Exception as err:  # noqa: BLE001 - rosbags raises several kinds; all mean "not readable as a whole"
        files = sorted(path.glob("*.mcap")) if path.is_dir() else ([path] if path.suffix == ".mcap" else [])
        if not files:
            raise BagError(f"cannot open bag {path}: {err}") from err
        warnings.append(f"bag {path} could not be opened whole ({err}); reading its MCAP records in order")
        return _salvage_mcap(files)

    def messages() -> Iterator[tuple[str, str, int, bytes, str, str]]:
        for conn, t_ns, data in reader.messages():
            yield conn.topic, conn.msgtype, t_ns, bytes(data), conn.msgdef.data, conn.digest

    return _MessageSource({c.topic: c.msgtype for c in reader.connections}, messages, reader.deserialize, reader.close)


def _salvage_mcap(files: list[Path]) -> _MessageSource:
    """Read MCAP files front to back without their summary, deserialising with our type store."""
    from mcap.reader import NonSeekingReader

    ts = typestore("humble")
    topics: dict[str, str] = {}
    handles = [open(f, "rb") for f in files]  # noqa: SIM115 - closed by the source's close()
    # Channels are announced before their messages: list them from a first pass that stops at the damage.
    for fh in handles:
        try:
            for schema, channel, _ in NonSeekingReader(fh).iter_messages(log_time_order=False):
                topics.setdefault(channel.topic, schema.name if schema else "")
        except Exception:  # noqa: BLE001, S110 - the damage ends the listing; messages() reports it
            pass
        fh.seek(0)

    def messages() -> Iterator[tuple[str, str, int, bytes, str, str]]:
        for fh in handles:
            for schema, channel, msg in NonSeekingReader(fh).iter_messages(log_time_order=False):
                msgtype = schema.name if schema else ""
                yield channel.topic, msgtype, msg.log_time, bytes(msg.data), schema.data.decode() if schema else "", ""

    def close() -> None:
        for fh in handles:
            fh.close()

    return _MessageSource(topics, messages, ts.deserialize_cdr, close)


def read_bag(path: Path, topics: BagTopics, slop_s: float = 0.05, keep_raw: bool = False) -> BagContents:
    """Read a rosbag2 (sqlite3 or MCAP, Humble or Jazzy) and pair images with the other topics by stamp.

    A bag damaged part-way (truncated file) is read up to the damage with a warning. Topics other
    than the task's are ignored (but kept for copying when keep_raw).

    Raises:
        BagError: the bag cannot be opened, or the image or camera_info topic is missing.
    """
    path = Path(path)
    warnings: list[str] = []
    by_topic: dict[str, list[tuple[int, Any]]] = {}
    raw: list[tuple[str, str, int, bytes, str, str]] = []
    wanted = {topics.image, topics.camera_info, topics.ground_truth} | ({topics.detections} - {None})
    source = _open_messages(path, warnings)
    found = source.topics
    missing = [t for t in (topics.image, topics.camera_info) if t not in found]
    if missing:
        source.close()
        raise BagError(f"bag {path} has no topic {missing}; topics found: {sorted(found)}")
    for t in sorted(wanted - set(found)):
        warnings.append(f"topic {t} is not in the bag; found {sorted(found)}")
    try:
        for topic, msgtype, t_ns, data, msgdef, digest in source.messages():
            if keep_raw:
                raw.append((topic, msgtype, t_ns, data, msgdef, digest))
            if topic in wanted:
                msg = source.deserialize(data, msgtype)
                stamp = stamp_ns_of(msg.header) if hasattr(msg, "header") else t_ns
                by_topic.setdefault(topic, []).append((stamp, msg))
    except Exception as err:  # noqa: BLE001 - a truncated file surfaces as any of several errors
        n = sum(len(v) for v in by_topic.values())
        warnings.append(f"bag {path} is damaged after {n} messages ({type(err).__name__}: {err}); "
                        "scoring what was read before the damage")
    finally:
        source.close()

    def column(topic: str | None) -> tuple[np.ndarray, list[Any]]:
        items = by_topic.get(topic, []) if topic else []
        return np.array([s for s, _ in items], dtype=np.int64), [m for _, m in items]

    slop_ns = int(slop_s * 1e9)
    infos, dets, gts = column(topics.camera_info), column(topics.detections), column(topics.ground_truth)
    frames = [SyncedFrame(stamp, img, _nearest(*infos, stamp, slop_ns), _nearest(*dets, stamp, slop_ns),
                          _nearest(*gts, stamp, slop_ns)) for stamp, img in by_topic.get(topics.image, [])]
    return BagContents(frames, found, raw, warnings)


# --------------------------------------------------------------------------------------------
# Ground truth out of messages


def gt_objects(msg: Any) -> list[tuple[int, np.ndarray, np.ndarray, float]]:
    """(obj_id, R, t metres, visib_fract) of each instance of a ground-truth Detection3DArray."""
    out = []
    for det in msg.detections:
        hyp = det.results[0]
        p = hyp.pose.pose
        R = matrix_from_quat([p.orientation.w, p.orientation.x, p.orientation.y, p.orientation.z])
        out.append((int(hyp.hypothesis.class_id), R, np.array([p.position.x, p.position.y, p.position.z]),
                    float(hyp.hypothesis.score)))
    return out


def gt_hand(msg: Any) -> np.ndarray | None:
    """(J, 3) joints of the first hand of a ground-truth HandJointsArray, or None."""
    if not msg.hands:
        return None
    return np.array([[p.x, p.y, p.z] for p in msg.hands[0].positions])


# --------------------------------------------------------------------------------------------
# Replay and scoring


@dataclass
class EvalResult:
    """What `featmap bag eval` produced: metrics, where the files are, and the frames' fate."""

    metrics: dict
    out_dir: Path
    output_bag: Path | None
    processed: int
    skipped: dict[str, int]
    warnings: list[str]


def default_node_config(task: str, model_path: str, meta: dict) -> NodeConfig:
    """The node's defaults for a checkpoint: object names from the checkpoint, no score cut (score everything)."""
    names = [f"{o['obj_id']}:{o['name']}" for o in meta.get("objects", [])]
    return NodeConfig(task=task, model_path=str(model_path), object_names=names, use_detections=task == "objects",
                      max_age_s=0.0)


def eval_bag(bag_path: Path, model_path: Path, out: Path, *, models_dir: Path | None = None,
             config: NodeConfig | None = None, topics: BagTopics | None = None, device: str = "auto",
             write_output_bag: bool = True, storage: str = "mcap", distro: str = "humble",
             n_overlays: int = 4) -> EvalResult:
    """Replay a bag through the node's processing path (FrameProcessor) and score it against its ground truth.

    Args:
        bag_path: the input rosbag2 folder.
        model_path: the checkpoint (its JSON says the task).
        out: output folder: report.md, metrics.json, plots, overlays, and output_bag/.
        models_dir: objects only: a BOP models folder (models_info.json + obj_*.ply) for the metrics;
            models_eval/ beside models/ is used when it exists, like `featmap evaluate`.
        config: the node's parameters (defaults from the checkpoint when None).
        topics: topic names (the task's defaults when None).
    """
    import cv2

    from featmap_ros.estimator import load_estimator
    from featmap_ros.experiments.bop_eval import write_object_report
    from featmap_ros.model.checkpoint import read_meta
    from featmap_ros.report import plot_curves, plot_series

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    meta = read_meta(model_path)
    task = meta["task"]
    cfg = config or default_node_config(task, str(model_path), meta)
    topics = topics or TOPICS[task]
    estimator = load_estimator(model_path, device=device)
    ts = typestore(distro)
    messages: list[str] = []
    proc = FrameProcessor(estimator, MessageFactory.for_rosbags(ts), cfg, log=messages.append)
    contents = read_bag(bag_path, topics, cfg.sync_slop_s, keep_raw=write_output_bag)
    for w in contents.warnings:
        log.warning(w)
    if task == "objects":
        infos, meshes = load_object_models(models_dir)
    outputs: list[tuple[SyncedFrame, ProcessorOutput | None]] = []
    t0 = time.perf_counter()
    for fr in tqdm(contents.frames, desc="bag eval", unit="frame"):
        outputs.append((fr, proc.safe_process(fr.image, fr.camera_info, fr.detections)))
    wall = time.perf_counter() - t0
    snap = proc.stats.snapshot()
    summary = {"bag": str(bag_path), "model": str(model_path), "task": task, "frames": len(contents.frames),
               "processed": snap.processed, "skipped": dict(snap.skipped), "warnings": contents.warnings,
               "latency_median_ms": snap.latency_median_s * 1e3, "latency_p95_ms": snap.latency_p95_s * 1e3,
               "wall_s": wall, "device": estimator.device, "log": messages}
    times = [(fr.stamp_ns - contents.frames[0].stamp_ns) / 1e9 for fr, _ in outputs] if outputs else []
    if task == "objects":
        names = {o.obj_id: o.name for o in estimator.objects}
        records = object_records(outputs, estimator)
        metrics = write_object_report(out, records, infos, meshes, names, extra=summary)
        series = {}
        for oid in sorted({r.obj_id for r in records}):
            recs = [r for r in records if r.obj_id == oid]
            errs = [min(ev.score_instance(r, infos[oid], meshes[oid].vertices)["proj_px"], 100.0) for r in recs]
            series[names.get(oid, str(oid))] = ([times[r.im_id] for r in recs], errs)
        if series:
            plot_series(out / "error_over_time.png", series, "2D projection error (px, clipped at 100)",
                        "error per frame")
    else:
        est_j, gt_j, per_frame = hand_arrays(outputs)
        metrics = {**summary, "frames_with_hand_gt": sum(1 for fr, _ in outputs if fr.ground_truth is not None),
                   "frames_scored": len(gt_j)}
        if len(gt_j):
            metrics.update(ev.score_hands(est_j, gt_j, estimator.joint_names))
        if len(gt_j):
            curve = ev.hand_curve(est_j, gt_j)
            metrics["curve"] = curve
            plot_curves(out / "max_error_curve.png", {"fm": (curve["threshold_mm"], curve["fraction"])},
                        "max joint error threshold (mm)", "fraction of frames", "hand: max-error success")
            err_mm = 1000 * np.linalg.norm(est_j - gt_j, axis=-1).mean(1)
            plot_series(out / "error_over_time.png", {"mean joint error": ([times[i] for i in per_frame], err_mm)},
                        "mm", "hand error per frame")
        ev.write_json(out / "metrics.json", metrics)
    # overlays of a sample of frames
    done = [(fr, o) for fr, o in outputs if o is not None and o.overlay is not None]
    picks = np.linspace(0, len(done) - 1, min(n_overlays, len(done))).astype(int) if done else []
    for fr, o in [done[i] for i in picks]:
        img = np.frombuffer(bytes(o.overlay.data), np.uint8).reshape(o.overlay.height, o.overlay.width, 3)
        cv2.imwrite(str(out / f"overlay_{fr.stamp_ns}.png"), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
    out_bag = None
    if write_output_bag:
        out_bag = out / "output_bag"
        with BagWriter(out_bag, storage, distro) as bw:
            for topic, msgtype, t_ns, data, msgdef, digest in contents.raw:
                bw.write_raw(topic, msgtype, t_ns, data, msgdef, digest)
            for fr, o in outputs:
                if o is not None:
                    for topic, msgtype, msg in proc.topic_messages(o):
                        bw.write(topic, msgtype, fr.stamp_ns, msg)
    write_report_md(out, metrics, task, out_bag)
    return EvalResult(metrics, out, out_bag, snap.processed, dict(snap.skipped), contents.warnings)


def load_object_models(models_dir: Path | None) -> tuple[dict[int, bop.ObjectInfo], dict[int, bop.Mesh]]:
    """models_info and the meshes used for metrics (models_eval/ when it lies beside models/)."""
    if models_dir is None:
        raise BagError("scoring objects needs the object models: pass models_dir (a BOP models/ folder)")
    models_dir = Path(models_dir)
    infos = bop.load_models_info(models_dir / "models_info.json")
    eval_dir = models_dir.parent / "models_eval"
    src = eval_dir if eval_dir.is_dir() else models_dir
    return infos, {i: bop.load_ply(src / f"obj_{i:06d}.ply") for i in infos}


def object_records(outputs: list[tuple[SyncedFrame, ProcessorOutput | None]], estimator: Any) -> list[ev.ObjectRecord]:
    """One record per ground-truth instance of a model's objects; a skipped frame leaves its instances unfound."""
    from featmap_ros.ros.messages import camera_info_to_intrinsics

    known = {o.obj_id for o in estimator.objects}
    records = []
    for k, (fr, o) in enumerate(outputs):
        if fr.ground_truth is None or fr.camera_info is None:
            continue
        K = camera_info_to_intrinsics(fr.camera_info)[0].K
        best = ev.best_per_object(o.result.objects if o is not None else [])
        for obj_id, R, t, visib in gt_objects(fr.ground_truth):
            if obj_id in known:
                records.append(ev.ObjectRecord(0, k, obj_id, R, t, visib, K, best.get(obj_id),
                                               o.result.timings.get("total", -1.0) if o else -1.0))
    return records


def hand_arrays(outputs: list[tuple[SyncedFrame, ProcessorOutput | None]]) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """(F, J, 3) estimates and ground truth of the frames that have both, and their frame indices."""
    est, gt, idx = [], [], []
    for k, (fr, o) in enumerate(outputs):
        if fr.ground_truth is None:
            continue
        g = gt_hand(fr.ground_truth)
        if g is None or o is None or not o.result.hands:
            continue
        est.append(o.result.hands[0].joints_xyz)
        gt.append(g)
        idx.append(k)
    shape = (0, 14, 3)
    return (np.array(est) if est else np.zeros(shape)), (np.array(gt) if gt else np.zeros(shape)), idx


def write_report_md(out: Path, metrics: dict, task: str, out_bag: Path | None) -> Path:
    """A short human report of a bag replay."""
    from featmap_ros.report import markdown_table

    lines = [f"# Bag replay: {task}", "", f"- bag: `{metrics.get('bag')}`", f"- model: `{metrics.get('model')}`",
             f"- frames: {metrics.get('frames')}, processed: {metrics.get('processed')}, "
             f"skipped: {metrics.get('skipped')}",
             f"- device: {metrics.get('device')}, latency median {metrics.get('latency_median_ms', 0.0):.1f} ms, "
             f"p95 {metrics.get('latency_p95_ms', 0.0):.1f} ms", ""]
    for w in metrics.get("warnings", []):
        lines.append(f"- warning: {w}")
    if task == "objects":
        rows = []
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
