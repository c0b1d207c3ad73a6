"""Run-time estimator: the crop -> network -> corners -> PnP chain, hands, batching and bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from featmap_ros import geometry as geo
from featmap_ros.backends import own_object_outputs
from featmap_ros.datasets.nyu import JOINT_NAMES
from featmap_ros.estimator import EstimatorError, HandEstimator, ObjectEstimator, joint_confidence, load_estimator
from featmap_ros.model import checkpoint
from featmap_ros.model.nets import FeatureMappingModel, NetConfig
from featmap_ros.preprocess import rgb_to_input
from featmap_ros.results import Detection2D

INTR = geo.Intrinsics(572.4, 573.6, 325.3, 242.0, 640, 480)
CORNERS = geo.box_corners([-0.04, -0.05, -0.03], [0.08, 0.1, 0.06])


def object_meta(n_objects: int = 2) -> dict:
    return {
        "task": "objects",
        "objects": [{"obj_id": i + 1, "name": f"obj{i + 1}", "corners_m": (CORNERS * (1 + 0.2 * i)).tolist(),
                     "extent_m": [0.08, 0.1, 0.06], "symmetric": False} for i in range(n_objects)],
        "crop": {"size": 64, "window_scale": 1.2},
    }


def tiny_model(task: str, n_outputs: int) -> FeatureMappingModel:
    torch.manual_seed(0)
    cfg = NetConfig(task=task, input_size=64, width=4, feature_dim=32, n_outputs=n_outputs, mapping=True)
    return FeatureMappingModel(cfg).eval()


class OracleNetwork:
    """Stands in for the network: returns fixed outputs (the true crop-normalised corners)."""

    def __init__(self, rows: np.ndarray) -> None:
        self.rows = rows

    def run(self, batch, objects=None):
        assert len(batch) == len(self.rows)
        rows = self.rows if objects is None else own_object_outputs(self.rows, objects, self.rows.shape[1] // 16)
        return rows, np.zeros(len(batch))


def test_corners_to_pose_chain_recovers_the_pose_exactly():
    est = ObjectEstimator(tiny_model("objects", 32), object_meta(2), device="cpu")
    R = geo.matrix_from_quat([0.9, 0.1, -0.3, 0.2])
    t = np.array([0.05, -0.03, 0.8])
    corners = est.objects[1].corners
    uv = geo.project_model(corners, R, t, INTR.K)
    box = np.r_[uv.min(0), uv.max(0) - uv.min(0)] + [3, -2, 5, 4]  # a detector's loose box
    dets = [Detection2D(box, score=0.7, obj_id=2)]
    (_, k, win), = est.windows(dets, INTR)
    assert k == 1
    rows = np.zeros((1, 32))
    rows[0, 16:] = geo.normalise_uv(win.to_crop(uv), 64).ravel()
    est.net = OracleNetwork(rows)
    (pose,) = est.estimate(np.zeros((480, 640, 3), np.uint8), INTR, dets)
    assert pose.obj_id == 2 and pose.name == "obj2" and pose.score == 0.7
    assert np.degrees(geo.rotation_angle(pose.R, R)) < 1e-4 and np.linalg.norm(pose.t - t) < 1e-6
    assert np.allclose(pose.corners_uv, uv, atol=1e-6)


def test_all_crops_of_a_frame_go_through_one_batch_and_match_single_runs():
    est = ObjectEstimator(tiny_model("objects", 32), object_meta(2), device="cpu")
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 255, (480, 640, 3), dtype=np.uint8)
    dets = [Detection2D([100, 100, 60, 80], obj_id=1), Detection2D([300, 200, 90, 70], class_id="obj2"),
            Detection2D([10, 10, 40, 40], obj_id=99), Detection2D([700, 10, 40, 40], obj_id=1)]
    chosen = est.windows(dets, INTR)
    assert [(i, k) for i, k, _ in chosen] == [(0, 0), (1, 1)]  # unknown object and off-image box skipped
    batch = np.stack([rgb_to_input(w.crop(rgb)) for _, _, w in chosen])
    out_batch, ood = est.net.run(batch)
    out_one, _ = est.net.run(batch[1:2])
    assert np.allclose(out_batch[1], out_one[0], atol=1e-5)
    assert np.isnan(ood).all()  # no feature statistics in this checkpoint


def test_object_input_validation():
    est = ObjectEstimator(tiny_model("objects", 32), object_meta(2), device="cpu")
    det = [Detection2D([100, 100, 60, 80], obj_id=1)]
    with pytest.raises(EstimatorError, match="640x480 but camera_info says 320x240"):
        est.estimate(np.zeros((480, 640, 3), np.uint8), geo.Intrinsics(300, 300, 160, 120, 320, 240), det)
    with pytest.raises(EstimatorError, match="uint8 RGB"):
        est.estimate(np.zeros((480, 640), np.float32), INTR, det)
    assert est.estimate(np.zeros((480, 640, 3), np.uint8), INTR, []) == []
    with pytest.raises(EstimatorError, match="not 'objects'"):
        ObjectEstimator(tiny_model("hands", 42), {"task": "hands"}, device="cpu")
    with pytest.raises(EstimatorError, match="16 each"):
        ObjectEstimator(tiny_model("objects", 16), object_meta(2), device="cpu")


def sphere_depth(centre: np.ndarray, radius: float = 0.05) -> np.ndarray:
    v, u = np.mgrid[0:480, 0:640]
    d = np.stack([(u - INTR.cx) / INTR.fx, (v - INTR.cy) / INTR.fy, np.ones((480, 640))], -1)
    d /= np.linalg.norm(d, axis=-1, keepdims=True)
    b = d @ centre
    disc = b**2 - (centre @ centre - radius**2)
    depth = np.full((480, 640), np.nan, np.float32)
    hit = disc > 0
    depth[hit] = ((b - np.sqrt(np.where(hit, disc, 0))) * d[..., 2])[hit]
    return depth


def hand_meta() -> dict:
    hands = {"joint_names": list(JOINT_NAMES), "cube_m": 0.3}
    return {"task": "hands", "hands": hands, "crop": {"size": 64}}


def test_hand_estimator_returns_named_joints_in_the_cube(tmp_path):
    model = tiny_model("hands", 42)
    checkpoint.save(tmp_path / "hand", model, {"method": "fm", **{k: v for k, v in hand_meta().items() if k != "task"}})
    est = load_estimator(tmp_path / "hand", device="cpu", recentre=0)  # the crop at the located centre, checked here
    assert isinstance(est, HandEstimator)
    centre = np.array([0.02, 0.01, 0.6])
    (hand,) = est.estimate(sphere_depth(centre), INTR)
    assert hand.joints_xyz.shape == (14, 3) and hand.joint_names == JOINT_NAMES
    assert np.linalg.norm(hand.centre[:2] - centre[:2]) < 0.01
    # the outputs are offsets from the centre in half-cube units: redo the crop and check the mapping
    crop, _ = geo.crop_depth_cube(sphere_depth(centre), INTR.K, hand.centre, cube_m=0.3, out=64)
    out, _ = est.net.run(crop[None, None])
    assert np.allclose(hand.joints_xyz, hand.centre + out[0].reshape(14, 3) * 0.15, atol=1e-6)
    assert hand.confidences.shape == (14,) and np.all((hand.confidences >= 0) & (hand.confidences <= 1))
    # a detection box that holds no hand yields nothing; an all-NaN frame is a clear error
    assert est.estimate(sphere_depth(centre), INTR, [Detection2D([0, 0, 50, 50])]) == []
    far_wall = np.full((480, 640), 3.0, np.float32)  # valid depth, but nothing within reach
    assert est.estimate(far_wall, INTR) == []
    with pytest.raises(EstimatorError, match="no valid pixel"):
        est.estimate(np.full((480, 640), np.nan, np.float32), INTR)
    with pytest.raises(EstimatorError, match="float depth"):
        est.estimate(np.zeros((480, 640), np.uint16), INTR)


def test_joint_confidence_follows_the_surface():
    depth = np.full((480, 640), 0.6, np.float32)
    inside = geo.uvd_to_xyz(np.array([[320.0, 240.0, 0.62]]), INTR.K)  # 2 cm behind the surface
    floating = geo.uvd_to_xyz(np.array([[320.0, 240.0, 0.5]]), INTR.K)  # 10 cm in front of it
    conf = joint_confidence(np.vstack([inside, floating]), depth, INTR.K)
    assert conf[0] == 1.0 and conf[1] == 0.0


def test_a_foreign_or_tampered_checkpoint_fails_cleanly(tmp_path):
    model = tiny_model("objects", 32)
    meta = {k: v for k, v in object_meta().items() if k != "task"}
    checkpoint.save(tmp_path / "obj", model, {"method": "fm", **meta})
    assert isinstance(load_estimator(tmp_path / "obj", device="cpu"), ObjectEstimator)
    blob = (tmp_path / "obj.safetensors").read_bytes()
    (tmp_path / "obj.safetensors").write_bytes(blob[:-1] + bytes([blob[-1] ^ 1]))
    with pytest.raises(checkpoint.CheckpointError):
        load_estimator(tmp_path / "obj", device="cpu")


def test_cpu_threads_cap_torchs_thread_pool(tmp_path):
    meta = {k: v for k, v in hand_meta().items() if k != "task"}
    checkpoint.save(tmp_path / "hand", tiny_model("hands", 42), {"method": "fm", **meta})
    before = torch.get_num_threads()
    try:
        load_estimator(tmp_path / "hand", device="cpu", cpu_threads=1)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
