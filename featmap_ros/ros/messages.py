"""numpy <-> ROS 2 messages, for rclpy message classes and rosbags dataclasses alike (pure Python).

Decoders read attributes only (duck typing), so they take rclpy messages, rosbags dataclasses
and mcap_ros2 objects. Builders go through a MessageFactory that owns the message classes and the
one place where array fields are converted for the backend (rosbags wants numpy arrays, rclpy
wants array.array for sequences and numpy arrays for fixed-size arrays).

This module is the boundary where quaternions turn from our (w, x, y, z) into ROS (x, y, z, w).
"""

from __future__ import annotations

import array
import dataclasses
import functools
import importlib
import struct
from collections.abc import Iterable, Mapping
from typing import Any

import cv2
import numpy as np

from featmap_ros.datasets.nyu import HAND_BONES
from featmap_ros.errors import FeatmapError
from featmap_ros.geometry import BOX_EDGES, GeometryError, Intrinsics, quat_from_matrix
from featmap_ros.results import Detection2D, FrameResult, HandPose, bone_indices

__all__ = [
    "HAND_BONES", "MAX_IMAGE_PIXELS", "MSGTYPES", "MessageError", "MessageFactory", "camera_info_to_intrinsics",
    "compressed_image_size", "compressed_size",
    "compressed_to_depth", "compressed_to_rgb", "detections_from_msg", "image_to_depth", "image_to_rgb",
    "rclpy_types", "stamp_ns_of",
]


class MessageError(FeatmapError, ValueError):
    """A message cannot be converted: unknown encoding, inconsistent sizes, missing calibration."""


@functools.lru_cache(maxsize=256)
def _quaternion_of(r_bytes: bytes) -> tuple[float, float, float, float]:
    """(w, x, y, z) of the float64 rotation matrix whose bytes these are (quat_from_matrix, an eigen-solve).

    A frame's messages ask for each object's rotation three times (its TF and the detection's two poses) and
    for the identity once per marker: the cache keeps it to one solve each (about 20 us), by value, so a
    matrix changed in place is solved anew.
    """
    return tuple(float(v) for v in quat_from_matrix(np.frombuffer(r_bytes, dtype=np.float64).reshape(3, 3)))


# --------------------------------------------------------------------------------------------
# Decoders: message -> numpy

# encoding -> (numpy dtype of one channel, channels)
COLOUR_ENCODINGS = {"rgb8": ("u1", 3), "bgr8": ("u1", 3), "rgba8": ("u1", 4), "bgra8": ("u1", 4), "mono8": ("u1", 1)}
DEPTH_ENCODINGS = {"16UC1": ("u2", 1), "mono16": ("u2", 1), "32FC1": ("f4", 1)}


def stamp_ns_of(header: Any) -> int:
    """Return a header's stamp in integer nanoseconds."""
    return int(header.stamp.sec) * 1_000_000_000 + int(header.stamp.nanosec)


def _bytes_of(data: Any) -> np.ndarray:
    """View a message's uint8 data (numpy, bytes, array.array, list) as a flat uint8 array, copying only lists."""
    if isinstance(data, np.ndarray):
        return data.reshape(-1).view(np.uint8)
    try:
        return np.frombuffer(data, dtype=np.uint8)
    except TypeError:
        return np.asarray(data, dtype=np.uint8).reshape(-1)


def _pixels(msg: Any, table: Mapping[str, tuple[str, int]]) -> tuple[str, np.ndarray]:
    """Return (encoding, HxWxC array in native byte order) of an Image whose encoding is in table."""
    enc = str(msg.encoding)
    if enc not in table:
        raise MessageError(f"image encoding {enc!r} is not supported here; expected one of {sorted(table)}")
    kind, channels = table[enc]
    h, w, step = int(msg.height), int(msg.width), int(msg.step)
    if h <= 0 or w <= 0:
        raise MessageError(f"{enc} image has zero size {w}x{h}; expected width and height > 0")
    dtype = np.dtype(kind).newbyteorder(">" if msg.is_bigendian else "<")
    row_bytes = w * channels * dtype.itemsize
    if step < row_bytes:
        raise MessageError(
            f"{enc} image {w}x{h} has step {step} bytes, less than width*bytes_per_pixel = {row_bytes}"
        )
    buf = _bytes_of(msg.data)
    if buf.size != h * step:
        raise MessageError(
            f"{enc} image {w}x{h} with step {step} needs height*step = {h * step} bytes of data, got {buf.size}"
        )
    # Slice the padding off each row, then reinterpret in the sender's byte order.
    rows = np.ascontiguousarray(buf.reshape(h, step)[:, :row_bytes])
    return enc, rows.view(dtype).reshape(h, w, channels).astype(dtype.newbyteorder("="))


