"""The message layer against the real ROS 2 schemas (rosbags type stores for Humble and Jazzy)."""

from __future__ import annotations

import array
import dataclasses
import math
import struct
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import cv2
import numpy as np
import pytest
import transforms3d.axangles as ta
from mcap.reader import make_reader
from mcap_ros2.decoder import DecoderFactory
from rosbags.highlevel import AnyReader
from rosbags.rosbag2 import StoragePlugin, Writer

from featmap_ros.datasets.nyu import JOINT_NAMES
from featmap_ros.geometry import BOX_EDGES, Intrinsics, box_corners
from featmap_ros.results import HAND_BONES, Detection2D, FrameResult, HandPose, ObjectPose
from featmap_ros.ros.messages import (
    MSGTYPES,
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
from featmap_ros.ros.typestore import typestore

DISTROS = ("humble", "jazzy")
STAMP_NS = 1_700_000_000_123_456_789
CAMERA = "camera_color_optical_frame"
INTR = Intrinsics(fx=572.4, fy=573.6, cx=325.3, cy=242.0, width=640, height=480)


# --------------------------------------------------------------------------------------------
# Fixtures and helpers


@pytest.fixture(params=DISTROS)
def ts(request: pytest.FixtureRequest) -> Any:
    return typestore(request.param)


@pytest.fixture
def factory(ts: Any) -> MessageFactory:
    return MessageFactory.for_rosbags(ts)


def make_object(obj_id: int, name: str, R: np.ndarray, t: tuple[float, float, float]) -> ObjectPose:
    extent = np.array([0.08, 0.06, 0.1])
    corners = box_corners(-extent / 2 + np.array([0.01, 0.0, 0.0]), extent)  # origin off the box centre
    return ObjectPose(
        obj_id=obj_id, name=name, R=R, t=np.array(t), corners_uv=np.full((8, 2), np.nan), corners_3d=corners,
        extent=extent, score=0.87, out_of_domain=0.25,
    )


def make_frame() -> FrameResult:
    rng = np.random.default_rng(0)
    hand = HandPose(
        joints_xyz=np.array([0.0, 0.0, 0.6]) + rng.normal(scale=0.04, size=(14, 3)),
        confidences=rng.uniform(size=14), centre=np.array([0.0, 0.0, 0.6]), cube_m=0.3, score=0.9,
        out_of_domain=1.5,
    )
    objects = [
        make_object(5, "can", ta.axangle2mat([0, 0, 1], np.pi / 2), (0.05, -0.02, 0.7)),
        make_object(8, "driller", ta.axangle2mat([1, 1, 0], 0.8), (-0.1, 0.05, 0.9)),
    ]
    return FrameResult(stamp_ns=STAMP_NS, frame_id=CAMERA, objects=objects, hands=[hand], timings={"f": 0.01})


def output_messages(factory: MessageFactory) -> list[tuple[str, str, Any]]:
    """(topic, msgtype, message) for every kind of message the builders make."""
    frame = make_frame()
    rgb = np.random.default_rng(1).integers(0, 256, size=(6, 5, 3), dtype=np.uint8)
    depth = np.array([[0.5, np.nan, 1.25], [0.0, 2.0, 0.733]], dtype=np.float32)
    dets = [Detection2D(np.array([10.0, 20.0, 30.0, 40.0]), 0.7, obj_id=5), Detection2D([1, 2, 3, 4], 0.2, "cup")]
    return [
        ("/tf", "tf2_msgs/msg/TFMessage", factory.tf_message(factory.transforms(frame))),
        ("/markers", "visualization_msgs/msg/MarkerArray", factory.markers(frame)),
        ("/objects", "vision_msgs/msg/Detection3DArray", factory.detection3d_array(frame)),
        ("/hands", "featmap_ros/msg/HandJointsArray", factory.hand_joints_array(frame)),
        ("/overlay", "sensor_msgs/msg/Image", factory.image_rgb(rgb, STAMP_NS, CAMERA)),
        ("/depth16", "sensor_msgs/msg/Image", factory.image_depth(depth, STAMP_NS, CAMERA, "16UC1")),
        ("/depth32", "sensor_msgs/msg/Image", factory.image_depth(depth, STAMP_NS, CAMERA, "32FC1")),
        ("/camera_info", "sensor_msgs/msg/CameraInfo", factory.camera_info(INTR, STAMP_NS, CAMERA)),
        ("/detections", "vision_msgs/msg/Detection2DArray", factory.detection2d_array(dets, STAMP_NS, CAMERA)),
        ("/compressed", "sensor_msgs/msg/CompressedImage", factory.compressed_image(rgb, STAMP_NS, CAMERA, "png")),
    ]


def plain(value: Any) -> Any:
    """Reduce a rosbags, mcap_ros2 or SimpleNamespace message to dicts, lists and Python scalars."""
    if dataclasses.is_dataclass(value):
        # rosbags lists __msgtype__ and the constants as fields; ROS field names are lower case.
        names = [f.name for f in dataclasses.fields(value) if f.name.islower() and not f.name.startswith("_")]
        return {n: plain(getattr(value, n)) for n in names}
    if isinstance(value, (bytes, bytearray, memoryview)):
        return np.frombuffer(bytes(value), dtype=np.uint8).tolist()
    if isinstance(value, (np.ndarray, array.array)):
        return np.asarray(value).tolist()
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, (str, bool, int, float, np.generic)):
        return value.item() if isinstance(value, np.generic) else value
    if hasattr(value, "__slots__"):  # mcap_ros2 dynamic classes
        return {s: plain(getattr(value, s)) for s in value.__slots__}
    return {k: plain(v) for k, v in vars(value).items()}


