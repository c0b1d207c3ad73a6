"""Geometry core: projection, box corners, PnP, rotations, crop windows, depth cubes."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import transforms3d.euler as te

from featmap_ros import geometry as g

K = np.array([[572.4114, 0.0, 325.2611], [0.0, 573.57043, 242.04899], [0.0, 0.0, 1.0]])


def random_pose(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    R = te.euler2mat(*rng.uniform(-np.pi, np.pi, 3))
    t = np.array([rng.uniform(-0.1, 0.1), rng.uniform(-0.1, 0.1), rng.uniform(0.4, 1.2)])
    return R, t


def test_intrinsics_round_trip_and_rejects_bad_K():
    intr = g.Intrinsics.from_K(K, 640, 480)
    assert np.allclose(intr.K, K)
    with pytest.raises(g.GeometryError, match="skew"):
        g.Intrinsics.from_K(np.array([[500, 3, 320], [0, 500, 240], [0, 0, 1.0]]), 640, 480)
    with pytest.raises(g.GeometryError, match="positive"):
        g.Intrinsics.from_K(np.zeros((3, 3)) + np.diag([0, 0, 1.0]), 640, 480)


def test_projection_of_the_optical_axis_is_the_principal_point():
    uv = g.project(np.array([[0.0, 0.0, 2.0], [0.1, -0.2, 1.0]]), K)
    assert np.allclose(uv[0], [K[0, 2], K[1, 2]])
    assert np.allclose(uv[1], [K[0, 2] + 0.1 * K[0, 0], K[1, 2] - 0.2 * K[1, 1]])


def test_box_corners_span_the_box_in_bit_order():
    c = g.box_corners([-1.0, -2.0, -3.0], [2.0, 4.0, 6.0])
    assert c.shape == (8, 3)
    assert np.allclose(c.min(axis=0), [-1, -2, -3]) and np.allclose(c.max(axis=0), [1, 2, 3])
    assert np.allclose(c[0], [-1, -2, -3]) and np.allclose(c[7], [1, 2, 3]) and np.allclose(c[4], [1, -2, -3])
    # every edge joins corners that differ in exactly one coordinate
    for a, b in g.BOX_EDGES:
        assert np.count_nonzero(~np.isclose(c[a], c[b])) == 1
    assert len({tuple(sorted(e)) for e in g.BOX_EDGES.tolist()}) == 12


@pytest.mark.parametrize("method", ["epnp", "sqpnp"])
def test_pnp_recovers_exact_poses(method):
    rng = np.random.default_rng(0)
    corners = g.box_corners([-0.04, -0.05, -0.03], [0.08, 0.1, 0.06])
    for _ in range(20):
        R, t = random_pose(rng)
        uv = g.project_model(corners, R, t, K)
        R_est, t_est = g.solve_pnp(corners, uv, K, method=method)
        assert np.degrees(g.rotation_angle(R, R_est)) < 1e-3
        assert np.linalg.norm(t - t_est) < 1e-6


def test_pnp_ransac_survives_an_outlier():
    rng = np.random.default_rng(1)
    corners = g.box_corners([-0.04, -0.05, -0.03], [0.08, 0.1, 0.06])
    R, t = random_pose(rng)
    uv = g.project_model(corners, R, t, K)
    uv[3] += [60.0, -45.0]
    R_plain, t_plain = g.solve_pnp(corners, uv, K)
    R_ransac, t_ransac = g.solve_pnp(corners, uv, K, ransac=True, ransac_threshold_px=3.0)
    assert np.linalg.norm(t_ransac - t) < np.linalg.norm(t_plain - t)
    assert np.linalg.norm(t_ransac - t) < 1e-3


def test_pnp_rejects_bad_input():
    with pytest.raises(g.GeometryError, match=">= 4"):
        g.solve_pnp(np.zeros((3, 3)), np.zeros((3, 2)), K)
    with pytest.raises(g.GeometryError, match="non-finite"):
        g.solve_pnp(np.ones((8, 3)), np.full((8, 2), np.nan), K)
    with pytest.raises(g.GeometryError, match="unknown PnP method"):
        g.solve_pnp(np.random.rand(8, 3), np.random.rand(8, 2), K, method="p3p-magic")


def test_quaternions_round_trip_in_wxyz_order():
    rng = np.random.default_rng(2)
    for _ in range(20):
        R, _ = random_pose(rng)
        q = g.quat_from_matrix(R)
        assert q[0] >= 0 and np.isclose(np.linalg.norm(q), 1.0)
        assert np.allclose(g.matrix_from_quat(q), R)
    # 90 degrees about z: w = cos 45, z = sin 45, in (w, x, y, z) order
    Rz = np.array([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    assert np.allclose(g.quat_from_matrix(Rz), [np.sqrt(0.5), 0, 0, np.sqrt(0.5)])
    with pytest.raises(g.GeometryError):
        g.matrix_from_quat([0, 0, 0, 0])


def test_rotation_angle():
    Rz = te.euler2mat(0, 0, 0.3)
    assert np.isclose(g.rotation_angle(np.eye(3), Rz), 0.3)
    assert np.isclose(g.rotation_angle(Rz, Rz), 0.0, atol=1e-7)


def test_crop_window_maps_are_inverse_and_edges_go_to_edges():
    w = g.CropWindow.around_box([100, 50, 40, 80], out=128, scale=1.5)
    assert w.size_px == 120 and (w.cu, w.cv) == (120, 90)
    pts = np.random.default_rng(3).uniform(0, 640, (10, 2))
    assert np.allclose(w.to_image(w.to_crop(pts)), pts)
    # the window's outer edges map to the crop's outer edges, its centre to the crop centre
    assert np.allclose(w.to_crop([[60, 30], [180, 150], [120, 90]]), [[-0.5, -0.5], [127.5, 127.5], [63.5, 63.5]])
    assert np.allclose(g.normalise_uv([[-0.5, -0.5], [127.5, 127.5]], 128), [[-1, -1], [1, 1]])
    assert np.allclose(g.denormalise_uv(g.normalise_uv(pts, 128), 128), pts)


def test_crop_intrinsics_project_into_the_crop():
    w = g.CropWindow(cu=600.0, cv=20.0, size_px=150.0, out=64)  # partly outside a 640x480 image
    rng = np.random.default_rng(4)
    X = np.c_[rng.uniform(-0.2, 0.2, (10, 2)), rng.uniform(0.5, 1.5, 10)]
    assert np.allclose(g.project(X, w.intrinsics(K)), w.to_crop(g.project(X, K)))


def test_crop_of_window_partly_outside_the_image_fills_outside():
    img = np.arange(480 * 640, dtype=np.float32).reshape(480, 640)
    # identity scale; the window covers pixels -32..31, so its top-left quarter lies outside
    w = g.CropWindow(cu=-0.5, cv=-0.5, size_px=64.0, out=64)
    crop = w.crop(img, fill=-1.0, interpolation=0)
    assert crop.shape == (64, 64)
    assert (crop[:32, :32] == -1).all()
    assert crop[32, 32] == img[0, 0] and crop[63, 63] == img[31, 31]


def test_uvd_xyz_round_trip():
    rng = np.random.default_rng(5)
    uvd = np.c_[rng.uniform(0, 640, 50), rng.uniform(0, 480, 50), rng.uniform(0.3, 3.0, 50)]
    assert np.allclose(g.xyz_to_uvd(g.uvd_to_xyz(uvd, K), K), uvd, atol=1e-9)


def synthetic_hand_scene() -> tuple[np.ndarray, np.ndarray]:
    """A wall at 1.5 m with a 'hand' (a sphere of radius 6 cm) at 0.7 m in front of it."""
    depth = np.full((480, 640), 1.5, dtype=np.float32)
    v, u = np.mgrid[0:480, 0:640]
    centre = np.array([0.05, -0.02, 0.7])
    x = (u - K[0, 2]) / K[0, 0]
    y = (v - K[1, 2]) / K[1, 1]
    d = np.stack([x, y, np.ones_like(x)], axis=-1)
    d /= np.linalg.norm(d, axis=-1, keepdims=True)
    b = d @ centre
    disc = b**2 - (centre @ centre - 0.06**2)
    hit = disc > 0
    s = b - np.sqrt(np.where(hit, disc, 0))
    depth[hit] = (s * d[..., 2])[hit]
    depth[:5, :] = np.nan  # invalid rows must be ignored
    return depth, centre


def test_locate_hand_finds_the_closest_blob():
    depth, centre = synthetic_hand_scene()
    found = g.locate_hand(depth, K, cube_m=0.3)
    # the centre of mass of the visible front half of a sphere lies ~r/2 in front of its centre
    assert np.linalg.norm(found[:2] - centre[:2]) < 0.01
    assert 0.64 < found[2] < 0.7


def _locate_hand_on_the_whole_image(depth_m, K_, cube_m=0.3, min_pixels=200, layer_m=0.05, max_depth_m=1.5,
                                    iterations=10):
    """locate_hand as it was before it cut windows: every step on the whole frame (the reference; the
    last step, the cube's centre of mass over the points found, is the shared one)."""
    depth = np.asarray(depth_m, dtype=np.float32)
    valid = np.isfinite(depth) & (depth > 0) & (depth < max_depth_m)
    z0 = float(depth[valid].min())
    for near in np.arange(z0, max_depth_m, layer_m):
        layer = (valid & (depth >= near) & (depth < near + cube_m / 2.0)).astype(np.uint8)
        n, labels, stats, _ = cv2.connectedComponentsWithStats(layer, connectivity=8)
        best = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA])) if n > 1 else 0
        if n > 1 and stats[best, cv2.CC_STAT_AREA] >= min_pixels:
            blob = labels == best
            break
    centre = g.depth_to_points(np.where(blob, depth, np.nan), K_).mean(axis=0)
    reach = cube_m * max(K_[0, 0], K_[1, 1]) / max(float(centre[2]) - cube_m, 1e-3)
    cu, cv = g.project(centre[None], K_)[0]
    window = np.zeros_like(valid)
    window[int(max(0, cv - reach)):int(min(480, cv + reach + 1)),
           int(max(0, cu - reach)):int(min(640, cu + reach + 1))] = 1
    points = g.depth_to_points(np.where(valid & window & (np.abs(depth - centre[2]) <= cube_m), depth, np.nan), K_)
    return g.cube_centre_of_mass(points, centre, cube_m, iterations)


