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
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, fields
from typing import Any, Generic, Protocol, TypeVar

import numpy as np

from featmap_ros.errors import FeatmapError
from featmap_ros.geometry import Intrinsics
from featmap_ros.overlay import draw_hands, draw_objects
from featmap_ros.results import Detection2D, FrameResult, HandPose, ObjectPose
from featmap_ros.ros.config import NodeConfig, ProcessorError
from featmap_ros.ros.messages import (
    COLOUR_ENCODINGS,
    DEPTH_ENCODINGS,
    MAX_IMAGE_PIXELS,
    MessageError,
    MessageFactory,
    camera_info_to_intrinsics,
    compressed_size,
    compressed_to_depth,
    compressed_to_rgb,
    detections_from_msg,
    image_to_depth,
    image_to_rgb,
    stamp_ns_of,
)

__all__ = [
    "STARTUP_ERRORS", "Estimator", "FrameProcessor", "LatestFrameBuffer", "LogOnce", "ProcessorError",
    "ProcessorOutput", "ProcessorStats", "StatsSnapshot", "check_input_types", "expected_input_types",
    "input_type_problems", "load_estimator_for",
]

# What the node catches at start-up, logs as FATAL and exits 1 on: the project's own errors (bad parameters,
# an unloadable or inconsistent checkpoint), a missing or unreadable file, a checkpoint JSON lacking a key,
# and a missing module (torch not installed in the environment the node runs in).
STARTUP_ERRORS: tuple[type[BaseException], ...] = (FeatmapError, ValueError, OSError, KeyError, ImportError)

class Estimator(Protocol):
    """What the processor needs of featmap_ros.estimator (raises a ValueError subclass on bad input)."""

    task: str
    device: str

    def estimate_objects(self, rgb: np.ndarray, intrinsics: Intrinsics,
                         detections: list[Detection2D]) -> list[ObjectPose]: ...

    def estimate_hands(self, depth_m: np.ndarray, intrinsics: Intrinsics,
                       detections: list[Detection2D] | None) -> list[HandPose]: ...


def load_estimator_for(config: NodeConfig) -> Estimator:
    """Load the model at config.model_path on config.backend and config.device and check it does config.task."""
    if not config.model_path:
        raise ProcessorError("config", "model_path is empty; set it to a featmap checkpoint")
    # The network's backend (torch or onnxruntime) lives behind this import: only a node that runs a model pays.
    from featmap_ros.estimator import load_estimator

    estimator = load_estimator(config.model_path, config.device, cpu_threads=config.cpu_threads,
                               max_detections=config.max_detections, backend=config.backend,
                               refine=config.refine_centre, decode_threads=config.decode_threads,
                               precision=config.precision, recrop=config.recrop,
                               recentre=config.recentre)
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
    latency_median_s: float  # processing time (decode + estimate + build); NaN before the first frame
    latency_p95_s: float
    rate_hz: float  # processed frames per second over the recent window
    recent_processed: int
    recent_skipped: int
    wait_median_s: float = float("nan")  # time a frame waited in the buffer before the worker took it
    wait_p95_s: float = float("nan")
    end_to_end_median_s: float = float("nan")  # image stamp to publish, on the node's clock
    end_to_end_p95_s: float = float("nan")
    published: int = 0


