"""The capsule hand: kinematics, limits, shapes, poses and the ray-cast renderer."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from featmap_ros.datasets.nyu import JOINT_NAMES, NYU_INTRINSICS
from featmap_ros.geometry import project
from featmap_ros.render.capsules_gl import GLCapsuleRenderer
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


@pytest.fixture(scope="module", params=["gl", "torch"])
def rendered(request):
    rng = np.random.default_rng(7)
    shape = HandShape.nominal()
    pose = sample_poses(rng, 24, shape)
    return shape, pose, HandRenderer(backend=request.param).render(shape, pose, labels=True)


def cast(backend: str, a: np.ndarray, b: np.ndarray, r: np.ndarray, part: np.ndarray | None = None):
    """(B, P, 3) ends and (B, P) radii through one backend -> numpy depth (B, 480, 640) and labels."""
    if backend == "gl":
        return GLCapsuleRenderer().render(a, b, r, K, 640, 480, part=part)
    depth, labels = render_capsules(*(torch.as_tensor(x, dtype=torch.float32) for x in (a, b, r)), K, 640, 480,
                                    part=None if part is None else torch.as_tensor(part))
    return depth.numpy(), None if labels is None else labels.numpy()


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


@pytest.mark.parametrize("backend", ["gl", "torch"])
def test_ray_cast_matches_a_sphere_analytically(backend: str) -> None:
    centre = np.array([[[0.05, -0.02, 0.6]]])
    depth, _ = cast(backend, centre, centre.copy(), np.array([[0.04]]))
    u, v = project(centre[0], K)[0]
    for du in (0, 20):
        x, y = (round(u) + du - K[0, 2]) / K[0, 0], (round(v) - K[1, 2]) / K[1, 1]
        d = np.array([x, y, 1.0])
        c = centre[0, 0]
        b, cc = d @ c, c @ c - 0.04**2
        t = (b - np.sqrt(b * b - (d @ d) * cc)) / (d @ d)
        assert depth[0, round(v), round(u) + du].item() == pytest.approx(t, abs=1e-5)
    assert np.isnan(depth[0, 0, 0])
    # The sphere's image is a disc of the right size: pixels 35 px beyond its rim are background.
    radius_px = K[0, 0] * 0.04 / 0.6
    assert np.isnan(depth[0, round(v), round(u + radius_px) + 35]) and np.isfinite(depth[0, round(v), round(u)])


@pytest.mark.parametrize("backend", ["gl", "torch"])
def test_ray_cast_matches_a_cylinder_side_on(backend: str) -> None:
    # A horizontal capsule across the optical axis: along the row through its axis the depth is the
    # cylinder's front, whatever the column.
    a, b = np.array([[[-0.1, 0.0, 0.5]]]), np.array([[[0.1, 0.0, 0.5]]])
    depth, _ = cast(backend, a, b, np.array([[0.02]]))
    row = round(K[1, 2])
    y = (row - K[1, 2]) / K[1, 1]  # the ray's slope below the axis
    for u in (250, 320, 400):  # hits on the cylinder part (|x| < 0.1 m at z 0.48)
        # Ray (x, y, 1) t meets the cylinder y'^2 + (z - 0.5)^2 = r^2 (axis along x).
        dd, bb, cc = y * y + 1.0, 0.5, 0.25 - 0.02**2
        t = (bb - np.sqrt(bb * bb - dd * cc)) / dd
        assert depth[0, row, u] == pytest.approx(t, abs=1e-5)


def test_gl_and_torch_backends_agree_on_sampled_hands() -> None:
    shape = HandShape.nominal()
    geo = forward_kinematics(shape, sample_poses(np.random.default_rng(11), 16, shape))
    d_gl, l_gl = cast("gl", geo.cap_a, geo.cap_b, geo.radius, geo.part)
    d_t, l_t = cast("torch", geo.cap_a, geo.cap_b, geo.radius, geo.part)
    hit_gl, hit_t = np.isfinite(d_gl), np.isfinite(d_t)
    assert hit_t.sum() > 100_000
    # Coverage differs only on a few silhouette pixels where a grazing ray rounds either way.
    assert (hit_gl ^ hit_t).sum() < 1e-3 * hit_t.sum()
    both = hit_gl & hit_t
    err = np.abs(d_gl - d_t)[both]
    assert np.quantile(err, 0.999) < 1e-4 and np.median(err) < 1e-5
    assert (l_gl[both] == l_t[both]).mean() > 0.999
    assert ((l_gl > 0) == hit_gl).all()


def test_backend_choice() -> None:
    assert HandRenderer(backend="torch").render(HandShape(), sample_poses(np.random.default_rng(0), 1)).depth.shape \
        == (1, 480, 640)
    assert HandRenderer().resolved_backend() == "gl"  # auto on a CPU with EGL
    assert HandRenderer(device="cuda").resolved_backend() == "torch"  # auto on CUDA (nothing is built here)
    with pytest.raises(HandModelError):
        HandRenderer(backend="vulkan")
    with pytest.raises(HandModelError):
        HandRenderer(device="cuda", backend="gl")


def test_auto_backend_falls_back_to_torch_in_a_forked_gl_process(monkeypatch) -> None:
    from featmap_ros.render import gl

    monkeypatch.setattr(gl, "_CONTEXT", (-1, object()))  # as if a parent process had opened OpenGL
    renderer = HandRenderer()
    out = renderer.render(HandShape(), sample_poses(np.random.default_rng(0), 1))
    assert renderer.resolved_backend() == "torch" and np.isfinite(out.depth).any()
    with pytest.raises(gl.RenderError):
        HandRenderer(backend="gl").render(HandShape(), sample_poses(np.random.default_rng(0), 1))


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


def test_gl_batches_of_several_passes_equal_smaller_batches_and_reuse_the_framebuffer() -> None:
    shape = HandShape.nominal()
    geo = forward_kinematics(shape, sample_poses(np.random.default_rng(12), 40, shape))
    renderer = GLCapsuleRenderer()
    whole, _ = renderer.render(geo.cap_a, geo.cap_b, geo.radius, K, 640, 480)  # 16 + 16 + 8 frames
    fbo = renderer._fbo
    halves = [renderer.render(geo.cap_a[s], geo.cap_b[s], geo.radius[s], K, 640, 480)[0]
              for s in (slice(0, 20), slice(20, 40))]
    np.testing.assert_array_equal(whole, np.concatenate(halves))
    assert renderer._fbo is fbo  # shorter passes draw into the same framebuffer, nothing is reallocated


def test_a_renderer_inherited_by_a_forked_process_does_not_touch_the_parents_context(monkeypatch) -> None:
    from featmap_ros.render import gl

    renderer = HandRenderer()
    assert renderer.resolved_backend() == "gl"
    # As in a forked child: another process id, and the context belongs to the parent.
    monkeypatch.setattr(renderer, "_gl_pid", -1)
    monkeypatch.setattr(gl, "_CONTEXT", (-1, object()))
    out = renderer.render(HandShape(), sample_poses(np.random.default_rng(0), 1))
    assert renderer.resolved_backend() == "torch" and np.isfinite(out.depth).any()
