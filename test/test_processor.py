"""The node's processing path off-ROS: parameters, FrameProcessor on real bag messages, bad input, buffering."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
import threading
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from rosbags.highlevel import AnyReader
from rosbags.rosbag2 import StoragePlugin, Writer

from featmap_ros.datasets.nyu import JOINT_NAMES
from featmap_ros.geometry import Intrinsics, box_corners
from featmap_ros.results import Detection2D, HandPose, ObjectPose
from featmap_ros.ros.config import NodeConfig, ProcessorError, load_node_config, parameter_specs, unknown_parameters
from featmap_ros.ros.messages import MessageFactory
from featmap_ros.ros.processor import FrameProcessor, LatestFrameBuffer, ProcessorStats, load_estimator_for
from featmap_ros.ros.typestore import typestore

ROOT = Path(__file__).resolve().parents[1]
CAMERA = "camera_color_optical_frame"
STAMP_NS = 1_700_000_000_250_000_000
INTR = Intrinsics(fx=60.0, fy=60.0, cx=31.5, cy=23.5, width=64, height=48)


class FakeEstimator:
    """Stands in for featmap_ros.estimator: a pose per detection, one hand at the nearest depth."""

    def __init__(self, task: str, fail: Exception | None = None) -> None:
        self.task, self.device, self.fail = task, "cpu", fail
        self.calls: list[Any] = []

    def estimate_objects(self, rgb: np.ndarray, intrinsics: Intrinsics, detections: list[Detection2D]) -> list:
        assert rgb.dtype == np.uint8 and rgb.shape == (intrinsics.height, intrinsics.width, 3)
        self.calls.append(detections)
        if self.fail is not None:
            raise self.fail
        extent = np.array([0.06, 0.05, 0.08])
        poses = []
        for det in detections:
            x, y, w, h = det.box_xywh
            z = 0.8
            u, v = x + w / 2, y + h / 2
            t = np.array([(u - intrinsics.cx) * z / intrinsics.fx, (v - intrinsics.cy) * z / intrinsics.fy, z])
            poses.append(ObjectPose(obj_id=det.obj_id or 0, name=f"model{det.obj_id}", R=np.eye(3), t=t,
                                    corners_uv=np.full((8, 2), np.nan), corners_3d=box_corners(-extent / 2, extent),
                                    extent=extent, score=det.score))
        return poses

    def estimate_hands(self, depth_m: np.ndarray, intrinsics: Intrinsics, detections: list | None) -> list:
        assert depth_m.dtype == np.float32 and depth_m.shape == (intrinsics.height, intrinsics.width)
        self.calls.append(detections)
        if not np.isfinite(depth_m).any():
            raise ValueError("depth image has no valid pixel")  # as EstimatorError (a ValueError) would
        z = float(np.nanmin(depth_m))
        centre = np.array([0.0, 0.0, z + 0.05])
        joints = centre + np.linspace(-0.05, 0.05, 42).reshape(14, 3)
        return [HandPose(joints_xyz=joints, confidences=np.full(14, 0.9), centre=centre, cube_m=0.3, score=0.8)]


@pytest.fixture(scope="module")
def ts() -> Any:
    return typestore("humble")


@pytest.fixture(scope="module")
def factory(ts: Any) -> MessageFactory:
    return MessageFactory.for_rosbags(ts)


def rgb_image(h: int = 48, w: int = 64) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def depth_image(h: int = 48, w: int = 64) -> np.ndarray:
    depth = np.full((h, w), 1.2, dtype=np.float32)
    depth[10:30, 20:40] = 0.6
    return depth


DETECTIONS = [Detection2D([10, 8, 20, 16], 0.9, class_id="can"), Detection2D([30, 20, 16, 20], 0.7, obj_id=8)]


def object_frame(factory: MessageFactory, stamp_ns: int = STAMP_NS, dets: list[Detection2D] | None = None,
                 rgb: np.ndarray | None = None) -> tuple[Any, Any, Any]:
    """(image, camera_info, detections) messages of one colour frame."""
    image = factory.image_rgb(rgb_image() if rgb is None else rgb, stamp_ns, CAMERA)
    info = factory.camera_info(INTR, stamp_ns, CAMERA)
    return image, info, factory.detection2d_array(DETECTIONS if dets is None else dets, stamp_ns, CAMERA)


def make_processor(factory: MessageFactory, task: str = "objects", estimator: Any = None,
                   **params: Any) -> tuple[FrameProcessor, list[str]]:
    """A FrameProcessor over a fake estimator, and the list its log lines go to."""
    if task == "hands":
        params.setdefault("use_detections", False)
    config = NodeConfig(task=task, object_names=["5:can", "8:driller"], **params)
    lines: list[str] = []
    return FrameProcessor(estimator or FakeEstimator(task), factory, config, log=lines.append), lines


# --------------------------------------------------------------------------------------------
# NodeConfig: the node's parameters and params files


def test_default_config_round_trips_through_a_params_file(tmp_path: Path) -> None:
    for config in (NodeConfig(), NodeConfig(task="hands", use_detections=False, min_score=0.25, object_names=["1:a"])):
        path = tmp_path / "params.yaml"
        path.write_text(config.to_yaml())
        assert load_node_config(path) == config


@pytest.mark.parametrize("name", ["objects.yaml", "hands.yaml"])
def test_shipped_params_files_load_without_unknown_keys(name: str) -> None:
    path = ROOT / "config" / name
    doc = yaml.safe_load(path.read_text())
    assert list(doc) == ["/**"] and list(doc["/**"]) == ["ros__parameters"]
    assert unknown_parameters(set(doc["/**"]["ros__parameters"])) == []
    config = load_node_config(path)
    assert config.task == name.removesuffix(".yaml")
    if config.task == "objects":
        assert config.object_name_map[5] == "can"


def test_a_node_section_overrides_the_wildcard(tmp_path: Path) -> None:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump({
        "/**": {"ros__parameters": {"min_score": 0.2, "use_sim_time": True}},
        "/robot/featmap": {"ros__parameters": {"min_score": 0.6, "frame_prefix": "fm/", "topics": {"x": 1}}},
        "other": {"ros__parameters": {"min_score": 0.9}},
    }))
    with pytest.raises(ProcessorError, match=r"unknown parameters \['topics.x'\]"):
        load_node_config(path, node_name="featmap")
    doc = yaml.safe_load(path.read_text())
    del doc["/robot/featmap"]["ros__parameters"]["topics"]
    path.write_text(yaml.safe_dump(doc))
    config = load_node_config(path, node_name="featmap")
    assert config.min_score == 0.6 and config.frame_prefix == "fm/"
    with pytest.raises(ProcessorError, match="say which node"):
        load_node_config(path)


def test_unknown_keys_fail_and_name_the_key(tmp_path: Path) -> None:
    path = tmp_path / "params.yaml"
    path.write_text("/**:\n  ros__parameters:\n    min_scor: 0.5\n")
    with pytest.raises(ProcessorError, match="min_scor") as err:
        load_node_config(path)
    assert err.value.kind == "config"


@pytest.mark.parametrize(("key", "value", "match"), [
    ("min_score", 1, "write 1.0"),  # ROS reads 1 as an integer: rclpy would refuse it too
    ("use_detections", "yes", "not of type bool"),
    ("queue_size", 2.0, "not of type integer"),
    ("queue_size", True, "not of type integer"),
    ("object_names", "5:can", "not of type string_array"),
    ("model_path", None, "not of type string"),
    ("task", "faces", "task 'faces' is unknown"),
    ("device", "gpu", "device 'gpu'"),
    ("object_names", ["5 can"], "not 'id:name'"),
    ("min_score", 1.5, "outside"),
    ("use_detections", False, "use_detections must be true"),
])
def test_wrong_types_and_values_fail(tmp_path: Path, key: str, value: Any, match: str) -> None:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump({"/**": {"ros__parameters": {key: value}}}))
    with pytest.raises(ProcessorError, match=match):
        load_node_config(path)


def test_a_params_file_needs_ros__parameters(tmp_path: Path) -> None:
    path = tmp_path / "params.yaml"
    path.write_text("/**:\n  min_score: 0.5\n")
    with pytest.raises(ProcessorError, match="ros__parameters"):
        load_node_config(path)


def test_every_parameter_is_declared_with_a_type_and_description() -> None:
    specs = {s.name: s for s in parameter_specs()}
    assert set(specs) == set(NodeConfig().to_params())
    assert all(s.description and s.ros_type in ("bool", "integer", "double", "string", "string_array")
               for s in specs.values())
    assert specs["model_path"].read_only and specs["device"].read_only and specs["task"].read_only
    assert not specs["min_score"].read_only and specs["min_score"].ros_type == "double"
    assert specs["object_names"].ros_type == "string_array" and specs["queue_size"].ros_type == "integer"


def test_live_parameters_change_and_read_only_ones_refuse(factory: MessageFactory) -> None:
    proc, _ = make_processor(factory)
    assert proc.update_config(min_score=0.8).min_score == 0.8 and proc.config.min_score == 0.8
    with pytest.raises(ProcessorError, match="read-only"):
        proc.update_config(model_path="/elsewhere")
    with pytest.raises(ProcessorError, match="outside"):
        proc.update_config(min_score=2.0)
    assert proc.config.min_score == 0.8


def test_loading_needs_a_model_path_and_the_estimator_must_do_the_task(factory: MessageFactory) -> None:
    with pytest.raises(ProcessorError, match="model_path is empty"):
        load_estimator_for(NodeConfig())
    with pytest.raises(ProcessorError, match="'hands'"):
        FrameProcessor(FakeEstimator("hands"), factory, NodeConfig(task="objects"))


# --------------------------------------------------------------------------------------------
# FrameProcessor on good frames


def test_object_outputs_carry_the_image_stamp_frame_and_prefixed_names(factory: MessageFactory) -> None:
    proc, lines = make_processor(factory, frame_prefix="fm/")
    out = proc.safe_process(*object_frame(factory))
    assert out is not None and lines == []
    assert out.result.stamp_ns == STAMP_NS and out.result.frame_id == CAMERA
    # "can" comes from the detector as a class name and is resolved to id 5 through object_names.
    assert [o.obj_id for o in out.result.objects] == [5, 8]
    assert [t.child_frame_id for t in out.transforms] == ["fm/can", "fm/driller"]
    stamped = [t.header for t in out.transforms] + [out.markers.markers[0].header, out.poses.header,
                                                    out.overlay.header]
    for header in stamped:
        assert header.frame_id == CAMERA
        assert header.stamp.sec * 10**9 + header.stamp.nanosec == STAMP_NS
    assert out.markers.markers[0].action == 3  # DELETEALL first
    assert [d.results[0].hypothesis.class_id for d in out.poses.detections] == ["5", "8"]
    assert (out.overlay.height, out.overlay.width, out.overlay.encoding) == (48, 64, "rgb8")
    assert set(out.result.timings) == {"decode", "estimate", "build", "total"}
    assert proc.stats.processed == 1


def test_two_instances_of_one_object_get_distinct_frames(factory: MessageFactory) -> None:
    proc, _ = make_processor(factory)
    dets = [Detection2D([5, 5, 10, 10], 0.9, obj_id=5), Detection2D([40, 20, 10, 10], 0.8, obj_id=5)]
    out = proc.safe_process(*object_frame(factory, dets=dets))
    assert [t.child_frame_id for t in out.transforms] == ["featmap/can", "featmap/can_1"]


def test_min_score_drops_weak_detections_before_the_estimator(factory: MessageFactory) -> None:
    est = FakeEstimator("objects")
    proc, _ = make_processor(factory, estimator=est, min_score=0.8)
    out = proc.safe_process(*object_frame(factory))
    assert [o.name for o in out.result.objects] == ["can"] and len(est.calls[0]) == 1


def test_overlay_can_be_switched_off(factory: MessageFactory) -> None:
    proc, _ = make_processor(factory, publish_overlay=False)
    out = proc.safe_process(*object_frame(factory))
    assert out.overlay is None and [t for t, _, _ in proc.topic_messages(out)] == [
        "/tf", "/featmap/markers", "/featmap/objects"]


def test_compressed_colour_input(factory: MessageFactory) -> None:
    proc, lines = make_processor(factory, compressed=True)
    image, info, dets = object_frame(factory)
    jpeg = factory.compressed_image(rgb_image(), STAMP_NS, CAMERA, "png")
    out = proc.safe_process(jpeg, info, dets)
    assert out is not None and lines == [] and len(out.result.objects) == 2


@pytest.mark.parametrize("encoding", ["16UC1", "32FC1"])
def test_hands_run_without_detections(factory: MessageFactory, encoding: str) -> None:
    est = FakeEstimator("hands")
    proc, lines = make_processor(factory, "hands", estimator=est)
    frame = "camera_depth_optical_frame"
    image = factory.image_depth(depth_image(), STAMP_NS, frame, encoding)
    out = proc.safe_process(image, factory.camera_info(INTR, STAMP_NS, frame))
    assert out is not None and lines == [] and est.calls == [None]
    assert out.transforms[0].child_frame_id == f"featmap/hand0_{JOINT_NAMES[0]}" and len(out.transforms) == 14
    assert out.poses.header.frame_id == frame and out.poses.hands[0].hand_id == "hand0"
    assert np.isclose(out.poses.hands[0].center.z, 0.65)


def test_the_real_estimator_runs_on_the_same_path(tmp_path: Path, factory: MessageFactory) -> None:
    """A tiny untrained hands checkpoint, loaded as the node loads it, through safe_process."""
    pytest.importorskip("torch", reason="the estimator needs PyTorch")
    from featmap_ros.model import checkpoint
    from featmap_ros.model.nets import FeatureMappingModel, NetConfig

    model = FeatureMappingModel(NetConfig(task="hands", input_size=32, width=4, feature_dim=32, dropout=0.0))
    path = checkpoint.save(tmp_path / "tiny", model, {"hands": {"joint_names": list(JOINT_NAMES), "cube_m": 0.3},
                                                      "crop": {"size": 32}})
    config = NodeConfig(task="hands", use_detections=False, model_path=str(path), device="cpu")
    lines: list[str] = []
    proc = FrameProcessor(load_estimator_for(config), factory, config, log=lines.append)
    intr = Intrinsics(fx=240.0, fy=240.0, cx=79.5, cy=59.5, width=160, height=120)
    depth = np.full((120, 160), 1.2, dtype=np.float32)
    depth[30:90, 50:110] = 0.6
    out = proc.safe_process(factory.image_depth(depth, STAMP_NS, CAMERA), factory.camera_info(intr, STAMP_NS, CAMERA))
    assert out is not None, lines
    assert len(out.poses.hands) == 1 and len(out.transforms) == 14 and proc.diagnostics()[0] == "ok"


def test_frames_read_back_from_an_mcap_bag(tmp_path: Path, ts: Any, factory: MessageFactory) -> None:
    """Frames written to a rosbag2 MCAP bag, read back, processed, and the outputs written and read again."""
    stamps = [STAMP_NS + i * 100_000_000 for i in range(3)]
    bag_in = tmp_path / "in"
    topics = {"/camera/color/image_raw": "sensor_msgs/msg/Image", "/camera/color/camera_info":
              "sensor_msgs/msg/CameraInfo", "/detections": "vision_msgs/msg/Detection2DArray"}
    with Writer(bag_in, version=8, storage_plugin=StoragePlugin.MCAP) as writer:
        conns = {t: writer.add_connection(t, m, typestore=ts) for t, m in topics.items()}
        for stamp in stamps:
            for (topic, msgtype), msg in zip(topics.items(), object_frame(factory, stamp), strict=True):
                writer.write(conns[topic], stamp, ts.serialize_cdr(msg, msgtype))

    frames: dict[int, dict[str, Any]] = defaultdict(dict)
    with AnyReader([bag_in], default_typestore=ts) as reader:
        for conn, t_ns, raw in reader.messages():
            frames[t_ns][conn.topic] = reader.deserialize(raw, conn.msgtype)
    proc, lines = make_processor(factory)
    outputs = [proc.safe_process(*(frames[s][t] for t in topics)) for s in sorted(frames)]
    assert all(o is not None for o in outputs) and lines == []

    bag_out = tmp_path / "out"
    with Writer(bag_out, version=8, storage_plugin=StoragePlugin.MCAP) as writer:
        conns = {}
        for out in outputs:
            for topic, msgtype, msg in proc.topic_messages(out):
                if topic not in conns:
                    conns[topic] = writer.add_connection(topic, msgtype, typestore=ts)
                writer.write(conns[topic], out.result.stamp_ns, ts.serialize_cdr(msg, msgtype))
    seen: dict[str, list[int]] = defaultdict(list)
    with AnyReader([bag_out], default_typestore=ts) as reader:
        for conn, _, raw in reader.messages():
            msg = reader.deserialize(raw, conn.msgtype)
            header = msg.transforms[0].header if conn.topic == "/tf" else (
                msg.markers[0].header if conn.topic == "/featmap/markers" else msg.header)
            assert header.frame_id == CAMERA
            seen[conn.topic].append(header.stamp.sec * 10**9 + header.stamp.nanosec)
            if conn.topic == "/tf":
                assert [t.child_frame_id for t in msg.transforms] == ["featmap/can", "featmap/driller"]
            if conn.topic == "/featmap/objects":
                assert len(msg.detections) == 2 and msg.detections[0].results[0].pose.pose.position.z == 0.8
    assert set(seen) == {"/tf", "/featmap/markers", "/featmap/objects", "/featmap/overlay"}
    assert all(v == stamps for v in seen.values())


# --------------------------------------------------------------------------------------------
# Bad input: None, one log line per kind, counted


def _bad_frames(factory: MessageFactory) -> dict[str, tuple[str, dict[str, Any], tuple[Any, Any, Any]]]:
    """kind -> (task, config, (image, info, detections)) of a frame the processor must skip."""
    image, info, dets = object_frame(factory)
    small_info = factory.camera_info(Intrinsics(60.0, 60.0, 15.5, 11.5, 32, 24), STAMP_NS, CAMERA)
    yuv = factory.image(np.zeros((48, 64, 2), np.uint8), "yuv422", STAMP_NS, CAMERA)
    nan_depth = factory.image_depth(np.full((48, 64), np.nan), STAMP_NS, CAMERA)
    uncalibrated = factory.camera_info(INTR, STAMP_NS, CAMERA)
    uncalibrated.k = np.zeros(9)
    no_frame = factory.image_rgb(rgb_image(), STAMP_NS, "")
    hands = {"use_detections": False}
    return {
        "size_mismatch": ("objects", {}, (image, small_info, dets)),
        "unknown_encoding": ("objects", {}, (yuv, info, dets)),
        "wrong_encoding": ("hands", hands, (image, info, None)),
        "estimator": ("hands", hands, (nan_depth, info, None)),
        "missing_camera_info": ("objects", {}, (image, None, dets)),
        "missing_detections": ("objects", {}, (image, info, None)),
        "bad_camera_info": ("objects", {}, (image, uncalibrated, dets)),
        "no_frame_id": ("objects", {}, (no_frame, info, dets)),
    }


@pytest.mark.parametrize("kind", ["size_mismatch", "unknown_encoding", "wrong_encoding", "estimator",
                                  "missing_camera_info", "missing_detections", "bad_camera_info", "no_frame_id"])
def test_bad_input_gives_none_and_one_log_line_per_kind(factory: MessageFactory, kind: str) -> None:
    task, params, frame = _bad_frames(factory)[kind]
    proc, lines = make_processor(factory, task, **params)
    assert proc.safe_process(*frame) is None
    assert proc.safe_process(*frame) is None
    assert len(lines) == 1 and f"[{kind}:" in lines[0]
    assert proc.stats.snapshot().skipped == {kind: 2} and proc.stats.processed == 0
    with pytest.raises(ProcessorError) as err:
        proc.process(*frame)
    assert err.value.kind == kind


def test_size_mismatch_says_both_sizes(factory: MessageFactory) -> None:
    _, _, frame = _bad_frames(factory)["size_mismatch"]
    proc, _ = make_processor(factory)
    with pytest.raises(ProcessorError, match="image is 64x48 but camera_info says 32x24"):
        proc.process(*frame)


def test_empty_detections_give_empty_outputs_not_an_error(factory: MessageFactory) -> None:
    est = FakeEstimator("objects")
    proc, lines = make_processor(factory, estimator=est)
    out = proc.safe_process(*object_frame(factory, dets=[]))
    assert out is not None and lines == [] and est.calls == []
    assert out.transforms == [] and out.poses.detections == [] and [m.action for m in out.markers.markers] == [3]
    assert out.poses.header.frame_id == CAMERA


def test_unexpected_errors_are_caught_and_named(factory: MessageFactory) -> None:
    proc, lines = make_processor(factory, estimator=FakeEstimator("objects", fail=RuntimeError("CUDA OOM")))
    assert proc.safe_process(*object_frame(factory)) is None
    assert "internal_RuntimeError" in lines[0] and "CUDA OOM" in lines[0]


def test_stale_frames_are_skipped_relative_to_the_newest(factory: MessageFactory) -> None:
    proc, lines = make_processor(factory, max_age_s=0.2)
    frame = object_frame(factory)
    assert proc.safe_process(*frame, newest_stamp_ns=STAMP_NS + 300_000_000) is None
    assert proc.safe_process(*frame, newest_stamp_ns=STAMP_NS + 100_000_000) is not None
    assert proc.stats.snapshot().skipped == {"stale": 1} and len(lines) == 1
    proc.update_config(max_age_s=0.0)
    assert proc.safe_process(*frame, newest_stamp_ns=STAMP_NS + 10**10) is not None


def test_distortion_is_logged_once_but_not_skipped(factory: MessageFactory) -> None:
    proc, lines = make_processor(factory)
    image, _, dets = object_frame(factory)
    info = factory.camera_info(INTR, STAMP_NS, CAMERA, d=np.array([0.1, 0, 0, 0, 0]))
    assert proc.safe_process(image, info, dets) is not None and proc.safe_process(image, info, dets) is not None
    assert len(lines) == 1 and "rectified" in lines[0]


# --------------------------------------------------------------------------------------------
# Buffering between the executor and the worker, and the numbers diagnostics report


def test_latest_frame_buffer_keeps_the_newest_and_counts_drops() -> None:
    buf: LatestFrameBuffer[int] = LatestFrameBuffer()
    for i in range(3):
        buf.put(i, stamp_ns=100 + i)
    assert len(buf) == 1 and buf.dropped == 2 and buf.newest_stamp_ns == 102
    assert buf.get(timeout=0) == 2 and buf.get(timeout=0.01) is None
    two: LatestFrameBuffer[int] = LatestFrameBuffer(size=2)
    for i in range(3):
        two.put(i)
    assert [two.get(0), two.get(0)] == [1, 2] and two.dropped == 1


def test_latest_frame_buffer_is_thread_safe_and_close_wakes_the_worker() -> None:
    buf: LatestFrameBuffer[int] = LatestFrameBuffer()
    got: list[int] = []

    def worker() -> None:
        while (item := buf.get(timeout=5)) is not None:
            got.append(item)

    thread = threading.Thread(target=worker)
    thread.start()
    for i in range(2000):
        buf.put(i)
    buf.close()
    thread.join(timeout=5)
    assert not thread.is_alive()
    assert got == sorted(got) and len(got) + buf.dropped + len(buf) == 2000 == buf.received


def test_stats_give_latency_percentiles_and_rate() -> None:
    now = [0.0]
    stats = ProcessorStats(window=100, rate_window_s=5.0, clock=lambda: now[0])
    for i in range(1, 101):
        now[0] = i * 0.04  # 25 Hz
        stats.record(i / 1000.0)
    stats.skip("stale")
    s = stats.snapshot()
    assert s.processed == 100 and s.skipped == {"stale": 1}
    assert s.latency_median_s == pytest.approx(0.0505) and s.latency_p95_s == pytest.approx(0.09505)
    assert s.rate_hz == pytest.approx(25.0)
    now[0] = 100.0
    assert stats.snapshot().rate_hz == 0.0 and stats.snapshot().recent_processed == 0


def test_diagnostics_levels(factory: MessageFactory) -> None:
    proc, _ = make_processor(factory)
    assert proc.diagnostics()[0] == "warn"
    proc.safe_process(*object_frame(factory))
    level, _, values = proc.diagnostics(dropped=3)
    assert level == "ok" and values["dropped (newest wins)"] == "3" and values["device"] == "cpu"
    bad, bad_proc = _bad_frames(factory)["size_mismatch"][2], make_processor(factory)[0]
    bad_proc.safe_process(*bad)
    level, message, values = bad_proc.diagnostics()
    assert level == "error" and values["skipped: size_mismatch"] == "1"


# --------------------------------------------------------------------------------------------
# The ROS files: launch, RViz, executable, and rclpy kept to ros/node.py


LAUNCH_FILES = sorted((ROOT / "launch").glob("*.launch.py"))


def test_there_are_object_hand_and_replay_launch_files() -> None:
    assert {p.name for p in LAUNCH_FILES} >= {"object_pose.launch.py", "hand_pose.launch.py", "replay.launch.py"}


@pytest.mark.parametrize("path", LAUNCH_FILES, ids=lambda p: p.name)
def test_launch_files_parse_and_reference_existing_config(path: Path) -> None:
    tree = ast.parse(path.read_text(), filename=str(path))
    assert "generate_launch_description" in {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
    strings = {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)}
    referenced = {s for s in strings if re.fullmatch(r"[\w.-]+\.(yaml|rviz)", s)}
    assert referenced and "featmap.rviz" in referenced
    for name in referenced:
        assert (ROOT / "config" / name).is_file(), f"{path.name} names config/{name}, which does not exist"
    assert "featmap_node" in strings and "featmap_ros" in strings


def test_rviz_shows_what_the_node_publishes() -> None:
    rviz = yaml.safe_load((ROOT / "config" / "featmap.rviz").read_text())
    displays = {d["Class"]: d for d in rviz["Visualization Manager"]["Displays"]}
    defaults = NodeConfig()
    assert displays["rviz_default_plugins/MarkerArray"]["Topic"]["Value"] == "/" + defaults.markers_topic
    assert displays["rviz_default_plugins/Image"]["Topic"]["Value"] == "/" + defaults.overlay_topic
    assert "rviz_default_plugins/TF" in displays
    assert rviz["Visualization Manager"]["Global Options"]["Fixed Frame"].endswith("_optical_frame")


def test_the_executable_runs_the_node_main() -> None:
    script = ROOT / "scripts" / "featmap_node"
    text = script.read_text()
    assert text.startswith("#!/usr/bin/env python3\n") and os.access(script, os.X_OK)
    assert "from featmap_ros.ros.node import main" in text
    node = ast.parse((ROOT / "featmap_ros" / "ros" / "node.py").read_text())
    assert "main" in {n.name for n in node.body if isinstance(n, ast.FunctionDef)}


def test_only_the_node_imports_ros_and_the_processor_imports_neither_ros_nor_torch() -> None:
    ros_modules = {"rclpy", "tf2_ros", "message_filters", "diagnostic_updater"}
    for path in (ROOT / "featmap_ros").rglob("*.py"):
        tree = ast.parse(path.read_text())
        imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        if path.name != "node.py":
            assert not imported & ros_modules, f"{path} imports {imported & ros_modules}"
    code = ("import sys, featmap_ros.ros.processor; "
            "print(','.join(m for m in ('rclpy', 'torch', 'featmap_ros.ros.node') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == ""
