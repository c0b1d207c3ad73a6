"""NYU reader, the hand locator and the metric cube crop on the real NYU frame."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.io

from featmap_ros import geometry as g
from featmap_ros.datasets import nyu

K = nyu.NYU_INTRINSICS.K


@pytest.fixture(scope="module")
def frame(nyu_root):
    depth = nyu.read_depth(nyu_root / "test" / "depth_1_0000001.png")
    uvd = nyu.read_joints_uvd_txt(nyu_root / "test" / "depth_1_0000001_joints_uvd.txt")
    return depth, uvd


def test_depth_decodes_to_metres_with_background_invalid(frame):
    depth, uvd = frame
    assert depth.shape == (480, 640) and depth.dtype == np.float32
    valid = depth[np.isfinite(depth)]
    assert 0.7 < valid.min() < 0.75 and valid.max() < 2.0
    # the ground-truth joints lie 3-33 mm behind the measured surface (shared/data/README.md)
    u, v = np.round(uvd[:, 0]).astype(int), np.round(uvd[:, 1]).astype(int)
    gap = uvd[:, 2] - depth[v, u]
    assert np.all((gap > 0.0) & (gap < 0.04))


def test_uvd_xyz_round_trip_is_exact(frame):
    _, uvd = frame
    xyz = nyu.joints_uvd_to_xyz(uvd)
    assert np.abs(g.xyz_to_uvd(xyz, K) - uvd).max() < 1e-6
    # OpenCV frame: the fingers (tips) are above the wrist, so smaller y
    assert xyz[nyu.JOINT_NAMES.index("middle_tip"), 1] < xyz[nyu.JOINT_NAMES.index("wrist_1"), 1]


def test_located_hand_is_near_the_palm_and_the_cube_holds_all_joints(frame):
    depth, uvd = frame
    joints = nyu.joints_uvd_to_xyz(uvd)
    centre = g.locate_hand(depth, K, cube_m=0.3)
    assert np.linalg.norm(centre - joints[nyu.PALM]) < 0.040
    crop, cube = g.crop_depth_cube(depth, K, centre, cube_m=0.3, out=128)
    assert cube.contains(joints).all()
    assert (crop < 1.0).mean() > 0.1  # the hand fills part of the crop
    assert np.all(np.abs(cube.normalise_joints(joints)) <= 1.0)


def test_depth_png_round_trip(tmp_path):
    depth = np.full((4, 5), np.nan, dtype=np.float32)
    depth[1:3, 1:4] = [[0.731, 1.0, 1.2], [0.5, 0.6, 1.999]]
    nyu.write_depth(tmp_path / "d.png", depth)
    back = nyu.read_depth(tmp_path / "d.png")
    assert np.array_equal(np.isnan(back), np.isnan(depth))
    assert np.allclose(back[1:3, 1:4], depth[1:3, 1:4], atol=1e-6)


def test_official_joint_data_mat_layout(tmp_path):
    """A fixture written in the exact joint_data.mat layout (kinects, frames, 36 joints, 3)."""
    rng = np.random.default_rng(0)
    xyz_mm = rng.uniform(-100, 100, (3, 2, 36, 3)) + [0, 0, 800]
    uvd = rng.uniform(0, 400, (3, 2, 36, 3))
    scipy.io.savemat(tmp_path / "joint_data.mat", {"joint_xyz": xyz_mm, "joint_uvd": uvd, "joint_names": ["x"] * 36})
    split = nyu.read_split(tmp_path, kinect=1)
    assert split.joints_xyz.shape == (2, 14, 3)
    assert np.allclose(split.joints_xyz[1, 3], xyz_mm[0, 1, 9] * [1e-3, -1e-3, 1e-3])  # joint 9, y flipped
    assert np.allclose(split.joints_uvd[0, :, 2], uvd[0, 0, list(nyu.EVAL_JOINT_IDS), 2] * 1e-3)
    assert split.depth_paths[1].name == "depth_1_0000002.png"


def test_reader_errors_are_clear(tmp_path):
    with pytest.raises(nyu.NyuError, match="cannot read depth"):
        nyu.read_depth(tmp_path / "missing.png")
    (tmp_path / "j.txt").write_text("1 2 3\n")
    with pytest.raises(nyu.NyuError, match="14 joints"):
        nyu.read_joints_uvd_txt(tmp_path / "j.txt")
    scipy.io.savemat(tmp_path / "joint_data.mat", {"something": np.zeros(3)})
    with pytest.raises(nyu.NyuError, match="joint_uvd"):
        nyu.read_split(tmp_path)
