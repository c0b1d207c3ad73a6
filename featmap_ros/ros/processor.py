"""One camera frame in, estimates and ROS messages out: the processing path of the node and of bag replay.

Pure Python (no rclpy): the node (ros/node.py) only subscribes, stores into a LatestFrameBuffer and
publishes what FrameProcessor.safe_process returns; bag evaluation calls the same safe_process, so
what is scored off the robot is what runs on it. NodeConfig is the one typed source of the node's
parameters: ROS parameters, params files and bag tools all go through it.
"""

from __future__ import annotations

import dataclasses
import re
import threading
import time
import traceback
from collections import Counter, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from functools import cache
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar, get_type_hints

import numpy as np
import yaml

from featmap_ros.geometry import Intrinsics
from featmap_ros.overlay import draw_hands, draw_objects
from featmap_ros.results import Detection2D, FrameResult, HandPose, ObjectPose
from featmap_ros.ros.messages import (
    COLOUR_ENCODINGS,
    DEPTH_ENCODINGS,
    MessageError,
    MessageFactory,
    camera_info_to_intrinsics,
    compressed_to_depth,
    compressed_to_rgb,
    detections_from_msg,
    image_to_depth,
    image_to_rgb,
    stamp_ns_of,
)

__all__ = [
    "Estimator", "FrameProcessor", "LatestFrameBuffer", "LogOnce", "NodeConfig", "ParamSpec", "ProcessorError",
    "ProcessorOutput", "ProcessorStats", "StatsSnapshot", "load_estimator_for", "load_node_config", "parameter_specs",
    "unknown_parameters",
]

TASKS = ("objects", "hands")
# ROS parameters every node may get from a params file or launch that are not ours to check.
ROS_RESERVED_PARAMS = ("use_sim_time", "start_type_description_service", "diagnostic_updater.period")
ROS_RESERVED_PREFIXES = ("qos_overrides.",)