@pytest.mark.parametrize("seed", range(4))
def test_locate_hand_in_windows_gives_the_whole_images_centre_exactly(seed: int) -> None:
    """The blob's box and the cube's reach window (the speed-up) change no bit of the located centre."""
    rng = np.random.default_rng(seed)
    depth, _ = synthetic_hand_scene()
    v, u = np.mgrid[0:480, 0:640]
    arm = (np.abs((u - 320) * 0.8 - (v - 240) * 0.6 - rng.uniform(-40, 40)) < 25) & (v > 240)  # a forearm-like band
    depth = np.where(arm & ~np.isfinite(depth), np.float32(rng.uniform(0.66, 0.75)), depth)
    depth = np.where(np.isfinite(depth), depth, np.float32(1.3))  # a wall behind
    depth[rng.random(depth.shape) < 0.05] = np.nan  # dropped pixels
    if seed % 2:
        depth = depth + rng.normal(0, 0.003, depth.shape).astype(np.float32)
        depth[:, :rng.integers(0, 200)] = 0.0  # a dead band on the left
    want = _locate_hand_on_the_whole_image(depth, K)
    assert np.array_equal(g.locate_hand(depth, K, cube_m=0.3), want)


def test_depth_to_points_of_a_window_are_the_images_points_in_it() -> None:
    depth, _ = synthetic_hand_scene()
    whole = g.depth_to_points(depth, K)
    sub = g.depth_to_points(depth[100:300, 200:500], K, origin=(200, 100))
    uvd = g.xyz_to_uvd(whole, K)
    keep = (uvd[:, 0] >= 199.5) & (uvd[:, 0] < 499.5) & (uvd[:, 1] >= 99.5) & (uvd[:, 1] < 299.5)
    assert len(sub) > 100 and np.allclose(sub, whole[keep], atol=1e-12)


