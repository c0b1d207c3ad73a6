"""Hostile input on the node's processing path (issue 14): a clear error naming the value, or a counted skip."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from test_processor import CAMERA, INTR, STAMP_NS, FakeEstimator, depth_image, make_processor, object_frame

from featmap_ros.errors import FeatmapError
from featmap_ros.ros import messages
from featmap_ros.ros.config import NodeConfig, ProcessorError
from featmap_ros.ros.messages import (
    MessageError,
    MessageFactory,
    camera_info_to_intrinsics,
    compressed_image_size,
    compressed_size,
)
from featmap_ros.ros.processor import (
    STARTUP_ERRORS,
    FrameProcessor,
    check_input_types,
    input_type_problems,
    load_estimator_for,
)
from featmap_ros.ros.typestore import typestore


@pytest.fixture(scope="module")
def factory() -> MessageFactory:
    return MessageFactory.for_rosbags(typestore("humble"))


# --------------------------------------------------------------------------------------------
# Item 4: NaN / inf in CameraInfo K, P, D


@pytest.mark.parametrize(("field", "index", "value", "match"), [
    ("k", 0, np.nan, r"CameraInfo.k holds non-finite values \[nan, "),
    ("k", 4, np.inf, r"CameraInfo.k holds non-finite values \[60.0, 0.0, 31.5, 0.0, inf"),
    ("k", 2, -np.inf, r"CameraInfo.k holds non-finite values \[60.0, 0.0, -inf"),
    ("p", 0, np.nan, r"CameraInfo.p holds non-finite values \[nan, "),
    ("d", 0, np.nan, r"CameraInfo.d holds non-finite distortion \[nan, 0.0"),
    ("d", 1, np.inf, r"CameraInfo.d holds non-finite distortion \[0.0, inf"),
])
def test_non_finite_calibration_is_a_named_error_and_a_counted_skip(
        factory: MessageFactory, field: str, index: int, value: float, match: str) -> None:
    image, info, dets = object_frame(factory)
    arr = np.array(getattr(info, field), dtype=np.float64)
    arr[index] = value
    setattr(info, field, arr)
    with pytest.raises(MessageError, match=match):
        camera_info_to_intrinsics(info)
    proc, lines = make_processor(factory)
    for _ in range(3):
        assert proc.safe_process(image, info, dets) is None
    assert proc.stats.snapshot().skipped == {"bad_camera_info": 3}
    assert len(lines) == 1 and "[bad_camera_info: logged once" in lines[0]
    assert "non-finite" in lines[0] and "rectified" not in " ".join(lines)


# --------------------------------------------------------------------------------------------
# Item 6: what the node catches at start-up


def test_startup_errors_cover_the_project_root_and_os_and_key_errors() -> None:
    assert all(issubclass(e, BaseException) for e in STARTUP_ERRORS)
    for err in (FeatmapError("x"), ProcessorError("config", "x"), FileNotFoundError("x"), KeyError("task"),
                PermissionError("x"), MessageError("x"), ModuleNotFoundError("No module named 'torch'")):
        assert isinstance(err, STARTUP_ERRORS), type(err)
    assert not isinstance(RuntimeError("CUDA OOM in a frame"), STARTUP_ERRORS)


def test_a_missing_model_fails_start_up_with_a_caught_error(tmp_path: Path) -> None:
    pytest.importorskip("torch", reason="loading a checkpoint needs PyTorch")
    config = NodeConfig(task="hands", use_detections=False, model_path=str(tmp_path / "absent.json"), device="cpu")
    with pytest.raises(STARTUP_ERRORS) as err:
        load_estimator_for(config)
    assert "absent" in str(err.value)


def test_corrupt_weights_and_a_json_lacking_a_key_fail_start_up_with_caught_errors(tmp_path: Path) -> None:
    pytest.importorskip("torch", reason="loading a checkpoint needs PyTorch")
    import json

    from featmap_ros.datasets.nyu import JOINT_NAMES
    from featmap_ros.model import checkpoint
    from featmap_ros.model.nets import FeatureMappingModel, NetConfig

    model = FeatureMappingModel(NetConfig(task="hands", input_size=32, width=4, feature_dim=32, dropout=0.0))
    path = Path(checkpoint.save(tmp_path / "tiny", model, {"hands": {"joint_names": list(JOINT_NAMES),
                                                                     "cube_m": 0.3}, "crop": {"size": 32}}))
    config = NodeConfig(task="hands", use_detections=False, model_path=str(path), device="cpu")
    assert load_estimator_for(config).task == "hands"
    weights = next(p for p in path.parent.iterdir() if p.suffix == ".safetensors")
    good = weights.read_bytes()
    weights.write_bytes(good[: len(good) // 2])
    with pytest.raises(STARTUP_ERRORS):
        load_estimator_for(config)
    weights.write_bytes(good)
    meta = json.loads(path.read_text())
    meta.pop("task", None)
    meta.get("meta", {}).pop("task", None)
    path.write_text(json.dumps(meta))
    with pytest.raises(STARTUP_ERRORS):
        load_estimator_for(config)


# --------------------------------------------------------------------------------------------
# Item 10: a message-type mismatch, by connection type and by message


TOPICS = {"image": "/camera/color/image_raw", "camera_info": "/camera/color/camera_info",
          "detections": "/camera/color/detections"}
GOOD = {"/camera/color/image_raw": "sensor_msgs/msg/Image", "/camera/color/camera_info": "sensor_msgs/msg/CameraInfo",
        "/camera/color/detections": "vision_msgs/msg/Detection2DArray", "/ground_truth/objects": "std_msgs/msg/String"}


def test_connection_types_that_match_pass_and_rclpy_lists_are_accepted() -> None:
    check_input_types(NodeConfig(), TOPICS, GOOD)
    check_input_types(NodeConfig(), TOPICS, {t: [m] for t, m in GOOD.items()})  # get_topic_names_and_types
    check_input_types(NodeConfig(), TOPICS, {"/camera/color/image_raw": "sensor_msgs/Image"})  # msg/ optional
    check_input_types(NodeConfig(), TOPICS, {})  # nothing published yet: nothing to check


def test_a_raw_image_while_compressed_is_refused_before_replay_with_a_hint() -> None:
    with pytest.raises(ProcessorError) as err:
        check_input_types(NodeConfig(compressed=True), TOPICS, GOOD)
    assert err.value.kind == "wrong_msgtype"
    assert str(err.value) == ("image topic /camera/color/image_raw carries sensor_msgs/msg/Image, but "
                              "sensor_msgs/msg/CompressedImage is expected; set compressed to false for raw images")


def test_a_string_on_the_image_topic_and_wrong_detections_are_both_named() -> None:
    found = {**GOOD, "/camera/color/image_raw": "std_msgs/msg/String",
             "/camera/color/detections": "vision_msgs/msg/Detection3DArray"}
    problems = input_type_problems(NodeConfig(), TOPICS, found)
    assert problems == [
        "image topic /camera/color/image_raw carries std_msgs/msg/String, but sensor_msgs/msg/Image is expected",
        "detections topic /camera/color/detections carries vision_msgs/msg/Detection3DArray, but "
        "vision_msgs/msg/Detection2DArray is expected",
    ]
    hands = NodeConfig(task="hands", use_detections=False)
    assert input_type_problems(hands, TOPICS, found)[1:] == []  # detections are not an input of this config


def test_a_message_of_the_wrong_type_is_a_counted_skip_not_an_internal_error(factory: MessageFactory) -> None:
    image, info, dets = object_frame(factory)
    proc, lines = make_processor(factory, compressed=True)
    assert proc.safe_process(image, info, dets) is None and proc.safe_process(image, info, dets) is None
    assert proc.stats.snapshot().skipped == {"wrong_msgtype": 2}
    assert "image message is a sensor_msgs__msg__Image without ['format']; expected " \
           "sensor_msgs/msg/CompressedImage (compressed is true)" in lines[0]
    string = factory.types["std_msgs/msg/String"](data="hello") if "std_msgs/msg/String" in factory.types else "hi"
    proc, lines = make_processor(factory)
    assert proc.safe_process(string, info, dets) is None
    assert proc.stats.snapshot().skipped == {"wrong_msgtype": 1} and "without ['header'," in lines[0]


# --------------------------------------------------------------------------------------------
# Item 12: the size of a compressed image from its header, before decoding


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR says width x height, with one tiny (wrong) IDAT: enough to read, never decoded here."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


@pytest.mark.parametrize("codec", [".png", ".jpg", "progressive"])
def test_header_sizes_match_what_opencv_decodes(codec: str) -> None:
    img = np.random.default_rng(1).integers(0, 256, size=(37, 53, 3), dtype=np.uint8)
    params = [cv2.IMWRITE_JPEG_PROGRESSIVE, 1] if codec == "progressive" else []
    ok, buf = cv2.imencode(".jpg" if codec == "progressive" else codec, img, params)
    assert ok and compressed_image_size(buf.reshape(-1)) == (53, 37)
    assert compressed_image_size(b"GIF89a....") is None and compressed_image_size(b"") is None


def test_an_oversize_png_is_refused_by_its_header_and_never_decoded(factory: MessageFactory,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    def no_decode(*_: Any) -> None:
        raise AssertionError("cv2.imdecode was called on an image refused by its header")

    monkeypatch.setattr(messages.cv2, "imdecode", no_decode)
    _, info, dets = object_frame(factory)
    msg = factory.compressed_image(np.zeros((48, 64, 3), np.uint8), STAMP_NS, CAMERA, "png")
    msg.data = np.frombuffer(png_header_only(12000, 12000), dtype=np.uint8).copy()
    assert compressed_size(msg) == (12000, 12000)
    proc, lines = make_processor(factory, compressed=True)
    assert proc.safe_process(msg, info, dets) is None
    assert proc.stats.snapshot().skipped == {"oversize": 1}
    assert "compressed image is 12000x12000 (144 Mpx) by its header, over the 50 Mpx limit; not decoded" in lines[0]
    with pytest.raises(MessageError, match="12000x12000 by its header"):
        messages.compressed_to_rgb(msg)


def test_a_compressed_image_of_another_size_than_camera_info_is_refused_before_decoding(
        factory: MessageFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    _, info, dets = object_frame(factory)
    msg = factory.compressed_image(np.zeros((96, 128, 3), np.uint8), STAMP_NS, CAMERA, "jpeg")
    monkeypatch.setattr(messages.cv2, "imdecode", lambda *_: pytest.fail("decoded"))
    proc, lines = make_processor(factory, compressed=True)
    assert proc.safe_process(msg, info, dets) is None
    assert proc.stats.snapshot().skipped == {"size_mismatch": 1}
    assert "image is 128x96 but camera_info says 64x48 (read from the compressed header; not decoded)" in lines[0]


def test_compressed_bytes_without_an_image_header_are_a_bad_image(factory: MessageFactory) -> None:
    _, info, dets = object_frame(factory)
    msg = factory.compressed_image(np.zeros((48, 64, 3), np.uint8), STAMP_NS, CAMERA, "jpeg")
    msg.data = np.frombuffer(b"not an image at all", dtype=np.uint8).copy()
    proc, lines = make_processor(factory, compressed=True)
    assert proc.safe_process(msg, info, dets) is None
    assert proc.stats.snapshot().skipped == {"bad_image": 1} and "start with no PNG or JPEG header" in lines[0]


# --------------------------------------------------------------------------------------------
# Item 15 (first point): 32FC1 depth that holds millimetres


def test_32fc1_millimetres_are_noted_once_and_counted(factory: MessageFactory) -> None:
    est = FakeEstimator("hands")
    proc, lines = make_processor(factory, "hands", estimator=est)
    frame = "camera_depth_optical_frame"
    mm = factory.image(depth_image() * 1000.0, "32FC1", STAMP_NS, frame)
    info = factory.camera_info(INTR, STAMP_NS, frame)
    for _ in range(3):
        proc.safe_process(mm, info)
    notes = [line for line in lines if "depth_32FC1_looks_like_mm" in line]
    assert len(notes) == 1
    assert "32FC1 depth has median 1200.0, more than 20 m: it looks like millimetres" in notes[0]
    assert proc.log_once.counts["depth_32FC1_looks_like_mm"] == 3
    assert proc.diagnostics()[2]["noted: depth_32FC1_looks_like_mm"] == "3"
    metres = factory.image_depth(depth_image(), STAMP_NS, frame, "32FC1")
    proc2, lines2 = make_processor(factory, "hands")
    assert proc2.safe_process(metres, info) is not None and lines2 == []


def test_the_processor_refuses_an_estimator_of_the_other_task(factory: MessageFactory) -> None:
    with pytest.raises(ProcessorError, match="the estimator does 'hands' but task is 'objects'"):
        FrameProcessor(FakeEstimator("hands"), factory, NodeConfig())