class ProcessorError(ValueError):
    """A frame or a configuration the processor cannot work with; `kind` names the reason for counting."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


class Estimator(Protocol):
    """What the processor needs of featmap_ros.estimator (raises a ValueError subclass on bad input)."""

    task: str
    device: str

    def estimate_objects(self, rgb: np.ndarray, intrinsics: Intrinsics,
                         detections: list[Detection2D]) -> list[ObjectPose]: ...

    def estimate_hands(self, depth_m: np.ndarray, intrinsics: Intrinsics,
                       detections: list[Detection2D] | None) -> list[HandPose]: ...


# --------------------------------------------------------------------------------------------
# Configuration: the node's parameters


def _param(default: Any, description: str, *, live: bool = False) -> Any:
    """A NodeConfig field: `live` ones may change while the node runs, the others are read-only."""
    meta = {"description": description, "live": live}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class NodeConfig:
    """The featmap node's parameters (ROS parameter names = field names); topics are relative to the node."""

    task: str = _param("objects", "what to estimate: 'objects' (6-DoF poses from colour) or 'hands' (depth joints)")
    model_path: str = _param("", "checkpoint of the estimator; its task must match 'task'")
    device: str = _param("auto", "where the network runs: 'auto', 'cpu', 'cuda' or 'cuda:N'")
    cpu_threads: int = _param(
        0, "CPU threads for the network (0 = torch's default); on a busy robot CPU fewer threads avoid stalls"
    )
    image_topic: str = _param("image", "input image: colour for objects, depth (16UC1 mm or 32FC1 m) for hands")
    camera_info_topic: str = _param("camera_info", "sensor_msgs/CameraInfo of the image (rectified pinhole)")
    detections_topic: str = _param("detections", "vision_msgs/Detection2DArray of 2D boxes to estimate in")
    compressed: bool = _param(False, "image_topic carries sensor_msgs/CompressedImage (jpeg/png, compressedDepth)")
    use_detections: bool = _param(True, "wait for 2D detections; hands may run without (the nearest blob is the hand)")
    object_names: list[str] = _param(
        [], "'id:name' per object id (e.g. '5:can'): names TF frames and maps detector class names to ids"
    )
    frame_prefix: str = _param("featmap/", "prefix of the TF child frames: <prefix><object> or <prefix>hand<i>_<joint>")
    min_score: float = _param(0.0, "drop detections and estimates scoring below this, in [0, 1]", live=True)
    sync_slop_s: float = _param(0.05, "largest stamp difference of image, camera_info and detections, seconds")
    queue_size: int = _param(10, "messages per input kept by the time synchroniser")
    max_age_s: float = _param(
        0.5, "skip a frame older than this behind the newest received one, seconds (0 = never)", live=True
    )
    publish_overlay: bool = _param(True, "publish the image with the estimates drawn on it", live=True)
    marker_lifetime_s: float = _param(0.5, "lifetime of the RViz markers, seconds (0 = forever)", live=True)
    markers_topic: str = _param("featmap/markers", "visualization_msgs/MarkerArray output")
    objects_topic: str = _param("featmap/objects", "vision_msgs/Detection3DArray output (task objects)")
    hands_topic: str = _param("featmap/hands", "featmap_ros/HandJointsArray output (task hands)")
    overlay_topic: str = _param("featmap/overlay", "sensor_msgs/Image (rgb8) output with the estimates drawn")

    def __post_init__(self) -> None:
        for f in fields(self):
            kind, value = _ros_type(f.name), getattr(self, f.name)
            if kind == "double" and isinstance(value, int) and not isinstance(value, bool):
                object.__setattr__(self, f.name, float(value))  # Python callers may write 1 for 1.0
            elif not _has_ros_type(value, kind):
                raise ProcessorError("config", f"parameter {f.name} = {value!r} is not of type {kind}")
            elif kind == "string_array":
                object.__setattr__(self, f.name, list(value))  # tuples too, so configs compare equal
        if self.task not in TASKS:
            raise ProcessorError("config", f"task {self.task!r} is unknown; expected one of {list(TASKS)}")
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device):
            raise ProcessorError("config", f"device {self.device!r} is unknown; expected auto, cpu, cuda or cuda:N")
        if self.task == "objects" and not self.use_detections:
            raise ProcessorError("config", "task objects crops around 2D detections: use_detections must be true")
        for name in ("image_topic", "camera_info_topic", "detections_topic", "markers_topic", "objects_topic",
                     "hands_topic", "overlay_topic"):
            if not getattr(self, name).strip():
                raise ProcessorError("config", f"{name} is empty; expected a topic name")
        if not 0.0 <= self.min_score <= 1.0:
            raise ProcessorError("config", f"min_score {self.min_score} is outside [0, 1]")
        if not self.sync_slop_s > 0.0:
            raise ProcessorError("config", f"sync_slop_s {self.sync_slop_s} must be > 0 seconds")
        if self.cpu_threads < 0:
            raise ProcessorError("config", f"cpu_threads {self.cpu_threads} must be >= 0 (0 = torch's default)")
        if self.queue_size < 1:
            raise ProcessorError("config", f"queue_size {self.queue_size} must be >= 1")
        for name in ("max_age_s", "marker_lifetime_s"):
            if not getattr(self, name) >= 0.0:
                raise ProcessorError("config", f"{name} {getattr(self, name)} must be >= 0 seconds")
        self.object_name_map  # noqa: B018 - parse now so a bad entry fails at start-up

    @property
    def object_name_map(self) -> dict[int, str]:
        """object_names as {obj_id: name}."""
        out: dict[int, str] = {}
        for entry in self.object_names:
            m = re.fullmatch(r"\s*(\d+)\s*:\s*([A-Za-z0-9_\-]+)\s*", entry)
            if m is None:
                raise ProcessorError(
                    "config", f"object_names entry {entry!r} is not 'id:name' (name of letters, digits, _ or -)"
                )
            if int(m.group(1)) in out:
                raise ProcessorError("config", f"object_names gives object id {m.group(1)} twice")
            out[int(m.group(1))] = m.group(2)
        return out

    @property
    def poses_topic(self) -> str:
        """The topic of this task's estimates."""
        return self.objects_topic if self.task == "objects" else self.hands_topic

    @property
    def poses_msgtype(self) -> str:
        """The message type of this task's estimates."""
        return "vision_msgs/msg/Detection3DArray" if self.task == "objects" else "featmap_ros/msg/HandJointsArray"

    @classmethod
    def from_params(cls, params: Mapping[str, Any], source: str = "parameters") -> NodeConfig:
        """Build from ROS parameters {name: value}, strictly: unknown names and wrong types fail.

        Unlike the constructor this refuses 1 for a double, as ROS does: a params file must say 1.0.
        """
        known = {f.name for f in fields(cls)}
        unknown = sorted(n for n in params if n not in known and not _ros_reserved(n))
        if unknown:
            raise ProcessorError("config", f"{source}: unknown parameters {unknown}; known are {sorted(known)}")
        ours = {n: v for n, v in params.items() if n in known}
        for name, value in ours.items():
            kind = _ros_type(name)
            if not _has_ros_type(value, kind) or (kind == "double" and not isinstance(value, float)):
                hint = " (write 1.0, not 1: ROS reads 1 as an integer)" if kind == "double" else ""
                got = f"{value!r} ({type(value).__name__})"
                raise ProcessorError("config", f"{source}: parameter {name} = {got} is not of type {kind}{hint}")
        return cls(**ours)

    def to_params(self) -> dict[str, Any]:
        """The parameters as {name: value} (lists copied)."""
        return {f.name: (list(v) if isinstance(v := getattr(self, f.name), list) else v) for f in fields(self)}

    def to_yaml(self, node_name: str = "/**") -> str:
        """A ROS params file holding these parameters under `node_name`."""
        return yaml.safe_dump({node_name: {"ros__parameters": self.to_params()}}, sort_keys=False)


