"""The capsule hand: kinematics, limits, shapes, poses and the ray-cast renderer."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from featmap_ros.datasets.nyu import JOINT_NAMES, NYU_INTRINSICS
from featmap_ros.geometry import project
from featmap_ros.render.hand import (
    ARTICULATION_NAMES,
    HAND_JOINTS,
    JOINT_LIMITS,
    NYU_FROM_HAND,
    HandModelError,
    HandPose,
    HandRenderer,
    HandShape,
    capsule_distance,
    forward_kinematics,
    render_capsules,
    sample_articulation,
    sample_poses,
)

K = NYU_INTRINSICS.K


@pytest.fixture(scope="module")
def rendered():
    rng = np.random.default_rng(7)
    shape = HandShape.nominal()
    pose = sample_poses(rng, 24, shape)
    return shape, pose, HandRenderer().render(shape, pose, labels=True)


def test_nyu_joints_are_named_model_joints() -> None:
    names = [HAND_JOINTS[i] for i in NYU_FROM_HAND]
    assert len(names) == len(JOINT_NAMES) == 14
    assert names[JOINT_NAMES.index("index_mid")] == "index_pip"
    assert names[JOINT_NAMES.index("palm")] == "palm"


def test_every_joint_lies_inside_or_within_10mm_of_the_surface(rendered) -> None:
    _, _, out = rendered
    geo = out.geometry
    assert capsule_distance(geo.joints, geo).max() < 0.010
    # And in the image: where a joint projects, the rendered surface is no more than 10 mm behind it.
    for b in range(len(geo.joints)):
        uv = np.round(project(geo.nyu_joints[b], K)).astype(int)
        inside = (uv[:, 0] >= 0) & (uv[:, 0] < 640) & (uv[:, 1] >= 0) & (uv[:, 1] < 480)
        d = out.depth[b][uv[inside, 1], uv[inside, 0]]
        assert np.isfinite(d).all()
        assert (d <= geo.nyu_joints[b][inside, 2] + 0.010).all()


def test_sampled_articulations_respect_the_joint_limits() -> None:
    q = sample_articulation(np.random.default_rng(0), 5000)
    assert q.shape == (5000, len(ARTICULATION_NAMES))
    assert (q >= JOINT_LIMITS[:, 0] - 1e-12).all() and (q <= JOINT_LIMITS[:, 1] + 1e-12).all()
    # Curls are correlated: the index and middle PIPs move together.
    i, m = ARTICULATION_NAMES.index("index_pip_flex"), ARTICULATION_NAMES.index("middle_pip_flex")
    assert np.corrcoef(q[:, i], q[:, m])[0, 1] > 0.5


def test_sampled_poses_face_the_camera_at_half_to_one_metre() -> None:
    shape = HandShape.nominal()
    pose = sample_poses(np.random.default_rng(1), 500, shape)
    palm = forward_kinematics(shape, pose).nyu_joints[:, -1]
    assert (palm[:, 2] >= 0.5).all() and (palm[:, 2] <= 1.0).all()
    normal = pose.R_h2c[:, :, 2]  # the palm's normal in the camera frame
    assert np.median(normal[:, 2]) < -0.5


def test_different_hand_shapes_change_bone_lengths() -> None:
    pose = sample_poses(np.random.default_rng(2), 1)
    nominal = HandShape.nominal()
    other = HandShape.sample(np.random.default_rng(3))
    tip, pip = HAND_JOINTS.index("middle_tip"), HAND_JOINTS.index("middle_pip")

    def length(shape: HandShape) -> float:
        j = forward_kinematics(shape, pose).joints[0]
        return float(np.linalg.norm(j[tip] - j[pip]))

    assert abs(length(other) - length(nominal)) > 1e-4
    bigger = HandShape(scale=1.1)
    assert length(bigger) == pytest.approx(1.1 * length(nominal))


def test_render_gives_float_metres_with_nan_background_and_part_labels(rendered) -> None:
    _, _, out = rendered
    assert out.depth.shape == (24, 480, 640) and out.depth.dtype == np.float32
    hand = np.isfinite(out.depth)
    assert hand.any() and (~hand).any()
    assert np.nanmin(out.depth) > 0.2 and np.nanmax(out.depth) < 1.5
    assert ((out.labels > 0) == hand).all()
    assert set(np.unique(out.labels)) >= {0, 1, 4}


def test_ray_cast_matches_a_sphere_analytically() -> None:
    centre = torch.tensor([[[0.05, -0.02, 0.6]]])
    depth, _ = render_capsules(centre, centre.clone(), torch.tensor([[0.04]]), K, 640, 480)
    u, v = project(centre[0].numpy(), K)[0]
    for du in (0, 20):
        x, y = (round(u) + du - K[0, 2]) / K[0, 0], (round(v) - K[1, 2]) / K[1, 1]
        d = np.array([x, y, 1.0])
        c = centre[0, 0].numpy().astype(np.float64)
        b, cc = d @ c, c @ c - 0.04**2
        t = (b - np.sqrt(b * b - (d @ d) * cc)) / (d @ d)
        assert depth[0, round(v), round(u) + du].item() == pytest.approx(t, abs=1e-5)
    assert torch.isnan(depth[0, 0, 0])


def test_rotation_about_the_ray_keeps_the_centre_and_rotates_in_plane() -> None:
    shape = HandShape.nominal()
    pose = sample_poses(np.random.default_rng(4), 3, shape)
    palm = forward_kinematics(shape, pose).nyu_joints[:, -1]
    turned = pose.rotated_about_ray(palm, np.full(3, np.pi / 2))
    assert np.allclose(forward_kinematics(shape, turned).nyu_joints[:, -1], palm)


def test_malformed_input_raises() -> None:
    bad = HandPose(np.zeros((2, 5)), np.tile(np.eye(3), (2, 1, 1)), np.zeros((2, 3)))
    with pytest.raises(HandModelError):
        forward_kinematics(HandShape(), bad)
    with pytest.raises(HandModelError):
        forward_kinematics([HandShape()], sample_poses(np.random.default_rng(0), 2))