def test_locate_hand_rejects_empty_depth():
    with pytest.raises(g.GeometryError, match="valid depth"):
        g.locate_hand(np.full((480, 640), np.nan, dtype=np.float32), K)


def test_depth_cube_crop_is_normalised_and_maps_joints():
    depth, centre = synthetic_hand_scene()
    crop, cube = g.crop_depth_cube(depth, K, centre, cube_m=0.3, out=128)
    assert crop.shape == (128, 128) and crop.dtype == np.float32
    assert crop.min() >= -1 and crop.max() <= 1
    # the sphere's nearest point (6 cm in front of the centre) is -0.4 of the half cube
    assert np.isclose(crop.min(), -0.06 / 0.15, atol=0.02)
    # the wall behind the cube and the invalid rows are the back face
    assert crop[0, 0] == 1.0
    joints = centre + np.array([[0.1, -0.1, 0.05], [-0.149, 0.149, -0.149]])
    assert np.allclose(cube.denormalise_joints(cube.normalise_joints(joints)), joints)
    assert cube.contains(joints).all() and not cube.contains(centre + [[0.16, 0, 0]]).any()
    with pytest.raises(g.GeometryError):
        g.crop_depth_cube(depth, K, [0, 0, np.nan])


def test_nearest_rotation_snaps_a_noisy_matrix_to_a_rotation():
    R = te.euler2mat(0.3, -0.2, 1.1)
    noisy = R + np.random.default_rng(6).normal(0, 1e-3, (3, 3))
    snapped = g.nearest_rotation(noisy)
    assert np.allclose(snapped @ snapped.T, np.eye(3), atol=1e-12) and np.isclose(np.linalg.det(snapped), 1.0)
    assert np.degrees(g.rotation_angle(snapped, R)) < 0.2
    assert np.allclose(g.nearest_rotation(R), R, atol=1e-12)