@dataclass(frozen=True)
class ParamSpec:
    """How the node declares one parameter: ros_type is bool, integer, double, string or string_array."""

    name: str
    default: Any
    ros_type: str
    description: str
    read_only: bool


@cache
def _ros_type(name: str) -> str:
    """The ROS parameter type of a NodeConfig field."""
    hint = get_type_hints(NodeConfig)[name]
    return {bool: "bool", int: "integer", float: "double", str: "string", list[str]: "string_array"}[hint]


def _has_ros_type(value: Any, kind: str) -> bool:
    """Whether value has ROS parameter type `kind` (bool is not an integer, an integer passes for a double)."""
    if kind == "bool":
        return isinstance(value, bool)
    if kind == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "double":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind == "string":
        return isinstance(value, str)
    return isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value)


def _ros_reserved(name: str) -> bool:
    """Whether a parameter belongs to ROS itself rather than to us."""
    return name in ROS_RESERVED_PARAMS or name.startswith(ROS_RESERVED_PREFIXES)


def parameter_specs() -> list[ParamSpec]:
    """Every NodeConfig field as a ROS parameter declaration, in field order."""
    default = NodeConfig()
    return [
        ParamSpec(f.name, getattr(default, f.name), _ros_type(f.name), f.metadata["description"],
                  not f.metadata["live"])
        for f in fields(NodeConfig)
    ]


def unknown_parameters(names: list[str] | set[str]) -> list[str]:
    """The names (e.g. a node's parameter overrides) that are neither ours nor ROS's, sorted."""
    known = {f.name for f in fields(NodeConfig)}
    return sorted(n for n in names if n not in known and not _ros_reserved(n))


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested params-file dicts as ROS's dotted parameter names."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def load_node_config(yaml_path: str | Path, node_name: str | None = None) -> NodeConfig:
    """Read a ROS params file (`/**:` and/or `<node>:` sections with `ros__parameters:`) into a NodeConfig.

    Sections apply as ROS applies them: the wildcard first, then the node's own section. Without
    node_name the file may hold at most one section besides the wildcard.

    Raises:
        ProcessorError: unreadable file, wrong layout, unknown parameter or wrong type (kind 'config').
    """
    path = Path(yaml_path)
    try:
        doc = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise ProcessorError("config", f"cannot read params file {path}: {err}") from err
    if not isinstance(doc, Mapping) or not doc:
        raise ProcessorError("config", f"{path}: expected '/**:' or '<node>:' sections, got {type(doc).__name__}")
    if node_name is None:
        named = [k for k in doc if k != "/**"]
        if len(named) > 1:
            raise ProcessorError("config", f"{path} has sections for nodes {named}; say which node to read")
        node_name = named[0] if named else "/**"
    wanted = ["/**"] + [k for k in doc if k != "/**" and str(k).lstrip("/").split("/")[-1] == node_name.lstrip("/")]
    params: dict[str, Any] = {}
    for key in [k for k in doc if k in wanted]:
        section = doc[key]
        if not isinstance(section, Mapping) or set(section) != {"ros__parameters"}:
            raise ProcessorError("config", f"{path}: section {key!r} must hold exactly 'ros__parameters:'")
        params.update(_flatten(section["ros__parameters"] or {}))
    return NodeConfig.from_params(params, source=str(path))


