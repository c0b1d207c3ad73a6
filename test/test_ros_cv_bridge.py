"""Our image codec against cv_bridge, on every supported encoding (padded rows and big-endian included).

Issue 16 item 7: where rclpy is present the node must read what cv_bridge users publish and produce
what they expect. Needs a sourced ROS 2 (rclpy message classes and cv_bridge, a test_depend).
"""

from __future__ import annotations

import pytest

pytest.importorskip("rclpy", reason="needs a ROS 2 installation (rclpy message classes)")
cv_bridge = pytest.importorskip("cv_bridge", reason="needs cv_bridge (ROS 2 test_depend of featmap_ros)")

import array  # noqa: E402 - after the skips
from typing import Any  # noqa: E402

import cv2  # noqa: E402
import numpy as np  # noqa: E402
from sensor_msgs.msg import Image  # noqa: E402

from featmap_ros.ros.messages import (  # noqa: E402
    MessageFactory,
    compressed_to_rgb,
    image_to_depth,
    image_to_rgb,
)

BRIDGE = cv_bridge.CvBridge()
RNG = np.random.default_rng(3)
H, W = 7, 5  # odd sizes, so row padding and alignment matter
COLOUR = {"rgb8": 3, "bgr8": 3, "rgba8": 4, "bgra8": 4, "mono8": 1}
DEPTH = {"16UC1": np.uint16, "mono16": np.uint16, "32FC1": np.float32}


def pixels(encoding: str) -> np.ndarray:
    """An HxW(xC) array in the encoding's own layout, as a cv_bridge user holds it."""
    if encoding in COLOUR:
        shape = (H, W) if COLOUR[encoding] == 1 else (H, W, COLOUR[encoding])
        return RNG.integers(0, 256, size=shape, dtype=np.uint8)
    if DEPTH[encoding] is np.uint16:
        return RNG.integers(0, 5000, size=(H, W), dtype=np.uint16)
    return RNG.uniform(0.3, 4.0, size=(H, W)).astype(np.float32)


def expected_rgb(px: np.ndarray, encoding: str) -> np.ndarray:
    """What our decoder must give for a cv_bridge image: HxWx3 RGB."""
    if encoding == "mono8":
        return np.repeat(px[..., None], 3, axis=2)
    if encoding.startswith("bgr"):
        return px[..., 2::-1]
    return px[..., :3]


def expected_depth(px: np.ndarray, encoding: str) -> np.ndarray:
    if encoding == "32FC1":
        return px
    out = px.astype(np.float32) / np.float32(1000.0)
    out[px == 0] = np.nan
    return out


def decode(msg: Any, encoding: str) -> np.ndarray:
    return image_to_rgb(msg) if encoding in COLOUR else image_to_depth(msg)


def expected(px: np.ndarray, encoding: str) -> np.ndarray:
    return expected_rgb(px, encoding) if encoding in COLOUR else expected_depth(px, encoding)


ENCODINGS = sorted(COLOUR) + sorted(DEPTH)


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_we_read_what_cv_bridge_writes(encoding: str) -> None:
    px = pixels(encoding)
    msg = BRIDGE.cv2_to_imgmsg(px, encoding=encoding)
    np.testing.assert_array_equal(decode(msg, encoding), expected(px, encoding))


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_cv_bridge_reads_what_we_write(encoding: str) -> None:
    px = pixels(encoding)
    msg = MessageFactory.for_rclpy().image(px, encoding, 123, "cam")
    np.testing.assert_array_equal(BRIDGE.imgmsg_to_cv2(msg, desired_encoding="passthrough").reshape(px.shape), px)


def _padded(px: np.ndarray, encoding: str, pad: int, bigendian: bool) -> Image:
    """An Image with `pad` bytes at the end of each row, in the chosen byte order."""
    arr = px.astype(px.dtype.newbyteorder(">" if bigendian else "<"))
    rows = arr.reshape(H, -1).view(np.uint8).reshape(H, -1)
    data = np.concatenate([rows, np.full((H, pad), 0xAB, np.uint8)], axis=1)
    out = array.array("B")
    out.frombytes(data.tobytes())
    return Image(height=H, width=W, encoding=encoding, is_bigendian=int(bigendian), step=rows.shape[1] + pad,
                 data=out)


@pytest.mark.parametrize("encoding", ENCODINGS)
@pytest.mark.parametrize(("pad", "bigendian"), [(8, False), (0, True), (6, True)])
def test_padded_rows_and_big_endian_decode_as_cv_bridge_does(encoding: str, pad: int, bigendian: bool) -> None:
    px = pixels(encoding)
    if bigendian and px.dtype.itemsize == 1:
        pytest.skip("byte order does not apply to 8-bit encodings")
    msg = _padded(px, encoding, pad, bigendian)
    theirs = BRIDGE.imgmsg_to_cv2(msg, desired_encoding="passthrough").reshape(px.shape)
    np.testing.assert_array_equal(theirs, px)  # cv_bridge itself honours step and byte order
    np.testing.assert_array_equal(decode(msg, encoding), expected(px, encoding))


def test_our_overlay_is_what_a_cv_bridge_user_asking_for_bgr8_expects() -> None:
    rgb = RNG.integers(0, 256, size=(H, W, 3), dtype=np.uint8)
    msg = MessageFactory.for_rclpy().image_rgb(rgb, 5, "cam")
    np.testing.assert_array_equal(BRIDGE.imgmsg_to_cv2(msg, desired_encoding="bgr8"), rgb[..., ::-1])


@pytest.mark.parametrize("codec", ["jpg", "png"])
def test_compressed_images_both_ways(codec: str) -> None:
    bgr = RNG.integers(0, 256, size=(16, 24, 3), dtype=np.uint8)
    theirs = BRIDGE.cv2_to_compressed_imgmsg(bgr, dst_format=codec)
    ours = compressed_to_rgb(theirs)
    np.testing.assert_array_equal(ours, cv2.imdecode(np.frombuffer(bytes(theirs.data), np.uint8), 1)[..., ::-1])
    mine = MessageFactory.for_rclpy().compressed_image(bgr[..., ::-1], 0, "cam", "png" if codec == "png" else "jpeg")
    back = BRIDGE.compressed_imgmsg_to_cv2(mine)
    if codec == "png":
        np.testing.assert_array_equal(back, bgr)
    else:
        assert back.shape == bgr.shape and np.abs(back.astype(int) - bgr).mean() < 20
