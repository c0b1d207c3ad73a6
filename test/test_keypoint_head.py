"""The keypoint vector-field head (PVNet): targets from renders vote back to the keypoints and the pose."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from featmap_ros import geometry as geo
from featmap_ros.datasets.pool import (
    AugmentConfig,
    add_keypoints,
    augment_pairs,
    augment_synthetic,
    background_bank,
    render_object_pool,
    shape_bank,
)
from featmap_ros.datasets.streams import ObjectStreamConfig
from featmap_ros.heads import dense_train, keypoints_train
from featmap_ros.heads.keypoints import (
    KEYPOINT_FPS,
    KeypointDecodeConfig,
    decode,
    farthest_points,
    keypoint_channels,
    object_keypoints,
    vote_keypoints,
)
from featmap_ros.metrics import proj_2d
from featmap_ros.model import checkpoint
from featmap_ros.model.nets import FeatureMappingModel, NetConfig, object_head_channels


@pytest.fixture(scope="module")
def lmo_pool(small_pool_models) -> tuple[dict, dict, dict, ObjectStreamConfig, list[np.ndarray]]:
    infos, meshes, cfg = small_pool_models
    kps = [object_keypoints(meshes[i].vertices, infos[i].min_xyz, infos[i].size_xyz) for i in cfg.obj_ids]
    pool = add_keypoints(render_object_pool(infos, meshes, cfg, 12, oversize=1.25, seed=3), kps)
    return pool, infos, meshes, cfg, kps


def _perfect_channels(keypoints_norm: torch.Tensor, mask: torch.Tensor) -> np.ndarray:
    """The head output a perfect network would give: visibility of the mask's blocks, exact unit vectors."""
    _, vis = dense_train.block_targets(torch.zeros(1, 3, *mask.shape), mask[None])
    side = vis.shape[-1]
    vec = keypoints_train.vector_targets(keypoints_norm[None], side)[0]  # (n, H, W, 2)
    logit = np.where(vis.numpy() >= 0.5, 8.0, -8.0)
    return np.concatenate([logit, vec.permute(0, 3, 1, 2).reshape(-1, side, side).numpy()], 0)


def _identity(P: int) -> geo.CropWindow:
    return geo.CropWindow(P / 2 - 0.5, P / 2 - 0.5, float(P), P)


def test_farthest_points_spread_over_the_surface_from_the_centre() -> None:
    rng = np.random.default_rng(0)
    pts = rng.normal(size=(2000, 3))
    pts /= np.linalg.norm(pts, axis=1, keepdims=True)  # a unit sphere
    chosen = farthest_points(pts, 8, np.zeros(3))
    assert chosen.shape == (8, 3)
    assert all(np.isclose(np.abs(pts - c).sum(1), 0).any() for c in chosen)  # surface points, not made up
    gaps = np.linalg.norm(chosen[:, None] - chosen[None], axis=-1)[np.triu_indices(8, 1)]
    assert gaps.min() > 0.9  # spread: random picks of 8 points on a unit sphere come closer
    kp = object_keypoints(pts, np.full(3, -1.0), np.full(3, 2.0))
    assert kp.shape == (1 + KEYPOINT_FPS, 3) and np.allclose(kp[0], 0)
    with pytest.raises(geo.GeometryError, match="finite points"):
        farthest_points(np.full((5, 3), np.nan), 3, np.zeros(3))


def test_voting_finds_keypoints_through_outlier_directions() -> None:
    rng = np.random.default_rng(1)
    p = rng.uniform(0, 64, (300, 2))
    truth = np.array([[20.0, 30.0], [70.0, -5.0], [32.0, 32.0]])
    d = truth[:, None, :] - p[None]
    d /= np.linalg.norm(d, axis=-1, keepdims=True)
    wrong = rng.choice(300, 90, replace=False)  # 30% of the locations point anywhere
    angle = rng.uniform(0, 2 * np.pi, (3, 90))
    d[:, wrong] = np.stack([np.cos(angle), np.sin(angle)], -1)
    found, share = vote_keypoints(p, d)
    np.testing.assert_allclose(found, truth, atol=0.2)
    assert ((share > 0.68) & (share < 0.8)).all()  # the right 70% (and a few chance agreements)