def image_to_rgb(msg: Any) -> np.ndarray:
    """Decode a colour sensor_msgs/Image (rgb8, bgr8, rgba8, bgra8, mono8) to HxWx3 uint8 RGB."""
    enc, px = _pixels(msg, COLOUR_ENCODINGS)
    if enc == "mono8":
        return np.repeat(px, 3, axis=2)
    if enc.startswith("bgr"):
        return np.ascontiguousarray(px[..., 2::-1])
    return np.ascontiguousarray(px[..., :3])


def image_to_depth(msg: Any) -> np.ndarray:
    """Decode a depth sensor_msgs/Image to HxW float32 metres, NaN where invalid.

    16UC1 / mono16 hold millimetres with 0 = invalid; 32FC1 holds metres with 0, inf and NaN
    invalid (REP 118). Negative depth cannot be seen by a camera and is marked invalid too.
    """
    enc, px = _pixels(msg, DEPTH_ENCODINGS)
    px = px[..., 0]
    if enc == "32FC1":
        depth = px.astype(np.float32)
        depth[~np.isfinite(depth) | (depth <= 0)] = np.nan
        return depth
    depth = px.astype(np.float32) / np.float32(1000.0)
    depth[px == 0] = np.nan
    return depth


def _parse_compressed_format(fmt: str) -> tuple[str, str, str]:
    """Split a CompressedImage format into (original encoding, codec, compressed encoding).

    image_transport writes '<enc>; <jpeg|png> compressed <enc>' (e.g. 'rgb8; jpeg compressed bgr8'),
    compressed_depth_image_transport '<enc>; compressedDepth [png]'; old publishers just 'jpeg'.
    Any part not given comes back as ''.
    """
    original, _, rest = fmt.partition(";") if ";" in fmt else ("", "", fmt)
    words = rest.split()
    codec = words[0].lower() if words else ""
    if codec == "compresseddepth":
        return original.strip(), "compressedDepth", (words[1].lower() if len(words) > 1 else "png")
    compressed_enc = words[2] if len(words) > 2 and words[1] == "compressed" else ""
    return original.strip(), codec, compressed_enc


# The largest compressed image decoded at all (a 12000x12000 PNG of 140 kB would take 540 MB).
MAX_IMAGE_PIXELS = 50_000_000
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# JPEG start-of-frame markers (they hold the size); C4, C8 and CC share the range but are not frames.
_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def compressed_image_size(buf: bytes | np.ndarray) -> tuple[int, int] | None:
    """(width, height) from a PNG's IHDR or a JPEG's start-of-frame header, without decoding; None if neither."""
    data = bytes(buf[:8]) if len(buf) >= 8 else b""
    if data == _PNG_SIGNATURE:
        head = bytes(buf[:24])
        if len(head) == 24 and head[12:16] == b"IHDR":
            width, height = struct.unpack(">II", head[16:24])
            return int(width), int(height)
        return None
    if not data.startswith(b"\xff\xd8"):
        return None
    raw = buf.tobytes() if isinstance(buf, np.ndarray) else bytes(buf)
    i = 2
    while i + 4 <= len(raw):
        if raw[i] != 0xFF:
            return None
        marker = raw[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in (0x01, 0xD8) or 0xD0 <= marker <= 0xD7:  # markers without a length
            i += 2
            continue
        if marker in (0xD9, 0xDA):  # end of image, start of scan: no frame header came first
            return None
        (length,) = struct.unpack(">H", raw[i + 2:i + 4])
        if marker in _JPEG_SOF:
            if i + 9 > len(raw):
                return None
            height, width = struct.unpack(">HH", raw[i + 5:i + 9])
            return int(width), int(height)
        i += 2 + length
    return None


def compressed_size(msg: Any) -> tuple[int, int]:
    """(width, height) of a CompressedImage (jpeg, png or compressedDepth png) read from its header alone.

    Raises:
        MessageError: the bytes hold no PNG or JPEG header.
    """
    fmt = str(msg.format)
    buf = _bytes_of(msg.data)
    if _parse_compressed_format(fmt)[1] == "compressedDepth":
        buf = buf[12:]  # compressed_depth_image_transport's ConfigHeader comes before the PNG
    size = compressed_image_size(buf)
    if size is None:
        raise MessageError(
            f"CompressedImage format {fmt!r}: the {buf.size} bytes start with no PNG or JPEG header "
            f"({bytes(buf[:8])!r}); cannot read the image size"
        )
    return size


def _imdecode(data: Any, fmt: str) -> np.ndarray:
    """cv2.imdecode with a MessageError that names the format when the bytes are not an image.

    An image whose header says it is over MAX_IMAGE_PIXELS is refused before decoding.
    """
    buf = _bytes_of(data)
    size = compressed_image_size(buf)
    if size is not None and size[0] * size[1] > MAX_IMAGE_PIXELS:
        raise MessageError(
            f"CompressedImage format {fmt!r} is {size[0]}x{size[1]} by its header, over {MAX_IMAGE_PIXELS} pixels"
        )
    img = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED) if buf.size else None
    if img is None:
        raise MessageError(f"CompressedImage with format {fmt!r} holds {buf.size} bytes that OpenCV cannot decode")
    return img


