"""The hand estimator's recentre passes: crop again around the palm the joints found, run the joints network there."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_refiner import blob_depth, constant_refiner, hand_checkpoint

from featmap_ros import geometry as geo
from featmap_ros.backends import HAND_RECENTRE, MAX_RECENTRE
from featmap_ros.datasets.nyu import NYU_INTRINSICS, PALM
from featmap_ros.estimator import EstimatorError, HandEstimator, load_estimator
from featmap_ros.model import checkpoint

K = NYU_INTRINSICS.K


@pytest.fixture(autouse=True)
def one_thread() -> None:
    torch.set_num_threads(1)


def net_on(est: HandEstimator, depth: np.ndarray, centre: np.ndarray) -> np.ndarray:
    """The estimator's network on the cube crop at `centre`: joints (14, 3) metres."""
    crop, cube = geo.crop_depth_cube(depth, K, centre, cube_m=est.cube_m, out=est.crop_size)
    outputs, _ = est.net.run(crop[None, None])
    return cube.denormalise_joints(outputs[0].reshape(-1, 3))


@pytest.mark.parametrize("passes", [1, 2])
def test_each_pass_crops_at_the_palm_of_the_previous_joints(tmp_path, passes) -> None:
    ckpt = checkpoint.attach_refiner(hand_checkpoint(tmp_path), constant_refiner((0.05, 0.0, 0.0)))
    first = load_estimator(ckpt, device="cpu", recentre=0)
    est = load_estimator(ckpt, device="cpu", recentre=passes)
    assert est.recentre == passes and first.recentre == 0
    depth = blob_depth()
    (start,), (hand,) = first.estimate(depth, NYU_INTRINSICS), est.estimate(depth, NYU_INTRINSICS)
    joints = start.joints_xyz
    for _ in range(passes):  # the same passes by hand: crop at the last palm, run the net there
        centre = joints[PALM]
        joints = net_on(first, depth, centre)
    assert np.allclose(hand.centre, centre, atol=1e-9) and np.allclose(hand.joints_xyz, joints, atol=1e-9)
    assert not np.allclose(hand.centre, start.centre)  # the random net's palm is not the refined centre
    assert np.isfinite(hand.confidences).all() and not est.skipped


def test_the_default_passes_are_the_nodes_and_bad_counts_are_refused(tmp_path) -> None:
    from featmap_ros.ros.config import NodeConfig
    from featmap_ros.ros.processor import ProcessorError, load_estimator_for

    ckpt = hand_checkpoint(tmp_path)
    assert load_estimator(ckpt, device="cpu").recentre == HAND_RECENTRE == NodeConfig().recentre
    cfg = NodeConfig(task="hands", model_path=str(ckpt), backend="torch", device="cpu", recentre=0)
    assert load_estimator_for(cfg).recentre == 0
    model, meta = checkpoint.load(ckpt)
    assert HandEstimator(model, meta, device="cpu", recentre=MAX_RECENTRE).recentre == MAX_RECENTRE
    for bad in (-1, MAX_RECENTRE + 1, 1.5, True, "2"):
        with pytest.raises(EstimatorError, match="recentre must be an integer"):
            HandEstimator(model, meta, device="cpu", recentre=bad)
    for bad in (-1, MAX_RECENTRE + 1):
        with pytest.raises(ProcessorError, match="recentre"):
            NodeConfig(task="hands", recentre=bad)


class ScriptedNet:
    """A hand network whose k-th call returns the k-th of `outputs` (normalised joints, (42,) for every crop
    of the batch or (B, 42) a row per crop; the last again after that), and records each call's batch size."""

    def __init__(self, net, outputs: list[np.ndarray]) -> None:
        self.inner, self.outputs, self.batches = net, outputs, []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    @property
    def calls(self) -> int:
        return len(self.batches)

    def run(self, batch):
        out = np.atleast_2d(self.outputs[min(self.calls, len(self.outputs) - 1)])
        self.batches.append(len(batch))
        return (np.tile(out, (len(batch), 1)) if len(out) == 1 else out[: len(batch)]), np.zeros(len(batch))


def test_a_failed_pass_keeps_the_last_pose_and_is_counted(tmp_path) -> None:
    est = load_estimator(hand_checkpoint(tmp_path), device="cpu", recentre=2)
    depth = blob_depth()
    good = np.full(42, 0.1)
    est.net = ScriptedNet(est.net, [good, np.full(42, np.nan)])
    (hand,) = est.estimate(depth, NYU_INTRINSICS)
    centre = geo.locate_hand(depth, K, cube_m=0.3)
    # The first pass's joints stay: the recentred pass gave non-finite output (counted; no second try).
    assert np.allclose(hand.joints_xyz, centre + 0.1 * 0.15, atol=1e-9)
    assert est.skipped["non_finite_recentre"] == 1 and est.skipped["non_finite_output"] == 0 and est.net.calls == 2