def load_estimator_for(config: NodeConfig) -> Estimator:
    """Load the checkpoint at config.model_path on config.device and check it does config.task."""
    if not config.model_path:
        raise ProcessorError("config", "model_path is empty; set it to a featmap checkpoint")
    # torch lives behind this import: only a node that runs a model pays for it.
    from featmap_ros.estimator import load_estimator

    estimator = load_estimator(config.model_path, config.device, cpu_threads=config.cpu_threads)
    if estimator.task != config.task:
        raise ProcessorError("config", f"{config.model_path} is a {estimator.task!r} model but task is {config.task!r}")
    return estimator


# --------------------------------------------------------------------------------------------
# Counting and logging what goes wrong, and how fast it goes


class LogOnce:
    """Log the first message of each kind through `log` and count them all (thread-safe)."""

    def __init__(self, log: Callable[[str], None]) -> None:
        self.log = log
        self.counts: Counter[str] = Counter()
        self._lock = threading.Lock()

    def __call__(self, kind: str, message: str) -> bool:
        """Count one `kind`; return whether this call logged (the first of its kind)."""
        with self._lock:
            self.counts[kind] += 1
            first = self.counts[kind] == 1
        if first:
            self.log(f"{message} [{kind}: logged once, counted in diagnostics]")
        return first


@dataclass(frozen=True)
class StatsSnapshot:
    """Counters and timing at one moment, for diagnostics."""

    processed: int
    skipped: dict[str, int]
    latency_median_s: float  # NaN before the first frame
    latency_p95_s: float
    rate_hz: float  # processed frames per second over the recent window
    recent_processed: int
    recent_skipped: int


