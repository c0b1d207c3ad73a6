"""The bags' format: topic names, a writer of our messages, a streamed reader that pairs each image
with the messages of its stamp, and the ground truth read back out of messages.

Bags are rosbag2 version 8 (they play on Humble and Jazzy; MCAP by default, sqlite3 on request).
Ground truth travels in the bag itself:
- objects: vision_msgs/Detection3DArray on /ground_truth/objects, one detection per annotated
  instance: results[0].pose.pose = the model-to-camera pose, hypothesis.class_id = the object id,
  hypothesis.score = the instance's visib_fract; TF frames gt/<name>; and, for a bag made from a BOP
  scene, std_msgs/String on /ground_truth/bop_image: JSON {dataset, split, scene_id, im_id}.
- hands: featmap_ros/HandJointsArray on /ground_truth/hands (joints in the camera frame, metres).
"""

from __future__ import annotations

import json
import shutil
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from mcap.reader import NonSeekingReader
from rosbags.highlevel import AnyReader
from rosbags.rosbag2 import StoragePlugin, Writer

from featmap_ros.errors import FeatmapError
from featmap_ros.geometry import matrix_from_quat
from featmap_ros.ros.messages import MessageFactory, stamp_ns_of
from featmap_ros.ros.typestore import typestore

START_NS = 1_700_000_000_000_000_000  # an arbitrary, plausible wall-clock start for made bags
STORAGES = {"mcap": StoragePlugin.MCAP, "sqlite3": StoragePlugin.SQLITE3}
MCAP_MAGIC = b"\x89MCAP0\r\n"
MAX_PENDING_IMAGES = 32  # images waiting for their companions; beyond it the oldest is paired with what came
MAX_BUFFERED = 1024  # companion messages kept per topic while waiting for images

RawMessage = tuple[str, str, int, bytes, str, str]  # topic, msgtype, log time ns, CDR bytes, definition, hash


class BagError(FeatmapError, RuntimeError):
    """A bag cannot be written, read or evaluated (the message names what was found)."""


@dataclass(frozen=True)
class BagTopics:
    """Topic names of one task's bag; detections (and image_id) are None when the task runs without them."""

    image: str
    camera_info: str
    detections: str | None
    ground_truth: str
    camera_frame: str
    image_id: str | None = None


