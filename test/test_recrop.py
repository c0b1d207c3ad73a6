"""Object recrop: the second crop is cut around the box the first pose projects to, as training windows were."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from featmap_ros import geometry as geo
from featmap_ros.estimator import EstimatorError, ObjectEstimator
from featmap_ros.results import Detection2D

K = np.array([[572.4, 0, 320], [0, 573.6, 240], [0, 0, 1.0]])
INTR = geo.Intrinsics.from_K(K, 640, 480)
CORNERS = geo.box_corners(np.full(3, -0.05), np.full(3, 0.1))
# A silhouette that is not the box: the recrop window must come from these points, not the corners.
SILHOUETTE = np.array([[0.04, 0, 0], [-0.03, 0, 0], [0, 0.02, 0], [0, -0.045, 0], [0, 0, 0.05], [0, 0, -0.05]])
T_TRUE = np.array([0.02, -0.01, 0.6])


def _rotation() -> np.ndarray:
    import cv2

    return cv2.Rodrigues(np.array([0.3, -0.2, 0.1]))[0]


def _meta(silhouette: bool = True) -> dict:
    obj = {"obj_id": 1, "name": "ape", "corners_m": CORNERS.tolist(), "extent_m": [0.1] * 3, "symmetric": False}
    if silhouette:
        obj["silhouette_m"] = SILHOUETTE.tolist()
    return {"task": "objects", "objects": [obj], "crop": {"size": 32, "window_scale": 1.2}}


def _ideal_window(R: np.ndarray, t: np.ndarray) -> geo.CropWindow:
    uv = geo.project_model(SILHOUETTE, R, t, K)
    return geo.CropWindow.around_box(np.r_[uv.min(0), uv.max(0) - uv.min(0)], 32, 1.2)


class WindowOracle:
    """A BB8 "network" that sees which window each crop came from (CropWindow.crop is spied on) and is
    exact only in the ideal window: its corners are off by half the window's offset from it."""

    head = "bb8"
    n_outputs = 16
    device = "cpu"

    def __init__(self, windows: list, fail_after: int | None = None) -> None:
        self.windows, self.calls, self.fail_after = windows, [], fail_after
        self.meta = _meta()

    def run(self, batch: np.ndarray, objects: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        wins = self.windows[-len(batch):]
        self.calls.append(list(wins))
        R = _rotation()
        ideal = _ideal_window(R, T_TRUE)
        out = []
        for win in wins:
            offset = np.array([win.cu - ideal.cu, win.cv - ideal.cv])
            uv = geo.project_model(CORNERS, R, T_TRUE, K) + 0.5 * offset
            out.append(geo.normalise_uv(win.to_crop(uv), 32).ravel())
        out = np.asarray(out, np.float32)
        if self.fail_after is not None and len(self.calls) > self.fail_after:
            out[:] = np.nan
        return out, np.zeros(len(batch))


@pytest.fixture
def spy_windows(monkeypatch: pytest.MonkeyPatch) -> list:
    seen: list = []
    real = geo.CropWindow.crop

    def crop(self, image, **kw):
        seen.append(self)
        return real(self, image, **kw)

    monkeypatch.setattr(geo.CropWindow, "crop", crop)
    return seen


def _estimate(est: ObjectEstimator, box: np.ndarray) -> list:
    rgb = np.zeros((480, 640, 3), np.uint8)
    return est.estimate(rgb, INTR, [Detection2D(box_xywh=box, obj_id=1, score=0.8)])


def _proj_error(pose) -> float:
    R = _rotation()
    return float(np.abs(geo.project_model(CORNERS, pose.R, pose.t, K) - geo.project_model(CORNERS, R, T_TRUE, K)).max())


def test_recrop_cuts_the_window_around_the_projected_silhouette_and_shrinks_the_error(spy_windows) -> None:
    ideal = _ideal_window(_rotation(), T_TRUE)
    # A detector's box 12 px right and 8 px low of the object's.
    box = np.array([ideal.cu - ideal.size_px / 2.4 + 12, ideal.cv - ideal.size_px / 2.4 + 8,
                    ideal.size_px / 1.2, ideal.size_px / 1.2])
    errors = []
    for passes in (0, 1, 2):
        net = WindowOracle(spy_windows)
        est = ObjectEstimator(net, _meta(), device="cpu", recrop=passes)
        (pose,) = _estimate(est, box)
        assert len(net.calls) == passes + 1 and pose.score == pytest.approx(0.8)
        errors.append(_proj_error(pose))
        if passes:
            # Every later window is the one around the silhouette of the pose before it.
            second = net.calls[1][0]
            assert abs(second.cu - ideal.cu) < abs(net.calls[0][0].cu - ideal.cu) / 1.5
    assert errors[0] > 5.0 and errors[1] < errors[0] / 1.5 and errors[2] < errors[1]


def test_a_failed_recrop_keeps_the_first_pose_and_counts_nothing(spy_windows) -> None:
    ideal = _ideal_window(_rotation(), T_TRUE)
    box = np.array([ideal.cu - ideal.size_px / 2.4 + 12, ideal.cv - ideal.size_px / 2.4,
                    ideal.size_px / 1.2, ideal.size_px / 1.2])
    first = _estimate(ObjectEstimator(WindowOracle(spy_windows), _meta(), device="cpu"), box)
    est = ObjectEstimator(WindowOracle(spy_windows, fail_after=1), _meta(), device="cpu", recrop=1)
    again = _estimate(est, box)
    assert len(again) == 1 and np.allclose(again[0].R, first[0].R) and np.allclose(again[0].t, first[0].t)
    assert sum(est.skipped.values()) == 0  # the first pass's pose stands; nothing was dropped


def test_recrop_refuses_bad_counts_and_checkpoints_without_silhouettes(spy_windows) -> None:
    for bad in (-1, 4, True, 1.0):
        with pytest.raises(EstimatorError, match="recrop"):
            ObjectEstimator(WindowOracle(spy_windows), _meta(), device="cpu", recrop=bad)
    with pytest.raises(EstimatorError, match="silhouette_m"):
        ObjectEstimator(WindowOracle(spy_windows), _meta(silhouette=False), device="cpu", recrop=1)
    ObjectEstimator(WindowOracle(spy_windows), _meta(silhouette=False), device="cpu", recrop=0)  # as before


def test_the_node_parameter_recrop_reaches_the_estimator_and_the_checkpoint_keeps_silhouettes(tmp_path: Path) -> None:
    import torch

    from featmap_ros.model import checkpoint
    from featmap_ros.model.nets import DENSE_CHANNELS, FeatureMappingModel, NetConfig
    from featmap_ros.ros.config import NodeConfig
    from featmap_ros.ros.processor import ProcessorError, load_estimator_for

    torch.manual_seed(0)
    cfg = NetConfig(task="objects", input_size=32, width=4, feature_dim=8, n_outputs=DENSE_CHANNELS, head="dense")
    meta = {k: v for k, v in _meta().items() if k != "task"} | {"method": "fm", "step": 0}
    path = checkpoint.save(tmp_path / "model", FeatureMappingModel(cfg), meta)
    est = load_estimator_for(NodeConfig(model_path=str(path), backend="torch", device="cpu", recrop=2))
    assert est.recrop == 2 and np.allclose(est.objects[0].silhouette, SILHOUETTE)
    from featmap_ros.estimator import MAX_RECROP

    assert NodeConfig(recrop=MAX_RECROP).recrop == MAX_RECROP  # the node and the estimator share one bound
    with pytest.raises(ProcessorError, match="recrop"):
        NodeConfig(recrop=MAX_RECROP + 1)
    meta["objects"][0]["silhouette_m"] = [[0.0, 0.0, 0.1]] * 3  # too few points
    bad = checkpoint.save(tmp_path / "bad", FeatureMappingModel(cfg), meta)
    with pytest.raises(checkpoint.CheckpointError, match="silhouette_m"):
        load_estimator_for(NodeConfig(model_path=str(bad), backend="torch", device="cpu"))