class ProcessorStats:
    """Processed and skipped counts, latency median/p95 over the last `window` frames and the recent rate."""

    def __init__(self, window: int = 100, rate_window_s: float = 5.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.processed = 0
        self.skipped: Counter[str] = Counter()
        self.latencies: deque[float] = deque(maxlen=window)
        self.rate_window_s = rate_window_s
        self.clock = clock
        self._events: deque[tuple[float, bool]] = deque()  # (time, processed?) within rate_window_s
        self._lock = threading.Lock()

    def _trim(self, now: float) -> None:
        """Forget events older than the rate window."""
        while self._events and self._events[0][0] < now - self.rate_window_s:
            self._events.popleft()

    def record(self, latency_s: float) -> None:
        """Count a processed frame that took latency_s seconds."""
        with self._lock:
            now = self.clock()
            self.processed += 1
            self.latencies.append(float(latency_s))
            self._events.append((now, True))
            self._trim(now)

    def skip(self, kind: str) -> None:
        """Count a skipped frame."""
        with self._lock:
            now = self.clock()
            self.skipped[kind] += 1
            self._events.append((now, False))
            self._trim(now)

    def snapshot(self) -> StatsSnapshot:
        """The current counters and timing."""
        with self._lock:
            now = self.clock()
            self._trim(now)
            lat = np.array(self.latencies, dtype=np.float64)
            done = [t for t, ok in self._events if ok]
            # Rate from the spacing of recent frames: unbiased from the second frame on.
            rate = (len(done) - 1) / (done[-1] - done[0]) if len(done) >= 2 and done[-1] > done[0] else 0.0
            return StatsSnapshot(
                processed=self.processed, skipped=dict(self.skipped),
                latency_median_s=float(np.median(lat)) if lat.size else float("nan"),
                latency_p95_s=float(np.percentile(lat, 95)) if lat.size else float("nan"),
                rate_hz=float(rate), recent_processed=len(done), recent_skipped=len(self._events) - len(done),
            )


T = TypeVar("T")


class LatestFrameBuffer(Generic[T]):
    """A bounded newest-wins buffer between the executor callback (put) and a worker thread (get).

    put never blocks: when full, the oldest item is dropped and counted. newest_stamp_ns is the
    stamp of the latest put, the reference for skipping frames that went stale while waiting.
    """

    def __init__(self, size: int = 1) -> None:
        if size < 1:
            raise ValueError(f"buffer size {size} must be >= 1")
        self._items: deque[T] = deque()
        self._size = size
        self._cond = threading.Condition()
        self._closed = False
        self.dropped = 0
        self.received = 0
        self.newest_stamp_ns: int | None = None

    def put(self, item: T, stamp_ns: int | None = None) -> None:
        """Store an item, dropping the oldest when full."""
        with self._cond:
            if len(self._items) >= self._size:
                self._items.popleft()
                self.dropped += 1
            self._items.append(item)
            self.received += 1
            if stamp_ns is not None:
                self.newest_stamp_ns = int(stamp_ns)
            self._cond.notify()

    def get(self, timeout: float | None = None) -> T | None:
        """Take the oldest stored item, waiting up to timeout seconds; None on timeout or once closed."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._items or self._closed, timeout=timeout):
                return None
            return self._items.popleft() if self._items and not self._closed else None

    @property
    def closed(self) -> bool:
        """Whether close() was called."""
        return self._closed

    def close(self) -> None:
        """Wake every waiting get and make later gets return None (shutdown)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def __len__(self) -> int:
        with self._cond:
            return len(self._items)


# --------------------------------------------------------------------------------------------
# The processing path


@dataclass
class ProcessorOutput:
    """One processed frame: the estimates and the messages to publish (one backend's classes)."""

    result: FrameResult
    transforms: list[Any]  # geometry_msgs/TransformStamped, for a TransformBroadcaster
    markers: Any  # visualization_msgs/MarkerArray
    poses: Any  # vision_msgs/Detection3DArray (objects) or featmap_ros/HandJointsArray (hands)
    overlay: Any | None  # sensor_msgs/Image rgb8, None when publish_overlay is off


class FrameProcessor:
    """Decode, check, estimate and build messages for one synchronised frame."""

    def __init__(self, estimator: Estimator, factory: MessageFactory, config: NodeConfig,
                 log: Callable[[str], None] = print, clock: Callable[[], float] = time.perf_counter) -> None:
        if estimator.task != config.task:
            raise ProcessorError("config", f"the estimator does {estimator.task!r} but task is {config.task!r}")
        self.estimator = estimator
        self.factory = factory
        self.config = config
        self.clock = clock
        self.log_once = LogOnce(log)
        self.stats = ProcessorStats()

    def update_config(self, **changes: Any) -> NodeConfig:
        """Change live parameters (min_score, max_age_s, publish_overlay, marker_lifetime_s) while running."""
        live = {f.name for f in fields(NodeConfig) if f.metadata["live"]}
        fixed = sorted(n for n in changes if n not in live and n in NodeConfig.__dataclass_fields__)
        if fixed:
            raise ProcessorError("config", f"parameters {fixed} are read-only while the node runs")
        new = NodeConfig.from_params({**self.config.to_params(), **changes}, source="parameter update")
        self.config = new  # one reference swap: the worker sees the old or the new config, never a mix
        return new

    # ---- the two entry points: process raises, safe_process counts and logs

    def safe_process(self, image_msg: Any, info_msg: Any | None, detections_msg: Any | None = None,
                     newest_stamp_ns: int | None = None) -> ProcessorOutput | None:
        """process() that never raises: a bad frame is counted, logged once per kind and gives None.

        newest_stamp_ns is the newest stamp received (LatestFrameBuffer.newest_stamp_ns): a frame
        more than max_age_s behind it is skipped as 'stale'. Bag replay leaves it None.
        """
        t0 = self.clock()
        try:
            max_age_ns = int(self.config.max_age_s * 1e9)
            if newest_stamp_ns is not None and max_age_ns > 0:
                age_ns = newest_stamp_ns - stamp_ns_of(image_msg.header)
                if age_ns > max_age_ns:
                    raise ProcessorError(
                        "stale", f"frame is {age_ns / 1e9:.3f} s behind the newest; max_age_s = {self.config.max_age_s}"
                    )
            out = self.process(image_msg, info_msg, detections_msg)
        except ProcessorError as err:
            self._skip(err.kind, f"skipping frame: {err}")
            return None
        except Exception as err:  # noqa: BLE001 - the worker thread must outlive any one frame
            kind = f"internal_{type(err).__name__}"
            self._skip(kind, f"skipping frame after an unexpected error: {err!r}\n{traceback.format_exc()}")
            return None
        self.stats.record(self.clock() - t0)
        return out

    def _skip(self, kind: str, message: str) -> None:
        """Count and (once per kind) log a skipped frame."""
        self.stats.skip(kind)
        self.log_once(kind, message)

    def process(self, image_msg: Any, info_msg: Any | None, detections_msg: Any | None = None) -> ProcessorOutput:
        """Estimate on one frame and build its messages, stamped with the image's stamp and frame.

        Raises:
            ProcessorError: with kind missing_camera_info, missing_detections, no_frame_id,
                bad_camera_info, unknown_encoding, wrong_encoding, bad_image, size_mismatch, estimator
                or build.
        """
        cfg = self.config
        t0 = self.clock()
        if info_msg is None:
            raise ProcessorError("missing_camera_info", "no camera_info came with the image")
        if cfg.use_detections and detections_msg is None:
            raise ProcessorError("missing_detections", "use_detections is true but no detections came with the image")
        stamp_ns, frame_id = stamp_ns_of(image_msg.header), str(image_msg.header.frame_id)
        if not frame_id:
            raise ProcessorError("no_frame_id", "image header has an empty frame_id; TF needs the camera frame")
        try:
            intr, dist = camera_info_to_intrinsics(info_msg)
        except MessageError as err:
            raise ProcessorError("bad_camera_info", str(err)) from err
        if np.any(np.abs(dist) > 1e-9):
            self.log_once("distorted", f"camera_info has distortion {dist.tolist()}: the image is assumed rectified")
        pixels = self._decode(image_msg)
        if pixels.shape[:2] != (intr.height, intr.width):
            h, w = pixels.shape[:2]
            raise ProcessorError(
                "size_mismatch", f"image is {w}x{h} but camera_info says {intr.width}x{intr.height}"
            )
        dets = self._detections(detections_msg) if cfg.use_detections else None
        t1 = self.clock()
        result = FrameResult(stamp_ns=stamp_ns, frame_id=frame_id)
        try:
            if cfg.task == "objects":
                objects = self.estimator.estimate_objects(pixels, intr, dets) if dets else []
                result.objects = self._name_objects([o for o in objects if o.score >= cfg.min_score])
            else:
                hands = [] if dets is not None and not dets else self.estimator.estimate_hands(pixels, intr, dets)
                result.hands = [h for h in hands if h.score >= cfg.min_score]
        except ValueError as err:  # EstimatorError and the geometry errors under it
            raise ProcessorError("estimator", f"{type(err).__name__}: {err}") from err
        t2 = self.clock()
        try:
            f = self.factory
            transforms = f.transforms(result, cfg.frame_prefix)
            markers = f.markers(result, lifetime_s=cfg.marker_lifetime_s)
            poses = f.detection3d_array(result) if cfg.task == "objects" else f.hand_joints_array(result)
            overlay = None
            if cfg.publish_overlay:
                drawn = (draw_objects(pixels, result.objects, intr.K) if cfg.task == "objects"
                         else draw_hands(pixels, result.hands, intr.K))
                overlay = f.image_rgb(drawn, stamp_ns, frame_id)
        except MessageError as err:
            raise ProcessorError("build", str(err)) from err
        t3 = self.clock()
        result.timings.update({"decode": t1 - t0, "estimate": t2 - t1, "build": t3 - t2, "total": t3 - t0})
        return ProcessorOutput(result, transforms, markers, poses, overlay)

    def topic_messages(self, out: ProcessorOutput) -> list[tuple[str, str, Any]]:
        """(absolute topic, msgtype, message) of everything the node publishes for a frame, /tf included (bags)."""
        cfg = self.config
        msgs = [
            ("/tf", "tf2_msgs/msg/TFMessage", self.factory.tf_message(out.transforms)),
            (_absolute(cfg.markers_topic), "visualization_msgs/msg/MarkerArray", out.markers),
            (_absolute(cfg.poses_topic), cfg.poses_msgtype, out.poses),
        ]
        if out.overlay is not None:
            msgs.append((_absolute(cfg.overlay_topic), "sensor_msgs/msg/Image", out.overlay))
        return msgs

    def diagnostics(self, dropped: int = 0) -> tuple[str, str, dict[str, str]]:
        """(level 'ok' | 'warn' | 'error', summary, key-values) for a diagnostic_updater task."""
        s = self.stats.snapshot()
        values = {
            "task": self.config.task, "device": str(self.estimator.device), "processed": str(s.processed),
            "skipped": str(sum(s.skipped.values())), "dropped (newest wins)": str(dropped),
            "rate (Hz)": f"{s.rate_hz:.2f}", "latency median (ms)": f"{s.latency_median_s * 1e3:.1f}",
            "latency p95 (ms)": f"{s.latency_p95_s * 1e3:.1f}",
        }
        values.update({f"skipped: {kind}": str(n) for kind, n in sorted(s.skipped.items())})
        window = f"{self.stats.rate_window_s:g} s"
        if s.recent_skipped and not s.recent_processed:
            return "error", f"every frame of the last {window} was skipped", values
        if not s.recent_processed:
            return "warn", f"no frames in the last {window}", values
        if s.recent_skipped:
            recent = s.recent_skipped + s.recent_processed
            return "warn", f"{s.recent_skipped} of the last {recent} frames skipped", values
        return "ok", f"{s.rate_hz:.1f} Hz, {s.latency_median_s * 1e3:.0f} ms median latency", values

    # ---- pieces of process

    def _decode(self, msg: Any) -> np.ndarray:
        """The image as HxWx3 uint8 RGB (objects) or HxW float32 metres (hands)."""
        colour = self.config.task == "objects"
        try:
            if self.config.compressed:
                return compressed_to_rgb(msg) if colour else compressed_to_depth(msg)
            enc = str(msg.encoding)
            wanted, other = (COLOUR_ENCODINGS, DEPTH_ENCODINGS) if colour else (DEPTH_ENCODINGS, COLOUR_ENCODINGS)
            if enc in other:
                need = "colour" if colour else "depth"
                raise ProcessorError(
                    "wrong_encoding", f"task {self.config.task} needs a {need} image, got {enc!r}; "
                    f"expected one of {sorted(wanted)}"
                )
            if enc not in wanted:
                raise ProcessorError("unknown_encoding", f"encoding {enc!r} is unknown; expected {sorted(wanted)}")
            return image_to_rgb(msg) if colour else image_to_depth(msg)
        except MessageError as err:
            raise ProcessorError("bad_image", str(err)) from err

    def _detections(self, msg: Any) -> list[Detection2D]:
        """Detections with ids resolved from object_names and those under min_score dropped."""
        by_name = {name: obj_id for obj_id, name in self.config.object_name_map.items()}
        out = []
        for det in detections_from_msg(msg):
            if det.obj_id is None and det.class_id in by_name:
                det.obj_id = by_name[det.class_id]
            if det.score >= self.config.min_score:
                out.append(det)
        return out

    def _name_objects(self, objects: list[ObjectPose]) -> list[ObjectPose]:
        """Names from object_names (else the estimator's), made unique per frame so TF frames do not collide."""
        names = self.config.object_name_map
        seen: Counter[str] = Counter()
        out = []
        for obj in objects:
            base = names.get(obj.obj_id, obj.name) or f"obj{obj.obj_id}"
            name = base if seen[base] == 0 else f"{base}_{seen[base]}"
            seen[base] += 1
            out.append(dataclasses.replace(obj, name=name))
        return out


def _absolute(topic: str) -> str:
    """A relative topic name as the absolute name it resolves to in the root namespace (bags have no namespace)."""
    return "/" + topic.lstrip("/")