def test_a_pass_stops_for_a_palm_too_near_the_camera_or_outside_the_first_cube(tmp_path) -> None:
    # A hand 0.25 m from the camera; its palm put 0.12 m nearer: inside its cube, but too near for one.
    near = np.full((480, 640), 1.2, np.float32)
    v, u = np.mgrid[0:480, 0:640]
    near[(u - 320) ** 2 + (v - 240) ** 2 < 120**2] = 0.25
    centre = geo.locate_hand(near, K, cube_m=0.3)
    towards = np.zeros((14, 3))
    towards[PALM, 2] = -0.12 / 0.15
    est = load_estimator(hand_checkpoint(tmp_path), device="cpu", recentre=1)
    est.net = ScriptedNet(est.net, [towards.ravel()])
    (hand,) = est.estimate(near, NYU_INTRINSICS)
    assert est.skipped["recentre_out_of_range"] == 1 and est.net.calls == 1
    assert np.allclose(hand.centre, centre) and hand.joints_xyz[PALM, 2] == pytest.approx(centre[2] - 0.12)
    # Each pass moves the palm 0.1 m sideways: the second pass's crop would leave the first cube (0.2 m off).
    sideways = np.zeros((14, 3))
    sideways[PALM, 0] = 0.1 / 0.15
    est = load_estimator(hand_checkpoint(tmp_path), device="cpu", recentre=3)
    est.net = ScriptedNet(est.net, [sideways.ravel()])
    (hand,) = est.estimate(blob_depth(), NYU_INTRINSICS)
    start = geo.locate_hand(blob_depth(), K, cube_m=0.3)
    assert est.net.calls == 2 and est.skipped["recentre_out_of_range"] == 1
    assert np.allclose(hand.centre, start + [0.1, 0, 0]) and np.isfinite(hand.joints_xyz).all()


def test_joints_without_a_palm_turn_recentre_off_with_a_warning(tmp_path, caplog) -> None:
    model, meta = checkpoint.load(hand_checkpoint(tmp_path))
    meta["hands"]["joint_names"] = [f"j{i}" for i in range(14)]
    est = HandEstimator(model, meta, device="cpu", recentre=2)
    assert est.recentre == 0 and "recentre off" in caplog.text
    assert len(est.estimate(blob_depth(), NYU_INTRINSICS)) == 1


def test_hands_of_one_frame_fail_or_go_on_each_on_its_own(tmp_path) -> None:
    """Four hands in four boxes: one goes on through both passes, one's palm lies outside its cube, one's
    recentred pass is not finite, and one's first pass is not finite (dropped)."""
    from featmap_ros.results import Detection2D

    depth = np.full((480, 640), 1.2, np.float32)
    v, u = np.mgrid[0:480, 0:640]
    spots = [(120, 120), (520, 120), (120, 360), (520, 360)]
    for x, y in spots:
        depth[(u - x) ** 2 + (v - y) ** 2 < 45**2] = 0.6
    boxes = [Detection2D(np.array([x - 80.0, y - 80, 160, 160]), score=1.0 - 0.1 * k) for k, (x, y) in enumerate(spots)]
    goes_on, outside, nan = np.full((14, 3), 0.05), np.full((14, 3), 0.05), np.full(42, np.nan)
    outside[PALM] = (2.0, 0.0, 0.0)  # 0.3 m off: outside the 0.3 m cube it was found in
    first = np.stack([goes_on.ravel(), outside.ravel(), goes_on.ravel(), nan])
    est = load_estimator(hand_checkpoint(tmp_path), device="cpu", recentre=2)
    est.net = ScriptedNet(est.net, [first, np.stack([goes_on.ravel(), nan]), goes_on.ravel()])
    hands = est.estimate(depth, NYU_INTRINSICS, boxes)
    assert est.net.batches == [4, 2, 1]  # all four; then the first and the third; then the first alone
    assert +est.skipped == {"non_finite_output": 1, "recentre_out_of_range": 1, "non_finite_recentre": 1}
    assert len(hands) == 3 and all(np.isfinite(h.joints_xyz).all() and np.isfinite(h.centre).all() for h in hands)
    def in_box(x: int, y: int) -> np.ndarray:  # the estimator's mask of a box [x - 80, x + 80) x [y - 80, y + 80)
        masked = np.full_like(depth, np.nan)
        masked[y - 80:y + 80, x - 80:x + 80] = depth[y - 80:y + 80, x - 80:x + 80]
        return masked

    located = [geo.locate_hand(in_box(x, y), K, cube_m=0.3) for x, y in spots[:3]]
    step = 0.05 * 0.15  # one pass's palm offset, metres per axis
    assert np.allclose(hands[0].centre, located[0] + 2 * step, atol=1e-9)  # cropped at the palm twice
    assert np.allclose(hands[0].joints_xyz, hands[0].centre + step, atol=1e-9)
    for hand, centre in zip(hands[1:], located[1:], strict=True):  # the first pass's pose, at the located centre
        assert np.allclose(hand.centre, centre, atol=1e-9)