def _crop_of_the_cleaned_frame(depth_m, K, c, cube_m, out):
    """crop_depth_cube as it was first written: clean the whole frame, then warp it (the reference)."""
    import cv2

    half = cube_m / 2.0
    u_lo, v_lo = g.project(np.array([[c[0] - half, c[1] - half, c[2]]]), K)[0]
    u_hi, v_hi = g.project(np.array([[c[0] + half, c[1] + half, c[2]]]), K)[0]
    sx, sy = out / (u_hi - u_lo), out / (v_hi - v_lo)
    A = np.array([[sx, 0.0, -sx * u_lo - 0.5], [0.0, sy, -sy * v_lo - 0.5]])
    clean = np.where(np.isfinite(depth_m) & (depth_m > 0), depth_m, 0.0).astype(np.float32)
    crop = cv2.warpAffine(clean, A, (out, out), flags=cv2.INTER_NEAREST, borderMode=cv2.BORDER_CONSTANT,
                          borderValue=0.0)
    norm = (crop - c[2]) / half
    norm[(crop <= 0) | (norm > 1.0)] = 1.0
    return np.clip(norm, -1.0, 1.0).astype(np.float32)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_depth_cube_crop_reads_only_its_window_and_equals_the_whole_frame_crop(dtype):
    rng = np.random.default_rng(0)
    K = np.array([[588.0, 0, 320], [0, 587.0, 240], [0, 0, 1]])
    checked = 0
    for _ in range(120):
        depth = rng.uniform(0.3, 1.5, (480, 640))
        depth[rng.random(depth.shape) < 0.1] = np.nan
        depth[rng.random(depth.shape) < 0.02] = -1.0
        depth[rng.random(depth.shape) < 0.01] = np.inf
        # Centres near and beyond the image edges too, so windows are cut by the border.
        c = np.array([rng.uniform(-0.8, 0.8), rng.uniform(-0.6, 0.6), rng.uniform(0.3, 1.4)])
        out = int(rng.choice([32, 64, 128]))
        crop, _ = g.crop_depth_cube(depth.astype(dtype), K, c, cube_m=0.3, out=out)
        np.testing.assert_array_equal(crop, _crop_of_the_cleaned_frame(depth.astype(dtype), K, c, 0.3, out))
        checked += 1
    assert checked == 120