def test_render_targets_vote_back_to_the_pose_to_under_a_pixel(lmo_pool) -> None:
    pool, infos, meshes, cfg, kps = lmo_pool
    P = pool["rgb"].shape[1]
    errors = []
    for i in range(len(pool["rgb"])):
        k = int(pool["obj_index"][i])
        oid = cfg.obj_ids[k]
        K = pool["K_crop"][i].double().numpy()
        channels = _perfect_channels(pool["keypoints"][i], pool["mask"][i])
        assert channels.shape == (object_head_channels("keypoints"), P // 2, P // 2)
        found = decode(channels, _identity(P), K, kps[k])
        errors.append(proj_2d(found.R, found.t, pool["R"][i].double().numpy(), pool["t"][i].double().numpy(), K,
                              meshes[oid].vertices))
        assert found.inlier_ratio > 0.95 and 0 < found.confidence <= 1
    assert max(errors) < 1.0, errors


def test_decode_through_a_window_and_with_outliers(lmo_pool) -> None:
    """Window of a larger image: the image-frame pose; 20% of the directions wrong: still under a pixel."""
    pool, _, meshes, cfg, kps = lmo_pool
    i, P = 5, pool["rgb"].shape[1]
    k = int(pool["obj_index"][i])
    K_crop = pool["K_crop"][i].double().numpy()
    window = geo.CropWindow(300.0, 200.0, 2.0 * P, P)
    A = window.image_to_crop
    K_img = K_crop.copy()
    K_img[0, 0], K_img[1, 1] = K_crop[0, 0] / A[0, 0], K_crop[1, 1] / A[1, 1]
    K_img[0, 2], K_img[1, 2] = (K_crop[0, 2] - A[0, 2]) / A[0, 0], (K_crop[1, 2] - A[1, 2]) / A[1, 1]
    channels = _perfect_channels(pool["keypoints"][i], pool["mask"][i])
    rng = np.random.default_rng(0)
    visible = np.flatnonzero(channels[0].ravel() > 0)
    wrong = rng.choice(visible, size=len(visible) // 5, replace=False)
    flat = channels[1:].reshape(len(kps[k]), 2, -1)
    angle = rng.uniform(0, 2 * np.pi, (len(kps[k]), len(wrong)))
    flat[:, 0, wrong], flat[:, 1, wrong] = np.cos(angle), np.sin(angle)
    found = decode(channels, window, K_img, kps[k])
    err = proj_2d(found.R, found.t, pool["R"][i].double().numpy(), pool["t"][i].double().numpy(), K_img,
                  meshes[cfg.obj_ids[k]].vertices)
    assert err < 1.0 and 0.7 < found.inlier_ratio < 0.9


def test_decode_refuses_non_finite_misshaped_or_voteless_output() -> None:
    win = _identity(64)
    kp = np.random.default_rng(0).normal(size=(9, 3)) * 0.05
    bad = np.zeros((keypoint_channels(9), 32, 32))
    bad[3, 3, 3] = np.inf
    with pytest.raises(geo.GeometryError, match="finite"):
        decode(bad, win, np.eye(3), kp)
    with pytest.raises(geo.GeometryError, match="finite"):
        decode(np.zeros((keypoint_channels(8), 32, 32)), win, np.eye(3), kp)
    # Every direction zero: nothing intersects, no keypoint has voters.
    with pytest.raises(geo.GeometryError, match="agreeing voters"):
        decode(np.zeros((keypoint_channels(9), 32, 32)), win, np.eye(3), kp)
    with pytest.raises(ValueError, match="inlier_cos"):
        KeypointDecodeConfig(inlier_cos=1.0)


def test_pool_keypoints_are_the_corner_targets_when_the_keypoints_are_the_corners(lmo_pool) -> None:
    """add_keypoints projects and normalises exactly as the corner targets, and augmentation moves both alike."""
    pool, infos, _, cfg, kps = lmo_pool
    corners = [infos[i].corners for i in cfg.obj_ids]
    as_corners = add_keypoints(dict(pool), corners)
    np.testing.assert_allclose(as_corners["keypoints"].numpy(), pool["target"].numpy(), atol=1e-4)
    g = torch.Generator().manual_seed(1)
    batch = augment_synthetic(as_corners, torch.arange(6), background_bank(8, 64, cfg), shape_bank(8, 64), 64, 1.25,
                              AugmentConfig(), g)
    np.testing.assert_allclose(batch["keypoints"].numpy(), batch["target"].numpy(), atol=1e-4)
    pairs = {"real": pool["rgb"], "syn": pool["rgb"],
             **{k: pool[k] for k in ("mask", "coords", "target", "obj_index", "keypoints")}}
    out = augment_pairs(pairs, torch.arange(4), 64, 1.5, AugmentConfig(), g)
    assert out["keypoints"].shape == (4, 2 * len(kps[0]))


def test_keypoint_loss_is_zero_only_for_the_right_object_channels(lmo_pool) -> None:
    pool, *_ = lmo_pool
    i = 2
    per = object_head_channels("keypoints")
    right = torch.from_numpy(_perfect_channels(pool["keypoints"][i], pool["mask"][i])).float()
    _, vis = dense_train.block_targets(torch.zeros(1, 3, *pool["mask"][i].shape), pool["mask"][i][None])
    out = torch.cat([torch.zeros_like(right), right])[None]  # object 1 holds the right channels
    kp = pool["keypoints"][i][None]
    at_right = keypoints_train.keypoint_loss(out, kp, vis, torch.tensor([1]), beta=0.05)
    at_wrong = keypoints_train.keypoint_loss(out, kp, vis, torch.tensor([0]), beta=0.05)
    bce_floor = torch.nn.functional.binary_cross_entropy_with_logits(right[0], vis[0])
    assert out.shape[1] == 2 * per
    assert at_right.item() == pytest.approx(bce_floor.item(), abs=1e-6) and at_wrong > at_right + 0.1


def _keypoint_checkpoint(tmp_path: Path, n_kp: int = 9) -> Path:
    cfg = NetConfig(task="objects", input_size=32, width=4, feature_dim=8, head="keypoints")
    assert cfg.n_outputs == keypoint_channels(n_kp)
    torch.manual_seed(0)
    corners = geo.box_corners(np.full(3, -0.05), np.full(3, 0.1))
    kp = np.random.default_rng(0).uniform(-0.05, 0.05, (n_kp, 3))
    meta = {"objects": [{"obj_id": 1, "name": "ape", "corners_m": corners.tolist(), "extent_m": [0.1] * 3,
                         "symmetric": False, "keypoints_m": kp.tolist()}],
            "crop": {"size": 32, "window_scale": 1.2}, "head": "keypoints", "method": "synthetic", "step": 0}
    return checkpoint.save(tmp_path / "model", FeatureMappingModel(cfg), meta)


def test_estimator_decodes_a_keypoint_checkpoint(tmp_path: Path) -> None:
    from featmap_ros.estimator import load_estimator
    from featmap_ros.results import Detection2D

    path = _keypoint_checkpoint(tmp_path)
    est = load_estimator(path, device="cpu")
    assert est.head == "keypoints" and est.per_object == 19
    K = np.array([[572.4, 0, 320], [0, 573.6, 240], [0, 0, 1.0]])
    rgb = np.random.default_rng(0).integers(0, 255, (480, 640, 3), dtype=np.uint8)
    poses = est.estimate(rgb, geo.Intrinsics.from_K(K, 640, 480),
                         [Detection2D(class_id="ape", obj_id=1, box_xywh=np.array([300.0, 200, 60, 60]), score=0.5)])
    # An untrained net gives some pose or none (counted); whatever comes is finite and scored by its voters.
    assert len(poses) + sum(est.skipped.values()) == 1
    for p in poses:
        assert np.isfinite(p.R).all() and np.isfinite(p.t).all() and 0.0 <= p.score <= 0.5


def test_checkpoint_refuses_keypoint_metadata_that_does_not_fit(tmp_path: Path) -> None:
    path = _keypoint_checkpoint(tmp_path)
    doc = json.loads(path.read_text())
    doc["objects"][0]["keypoints_m"] = doc["objects"][0]["keypoints_m"][:8]  # 8 keypoints for a 9-keypoint head
    path.write_text(json.dumps(doc))
    with pytest.raises(checkpoint.CheckpointError, match="1 \\+ 2 n"):
        checkpoint.load(path)
    del doc["objects"][0]["keypoints_m"]
    path.write_text(json.dumps(doc))
    with pytest.raises(checkpoint.CheckpointError, match="keypoints_m"):
        checkpoint.load(path)
