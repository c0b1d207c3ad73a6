"""One camera frame in, estimates and ROS messages out: the processing path of the node and of bag replay.

Pure Python (no rclpy): the node (ros/node.py) only subscribes, stores into a LatestFrameBuffer and
publishes what FrameProcessor.safe_process returns; bag evaluation calls the same safe_process, so
what is scored off the robot is what runs on it. The node's parameters are ros.config.NodeConfig.
"""

from __future__ import annotations

import dataclasses
import threading
import time
import traceback
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any, Generic, Protocol, TypeVar

import numpy as np

from featmap_ros.geometry import Intrinsics
from featmap_ros.overlay import draw_hands, draw_objects
from featmap_ros.results import Detection2D, FrameResult, HandPose, ObjectPose
from featmap_ros.ros.config import NodeConfig, ProcessorError
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
    "Estimator", "FrameProcessor", "LatestFrameBuffer", "LogOnce", "ProcessorError", "ProcessorOutput",
    "ProcessorStats", "StatsSnapshot", "load_estimator_for",
]

class Estimator(Protocol):
    """What the processor needs of featmap_ros.estimator (raises a ValueError subclass on bad input)."""

    task: str
    device: str

    def estimate_objects(self, rgb: np.ndarray, intrinsics: Intrinsics,
                         detections: list[Detection2D]) -> list[ObjectPose]: ...

    def estimate_hands(self, depth_m: np.ndarray, intrinsics: Intrinsics,
                       detections: list[Detection2D] | None) -> list[HandPose]: ...


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