def compressed_to_rgb(msg: Any) -> np.ndarray:
    """Decode a colour sensor_msgs/CompressedImage (jpeg or png) to HxWx3 uint8 RGB."""
    fmt = str(msg.format)
    original, codec, compressed_enc = _parse_compressed_format(fmt)
    if codec not in ("jpeg", "jpg", "png"):
        raise MessageError(f"CompressedImage format {fmt!r}: codec {codec!r} is not jpeg or png")
    if original in DEPTH_ENCODINGS:
        raise MessageError(f"CompressedImage format {fmt!r} holds depth, not colour; use compressed_to_depth")
    img = _imdecode(msg.data, fmt)
    if img.dtype != np.uint8:
        raise MessageError(f"CompressedImage format {fmt!r} decoded to {img.dtype}; expected 8-bit colour")
    if img.ndim == 2:
        return np.repeat(img[..., None], 3, axis=2)
    # OpenCV returns channels in the order they were encoded in, which image_transport names
    # after 'compressed' (bgr8 by default); only an explicit rgb order is already RGB.
    if compressed_enc.startswith("rgb"):
        return np.ascontiguousarray(img[..., :3])
    return np.ascontiguousarray(img[..., 2::-1])


def compressed_to_depth(msg: Any) -> np.ndarray:
    """Decode a depth CompressedImage (compressedDepth png, or 16-bit png) to HxW float32 metres, NaN invalid."""
    fmt = str(msg.format)
    original, codec, sub = _parse_compressed_format(fmt)
    buf = _bytes_of(msg.data)
    if codec == "compressedDepth":
        if sub != "png":
            raise MessageError(f"CompressedImage format {fmt!r}: compressedDepth {sub!r} unsupported; expected png")
        # compressed_depth_image_transport prefixes the PNG with a 12-byte ConfigHeader:
        # int32 format (0 = inverse depth), float32 depthQuantA, float32 depthQuantB.
        if buf.size <= 12:
            raise MessageError(f"compressedDepth message has {buf.size} bytes; expected a 12-byte header and a PNG")
        _, quant_a, quant_b = struct.unpack("<iff", buf[:12].tobytes())
        img = _imdecode(buf[12:], fmt)
        if img.dtype != np.uint16 or img.ndim != 2:
            raise MessageError(f"format {fmt!r} decoded to {img.dtype} {img.shape}; expected 16-bit grey")
        if original == "32FC1":
            # Inverse-depth quantisation: value = quant_a / depth + quant_b, 0 = invalid.
            with np.errstate(divide="ignore"):
                depth = (quant_a / (img.astype(np.float32) - quant_b)).astype(np.float32)
            depth[(img == 0) | ~np.isfinite(depth) | (depth <= 0)] = np.nan
            return depth
        if original not in ("16UC1", "mono16"):
            raise MessageError(f"compressedDepth format {fmt!r}: original encoding {original!r} is not 16UC1 or 32FC1")
    elif codec == "png":
        img = _imdecode(buf, fmt)
        if img.dtype != np.uint16 or img.ndim != 2:
            raise MessageError(f"format {fmt!r} decoded to {img.dtype} {img.shape}; expected 16-bit grey")
    else:
        raise MessageError(f"CompressedImage format {fmt!r} is not depth; expected compressedDepth or 16-bit png")
    depth = img.astype(np.float32) / np.float32(1000.0)
    depth[img == 0] = np.nan
    return depth


def camera_info_to_intrinsics(msg: Any) -> tuple[Intrinsics, np.ndarray]:
    """Read a sensor_msgs/CameraInfo as (Intrinsics, distortion coefficients d).

    d is returned so the caller can warn when the image is not rectified: our projection
    assumes no distortion.
    """
    K = np.asarray(msg.k, dtype=np.float64).reshape(-1)
    if K.size != 9:
        raise MessageError(f"CameraInfo.k has {K.size} values; expected 9")
    if not np.isfinite(K).all():
        raise MessageError(f"CameraInfo.k holds non-finite values {K.tolist()}; expected a finite camera matrix")
    d = np.asarray(msg.d, dtype=np.float64).reshape(-1)
    if not np.isfinite(d).all():
        raise MessageError(f"CameraInfo.d holds non-finite distortion {d.tolist()}; expected finite coefficients")
    P = np.asarray(getattr(msg, "p", np.zeros(12)), dtype=np.float64).reshape(-1)
    if not np.isfinite(P).all():
        raise MessageError(f"CameraInfo.p holds non-finite values {P.tolist()}; expected a finite projection")
    if not K.any():
        raise MessageError("CameraInfo.k is all zeros: camera not calibrated")
    w, h = int(msg.width), int(msg.height)
    if w <= 0 or h <= 0:
        raise MessageError(f"CameraInfo has zero image size {w}x{h}; expected width and height > 0")
    try:
        intr = Intrinsics.from_K(K.reshape(3, 3), w, h)
    except GeometryError as err:
        raise MessageError(f"CameraInfo.k is not a usable camera matrix: {err}") from err
    return intr, d