class ProcessorStats:
    """Processed and skipped counts, latency median/p95 over the last `window` frames and the recent rate."""

    def __init__(self, window: int = 100, rate_window_s: float = 5.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.processed = 0
        self.skipped: Counter[str] = Counter()
        self.latencies: deque[float] = deque(maxlen=window)
        self.waits: deque[float] = deque(maxlen=window)
        self.end_to_end: deque[float] = deque(maxlen=window)
        self.published = 0
        self.rate_window_s = rate_window_s
        self.clock = clock
        self._events: deque[tuple[float, bool]] = deque()  # (time, processed?) within rate_window_s
        self._lock = threading.Lock()

    def _trim(self, now: float) -> None:
        """Forget events older than the rate window."""
        while self._events and self._events[0][0] < now - self.rate_window_s:
            self._events.popleft()

    def record(self, latency_s: float, wait_s: float | None = None) -> None:
        """Count a processed frame that took latency_s seconds after waiting wait_s in the buffer."""
        with self._lock:
            now = self.clock()
            self.processed += 1
            self.latencies.append(float(latency_s))
            if wait_s is not None:
                self.waits.append(float(wait_s))
            self._events.append((now, True))
            self._trim(now)

    def record_published(self, end_to_end_s: float) -> None:
        """Count a published frame whose outputs went out end_to_end_s after its image stamp."""
        with self._lock:
            self.published += 1
            self.end_to_end.append(float(end_to_end_s))

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
            done = [t for t, ok in self._events if ok]
            # Rate from the spacing of recent frames: unbiased from the second frame on.
            rate = (len(done) - 1) / (done[-1] - done[0]) if len(done) >= 2 and done[-1] > done[0] else 0.0
            lat, wait, e2e = _percentiles(self.latencies), _percentiles(self.waits), _percentiles(self.end_to_end)
            return StatsSnapshot(
                processed=self.processed, skipped=dict(self.skipped), latency_median_s=lat[0],
                latency_p95_s=lat[1], rate_hz=float(rate), recent_processed=len(done),
                recent_skipped=len(self._events) - len(done), wait_median_s=wait[0], wait_p95_s=wait[1],
                end_to_end_median_s=e2e[0], end_to_end_p95_s=e2e[1], published=self.published,
            )


def _percentiles(values: deque[float]) -> tuple[float, float]:
    """(median, p95) of values; NaN for none."""
    if not values:
        return float("nan"), float("nan")
    arr = np.array(values, dtype=np.float64)
    return float(np.median(arr)), float(np.percentile(arr, 95))


T = TypeVar("T")


class LatestFrameBuffer(Generic[T]):
    """A bounded newest-wins buffer between the executor callback (put) and a worker thread (get).

    put never blocks: when full, the oldest item is dropped and counted. newest_stamp_ns is the
    stamp of the latest put, the reference for skipping frames that went stale while waiting.
    """

    def __init__(self, size: int = 1) -> None:
        if size < 1:
            raise ValueError(f"buffer size {size} must be >= 1")
        self._items: deque[tuple[T, float]] = deque()  # (item, monotonic time of put)
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
            self._items.append((item, time.monotonic()))
            self.received += 1
            if stamp_ns is not None:
                self.newest_stamp_ns = int(stamp_ns)
            self._cond.notify()

    def get(self, timeout: float | None = None) -> T | None:
        """Take the oldest stored item, waiting up to timeout seconds; None on timeout or once closed."""
        got = self.get_timed(timeout)
        return None if got is None else got[0]

    def get_timed(self, timeout: float | None = None) -> tuple[T, float] | None:
        """(oldest item, seconds it waited in the buffer), waiting up to timeout; None on timeout or once closed."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._items or self._closed, timeout=timeout):
                return None
            if not self._items or self._closed:
                return None
            item, put_at = self._items.popleft()
            return item, time.monotonic() - put_at

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
        self._non_finite_seen = 0  # the estimator's non-finite drops at the last diagnostics update

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
                     newest_stamp_ns: int | None = None, wait_s: float | None = None) -> ProcessorOutput | None:
        """process() that never raises: a bad frame is counted, logged once per kind and gives None.

        newest_stamp_ns is the newest stamp received (LatestFrameBuffer.newest_stamp_ns): a frame
        more than max_age_s behind it is skipped as 'stale'. wait_s is how long the frame waited in the
        buffer (reported beside the processing time). Bag replay leaves both None.
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
        self.stats.record(self.clock() - t0, wait_s)
        return out

    def record_published(self, out: ProcessorOutput, now_ns: int) -> float:
        """Count a published frame at now_ns (the node's clock); return its end-to-end latency in seconds.

        End-to-end is the image stamp to the publish: driver and transport delay, the synchroniser,
        the buffer wait and the processing together, the number a robot's controller sees.
        """
        end_to_end_s = (int(now_ns) - out.result.stamp_ns) / 1e9
        self.stats.record_published(end_to_end_s)
        return end_to_end_s

    def _skip(self, kind: str, message: str) -> None:
        """Count and (once per kind) log a skipped frame."""
        self.stats.skip(kind)
        self.log_once(kind, message)

    def process(self, image_msg: Any, info_msg: Any | None, detections_msg: Any | None = None) -> ProcessorOutput:
        """Estimate on one frame and build its messages, stamped with the image's stamp and frame.

        Raises:
            ProcessorError: with kind missing_camera_info, missing_detections, wrong_msgtype, no_frame_id,
                bad_camera_info, unknown_encoding, wrong_encoding, bad_image, oversize, size_mismatch,
                estimator or build.
        """
        cfg = self.config
        t0 = self.clock()
        if info_msg is None:
            raise ProcessorError("missing_camera_info", "no camera_info came with the image")
        if cfg.use_detections and detections_msg is None:
            raise ProcessorError("missing_detections", "use_detections is true but no detections came with the image")
        _check_message_fields(cfg, image_msg, info_msg, detections_msg if cfg.use_detections else None)
        stamp_ns, frame_id = stamp_ns_of(image_msg.header), str(image_msg.header.frame_id)
        if not frame_id:
            raise ProcessorError("no_frame_id", "image header has an empty frame_id; TF needs the camera frame")
        try:
            intr, dist = camera_info_to_intrinsics(info_msg)
        except MessageError as err:
            raise ProcessorError("bad_camera_info", str(err)) from err
        if np.any(np.abs(dist) > 1e-9):
            self.log_once("distorted", f"camera_info has distortion {dist.tolist()}: the image is assumed rectified")
        if cfg.compressed:
            self._check_compressed_size(image_msg, intr)
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

    def diagnostics(self, dropped: int = 0, inputs: Any | None = None) -> tuple[str, str, dict[str, str]]:
        """(level 'ok' | 'warn' | 'error', summary, key-values) for a diagnostic_updater task.

        Three times are reported apart: processing (decode + estimate + build), the wait in the buffer,
        and end-to-end (image stamp to publish, on the node's clock; only where record_published is
        called). inputs is the node's runtime.InputMonitor: what arrived per input, the images that
        found no partner, and a silent or wrongly typed input, which make the level an error.
        """
        s = self.stats.snapshot()
        values = {
            "task": self.config.task, "device": str(self.estimator.device), "processed": str(s.processed),
            "published": str(s.published), "skipped": str(sum(s.skipped.values())),
            "dropped (newest wins)": str(dropped), "rate (Hz)": f"{s.rate_hz:.2f}",
            "end-to-end median (ms)": _ms(s.end_to_end_median_s), "end-to-end p95 (ms)": _ms(s.end_to_end_p95_s),
            "buffer wait median (ms)": _ms(s.wait_median_s), "buffer wait p95 (ms)": _ms(s.wait_p95_s),
            "processing median (ms)": _ms(s.latency_median_s), "processing p95 (ms)": _ms(s.latency_p95_s),
        }
        values.update({f"skipped: {kind}": str(n) for kind, n in sorted(s.skipped.items())})
        noted = {k: n for k, n in self.log_once.counts.items() if k not in s.skipped}
        values.update({f"noted: {kind}": str(n) for kind, n in sorted(noted.items())})
        # What the estimator dropped one by one: detections (bad boxes, over max_detections, PnP, non-finite
        # output) or hands (no blob, a non-finite output; and, kept at their last good centre or pose, a
        # non-finite refinement or recentre pass, or one out of range).
        unit = "detections" if self.config.task == "objects" else "hands"
        dropped_dets = dict(getattr(self.estimator, "skipped", {}) or {})
        values.update({f"{unit} dropped: {kind}": str(n) for kind, n in sorted(dropped_dets.items())})
        # The joints network's non-finite output on a recentre pass is the same fault as on the first pass.
        non_finite = int(dropped_dets.get("non_finite_output", 0)) + int(dropped_dets.get("non_finite_recentre", 0))
        new_non_finite, self._non_finite_seen = non_finite - self._non_finite_seen, non_finite
        if new_non_finite > 0:
            message = f"the network gave non-finite output for {new_non_finite} {unit} since the last update"
            self.log_once("non_finite_output", message + " (never published: dropped, or the pose before kept)")
            return "error", message, values
        problem = None
        if inputs is not None:
            input_values, problem = inputs.report()
            values.update(input_values)
            if problem is not None:
                self.log_once(f"inputs_{problem.kind}", problem.message)
                return "error", problem.message, values
        window = f"{self.stats.rate_window_s:g} s"
        if s.recent_skipped and not s.recent_processed:
            return "error", f"every frame of the last {window} was skipped", values
        if not s.recent_processed:
            return "warn", f"no frames in the last {window}", values
        if s.recent_skipped:
            recent = s.recent_skipped + s.recent_processed
            return "warn", f"{s.recent_skipped} of the last {recent} frames skipped", values
        timing = f"{s.latency_median_s * 1e3:.0f} ms processing median"
        if np.isfinite(s.end_to_end_median_s):
            timing = (f"{s.end_to_end_median_s * 1e3:.0f} ms end-to-end median "
                      f"({s.latency_median_s * 1e3:.0f} ms processing, {s.wait_median_s * 1e3:.0f} ms in the buffer)")
        return "ok", f"{s.rate_hz:.1f} Hz, {timing}", values

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
            if colour:
                return image_to_rgb(msg)
            depth = image_to_depth(msg)
            if enc == "32FC1":
                self._note_millimetres(depth)
            return depth
        except MessageError as err:
            raise ProcessorError("bad_image", str(err)) from err

    def _note_millimetres(self, depth_m: np.ndarray) -> None:
        """Say once when 32FC1 depth looks like millimetres (REP 118: metres): no hand would ever be found."""
        sample = depth_m[::4, ::4]
        if not np.isfinite(sample).any():
            return
        median = float(np.nanmedian(sample))
        if median > MILLIMETRE_HINT_M:
            self.log_once(
                "depth_32FC1_looks_like_mm",
                f"32FC1 depth has median {median:.1f}, more than {MILLIMETRE_HINT_M:g} m: it looks like millimetres, "
                "but REP 118 says 32FC1 holds metres; publish 16UC1 millimetres or 32FC1 metres",
            )

    def _check_compressed_size(self, msg: Any, intr: Intrinsics) -> None:
        """Refuse a compressed image by the size in its PNG/JPEG header, before decoding a byte of it."""
        try:
            size = compressed_size(msg)
        except MessageError as err:
            raise ProcessorError("bad_image", str(err)) from err
        w, h = size
        if w * h > MAX_IMAGE_PIXELS:
            raise ProcessorError(
                "oversize", f"compressed image is {w}x{h} ({w * h / 1e6:.0f} Mpx) by its header, over the "
                f"{MAX_IMAGE_PIXELS / 1e6:.0f} Mpx limit; not decoded"
            )
        if (w, h) != (intr.width, intr.height):
            raise ProcessorError(
                "size_mismatch", f"image is {w}x{h} but camera_info says {intr.width}x{intr.height} "
                "(read from the compressed header; not decoded)"
            )

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


# 32FC1 depth with a median beyond this many metres is millimetres in disguise (no depth camera sees 20 m).
MILLIMETRE_HINT_M = 20.0


def _ms(seconds: float) -> str:
    """Seconds as milliseconds for diagnostics ('nan' before the first value)."""
    return f"{seconds * 1e3:.1f}"


# --------------------------------------------------------------------------------------------
# Message types of the inputs: checked against the configuration before replay and in the node


def expected_input_types(config: NodeConfig) -> dict[str, str]:
    """{input: 'pkg/msg/Name'} the configuration expects: 'image', 'camera_info' and, with detections, 'detections'."""
    image = "sensor_msgs/msg/CompressedImage" if config.compressed else "sensor_msgs/msg/Image"
    out = {"image": image, "camera_info": "sensor_msgs/msg/CameraInfo"}
    if config.use_detections:
        out["detections"] = "vision_msgs/msg/Detection2DArray"
    return out


def _canonical(msgtype: str) -> str:
    """'sensor_msgs/Image' and 'sensor_msgs/msg/Image' alike as 'sensor_msgs/msg/Image'."""
    parts = str(msgtype).strip("/").split("/")
    return f"{parts[0]}/msg/{parts[-1]}" if len(parts) >= 2 else str(msgtype)


def input_type_problems(config: NodeConfig, topics: Mapping[str, str],
                        found: Mapping[str, str | Iterable[str]]) -> list[str]:
    """Each input whose topic carries a type the configuration does not expect, as one sentence.

    Args:
        config: the node's parameters (compressed and use_detections decide the expected types).
        topics: {input ('image', 'camera_info', 'detections'): topic name} as resolved (bag or node).
        found: {topic: msgtype or msgtypes} as a bag's connections or rclpy's get_topic_names_and_types
            list them. Topics not found are not a problem here (nothing to check yet).
    """
    problems = []
    for role, expected in expected_input_types(config).items():
        topic = topics.get(role)
        if topic is None or topic not in found:
            continue
        got = found[topic]
        got_types = sorted({_canonical(t) for t in ([got] if isinstance(got, str) else got)})
        if got_types and got_types != [expected]:
            hint = ""
            if role == "image" and "sensor_msgs/msg/Image" in got_types and config.compressed:
                hint = "; set compressed to false for raw images"
            elif role == "image" and "sensor_msgs/msg/CompressedImage" in got_types and not config.compressed:
                hint = "; set compressed to true for sensor_msgs/CompressedImage"
            problems.append(f"{role} topic {topic} carries {', '.join(got_types)}, but {expected} is expected{hint}")
    return problems


def check_input_types(config: NodeConfig, topics: Mapping[str, str], found: Mapping[str, str | Iterable[str]]) -> None:
    """Raise ProcessorError (kind 'wrong_msgtype') naming every input topic of the wrong message type.

    Bag replay calls it once the bag's connections are open, before the first frame; the node at start
    and with every diagnostics update (publishers come and go).
    """
    problems = input_type_problems(config, topics, found)
    if problems:
        raise ProcessorError("wrong_msgtype", "; ".join(problems))


def _check_message_fields(config: NodeConfig, image: Any, info: Any, detections: Any | None) -> None:
    """A message of another type (a String on the image topic) named as such, not an AttributeError later."""
    image_fields = ("format", "data") if config.compressed else ("encoding", "height", "width", "step", "data")
    checks = [("image", image, ("header",) + image_fields), ("camera_info", info, ("header", "k", "d", "width"))]
    if detections is not None:
        checks.append(("detections", detections, ("header", "detections")))
    expected = expected_input_types(config)
    for role, msg, names in checks:
        missing = [n for n in names if not hasattr(msg, n)]
        if missing:
            note = " (compressed is true)" if role == "image" and config.compressed else ""
            raise ProcessorError(
                "wrong_msgtype", f"{role} message is a {type(msg).__name__} without {missing}; "
                f"expected {expected[role]}{note}"
            )


def _absolute(topic: str) -> str:
    """A relative topic name as the absolute name it resolves to in the root namespace (bags have no namespace)."""
    return "/" + topic.lstrip("/")