def assert_same(a: Any, b: Any, where: str = "msg") -> None:
    """Equal content; floats to float32 precision (float32 fields round on the wire), NaN equal to NaN."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), f"{where}: fields {sorted(a)} vs {sorted(b)}"
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), f"{where}: length {len(a)} vs {len(b)}"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, float) or isinstance(b, float):
        same = (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9)
        assert same, f"{where}: {a} != {b}"
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


# --------------------------------------------------------------------------------------------
# Every output message survives CDR, a real MCAP bag, an independent decoder and AnyReader


def test_every_built_message_round_trips_through_cdr(ts: Any, factory: MessageFactory) -> None:
    for _, msgtype, msg in output_messages(factory):
        back = ts.deserialize_cdr(ts.serialize_cdr(msg, msgtype), msgtype)
        assert_same(plain(msg), plain(back), msgtype)


def test_mcap_bag_decodes_the_same_with_mcap_ros2_and_anyreader(
    ts: Any, factory: MessageFactory, tmp_path: Path
) -> None:
    messages = output_messages(factory)
    bag = tmp_path / "bag"
    with Writer(bag, version=8, storage_plugin=StoragePlugin.MCAP) as writer:
        for topic, msgtype, msg in messages:
            conn = writer.add_connection(topic, msgtype, typestore=ts)
            writer.write(conn, STAMP_NS, ts.serialize_cdr(msg, msgtype))
    expected = {topic: (msgtype, plain(msg)) for topic, msgtype, msg in messages}

    (mcap_file,) = bag.glob("*.mcap")
    seen = set()
    with mcap_file.open("rb") as fh:
        reader = make_reader(fh, decoder_factories=[DecoderFactory()])
        for schema, channel, message, decoded in reader.iter_decoded_messages():
            msgtype, want = expected[channel.topic]
            assert schema.name == msgtype and message.log_time == STAMP_NS
            assert_same(want, plain(decoded), channel.topic)
            seen.add(channel.topic)
    assert seen == expected.keys()

    seen.clear()
    with AnyReader([bag]) as reader:
        for conn, t_ns, raw in reader.messages():
            assert conn.msgtype == expected[conn.topic][0] and t_ns == STAMP_NS
            assert_same(expected[conn.topic][1], plain(reader.deserialize(raw, conn.msgtype)), conn.topic)
            seen.add(conn.topic)
    assert seen == expected.keys()


def test_images_read_back_from_the_independent_decoder(factory: MessageFactory, ts: Any, tmp_path: Path) -> None:
    rgb = np.random.default_rng(2).integers(0, 256, size=(4, 7, 3), dtype=np.uint8)
    depth = np.array([[0.5, np.nan], [1.25, 3.0]], dtype=np.float32)
    bag = tmp_path / "bag"
    with Writer(bag, version=8, storage_plugin=StoragePlugin.MCAP) as writer:
        for topic, msg in (("/rgb", factory.image_rgb(rgb, 1, CAMERA)), ("/d", factory.image_depth(depth, 1, CAMERA))):
            conn = writer.add_connection(topic, "sensor_msgs/msg/Image", typestore=ts)
            writer.write(conn, 1, ts.serialize_cdr(msg, "sensor_msgs/msg/Image"))
    with next(bag.glob("*.mcap")).open("rb") as fh:
        reader = make_reader(fh, decoder_factories=[DecoderFactory()])
        decoded = {ch.topic: d for _, ch, _, d in reader.iter_decoded_messages()}
    # mcap_ros2 gives `data` as bytes: the decoders are duck-typed over it.
    np.testing.assert_array_equal(image_to_rgb(decoded["/rgb"]), rgb)
    np.testing.assert_array_equal(image_to_depth(decoded["/d"]), depth)


# --------------------------------------------------------------------------------------------
# Decoding images: every encoding, padded rows, big-endian


def raw_image(
    factory: MessageFactory, encoding: str, pixels: np.ndarray, *, pad: int = 0, bigendian: bool = False
) -> Any:
    """An Image whose bytes are laid out by hand (independently of the builders), rows padded with 0xAB."""
    arr = np.ascontiguousarray(pixels)
    h, w = arr.shape[:2]
    rows = arr.astype(arr.dtype.newbyteorder(">" if bigendian else "<")).reshape(h, -1).view(np.uint8).reshape(h, -1)
    padded = np.concatenate([rows, np.full((h, pad), 0xAB, dtype=np.uint8)], axis=1)
    return factory.new(
        "sensor_msgs/msg/Image", header=factory.header(7, CAMERA), height=h, width=w, encoding=encoding,
        is_bigendian=int(bigendian), step=padded.shape[1], data=padded.reshape(-1),
    )


RGB = np.random.default_rng(3).integers(0, 256, size=(3, 4, 3), dtype=np.uint8)
ALPHA = np.full((3, 4, 1), 200, dtype=np.uint8)
GREY = RGB[..., 0]


@pytest.mark.parametrize("pad", [0, 3])
@pytest.mark.parametrize(
    ("encoding", "pixels", "expected"),
    [
        ("rgb8", RGB, RGB),
        ("bgr8", RGB[..., ::-1], RGB),
        ("rgba8", np.concatenate([RGB, ALPHA], axis=2), RGB),
        ("bgra8", np.concatenate([RGB[..., ::-1], ALPHA], axis=2), RGB),
        ("mono8", GREY, np.stack([GREY] * 3, axis=2)),
    ],
)
def test_colour_encodings_decode_to_rgb(factory: MessageFactory, encoding: str, pixels: np.ndarray,
                                        expected: np.ndarray, pad: int) -> None:
    out = image_to_rgb(raw_image(factory, encoding, pixels, pad=pad))
    assert out.dtype == np.uint8 and out.shape == (3, 4, 3)
    np.testing.assert_array_equal(out, expected)


MM = np.array([[0, 500, 1234], [65535, 1, 800]], dtype=np.uint16)
MM_AS_M = np.where(MM == 0, np.nan, MM.astype(np.float32) * np.float32(1e-3))


@pytest.mark.parametrize("bigendian", [False, True])
@pytest.mark.parametrize("pad", [0, 2])
@pytest.mark.parametrize("encoding", ["16UC1", "mono16"])
def test_16bit_depth_is_millimetres_with_zero_invalid(factory: MessageFactory, encoding: str, pad: int,
                                                      bigendian: bool) -> None:
    out = image_to_depth(raw_image(factory, encoding, MM, pad=pad, bigendian=bigendian))
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, MM_AS_M, rtol=1e-6)
    assert np.isnan(out[0, 0]) and out[0, 1] == pytest.approx(0.5)


@pytest.mark.parametrize("bigendian", [False, True])
@pytest.mark.parametrize("pad", [0, 4])
def test_float_depth_is_metres_with_zero_inf_nan_invalid(factory: MessageFactory, pad: int, bigendian: bool) -> None:
    metres = np.array([[0.5, 0.0, np.inf], [np.nan, 1.75, -np.inf]], dtype=np.float32)
    out = image_to_depth(raw_image(factory, "32FC1", metres, pad=pad, bigendian=bigendian))
    np.testing.assert_array_equal(out, [[0.5, np.nan, np.nan], [np.nan, 1.75, np.nan]])


def test_built_images_decode_back(factory: MessageFactory) -> None:
    rgb = np.random.default_rng(4).integers(0, 256, size=(5, 6, 3), dtype=np.uint8)
    np.testing.assert_array_equal(image_to_rgb(factory.image_rgb(rgb, 1, CAMERA)), rgb)
    depth = np.array([[0.5004, np.nan, 0.0], [1.2, 2.0, -1.0]], dtype=np.float32)
    from16 = image_to_depth(factory.image_depth(depth, 1, CAMERA, "16UC1"))
    np.testing.assert_allclose(from16, [[0.5, np.nan, np.nan], [1.2, 2.0, np.nan]], rtol=1e-6)
    from32 = image_to_depth(factory.image_depth(depth, 1, CAMERA, "32FC1"))
    np.testing.assert_array_equal(from32, np.array([[0.5004, np.nan, np.nan], [1.2, 2.0, np.nan]], dtype=np.float32))


# --------------------------------------------------------------------------------------------
# Bad inputs say what came and what was expected


def test_unknown_encoding_is_named(factory: MessageFactory) -> None:
    msg = raw_image(factory, "rgb8", RGB)
    msg.encoding = "yuv422"
    with pytest.raises(MessageError, match=r"'yuv422'.*expected one of.*bgr8"):
        image_to_rgb(msg)


def test_depth_image_is_not_colour_and_colour_is_not_depth(factory: MessageFactory) -> None:
    with pytest.raises(MessageError, match=r"'16UC1'.*expected one of"):
        image_to_rgb(raw_image(factory, "16UC1", MM))
    with pytest.raises(MessageError, match=r"'rgb8'.*expected one of.*32FC1"):
        image_to_depth(raw_image(factory, "rgb8", RGB))


def test_data_length_must_be_height_times_step(factory: MessageFactory) -> None:
    msg = raw_image(factory, "rgb8", RGB)
    msg.data = msg.data[:-1]
    with pytest.raises(MessageError, match=r"rgb8 image 4x3 with step 12 needs height\*step = 36 bytes.*got 35"):
        image_to_rgb(msg)


def test_step_shorter_than_a_row_is_rejected(factory: MessageFactory) -> None:
    msg = raw_image(factory, "16UC1", MM)
    msg.step = 5
    with pytest.raises(MessageError, match=r"step 5 bytes, less than width\*bytes_per_pixel = 6"):
        image_to_depth(msg)


def test_zero_size_is_rejected(factory: MessageFactory) -> None:
    msg = raw_image(factory, "rgb8", RGB)
    msg.width = 0
    with pytest.raises(MessageError, match="zero size 0x3"):
        image_to_rgb(msg)


def test_uncalibrated_camera_info_is_rejected(factory: MessageFactory) -> None:
    msg = factory.camera_info(INTR, 1, CAMERA)
    msg.k = np.zeros(9)
    with pytest.raises(MessageError, match="camera not calibrated"):
        camera_info_to_intrinsics(msg)
    msg = factory.camera_info(INTR, 1, CAMERA)
    msg.k = np.array([500.0, 3.0, 320.0, 0.0, 500.0, 240.0, 0.0, 0.0, 1.0])
    with pytest.raises(MessageError, match="not a usable camera matrix.*skew"):
        camera_info_to_intrinsics(msg)
    msg = factory.camera_info(INTR, 1, CAMERA)
    msg.width = 0
    with pytest.raises(MessageError, match="zero image size 0x480"):
        camera_info_to_intrinsics(msg)


def test_negative_stamp_is_rejected(factory: MessageFactory) -> None:
    with pytest.raises(MessageError, match="negative"):
        factory.header(-1, CAMERA)


def test_hand_with_mismatched_counts_is_rejected(factory: MessageFactory) -> None:
    hand = make_frame().hands[0]
    hand.confidences = hand.confidences[:-1]
    with pytest.raises(MessageError, match="14 joint names, 14 positions and 13 confidences"):
        factory.hand_joints(factory.header(1, CAMERA), hand, "hand0")


# --------------------------------------------------------------------------------------------
# CompressedImage


def compressed(factory: MessageFactory, fmt: str, data: bytes | np.ndarray) -> Any:
    return factory.new("sensor_msgs/msg/CompressedImage", header=factory.header(1, CAMERA), format=fmt,
                       data=np.frombuffer(bytes(data), dtype=np.uint8))


def test_png_and_jpeg_decode_to_rgb(factory: MessageFactory) -> None:
    rgb = np.random.default_rng(5).integers(0, 256, size=(8, 9, 3), dtype=np.uint8)
    np.testing.assert_array_equal(compressed_to_rgb(factory.compressed_image(rgb, 1, CAMERA, "png")), rgb)
    red = np.zeros((16, 16, 3), dtype=np.uint8)
    red[..., 0] = 220
    out = compressed_to_rgb(factory.compressed_image(red, 1, CAMERA, "jpeg"))
    assert np.abs(out.astype(int) - red).max() < 8  # lossy, but red stays red


@pytest.mark.parametrize(
    ("fmt", "channel_order"),
    [("jpeg", "bgr"), ("png", "bgr"), ("bgr8; png compressed bgr8", "bgr"), ("rgb8; png compressed rgb8", "rgb")],
)
def test_compressed_channel_order_follows_the_format(factory: MessageFactory, fmt: str, channel_order: str) -> None:
    rgb = np.random.default_rng(6).integers(0, 256, size=(3, 5, 3), dtype=np.uint8)
    ok, buf = cv2.imencode(".png", rgb[..., ::-1] if channel_order == "bgr" else rgb)
    assert ok
    np.testing.assert_array_equal(compressed_to_rgb(compressed(factory, fmt, buf.tobytes())), rgb)


def test_compressed_depth_png_16bit(factory: MessageFactory) -> None:
    _, png = cv2.imencode(".png", MM)
    header = struct.pack("<iff", -1, 0.0, 0.0)
    out = compressed_to_depth(compressed(factory, "16UC1; compressedDepth png", header + png.tobytes()))
    np.testing.assert_allclose(out, MM_AS_M, rtol=1e-6)
    out = compressed_to_depth(compressed(factory, "16UC1; png compressed mono16", png.tobytes()))
    np.testing.assert_allclose(out, MM_AS_M, rtol=1e-6)


def test_compressed_depth_32bit_inverse_quantisation(factory: MessageFactory) -> None:
    # The publisher's quantisation (compressed_depth_image_transport, default parameters).
    depth_max, depth_quant = 10.0, 100.0
    quant_a = depth_quant * (depth_quant + 1.0)
    quant_b = 1.0 - quant_a / depth_max
    metres = np.array([[0.5, 1.0], [2.0, np.nan]], dtype=np.float32)
    inv = np.where(np.isfinite(metres), quant_a / metres + quant_b, 0).astype(np.uint16)
    _, png = cv2.imencode(".png", inv)
    header = struct.pack("<iff", 0, quant_a, quant_b)
    out = compressed_to_depth(compressed(factory, "32FC1; compressedDepth png", header + png.tobytes()))
    np.testing.assert_allclose(out, metres, rtol=2e-3)


def test_bad_compressed_inputs_raise(factory: MessageFactory) -> None:
    with pytest.raises(MessageError, match=r"'jpeg'.*4 bytes that OpenCV cannot decode"):
        compressed_to_rgb(compressed(factory, "jpeg", b"\x00\x01\x02\x03"))
    with pytest.raises(MessageError, match="'tiff' is not jpeg or png"):
        compressed_to_rgb(compressed(factory, "rgb8; tiff compressed bgr8", b"\x00"))
    with pytest.raises(MessageError, match="rvl.*unsupported"):
        compressed_to_depth(compressed(factory, "16UC1; compressedDepth rvl", b"\x00" * 20))
    with pytest.raises(MessageError, match="holds depth"):
        compressed_to_rgb(compressed(factory, "16UC1; png compressed mono16", b"\x00"))


# --------------------------------------------------------------------------------------------
# CameraInfo and Detection2DArray in


def test_camera_info_round_trips_to_intrinsics_with_distortion(factory: MessageFactory) -> None:
    intr, d = camera_info_to_intrinsics(factory.camera_info(INTR, 1, CAMERA))
    assert intr == INTR and not d.any()
    _, d = camera_info_to_intrinsics(factory.camera_info(INTR, 1, CAMERA, d=np.array([0.1, -0.2, 0, 0, 0.01])))
    np.testing.assert_array_equal(d, [0.1, -0.2, 0, 0, 0.01])


def test_detections_round_trip_and_pick_the_best_hypothesis(factory: MessageFactory) -> None:
    dets = [Detection2D([10.0, 20.0, 30.0, 40.0], 0.7, obj_id=5), Detection2D([1.5, 2.0, 3.0, 4.0], 0.2, "cup")]
    msg = factory.detection2d_array(dets, 1, CAMERA)
    assert msg.detections[0].bbox.center.position.x == 25.0 and msg.detections[0].bbox.size_y == 40.0
    back = detections_from_msg(msg)
    assert [(d.class_id, d.obj_id, d.score) for d in back] == [("5", 5, 0.7), ("cup", None, 0.2)]
    np.testing.assert_array_equal(back[1].box_xywh, [1.5, 2.0, 3.0, 4.0])
    weak = factory.new("vision_msgs/msg/ObjectHypothesisWithPose",
                       hypothesis=factory.new("vision_msgs/msg/ObjectHypothesis", class_id="9", score=0.1))
    msg.detections[0].results.insert(0, weak)
    assert detections_from_msg(msg)[0].class_id == "5"


# --------------------------------------------------------------------------------------------
# Outputs: quaternion order, TF frames and stamps, markers, Detection3D, hand joints


def test_quaternion_is_xyzw_at_the_boundary(factory: MessageFactory) -> None:
    R = ta.axangle2mat([1, 0, 0], np.pi / 3)  # 60 degrees about x: (w, x, y, z) = (cos 30, sin 30, 0, 0)
    q = factory.quaternion(R)
    assert (q.x, q.y, q.z, q.w) == pytest.approx((0.5, 0.0, 0.0, math.sqrt(3) / 2))
    q = factory.quaternion(ta.axangle2mat([0, 0, 1], np.pi / 2))
    assert (q.x, q.y, q.z, q.w) == pytest.approx((0.0, 0.0, math.sqrt(0.5), math.sqrt(0.5)))
    # Solved once per distinct matrix (a cache by value): one changed in place, or given as float32 or as
    # nested lists, gets its own quaternion.
    R[:] = ta.axangle2mat([0, 1, 0], np.pi / 3)
    q = factory.quaternion(R)
    assert (q.x, q.y, q.z, q.w) == pytest.approx((0.0, 0.5, 0.0, math.sqrt(3) / 2))
    for same in (R.astype(np.float32), R.tolist()):
        q = factory.quaternion(same)
        assert (q.x, q.y, q.z, q.w) == pytest.approx((0.0, 0.5, 0.0, math.sqrt(3) / 2), abs=1e-6)


def test_tf_frames_carry_the_image_stamp_and_camera_frame(factory: MessageFactory) -> None:
    frame = make_frame()
    tfs = factory.transforms(frame, prefix="fm/")
    assert len(tfs) == 2 + 14
    assert [t.child_frame_id for t in tfs[:3]] == ["fm/can", "fm/driller", f"fm/hand0_{JOINT_NAMES[0]}"]
    assert tfs[-1].child_frame_id == "fm/hand0_palm"
    for t in tfs:
        assert t.header.frame_id == CAMERA and stamp_ns_of(t.header) == STAMP_NS
        assert (t.header.stamp.sec, t.header.stamp.nanosec) == (1_700_000_000, 123_456_789)
    obj = tfs[0].transform
    assert (obj.translation.x, obj.translation.y, obj.translation.z) == (0.05, -0.02, 0.7)
    assert (obj.rotation.z, obj.rotation.w) == pytest.approx((math.sqrt(0.5), math.sqrt(0.5)))
    joint = tfs[2].transform
    np.testing.assert_allclose([joint.translation.x, joint.translation.y, joint.translation.z],
                               frame.hands[0].joints_xyz[0])
    assert joint.rotation.w == 1.0


def test_markers_clear_first_then_boxes_and_hands(factory: MessageFactory) -> None:
    frame = make_frame()
    markers = factory.markers(frame, lifetime_s=0.25).markers
    assert markers[0].action == 3  # DELETEALL
    by_ns = {}
    for m in markers[1:]:
        assert m.header.frame_id == CAMERA and stamp_ns_of(m.header) == STAMP_NS
        assert (m.lifetime.sec, m.lifetime.nanosec) == (0, 250_000_000) and m.action == 0
        assert m.pose.orientation.w == 1.0
        by_ns.setdefault(m.ns, []).append(m)
    for ms in by_ns.values():
        assert len({m.id for m in ms}) == len(ms), "ids are unique within a namespace"
    boxes = by_ns["featmap/boxes"]
    assert len(boxes) == 2 and all(m.type == 5 and len(m.points) == 24 for m in boxes)
    want = frame.objects[1].corners_cam()[BOX_EDGES.reshape(-1)]
    np.testing.assert_allclose([[p.x, p.y, p.z] for p in boxes[1].points], want)
    assert [m.text for m in by_ns["featmap/labels"]] == ["can 0.87", "driller 0.87"]
    (joints,) = by_ns["featmap/hand_joints"]
    (bones,) = by_ns["featmap/hand_bones"]
    assert joints.type == 7 and len(joints.points) == 14
    assert bones.type == 5 and len(bones.points) == 2 * len(HAND_BONES)
    assert by_ns["featmap/hand_labels"][0].type == 9


def test_detection3d_box_is_centred_and_result_pose_is_the_model_pose(factory: MessageFactory) -> None:
    frame = make_frame()
    (det, _) = factory.detection3d_array(frame).detections
    obj = frame.objects[0]
    centre = obj.R @ obj.corners_3d.mean(axis=0) + obj.t
    c = det.bbox.center.position
    np.testing.assert_allclose([c.x, c.y, c.z], centre)
    assert (det.bbox.size.x, det.bbox.size.y, det.bbox.size.z) == (0.08, 0.06, 0.1)
    res = det.results[0]
    assert (res.hypothesis.class_id, res.hypothesis.score, det.id) == ("5", 0.87, "can")
    p = res.pose.pose.position
    assert (p.x, p.y, p.z) == (0.05, -0.02, 0.7)
    assert det.header.frame_id == CAMERA


def test_hand_joints_array_holds_every_joint(factory: MessageFactory) -> None:
    frame = make_frame()
    msg = factory.hand_joints_array(frame)
    (hand,) = msg.hands
    assert hand.hand_id == "hand0" and list(hand.joint_names) == list(JOINT_NAMES)
    np.testing.assert_allclose([[p.x, p.y, p.z] for p in hand.positions], frame.hands[0].joints_xyz)
    assert hand.confidences.dtype == np.float32 and hand.cube_size == 0.3
    assert stamp_ns_of(msg.header) == STAMP_NS


# --------------------------------------------------------------------------------------------
# The rclpy backend, with stand-in classes (rclpy itself needs a ROS machine)


def test_rclpy_backend_uses_array_array_for_sequences_and_numpy_for_fixed_arrays() -> None:
    fake = MessageFactory({name: (lambda **kw: SimpleNamespace(**kw)) for name in MSGTYPES})
    assert fake.backend == "rclpy"
    rgb = np.random.default_rng(7).integers(0, 256, size=(3, 4, 3), dtype=np.uint8)
    img = fake.image_rgb(rgb, 5, CAMERA)
    assert isinstance(img.data, array.array) and img.data.typecode == "B"
    np.testing.assert_array_equal(image_to_rgb(img), rgb)
    conf = fake.seq([0.5, 0.25], "float32")
    assert isinstance(conf, array.array) and conf.typecode == "f" and list(conf) == [0.5, 0.25]
    info = fake.camera_info(INTR, 5, CAMERA)
    assert isinstance(info.k, np.ndarray) and info.k.dtype == np.float64 and isinstance(info.d, array.array)
    assert camera_info_to_intrinsics(info)[0] == INTR
    depth = np.array([[0.5, np.nan]], dtype=np.float32)
    np.testing.assert_array_equal(image_to_depth(fake.image_depth(depth, 5, CAMERA, "32FC1")), depth)
    # rclpy checks scalar types strictly (float fields reject numpy float32): builders pass Python scalars.
    hand = fake.hand_joints(fake.header(5, CAMERA), make_frame().hands[0], "hand0")
    assert type(hand.score) is float and type(hand.positions[0].x) is float


def test_rosbags_factory_rejects_unknown_fields(factory: MessageFactory) -> None:
    with pytest.raises(MessageError, match="no fields.*'colour'"):
        factory.new("std_msgs/msg/Header", colour=1)
    with pytest.raises(MessageError, match="not known"):
        factory.new("sensor_msgs/msg/NoSuchThing")
    with pytest.raises(MessageError, match="for_rosbags"):
        MessageFactory(factory.types)
