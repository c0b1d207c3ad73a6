"""The hand estimator's recentre passes: crop again around the palm the joints found, run the joints network there."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_refiner import blob_depth, constant_refiner, hand_checkpoint

from featmap_ros import geometry as geo
from featmap_ros.backends import HAND_RECENTRE, MAX_RECROP
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
    for bad in (-1, MAX_RECROP + 1, 1.5, True, "2"):
        with pytest.raises(EstimatorError, match="recentre must be an integer"):
            HandEstimator(model, meta, device="cpu", recentre=bad)
    for bad in (-1, MAX_RECROP + 1):
        with pytest.raises(ProcessorError, match="recentre"):
            NodeConfig(task="hands", recentre=bad)


class ScriptedNet:
    """A hand network whose k-th call returns the k-th of `outputs` (normalised joints) for every crop."""

    def __init__(self, net, outputs: list[np.ndarray]) -> None:
        self.inner, self.outputs, self.calls = net, outputs, 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def run(self, batch):
        out = self.outputs[min(self.calls, len(self.outputs) - 1)]
        self.calls += 1
        return np.tile(out.reshape(1, -1), (len(batch), 1)), np.zeros(len(batch))


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
    # A palm closer to the camera than half the cube gets no crop: the pose stays, counted.
    est = load_estimator(hand_checkpoint(tmp_path), device="cpu", recentre=1)
    towards = good.reshape(14, 3).copy()
    towards[PALM, 2] = -(centre[2] - 0.1) / 0.15  # the palm 0.1 m from the camera
    est.net = ScriptedNet(est.net, [towards.ravel()])
    (hand,) = est.estimate(depth, NYU_INTRINSICS)
    assert est.skipped["recentre_out_of_range"] == 1 and est.net.calls == 1
    assert hand.joints_xyz[PALM, 2] == pytest.approx(0.1) and np.isfinite(hand.joints_xyz).all()


def test_joints_without_a_palm_turn_recentre_off_with_a_warning(tmp_path, caplog) -> None:
    model, meta = checkpoint.load(hand_checkpoint(tmp_path))
    meta["hands"]["joint_names"] = [f"j{i}" for i in range(14)]
    est = HandEstimator(model, meta, device="cpu", recentre=2)
    assert est.recentre == 0 and "recentre off" in caplog.text
    assert len(est.estimate(blob_depth(), NYU_INTRINSICS)) == 1

