"""Overlays draw where the projections fall, in the right colours, and never touch their input."""

from __future__ import annotations

import numpy as np
import transforms3d.axangles as ta

from featmap_ros.datasets.nyu import JOINT_NAMES
from featmap_ros.geometry import BOX_EDGES, Intrinsics, box_corners, project
from featmap_ros.overlay import EST_RGB, GT_RGB, HAND_RGB, JOINT_RGB, depth_to_colormap, draw_hands, draw_objects
from featmap_ros.results import HandPose, ObjectPose, bone_indices

K = Intrinsics(fx=500.0, fy=500.0, cx=160.0, cy=120.0, width=320, height=240).K


def make_object(t: tuple[float, float, float], R: np.ndarray | None = None) -> ObjectPose:
    extent = np.array([0.1, 0.1, 0.1])
    return ObjectPose(
        obj_id=1, name="ape", R=np.eye(3) if R is None else R, t=np.array(t), corners_uv=np.full((8, 2), np.nan),
        corners_3d=box_corners(-extent / 2, extent), extent=extent, score=0.5,
    )


def edge_midpoints(obj: ObjectPose) -> np.ndarray:
    """(12, 2) pixel midpoints of the projected box edges, rounded like OpenCV draws them."""
    uv = project(obj.corners_cam(), K)
    return np.round((uv[BOX_EDGES[:, 0]] + uv[BOX_EDGES[:, 1]]) / 2.0).astype(int)


def test_estimate_and_ground_truth_boxes_are_drawn_in_their_colours() -> None:
    rgb = np.full((240, 320, 3), 30, dtype=np.uint8)
    before = rgb.copy()
    est = make_object((0.0, 0.0, 0.8))
    gt = make_object((0.12, 0.02, 0.9), ta.axangle2mat([0, 1, 0], 0.3))
    out = draw_objects(rgb, [est], K, gt=[gt])
    np.testing.assert_array_equal(rgb, before)  # the input is untouched
    assert out.shape == rgb.shape and out.dtype == np.uint8
    est_hits = [tuple(out[v, u]) == EST_RGB for u, v in edge_midpoints(est)]
    gt_hits = [tuple(out[v, u]) == GT_RGB for u, v in edge_midpoints(gt)]
    assert sum(est_hits) >= 10 and sum(gt_hits) >= 8  # a few edges may cross the other box
    assert tuple(out[120, 160]) == (30, 30, 30)  # the box's inside stays clear (its centre projects here)


def test_raw_corner_predictions_are_dotted() -> None:
    obj = make_object((0.0, 0.0, 0.8))
    obj.corners_uv = np.full((8, 2), np.nan)
    obj.corners_uv[0] = (40.0, 200.0)
    out = draw_objects(np.zeros((240, 320, 3), dtype=np.uint8), [obj], K)
    assert out[200, 40].any()


def test_box_behind_the_camera_is_skipped() -> None:
    rgb = np.zeros((240, 320, 3), dtype=np.uint8)
    out = draw_objects(rgb, [make_object((0.0, 0.0, -0.5))], K)
    assert not out.any()


def make_hand() -> HandPose:
    rng = np.random.default_rng(0)
    joints = np.array([0.0, 0.0, 0.5]) + rng.uniform(-0.06, 0.06, size=(14, 3))
    return HandPose(joints_xyz=joints, confidences=np.ones(14), centre=np.array([0.0, 0.0, 0.5]), cube_m=0.3)


def test_hand_skeleton_on_depth_has_joints_and_bones() -> None:
    depth = np.full((240, 320), 0.6, dtype=np.float32)
    depth[:10] = np.nan
    hand = make_hand()
    out = draw_hands(depth, [hand], K)
    assert out.shape == (240, 320, 3) and out.dtype == np.uint8
    uv = np.round(project(hand.joints_xyz, K)).astype(int)
    assert all(tuple(out[v, u]) == JOINT_RGB for u, v in uv)
    bones = bone_indices(JOINT_NAMES)
    assert len(bones) == 13
    mids = np.round((project(hand.joints_xyz[bones[:, 0]], K) + project(hand.joints_xyz[bones[:, 1]], K)) / 2)
    hits = [tuple(out[v, u]) == HAND_RGB for u, v in mids.astype(int)]
    assert sum(hits) >= 10  # a few midpoints sit under a joint dot or another bone


def test_hand_on_rgb_leaves_the_input_alone() -> None:
    rgb = np.zeros((240, 320, 3), dtype=np.uint8)
    out = draw_hands(rgb, [make_hand()], K)
    assert out.any() and not rgb.any()


def test_depth_colormap_blacks_out_invalid_and_separates_near_from_far() -> None:
    depth = np.array([[0.5, 1.0, np.nan], [2.0, 0.0, 1.5]], dtype=np.float32)
    out = depth_to_colormap(depth, near_m=0.5, far_m=2.0)
    assert out.shape == (2, 3, 3) and out.dtype == np.uint8
    assert not out[0, 2].any() and not out[1, 1].any()
    assert tuple(out[0, 0]) != tuple(out[1, 0])
    assert not depth_to_colormap(np.full((3, 3), np.nan, dtype=np.float32)).any()
