"""The structured-light sensor model and scene composition."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from featmap_ros.datasets.nyu import NYU_INTRINSICS
from featmap_ros.geometry import locate_hand
from featmap_ros.render import sensor
from featmap_ros.render.hand import HandPose, HandRenderer, HandShape, _rot_x
from featmap_ros.render.sensor import SensorConfig, SensorError, apply, axial_noise_std, compose_scene

K = NYU_INTRINSICS.K
H, W = 480, 640


def box_scene(front: float = 0.6, back: float = 1.0) -> np.ndarray:
    """A 100x100 px square at `front` metres before a wall at `back` metres."""
    depth = np.full((H, W), back, dtype=np.float32)
    depth[190:290, 270:370] = front
    return depth


def test_axial_noise_formula() -> None:
    assert axial_noise_std(0.4) == pytest.approx(0.0012)
    assert axial_noise_std(1.0) == pytest.approx(0.0012 + 0.0019 * 0.36)


def test_axial_noise_on_a_flat_wall_at_one_metre_matches_the_formula() -> None:
    wall = np.full((H, W), 1.0, dtype=np.float32)
    noisy = apply(wall, K, np.random.default_rng(0))
    valid = np.isfinite(noisy)
    assert valid.mean() > 0.99
    assert np.std(noisy[valid]) == pytest.approx(axial_noise_std(1.0), rel=0.2)
    assert abs(np.mean(noisy[valid]) - 1.0) < 0.002


def test_disparity_is_quantised_to_an_eighth_of_a_pixel() -> None:
    cfg = replace(SensorConfig.nominal(), noise_scale=0.0, output_resolution_m=0.0)
    ramp = np.linspace(0.6, 0.9, W, dtype=np.float32)[None].repeat(H, 0)  # a slanted plane
    noisy = apply(ramp, K, np.random.default_rng(0), cfg)
    valid = np.isfinite(noisy)
    disparity = cfg.baseline_m * K[0, 0] / noisy[valid].astype(np.float64)
    steps = disparity / cfg.disparity_step_px
    assert np.abs(steps - np.round(steps)).max() < 1e-2
    # Visible steps: far fewer distinct depths than the clean ramp, and the gaps grow with z^2.
    levels = np.unique(noisy[valid])
    assert len(levels) < 0.5 * W
    gap = np.diff(levels)
    assert gap[-1] > 1.5 * gap[0]


@pytest.mark.parametrize("side", [-1, 1])
def test_projector_shadow_falls_on_the_side_away_from_the_projector(side: int) -> None:
    cfg = replace(SensorConfig.nominal(), projector_side=side, p_edge_hole=0.0, p_dropout=0.0)
    noisy = apply(box_scene(), K, np.random.default_rng(1), cfg)
    holes = np.isnan(noisy[200:280])
    # Shadow width: baseline * f * (1/0.6 - 1/1.0) = 29 px on the wall beside the box.
    right = holes[:, 372:395].mean()
    left = holes[:, 245:268].mean()
    shadowed, lit = (right, left) if side < 0 else (left, right)
    assert shadowed > 0.9 and lit < 0.1


def test_holes_and_flying_pixels_appear_along_depth_edges() -> None:
    noisy = apply(box_scene(), K, np.random.default_rng(2), SensorConfig.nominal())
    edge_band = np.isnan(noisy[200:280, 268:272]).mean()  # the box's lit (left) edge
    interior = np.isnan(noisy[200:280, 290:350]).mean()
    assert edge_band > 0.1 and interior < 0.02
    between = (noisy > 0.65) & (noisy < 0.95)
    assert between.sum() > 20  # flying pixels between the box and the wall


def test_grazing_surfaces_lose_pixels() -> None:
    u = np.arange(W, dtype=np.float32)
    z = np.where(u < 320, 0.8, 0.8 + 0.01 * (u - 320))  # flat, then turning away at 75-80 degrees
    noisy = apply(np.repeat(z[None], H, 0).astype(np.float32), K, np.random.default_rng(3))
    assert np.isnan(noisy[:, 330:390]).mean() > 0.4
    assert np.isnan(noisy[:, 50:300]).mean() < 0.02


def test_compose_scene_adds_background_only_behind_the_hand() -> None:
    hand = np.full((H, W), np.nan, dtype=np.float32)
    hand[200:280, 280:360] = 0.7
    cfg = sensor.SceneConfig(p_torso=1.0, p_wall=1.0, p_table=1.0)
    scene = compose_scene(hand, K, np.random.default_rng(4), cfg)
    assert np.array_equal(scene[200:280, 280:360], hand[200:280, 280:360])
    background = scene[np.isnan(hand)]
    assert np.isfinite(background).mean() > 0.5 and np.nanmin(background) > 0.7


def test_locate_hand_finds_the_palm_on_a_sensor_frame() -> None:
    shape = HandShape.nominal()
    R = _rot_x(np.array([np.deg2rad(15.0)])) @ np.diag([1.0, -1.0, -1.0])  # NYU-like: fingers up, tipped in
    palm = np.array([-0.12, 0.03, 0.75])
    pose = HandPose(np.zeros((1, 22)), R, (palm - R[0] @ shape.palm_centre())[None])
    renderer = HandRenderer()
    depth = renderer.render(shape, pose).depth[0]
    rng = np.random.default_rng(5)
    noisy = apply(compose_scene(depth, K, rng, sensor.SceneConfig(p_torso=1.0)), K, rng)
    assert np.linalg.norm(locate_hand(noisy, K) - palm) < 0.040


def test_test_time_and_varied_sensors_differ_from_the_nominal() -> None:
    nominal = SensorConfig.nominal()
    assert SensorConfig.test_time() != nominal
    varied = nominal.varied(np.random.default_rng(0))
    assert varied != nominal and varied.projector_side == nominal.projector_side


def test_bad_input_raises() -> None:
    with pytest.raises(SensorError):
        apply(np.zeros((2, 3, 4), dtype=np.float32), K, np.random.default_rng(0))
    with pytest.raises(SensorError):
        apply(box_scene(), K, np.random.default_rng(0), replace(SensorConfig(), projector_side=0))