TOPICS = {
    "objects": BagTopics("/camera/color/image_raw", "/camera/color/camera_info", "/camera/color/detections",
                         "/ground_truth/objects", "camera_color_optical_frame", "/ground_truth/bop_image"),
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

    def write_bop_image_id(self, topic: str, t_ns: int, dataset: str, split: str, scene_id: int, im_id: int) -> None:
        """Write the BOP identity of the frame at t_ns (std_msgs/String holding JSON)."""
        data = json.dumps({"dataset": dataset, "split": split, "scene_id": int(scene_id), "im_id": int(im_id)})
        self.write(topic, "std_msgs/msg/String", t_ns, self.ts.types["std_msgs/msg/String"](data=data))


# --------------------------------------------------------------------------------------------
# Reading, streamed


@dataclass
class SyncedFrame:
    """One image with the messages of the same stamp (None where a topic had nothing close enough)."""

    stamp_ns: int
    image: Any
    camera_info: Any | None
    detections: Any | None
    ground_truth: Any | None
    image_id: Any | None = None


@dataclass
class BagSource:
    """An open bag: its topics (topic -> msgtype), image count when known, warnings, and its messages."""

    path: Path
    topics: dict[str, str]
    messages: Callable[[], Iterator[RawMessage]]
    deserialize: Callable[[bytes, str], Any]
    close: Callable[[], None]
    image_counts: dict[str, int] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def __enter__(self) -> BagSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_bag(path: Path, topics: BagTopics) -> BagSource:
    """Open a rosbag2 (sqlite3 or MCAP, Humble or Jazzy) and check that the image and camera_info topics are there.

    An MCAP file without its summary (truncated) is read record by record instead, with a warning.

    Raises:
        BagError: the bag cannot be opened, is not a bag, or lacks the image or camera_info topic.
    """
    path = Path(path)
    source = _open_messages(path)
    missing = [t for t in (topics.image, topics.camera_info) if t not in source.topics]
    if missing:
        source.close()
        raise BagError(f"bag {path} has no topic {missing}; topics found: {sorted(source.topics)}")
    wanted = [topics.image, topics.camera_info, topics.ground_truth, topics.detections]
    for t in sorted({t for t in wanted if t} - set(source.topics)):
        source.warnings.append(f"topic {t} is not in the bag; found {sorted(source.topics)}")
    return source


def _open_messages(path: Path) -> BagSource:
    if not path.exists():
        raise BagError(f"bag {path} does not exist")
    files = sorted(path.glob("*.mcap")) if path.is_dir() else ([path] if path.suffix == ".mcap" else [])
    for f in files:  # a file that only carries the name (a text file called x.mcap) is said so plainly
        with open(f, "rb") as fh:
            head = fh.read(len(MCAP_MAGIC))
        if head != MCAP_MAGIC:
            raise BagError(f"{f} is not an MCAP file: it starts with {head!r}, expected the MCAP magic {MCAP_MAGIC!r}")
    try:
        reader = AnyReader([path])
        reader.open()
    except Exception as err:  # noqa: BLE001 - rosbags raises several kinds; all mean "not readable as a whole"
        if not files:
            raise BagError(f"cannot open bag {path}: {err}") from err
        source = _salvage_mcap(path, files)
        source.warnings.append(f"bag {path} could not be opened whole ({err}); reading its MCAP records in order")
        return source

    def messages() -> Iterator[RawMessage]:
        for conn, t_ns, data in reader.messages():
            yield conn.topic, conn.msgtype, t_ns, bytes(data), conn.msgdef.data, conn.digest

    counts: dict[str, int] = {}
    for c in reader.connections:
        counts[c.topic] = counts.get(c.topic, 0) + int(c.msgcount)
    return BagSource(path, {c.topic: c.msgtype for c in reader.connections}, messages, reader.deserialize,
                     reader.close, counts)


def _salvage_mcap(path: Path, files: list[Path]) -> BagSource:
    """Read MCAP files front to back without their summary, deserialising with our type store."""
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

    def messages() -> Iterator[RawMessage]:
        for fh in handles:
            for schema, channel, msg in NonSeekingReader(fh).iter_messages(log_time_order=False):
                msgtype = schema.name if schema else ""
                yield channel.topic, msgtype, msg.log_time, bytes(msg.data), schema.data.decode() if schema else "", ""

    def close() -> None:
        for fh in handles:
            fh.close()

    if not topics:
        close()
        raise BagError(f"bag {path} holds no readable MCAP channel (files: {[f.name for f in files]})")
    return BagSource(path, topics, messages, ts.deserialize_cdr, close)


def stream_frames(source: BagSource, topics: BagTopics, slop_s: float = 0.05,
                  on_raw: Callable[[RawMessage], None] | None = None) -> Iterator[SyncedFrame]:
    """Yield the bag's images one by one, each with the nearest companion message within slop_s.

    Memory stays flat in the bag's length: an image waits only until every companion topic has
    passed its stamp by more than slop_s (or MAX_PENDING_IMAGES wait), and companion messages older
    than the oldest waiting image minus slop_s are dropped. Stamps are assumed to grow on each topic,
    as they do in a recording. A bag damaged part-way yields what was read before the damage and
    adds a warning to source.warnings. on_raw sees every message as read (to copy it elsewhere).
    """
    slop_ns = int(slop_s * 1e9)
    companions = [t for t in (topics.camera_info, topics.detections, topics.ground_truth, topics.image_id)
                  if t and t in source.topics]
    buffers: dict[str, deque[tuple[int, Any]]] = {t: deque(maxlen=MAX_BUFFERED) for t in companions}
    latest: dict[str, int | None] = dict.fromkeys(companions)
    pending: deque[tuple[int, Any]] = deque()
    floor = [None]  # stamp of the last image yielded: older companions can match no later image

    def nearest(topic: str | None, t: int) -> Any | None:
        best, best_d = None, slop_ns + 1
        for s, msg in buffers.get(topic, ()) if topic else ():
            if abs(s - t) < best_d:
                best, best_d = msg, abs(s - t)
        return best

    def pop() -> SyncedFrame:
        stamp, img = pending.popleft()
        floor[0] = stamp
        lo = (pending[0][0] if pending else stamp) - slop_ns
        frame = SyncedFrame(stamp, img, nearest(topics.camera_info, stamp), nearest(topics.detections, stamp),
                            nearest(topics.ground_truth, stamp), nearest(topics.image_id, stamp))
        for buf in buffers.values():
            while buf and buf[0][0] < lo:
                buf.popleft()
        return frame

    def ready(stamp: int) -> bool:
        return all(s is not None and s > stamp + slop_ns for s in latest.values())

    wanted = {topics.image, *companions}
    n_read = 0
    try:
        for raw in source.messages():
            if on_raw is not None:
                on_raw(raw)
            topic, msgtype, t_ns, data = raw[:4]
            if topic not in wanted:
                continue
            msg = source.deserialize(data, msgtype)
            n_read += 1
            stamp = stamp_ns_of(msg.header) if hasattr(msg, "header") else t_ns
            if topic == topics.image:
                pending.append((stamp, msg))
            else:
                if floor[0] is None or stamp >= floor[0] - slop_ns:
                    buffers[topic].append((stamp, msg))
                latest[topic] = stamp if latest[topic] is None else max(latest[topic], stamp)
            while pending and (ready(pending[0][0]) or len(pending) > MAX_PENDING_IMAGES):
                yield pop()
    except Exception as err:  # noqa: BLE001 - a truncated file surfaces as any of several errors
        source.warnings.append(f"bag {source.path} is damaged after {n_read} messages ({type(err).__name__}: "
                               f"{err}); scoring what was read before the damage")
    while pending:
        yield pop()


@dataclass
class BagContents:
    """A whole bag in memory (for tests and small tools): synchronised frames, raw messages, warnings."""

    frames: list[SyncedFrame]
    topics: dict[str, str]  # topic -> msgtype of every connection
    raw: list[RawMessage] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def read_bag(path: Path, topics: BagTopics, slop_s: float = 0.05, keep_raw: bool = False) -> BagContents:
    """Read a whole bag into memory: stream_frames collected (bag replay streams instead)."""
    raw: list[RawMessage] = []
    with open_bag(path, topics) as source:
        frames = list(stream_frames(source, topics, slop_s, raw.append if keep_raw else None))
        return BagContents(frames, source.topics, raw, source.warnings)


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


def bop_image_id(msg: Any | None) -> dict | None:
    """{dataset, split, scene_id, im_id} of a /ground_truth/bop_image message, or None (absent or unreadable)."""
    if msg is None:
        return None
    try:
        d = json.loads(msg.data)
        return {"dataset": str(d["dataset"]), "split": str(d["split"]), "scene_id": int(d["scene_id"]),
                "im_id": int(d["im_id"])}
    except (ValueError, KeyError, TypeError, AttributeError):
        return None