def detections_from_msg(msg: Any) -> list[Detection2D]:
    """Read a vision_msgs/Detection2DArray as Detection2D boxes (x, y, w, h pixels) with their best hypothesis.

    A detection without hypotheses keeps an empty class_id and score 1.0: the detector vouched for the box.
    """
    out = []
    for det in msg.detections:
        cx, cy = float(det.bbox.center.position.x), float(det.bbox.center.position.y)
        w, h = float(det.bbox.size_x), float(det.bbox.size_y)
        class_id, score = "", 1.0
        if len(det.results):
            best = max(det.results, key=lambda r: float(r.hypothesis.score))
            class_id, score = str(best.hypothesis.class_id), float(best.hypothesis.score)
        out.append(Detection2D(np.array([cx - w / 2.0, cy - h / 2.0, w, h]), score=score, class_id=class_id))
    return out


# --------------------------------------------------------------------------------------------
# Builders: results -> messages

# The message types the builders use; rclpy_types imports exactly these.
MSGTYPES = (
    "builtin_interfaces/msg/Time", "builtin_interfaces/msg/Duration", "std_msgs/msg/Header",
    "std_msgs/msg/ColorRGBA", "geometry_msgs/msg/Point", "geometry_msgs/msg/Vector3",
    "geometry_msgs/msg/Quaternion", "geometry_msgs/msg/Pose", "geometry_msgs/msg/PoseWithCovariance",
    "geometry_msgs/msg/Transform", "geometry_msgs/msg/TransformStamped", "sensor_msgs/msg/Image",
    "sensor_msgs/msg/CompressedImage", "sensor_msgs/msg/CameraInfo", "visualization_msgs/msg/Marker",
    "visualization_msgs/msg/MarkerArray", "vision_msgs/msg/Point2D", "vision_msgs/msg/Pose2D",
    "vision_msgs/msg/BoundingBox2D", "vision_msgs/msg/BoundingBox3D", "vision_msgs/msg/ObjectHypothesis",
    "vision_msgs/msg/ObjectHypothesisWithPose", "vision_msgs/msg/Detection2D",
    "vision_msgs/msg/Detection2DArray", "vision_msgs/msg/Detection3D", "vision_msgs/msg/Detection3DArray",
    "featmap_ros/msg/HandJoints", "featmap_ros/msg/HandJointsArray", "tf2_msgs/msg/TFMessage",
)


def rclpy_types(names: Iterable[str] = MSGTYPES) -> dict[str, type]:
    """Import rclpy message classes by 'pkg/msg/Name' (needs a sourced ROS environment)."""
    types = {}
    for name in names:
        pkg, sub, cls = name.split("/")
        try:
            types[name] = getattr(importlib.import_module(f"{pkg}.{sub}"), cls)
        except (ImportError, AttributeError) as err:
            raise MessageError(f"cannot import message class {name}; is the ROS environment sourced?") from err
    return types


_BASE_DEFAULTS = {"bool": False, "string": "", "float32": 0.0, "float64": 0.0}
# Non-zero defaults from .msg files, which rosbags' field definitions do not carry.
_MSG_DEFAULTS = {"geometry_msgs/msg/Quaternion": {"w": 1.0}}
_DTYPES = {"octet": "uint8", "char": "uint8", "byte": "uint8"}  # IDL names numpy does not know
_TYPECODES = {
    "u1": "B", "i1": "b", "u2": "H", "i2": "h", "u4": "I", "i4": "i", "u8": "Q", "i8": "q", "f4": "f", "f8": "d",
}

# Marker colours (r, g, b) in [0, 1]: estimate boxes cycle through the palette by object id.
PALETTE = ((0.1, 0.8, 0.2), (0.2, 0.5, 1.0), (1.0, 0.6, 0.1), (0.9, 0.2, 0.9), (0.1, 0.9, 0.9), (1.0, 1.0, 0.2))
HAND_RGB = (1.0, 0.3, 0.2)
TEXT_RGB = (1.0, 1.0, 1.0)


