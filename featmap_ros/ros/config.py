"""The featmap node's parameters: NodeConfig, the one typed source of them, and ROS params files.

ROS parameters, params files (config/*.yaml), launch arguments and the bag tools all go through
NodeConfig: unknown names and wrong types fail at start-up with the name and the expected type.
Pure Python (no rclpy): the node declares parameter_specs() and builds NodeConfig.from_params.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from functools import cache
from pathlib import Path
from typing import Any, get_type_hints

import yaml

from featmap_ros.backends import BACKENDS, HAND_RECENTRE, MAX_RECENTRE, MAX_RECROP, PRECISIONS
from featmap_ros.errors import FeatmapError

__all__ = ["NodeConfig", "ParamSpec", "ProcessorError", "TASKS", "load_node_config", "parameter_specs",
           "unknown_parameters"]

TASKS = ("objects", "hands")

# Durations longer than this (11.6 days) are no sensible slop, age or lifetime, and overflow ROS
# Durations (int64 nanoseconds) long before float seconds run out.
MAX_SECONDS = 1e6
# ROS parameters every node may get from a params file or launch that are not ours to check.
ROS_RESERVED_PARAMS = ("use_sim_time", "start_type_description_service", "diagnostic_updater.period")
ROS_RESERVED_PREFIXES = ("qos_overrides.",)


class ProcessorError(FeatmapError, ValueError):
    """A frame or a configuration the processor cannot work with; `kind` names the reason for counting.

    Defined here, beside the configuration that raises it first; ros.processor raises it for frames.
    """

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind



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
    backend: str = _param(
        "auto", "what runs the network: 'torch' (a checkpoint), 'onnxruntime' (its `featmap export`; needs no "
        "torch; providers TensorRT, CUDA, CPU where available) or 'auto' (onnxruntime when installed and the "
        "model has an export, else torch)"
    )
    cpu_threads: int = _param(
        1, "CPU threads for the network (0 = the backend's default, one per core); 1 resists a busy CPU best "
        "(docs/ros.md), raise it only on cores nothing else uses"
    )
    precision: str = _param(
        "auto", "backend torch: 'auto' (CUDA in half precision, a CPU in float32), 'float32', or 'bf16' (bf16 "
        "autocast, on CPUs with AMX-BF16 or AVX512-BF16 or CUDA: faster on such CPUs, docs/ros.md); with "
        "onnxruntime only 'auto'"
    )
    decode_threads: int = _param(
        1, "objects: threads that solve the detections' PnP after the network (1: in the callback's thread); "
        "more can help on many idle cores (no reliable gain measured on 2, docs/results.md)"
    )
    recrop: int = _param(
        0, "objects: passes that cut each crop again around the box the pose found projects to, and estimate "
        f"again (0-{MAX_RECROP}; each pass costs one more network pass and decode; docs/ros.md)"
    )
    recentre: int = _param(
        HAND_RECENTRE, "hands: passes that crop each hand again around the palm its joints found, and estimate "
        f"again (0-{MAX_RECENTRE}; each pass costs one more network pass; docs/ros.md)"
    )
    max_detections: int = _param(
        32, "most detections estimated per frame: the highest scores are kept, the rest counted as dropped"
    )
    refine_centre: bool = _param(
        True, "hands: move the located hand centre towards the palm with the checkpoint's centre refiner "
        "(where it has one; off: the centre of mass, as DeepPrior++ without its refinement)"
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
            if kind == "double" and not math.isfinite(getattr(self, f.name)):
                raise ProcessorError("config", f"parameter {f.name} = {value!r} must be a finite number")
        if self.task not in TASKS:
            raise ProcessorError("config", f"task {self.task!r} is unknown; expected one of {list(TASKS)}")
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device):
            raise ProcessorError("config", f"device {self.device!r} is unknown; expected auto, cpu, cuda or cuda:N")
        if self.backend not in BACKENDS:
            raise ProcessorError("config", f"backend {self.backend!r} is unknown; expected one of {list(BACKENDS)}")
        if self.precision not in PRECISIONS:
            raise ProcessorError("config", f"precision {self.precision!r} is unknown; expected one of "
                                           f"{list(PRECISIONS)}")
        if self.task == "objects" and not self.use_detections:
            raise ProcessorError("config", "task objects crops around 2D detections: use_detections must be true")
        for name in ("image_topic", "camera_info_topic", "detections_topic", "markers_topic", "objects_topic",
                     "hands_topic", "overlay_topic"):
            if not getattr(self, name).strip():
                raise ProcessorError("config", f"{name} is empty; expected a topic name")
        if not 0.0 <= self.min_score <= 1.0:
            raise ProcessorError("config", f"min_score {self.min_score} is outside [0, 1]")
        if not 0.0 < self.sync_slop_s <= MAX_SECONDS:
            raise ProcessorError("config", f"sync_slop_s {self.sync_slop_s} must be in (0, {MAX_SECONDS:g}] seconds")
        if self.cpu_threads < 0:
            raise ProcessorError("config", f"cpu_threads {self.cpu_threads} must be >= 0 (0 = the backend's default)")
        if self.max_detections < 1:
            raise ProcessorError("config", f"max_detections {self.max_detections} must be >= 1")
        if self.decode_threads < 1:
            raise ProcessorError("config", f"decode_threads {self.decode_threads} must be >= 1")
        if not 0 <= self.recrop <= MAX_RECROP:
            raise ProcessorError("config", f"recrop {self.recrop} must be in [0, {MAX_RECROP}]")
        if not 0 <= self.recentre <= MAX_RECENTRE:
            raise ProcessorError("config", f"recentre {self.recentre} must be in [0, {MAX_RECENTRE}]")
        if self.queue_size < 1:
            raise ProcessorError("config", f"queue_size {self.queue_size} must be >= 1")
        for name in ("max_age_s", "marker_lifetime_s"):
            if not 0.0 <= getattr(self, name) <= MAX_SECONDS:
                raise ProcessorError("config", f"{name} {getattr(self, name)} must be in [0, {MAX_SECONDS:g}] seconds")
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
