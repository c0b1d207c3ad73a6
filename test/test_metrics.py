"""Pose metrics with hand-computed cases."""

from __future__ import annotations

import numpy as np
import pytest
import transforms3d.axangles as ta

from featmap_ros import metrics as m

K = np.array([[500.0, 0.0, 320.0], [0.0, 500.0, 240.0], [0.0, 0.0, 1.0]])
CUBE = np.array([[x, y, z] for x in (-0.05, 0.05) for y in (-0.05, 0.05) for z in (-0.05, 0.05)])
I = np.eye(3)
T = np.array([0.0, 0.0, 1.0])


def test_identical_poses_have_zero_error():
    assert m.proj_2d(I, T, I, T, K, CUBE) == 0
    assert m.add(I, T, I, T, CUBE) == 0 and m.adi(I, T, I, T, CUBE) == 0
    assert m.re(I, I) == 0 and m.te(T, T) == 0 and m.cm_deg(I, T, I, T)


def test_translation_error_by_hand():
    t = T + [0.03, 0.0, 0.04]
    assert np.isclose(m.te(t, T), 0.05)
    assert np.isclose(m.add(I, t, I, T, CUBE), 0.05)  # every point moves by the same 5 cm
    assert not m.cm_deg(I, t, I, T)  # 5 cm is not under 5 cm
    assert m.cm_deg(I, T + [0.049, 0, 0], I, T)


def test_proj_2d_by_hand_for_a_sideways_shift():
    # a shift of 1 cm sideways at 1 m depth moves every point of the plane z=1 by 5 px
    flat = np.array([[0.0, 0.0, 0.0], [0.1, 0.1, 0.0]])
    assert np.isclose(m.proj_2d(I, T + [0.01, 0, 0], I, T, K, flat), 5.0)


def test_rotation_error_in_degrees():
    R = ta.axangle2mat([0, 0, 1], np.radians(7.0))
    assert np.isclose(m.re(R, I), 7.0)
    assert not m.cm_deg(R, T, I, T) and m.cm_deg(ta.axangle2mat([1, 0, 0], np.radians(4.9)), T, I, T)


def test_add_s_never_exceeds_add():
    rng = np.random.default_rng(0)
    pts = rng.normal(size=(300, 3)) * 0.05
    for _ in range(20):
        R = ta.axangle2mat(rng.normal(size=3), rng.uniform(0, np.pi))
        t = T + rng.normal(size=3) * 0.02
        assert m.adi(R, t, I, T, pts) <= m.add(R, t, I, T, pts) + 1e-12


def test_symmetric_model_rotated_by_its_symmetry():
    # a box symmetric under 180 degrees about z: ADD sees a large error, ADD-S none
    R = ta.axangle2mat([0, 0, 1], np.pi)
    assert m.adi(R, T, I, T, CUBE) < 1e-9
    assert m.add(R, T, I, T, CUBE) > 0.05
    assert m.add_or_adi(R, T, I, T, CUBE, symmetric=True) < 1e-9
    assert m.add_or_adi(R, T, I, T, CUBE, symmetric=False) > 0.05


def test_accuracy_and_monotone_success_curves():
    errors = np.array([1.0, 2.0, 3.0, np.nan, 10.0])
    assert m.accuracy(errors, 3.0) == pytest.approx(0.4)  # strictly below; NaN is a failure
    assert m.accuracy([], 3.0) == 0.0
    rng = np.random.default_rng(1)
    curve = m.success_curve(rng.exponential(5, 500), np.linspace(0, 50, 51))
    assert curve[0] == 0 and np.all(np.diff(curve) >= 0) and curve[-1] <= 1


def test_joint_errors_by_hand():
    gt = np.zeros((2, 3, 3))
    est = gt.copy()
    est[0, 0] = [0.003, 0.004, 0.0]  # 5 mm
    est[1, 2] = [0.0, 0.0, 0.03]  # 30 mm
    assert np.isclose(m.mean_joint_error(est, gt), 0.035 / 6)
    assert np.allclose(m.per_joint_error(est, gt), [0.0025, 0.0, 0.015])
    assert np.allclose(m.max_error_fraction(est, gt, [0.004, 0.005, 0.02, 0.03]), [0.0, 0.5, 0.5, 1.0])
    with pytest.raises(ValueError, match="F, J, 3"):
        m.joint_errors(np.zeros((2, 3, 3)), np.zeros((2, 4, 3)))