class MessageFactory:
    """Builds messages from one backend's classes: rosbags (`for_rosbags(ts)`) or rclpy (`for_rclpy()`).

    rosbags dataclasses have no defaults, so with that backend missing fields are filled from the
    typestore's field definitions; rclpy classes fill their own.
    """

    def __init__(self, types: Mapping[str, type], fielddefs: Mapping[str, Any] | None = None) -> None:
        if fielddefs is None and any(dataclasses.is_dataclass(c) for c in types.values()):
            # rosbags classes have no defaults: without field definitions every builder would fail.
            raise MessageError("rosbags message classes need the typestore's fielddefs; use for_rosbags(ts)")
        self.types = types
        self.fielddefs = fielddefs
        self.backend = "rosbags" if fielddefs is not None else "rclpy"

    @classmethod
    def for_rosbags(cls, ts: Any) -> MessageFactory:
        """Factory over a rosbags Typestore (e.g. featmap_ros.ros.typestore.typestore('humble'))."""
        return cls(ts.types, ts.fielddefs)

    @classmethod
    def for_rclpy(cls) -> MessageFactory:
        """Factory over the rclpy classes of MSGTYPES."""
        return cls(rclpy_types())

    # ---- generic construction and the one per-backend array conversion

    def new(self, msgtype: str, **fields: Any) -> Any:
        """Make a `msgtype` ('pkg/msg/Name') message; fields not given get ROS defaults."""
        if msgtype not in self.types:
            raise MessageError(f"message type {msgtype} is not known to this {self.backend} factory")
        if self.backend == "rclpy":
            return self.types[msgtype](**fields)
        names = [n for n, _ in self.fielddefs[msgtype][1]]
        unknown = set(fields) - set(names)
        if unknown:
            raise MessageError(f"{msgtype} has no fields {sorted(unknown)}; its fields are {names}")
        fields = {**_MSG_DEFAULTS.get(msgtype, {}), **fields}
        for name, desc in self.fielddefs[msgtype][1]:
            if name not in fields:
                fields[name] = self._default(desc)
        return self.types[msgtype](**fields)

    def _default(self, desc: tuple[Any, Any]) -> Any:
        """The ROS default value of a rosbags field description (Nodetype, details)."""
        kind, detail = int(desc[0]), desc[1]
        if kind == 1:  # BASE
            return _BASE_DEFAULTS.get(detail[0], 0)
        if kind == 2:  # NAME: a nested message
            return self.new(detail)
        (sub_kind, sub_detail), length = detail
        if int(sub_kind) == 1 and sub_detail[0] != "string":
            dtype = np.dtype(_DTYPES.get(sub_detail[0], sub_detail[0]))
            return np.zeros(length if kind == 3 else 0, dtype=dtype)
        return [self._default((sub_kind, sub_detail)) for _ in range(length if kind == 3 else 0)]

    def seq(self, values: Any, dtype: str) -> Any:
        """A variable-length numeric array field (uint8[] data, float32[] ...) in the backend's type."""
        arr = np.ascontiguousarray(values, dtype=np.dtype(dtype)).reshape(-1)
        if self.backend == "rosbags":
            return arr
        # rclpy stores numeric sequences as array.array and accepts one of the right typecode as is;
        # anything else it checks element by element in Python, which is slow for images.
        out = array.array(_TYPECODES[arr.dtype.str[1:]])
        out.frombytes(arr.astype(arr.dtype.newbyteorder("=")).tobytes())
        return out

    def fixed(self, values: Any, dtype: str) -> np.ndarray:
        """A fixed-size numeric array field (float64[9] k ...): numpy for both backends."""
        return np.ascontiguousarray(values, dtype=np.dtype(dtype)).reshape(-1)

    # ---- small pieces

    def time(self, stamp_ns: int) -> Any:
        """builtin_interfaces/Time from integer nanoseconds (>= 0)."""
        if stamp_ns < 0:
            raise MessageError(f"stamp {stamp_ns} ns is negative; ROS time starts at 0")
        sec, nanosec = divmod(int(stamp_ns), 1_000_000_000)
        return self.new("builtin_interfaces/msg/Time", sec=sec, nanosec=nanosec)

    def duration(self, seconds: float) -> Any:
        """builtin_interfaces/Duration from seconds (>= 0)."""
        sec, nanosec = divmod(round(seconds * 1e9), 1_000_000_000)
        return self.new("builtin_interfaces/msg/Duration", sec=int(sec), nanosec=int(nanosec))

    def header(self, stamp_ns: int, frame_id: str) -> Any:
        """std_msgs/Header from a stamp in nanoseconds and a frame id."""
        return self.new("std_msgs/msg/Header", stamp=self.time(stamp_ns), frame_id=str(frame_id))

    def point(self, xyz: Any) -> Any:
        """geometry_msgs/Point from (3,) metres."""
        x, y, z = (float(v) for v in np.asarray(xyz).reshape(3))
        return self.new("geometry_msgs/msg/Point", x=x, y=y, z=z)

    def quaternion(self, R: np.ndarray) -> Any:
        """geometry_msgs/Quaternion of a rotation matrix: our (w, x, y, z) becomes ROS (x, y, z, w) here."""
        w, x, y, z = _quaternion_of(np.ascontiguousarray(R, dtype=np.float64).tobytes())
        return self.new("geometry_msgs/msg/Quaternion", x=x, y=y, z=z, w=w)

    def pose(self, R: np.ndarray, t: np.ndarray) -> Any:
        """geometry_msgs/Pose from a rotation matrix and (3,) translation in metres."""
        return self.new("geometry_msgs/msg/Pose", position=self.point(t), orientation=self.quaternion(R))

    def colour(self, rgb: tuple[float, float, float], alpha: float = 1.0) -> Any:
        """std_msgs/ColorRGBA from components in [0, 1]."""
        r, g, b = (float(v) for v in rgb)
        return self.new("std_msgs/msg/ColorRGBA", r=r, g=g, b=b, a=float(alpha))

    # ---- outputs of the estimator

    def transform_stamped(self, stamp_ns: int, parent: str, child: str, R: np.ndarray, t: np.ndarray) -> Any:
        """geometry_msgs/TransformStamped placing `child` in `parent` (x_parent = R x_child + t)."""
        tx, ty, tz = (float(v) for v in np.asarray(t).reshape(3))
        transform = self.new(
            "geometry_msgs/msg/Transform",
            translation=self.new("geometry_msgs/msg/Vector3", x=tx, y=ty, z=tz),
            rotation=self.quaternion(R),
        )
        return self.new(
            "geometry_msgs/msg/TransformStamped", header=self.header(stamp_ns, parent), child_frame_id=child,
            transform=transform,
        )

    def transforms(self, frame: FrameResult, prefix: str = "featmap/") -> list[Any]:
        """TF for a frame: '<prefix><name>' per object, '<prefix>hand<i>_<joint>' per hand joint.

        The parent is the camera frame of the image and the stamp is the image's, so TF lookups
        line up with the data. Joint frames carry no orientation (identity).
        """
        out = [
            self.transform_stamped(frame.stamp_ns, frame.frame_id, f"{prefix}{o.name}", o.R, o.t)
            for o in frame.objects
        ]
        eye = np.eye(3)
        for i, hand in enumerate(frame.hands):
            for name, xyz in zip(hand.joint_names, np.asarray(hand.joints_xyz), strict=True):
                out.append(self.transform_stamped(frame.stamp_ns, frame.frame_id, f"{prefix}hand{i}_{name}", eye, xyz))
        return out

    def tf_message(self, transforms: list[Any]) -> Any:
        """tf2_msgs/TFMessage holding TransformStamped messages (the /tf topic of a bag)."""
        return self.new("tf2_msgs/msg/TFMessage", transforms=list(transforms))

    def marker(self, header: Any, ns: str, marker_id: int, marker_type: int, *, lifetime_s: float,
               rgb: tuple[float, float, float], scale: tuple[float, float, float],
               points: np.ndarray | None = None, position: np.ndarray | None = None, text: str = "") -> Any:
        """One visualization_msgs/Marker in the header's frame (identity pose unless `position`)."""
        sx, sy, sz = (float(v) for v in scale)
        pose = self.pose(np.eye(3), np.zeros(3) if position is None else position)
        return self.new(
            "visualization_msgs/msg/Marker", header=header, ns=ns, id=int(marker_id), type=int(marker_type),
            action=0, pose=pose, scale=self.new("geometry_msgs/msg/Vector3", x=sx, y=sy, z=sz),
            color=self.colour(rgb), lifetime=self.duration(lifetime_s),
            points=[] if points is None else [self.point(p) for p in np.asarray(points).reshape(-1, 3)],
            text=text,
        )

    def markers(self, frame: FrameResult, lifetime_s: float = 0.5, line_width_m: float = 0.003,
                joint_size_m: float = 0.012, text_size_m: float = 0.03) -> Any:
        """visualization_msgs/MarkerArray: DELETEALL, box + label per object, joints + bones + label per hand."""
        header = self.header(frame.stamp_ns, frame.frame_id)
        # DELETEALL first so markers of objects no longer seen vanish at once, not after their lifetime.
        clear = self.new("visualization_msgs/msg/Marker", header=header, action=3)
        out = [clear]
        common = {"lifetime_s": lifetime_s}
        for i, obj in enumerate(frame.objects):
            rgb = PALETTE[obj.obj_id % len(PALETTE)]
            corners = obj.corners_cam()
            edges = corners[BOX_EDGES.reshape(-1)]  # (24, 3): the 12 edges as point pairs
            out.append(self.marker(header, "featmap/boxes", i, 5, rgb=rgb, scale=(line_width_m, 0, 0),
                                   points=edges, **common))
            # Label above the box: "up" is -y in the optical frame.
            top = corners[np.argmin(corners[:, 1])] - np.array([0.0, text_size_m, 0.0])
            out.append(self.marker(header, "featmap/labels", i, 9, rgb=TEXT_RGB, scale=(0, 0, text_size_m),
                                   position=top, text=f"{obj.name} {obj.score:.2f}", **common))
        for i, hand in enumerate(frame.hands):
            joints = np.asarray(hand.joints_xyz, dtype=np.float64).reshape(-1, 3)
            bones = joints[bone_indices(hand.joint_names).reshape(-1)]
            out.append(self.marker(header, "featmap/hand_joints", i, 7, rgb=HAND_RGB,
                                   scale=(joint_size_m,) * 3, points=joints, **common))
            out.append(self.marker(header, "featmap/hand_bones", i, 5, rgb=HAND_RGB, scale=(line_width_m, 0, 0),
                                   points=bones, **common))
            top = joints[np.argmin(joints[:, 1])] - np.array([0.0, text_size_m, 0.0])
            out.append(self.marker(header, "featmap/hand_labels", i, 9, rgb=TEXT_RGB, scale=(0, 0, text_size_m),
                                   position=top, text=f"hand{i} {hand.score:.2f}", **common))
        return self.new("visualization_msgs/msg/MarkerArray", markers=out)

    def detection3d_array(self, frame: FrameResult) -> Any:
        """vision_msgs/Detection3DArray: bbox = the object's box (centre pose, extent), results[0] = model pose.

        bbox.center is the box centre (the model origin need not be at the centre of its box);
        results[0].pose.pose is the model-to-camera pose itself.
        """
        header = self.header(frame.stamp_ns, frame.frame_id)
        dets = []
        for obj in frame.objects:
            centre_model = np.asarray(obj.corners_3d).mean(axis=0)
            centre_cam = np.asarray(obj.R) @ centre_model + np.asarray(obj.t).reshape(3)
            ex, ey, ez = (float(v) for v in np.asarray(obj.extent).reshape(3))
            bbox = self.new(
                "vision_msgs/msg/BoundingBox3D", center=self.pose(obj.R, centre_cam),
                size=self.new("geometry_msgs/msg/Vector3", x=ex, y=ey, z=ez),
            )
            hyp = self.new(
                "vision_msgs/msg/ObjectHypothesisWithPose",
                hypothesis=self.new(
                    "vision_msgs/msg/ObjectHypothesis", class_id=str(obj.obj_id), score=float(obj.score)
                ),
                pose=self.new("geometry_msgs/msg/PoseWithCovariance", pose=self.pose(obj.R, obj.t)),
            )
            dets.append(self.new("vision_msgs/msg/Detection3D", header=header, results=[hyp], bbox=bbox, id=obj.name))
        return self.new("vision_msgs/msg/Detection3DArray", header=header, detections=dets)

    def hand_joints(self, header: Any, hand: HandPose, hand_id: str) -> Any:
        """featmap_ros/HandJoints of one hand (camera frame, metres)."""
        joints = np.asarray(hand.joints_xyz, dtype=np.float64).reshape(-1, 3)
        names = [str(n) for n in hand.joint_names]
        if len(names) != len(joints) or np.asarray(hand.confidences).size != len(joints):
            raise MessageError(
                f"hand {hand_id} has {len(names)} joint names, {len(joints)} positions and "
                f"{np.asarray(hand.confidences).size} confidences; expected equal counts"
            )
        return self.new(
            "featmap_ros/msg/HandJoints", header=header, hand_id=hand_id, joint_names=names,
            positions=[self.point(p) for p in joints], confidences=self.seq(hand.confidences, "float32"),
            center=self.point(hand.centre), cube_size=float(hand.cube_m), score=float(hand.score),
            out_of_domain=float(hand.out_of_domain),
        )

    def hand_joints_array(self, frame: FrameResult) -> Any:
        """featmap_ros/HandJointsArray of all hands of a frame; hand ids are 'hand<i>' as in TF."""
        header = self.header(frame.stamp_ns, frame.frame_id)
        hands = [self.hand_joints(header, h, f"hand{i}") for i, h in enumerate(frame.hands)]
        return self.new("featmap_ros/msg/HandJointsArray", header=header, hands=hands)

    # ---- inputs (to make bags and test fixtures) and the overlay image

    def image(self, pixels: np.ndarray, encoding: str, stamp_ns: int, frame_id: str) -> Any:
        """sensor_msgs/Image of an HxW(xC) array already in `encoding`'s layout, little-endian, unpadded."""
        arr = np.ascontiguousarray(pixels)
        h, w = arr.shape[:2]
        arr = arr.astype(arr.dtype.newbyteorder("<"))
        return self.new(
            "sensor_msgs/msg/Image", header=self.header(stamp_ns, frame_id), height=int(h), width=int(w),
            encoding=encoding, is_bigendian=0, step=int(arr.nbytes // h), data=self.seq(arr.view(np.uint8), "uint8"),
        )

    def image_rgb(self, rgb: np.ndarray, stamp_ns: int, frame_id: str) -> Any:
        """sensor_msgs/Image rgb8 from HxWx3 uint8 RGB."""
        rgb = np.asarray(rgb)
        if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
            raise MessageError(f"expected HxWx3 uint8 RGB, got shape {rgb.shape} dtype {rgb.dtype}")
        return self.image(rgb, "rgb8", stamp_ns, frame_id)

    def image_depth(self, depth_m: np.ndarray, stamp_ns: int, frame_id: str, encoding: str = "16UC1") -> Any:
        """sensor_msgs/Image of HxW depth in metres (NaN invalid): 16UC1 millimetres (0 invalid) or 32FC1 metres."""
        depth = np.asarray(depth_m, dtype=np.float64)
        if depth.ndim != 2:
            raise MessageError(f"expected HxW depth, got shape {depth.shape}")
        valid = np.isfinite(depth) & (depth > 0)
        if encoding == "16UC1":
            mm = np.where(valid, np.round(depth * 1000.0), 0.0)
            if mm.max(initial=0) > 65535:
                raise MessageError(f"depth up to {mm.max() / 1000:.1f} m does not fit 16UC1 millimetres (max 65.535 m)")
            return self.image(mm.astype(np.uint16), encoding, stamp_ns, frame_id)
        if encoding == "32FC1":
            return self.image(np.where(valid, depth, np.nan).astype(np.float32), encoding, stamp_ns, frame_id)
        raise MessageError(f"depth encoding {encoding!r} is not supported; expected '16UC1' or '32FC1'")

    def compressed_image(self, rgb: np.ndarray, stamp_ns: int, frame_id: str, codec: str = "jpeg") -> Any:
        """sensor_msgs/CompressedImage of HxWx3 uint8 RGB, format 'rgb8; <codec> compressed bgr8' (image_transport)."""
        ok, buf = cv2.imencode(".jpg" if codec == "jpeg" else ".png", np.ascontiguousarray(np.asarray(rgb)[..., ::-1]))
        if not ok:
            raise MessageError(f"OpenCV could not encode a {np.asarray(rgb).shape} image as {codec}")
        return self.new(
            "sensor_msgs/msg/CompressedImage", header=self.header(stamp_ns, frame_id),
            format=f"rgb8; {codec} compressed bgr8", data=self.seq(buf.reshape(-1), "uint8"),
        )

    def camera_info(self, intr: Intrinsics, stamp_ns: int, frame_id: str, d: np.ndarray | None = None) -> Any:
        """sensor_msgs/CameraInfo of a pinhole camera (plumb_bob, zero distortion unless d is given)."""
        K = intr.K
        P = np.concatenate([K, np.zeros((3, 1))], axis=1)
        return self.new(
            "sensor_msgs/msg/CameraInfo", header=self.header(stamp_ns, frame_id), height=int(intr.height),
            width=int(intr.width), distortion_model="plumb_bob",
            d=self.seq(np.zeros(5) if d is None else d, "float64"), k=self.fixed(K, "float64"),
            r=self.fixed(np.eye(3), "float64"), p=self.fixed(P, "float64"),
        )

    def detection2d_array(self, detections: list[Detection2D], stamp_ns: int, frame_id: str) -> Any:
        """vision_msgs/Detection2DArray of boxes (x, y, w, h pixels) with one hypothesis each."""
        header = self.header(stamp_ns, frame_id)
        dets = []
        for det in detections:
            x, y, w, h = (float(v) for v in det.box_xywh)
            centre = self.new(
                "vision_msgs/msg/Pose2D",
                position=self.new("vision_msgs/msg/Point2D", x=x + w / 2.0, y=y + h / 2.0), theta=0.0,
            )
            bbox = self.new("vision_msgs/msg/BoundingBox2D", center=centre, size_x=w, size_y=h)
            hyp = self.new(
                "vision_msgs/msg/ObjectHypothesisWithPose",
                hypothesis=self.new("vision_msgs/msg/ObjectHypothesis", class_id=det.class_id, score=float(det.score)),
            )
            dets.append(self.new("vision_msgs/msg/Detection2D", header=header, results=[hyp], bbox=bbox,
                                 id=det.class_id))
        return self.new("vision_msgs/msg/Detection2DArray", header=header, detections=dets)
