"""The dense correspondence head: targets from renders decode back to the pose; spatial g starts as the identity."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from featmap_ros import geometry as geo
from featmap_ros.datasets.bop import ObjectInfo
from featmap_ros.datasets.pool import (
    AugmentConfig,
    PoolConfig,
    augment_pairs,
    augment_synthetic,
    background_bank,
    jitter_thetas,
    occlude,
    photometric,
    render_object_pool,
    shape_bank,
    warp_corners,
)
from featmap_ros.datasets.streams import ObjectStreamConfig, StreamError
from featmap_ros.heads import dense, dense_train
from featmap_ros.metrics import proj_2d
from featmap_ros.model import checkpoint
from featmap_ros.model.nets import DENSE_CHANNELS, FeatureMappingModel, NetConfig, pooled_features

LMO = Path(__file__).resolve().parents[2] / "shared" / "data" / "lmo"
needs_lmo = pytest.mark.skipif(not (LMO / "models").is_dir(), reason="../shared/data/lmo is absent")


@pytest.fixture(scope="module")
def lmo_pool(small_pool_models) -> tuple[dict, dict, dict, ObjectStreamConfig]:
    infos, meshes, cfg = small_pool_models
    return render_object_pool(infos, meshes, cfg, 12, oversize=1.25, seed=3), infos, meshes, cfg


def _perfect_channels(coords: torch.Tensor, mask: torch.Tensor) -> np.ndarray:
    """The head output a perfect network would give for these full-resolution targets."""
    c, vis = dense_train.block_targets(coords[None].float(), mask[None])
    logit = np.where(vis.numpy() >= 0.5, 8.0, -8.0)
    return np.concatenate([logit[:, None], c.numpy()], 1)[0]


def test_render_targets_decode_recovers_the_pose_to_under_a_pixel(lmo_pool) -> None:
    pool, infos, meshes, cfg = lmo_pool
    P = pool["rgb"].shape[1]
    identity = geo.CropWindow(P / 2 - 0.5, P / 2 - 0.5, float(P), P)
    errors = []
    for i in range(len(pool["rgb"])):
        oid = cfg.obj_ids[int(pool["obj_index"][i])]
        K = pool["K_crop"][i].double().numpy()
        found = dense.decode(_perfect_channels(pool["coords"][i], pool["mask"][i]), identity, K,
                             infos[oid].min_xyz, infos[oid].size_xyz)
        errors.append(proj_2d(found.R, found.t, pool["R"][i].double().numpy(), pool["t"][i].double().numpy(), K,
                              meshes[oid].vertices))
        assert found.inlier_ratio > 0.9
    assert max(errors) < 1.0, errors


@pytest.mark.parametrize(("iterations", "lm_scales"), [(150, (8.0, 4.0, 2.0, 1.0)), (0, (8.0, 4.0, 2.0, 1.0)),
                                                      (0, (4.0, 1.0))])
def test_decode_recovers_the_pose_through_outliers_with_and_without_ransac(lmo_pool, iterations: int,
                                                                           lm_scales: tuple[float, ...]) -> None:
    pool, infos, meshes, cfg = lmo_pool
    P = pool["rgb"].shape[1]
    identity = geo.CropWindow(P / 2 - 0.5, P / 2 - 0.5, float(P), P)
    rng = np.random.default_rng(0)
    decode_cfg = dense.DenseDecodeConfig(ransac_iterations=iterations, lm_scales=lm_scales)
    errors = []
    for i in range(len(pool["rgb"])):
        oid = cfg.obj_ids[int(pool["obj_index"][i])]
        K = pool["K_crop"][i].double().numpy()
        channels = _perfect_channels(pool["coords"][i], pool["mask"][i])
        visible = np.flatnonzero(channels[0].ravel() > 0)
        wrong = rng.choice(visible, size=len(visible) // 5, replace=False)  # 20% gross outliers
        flat = channels[1:].reshape(3, -1)
        flat[:, wrong] = rng.uniform(-1, 1, (3, len(wrong)))
        found = dense.decode(channels, identity, K, infos[oid].min_xyz, infos[oid].size_xyz, decode_cfg)
        errors.append(proj_2d(found.R, found.t, pool["R"][i].double().numpy(), pool["t"][i].double().numpy(), K,
                              meshes[oid].vertices))
        assert 0.7 < found.inlier_ratio <= 0.85  # the outliers are found out
    assert max(errors) < 1.0, errors


def test_decode_through_a_window_maps_crop_points_back_to_the_image(lmo_pool) -> None:
    """The same correspondences seen through a window of a 640x480 image give the image-frame pose."""
    pool, infos, meshes, cfg = lmo_pool
    i = 5
    oid = cfg.obj_ids[int(pool["obj_index"][i])]
    P = pool["rgb"].shape[1]
    K_crop = pool["K_crop"][i].double().numpy()
    # A window whose crop camera is K_crop: image K with the principal point moved by the window.
    window = geo.CropWindow(300.0, 200.0, 2.0 * P, P)
    A = window.image_to_crop
    K_img = K_crop.copy()
    K_img[0, 0] /= A[0, 0]
    K_img[1, 1] /= A[1, 1]
    K_img[0, 2] = (K_crop[0, 2] - A[0, 2]) / A[0, 0]
    K_img[1, 2] = (K_crop[1, 2] - A[1, 2]) / A[1, 1]
    np.testing.assert_allclose(window.intrinsics(K_img), K_crop, atol=1e-9)
    found = dense.decode(_perfect_channels(pool["coords"][i], pool["mask"][i]), window, K_img,
                         infos[oid].min_xyz, infos[oid].size_xyz)
    err = proj_2d(found.R, found.t, pool["R"][i].double().numpy(), pool["t"][i].double().numpy(), K_img,
                  meshes[oid].vertices)
    assert err < 1.0


def test_decode_refuses_non_finite_or_misshaped_output() -> None:
    win = geo.CropWindow(31.5, 31.5, 64.0, 64)
    info = ObjectInfo(1, 0.1, np.full(3, -0.05), np.full(3, 0.1))
    bad = np.zeros((DENSE_CHANNELS, 32, 32))
    bad[1, 3, 3] = np.nan
    with pytest.raises(geo.GeometryError, match="finite"):
        dense.decode(bad, win, np.eye(3), info.min_xyz, info.size_xyz)
    with pytest.raises(geo.GeometryError, match="finite"):
        dense.decode(np.zeros((3, 32, 32)), win, np.eye(3), info.min_xyz, info.size_xyz)


def test_block_targets_average_coordinates_over_visible_pixels_only() -> None:
    coords = torch.zeros(1, 3, 4, 4)
    coords[0, 0, 0, 0], coords[0, 0, 0, 1] = 1.0, 100.0  # the second pixel is not visible
    mask = torch.zeros(1, 4, 4, dtype=torch.bool)
    mask[0, 0, 0] = mask[0, 1, 0] = True
    c, vis = dense_train.block_targets(coords, mask)
    assert vis.shape == (1, 2, 2) and vis[0, 0, 0] == pytest.approx(0.5) and vis[0, 1, 1] == 0
    assert c[0, 0, 0, 0] == pytest.approx(0.5)  # mean of 1.0 and 0.0 (the two visible pixels)


def test_dense_loss_is_zero_only_for_the_right_object_channels() -> None:
    coords = torch.rand(2, 3, 8, 8) * 2 - 1
    vis = (torch.rand(2, 8, 8) > 0.5).float()
    perfect = torch.cat([(vis * 2 - 1)[:, None] * 30.0, coords], 1)
    out = torch.cat([torch.zeros_like(perfect), perfect], 1)  # object 1 right, object 0 wrong
    idx = torch.tensor([1, 1])
    assert dense_train.dense_loss(out, coords, vis, idx).item() < 1e-6
    assert dense_train.dense_loss(out, coords, vis, torch.tensor([0, 0])).item() > 0.1


def test_spatial_mapping_is_the_identity_at_initialisation() -> None:
    cfg = NetConfig(task="objects", input_size=32, width=4, feature_dim=8, n_outputs=2 * DENSE_CHANNELS,
                    head="dense", mapping=True)
    model = FeatureMappingModel(cfg)
    x = torch.randn(3, 3, 32, 32)
    f = model.f_R(x)
    assert f.shape == (3, 8, 16, 16)
    torch.testing.assert_close(model.g(f), f)
    assert model.predict_real(x).outputs.shape == (3, 2 * DENSE_CHANNELS, 16, 16)
    assert pooled_features(f).shape == (3, 8)


def test_head_must_fit_the_task_and_the_channel_count() -> None:
    with pytest.raises(ValueError, match="head"):
        NetConfig(task="hands", head="dense")
    with pytest.raises(ValueError, match="channels per object"):
        NetConfig(task="objects", head="dense", n_outputs=6, feature_dim=32)
    with pytest.raises(ValueError, match="expected <= 256"):
        NetConfig(task="objects", head="dense", n_outputs=8)  # the FC default of 1024 channels at S/2
    assert NetConfig(task="objects", head="dense", feature_dim=32).n_outputs == DENSE_CHANNELS
    with pytest.raises(ValueError, match="head must be"):
        NetConfig(task="objects", head="pvnet")


def test_window_jitter_moves_corners_with_the_image() -> None:
    g = torch.Generator().manual_seed(0)
    theta = jitter_thetas(g, 4, 1.25, 0.08, (0.8, 1.2))
    uv = torch.rand(4, 16) * 2 - 1
    out = warp_corners(uv, theta)
    # Back through the affine map: p_in = A p_out + b.
    back = (theta[:, None, :, :2] @ out.view(4, 8, 2, 1)).squeeze(-1) + theta[:, None, :, 2]
    torch.testing.assert_close(back.reshape(4, 16), uv)
    identity = torch.tensor([[[1.0, 0, 0], [0, 1.0, 0]]])
    torch.testing.assert_close(warp_corners(uv[:1], identity), uv[:1])


def test_rotated_windows_move_image_and_corners_alike() -> None:
    from featmap_ros.datasets.pool import warp

    # A stored crop (oversize 1.5, 96 px for a 64 px window) with one bright 3 x 3 dot at a known point.
    g = torch.Generator().manual_seed(0)
    plain = jitter_thetas(torch.Generator().manual_seed(0), 6, 1.5, 0.08, (0.8, 1.2))
    theta = jitter_thetas(g, 6, 1.5, 0.08, (0.8, 1.2), rotation_deg=30.0)
    turned = torch.atan2(theta[:, 1, 0], theta[:, 0, 0])
    assert (turned.abs() > 1e-3).all() and (turned.abs() <= math.radians(30.0) + 1e-6).all()
    # Scale and shift are drawn first, so they are the unrotated windows' (rotation 0 draws nothing more).
    torch.testing.assert_close(theta[:, :, :2].square().sum(1), plain[:, :, :2].square().sum(1))
    torch.testing.assert_close(theta[:, :, 2], plain[:, :, 2])
    stored = torch.zeros(6, 1, 96, 96)
    dot = torch.tensor([[0.3, -0.2]])  # normalised over the stored crop (x, y)
    u, v = ((dot[0] + 1) * 96 / 2 - 0.5).round().long().tolist()
    stored[:, :, v - 1:v + 2, u - 1:u + 2] = 1.0
    out = warp(stored, theta, 64, "nearest")[:, 0]
    where = warp_corners(dot.expand(6, 2), theta)  # the dot's place in each output window, normalised
    for i in range(6):
        vs, us = torch.nonzero(out[i] > 0.5, as_tuple=True)
        centre = torch.stack([us.float().mean(), vs.float().mean()])
        expected = (where[i] + 1) * 64 / 2 - 0.5
        assert torch.dist(centre, expected) < 1.0, (i, centre, expected)
    with pytest.raises(StreamError, match="rotation_deg"):
        AugmentConfig(rotation_deg=float("nan"))
    with pytest.raises(StreamError, match="rotation_deg"):
        AugmentConfig(rotation_deg=-5.0)


def test_augmented_batches_have_both_heads_targets(lmo_pool) -> None:
    pool, _, _, cfg = lmo_pool
    g = torch.Generator().manual_seed(1)
    bg = background_bank(8, 64, cfg)
    shapes = shape_bank(8, 64)
    batch = augment_synthetic(pool, torch.arange(6), bg, shapes, 64, 1.25, AugmentConfig(), g)
    assert batch["image"].shape == (6, 3, 64, 64) and batch["coords"].shape == (6, 3, 32, 32)
    assert batch["visibility"].shape == (6, 32, 32) and batch["target"].shape == (6, 16)
    assert batch["image"].min() >= -1 and batch["image"].max() <= 1
    assert (batch["visibility"].flatten(1).sum(1) > 0).all()  # the object stays in view
    pairs = {"real": pool["rgb"], "syn": pool["rgb"], **{k: pool[k] for k in ("mask", "coords", "target", "obj_index")}}
    out = augment_pairs(pairs, torch.arange(4), 64, 1.5, AugmentConfig(), g)
    assert out["real"].shape == out["syn"].shape == (4, 3, 64, 64)


def test_real_crops_get_the_same_occluder_as_their_render(lmo_pool) -> None:
    pool, _, _, _ = lmo_pool
    shapes = shape_bank(8, 64)
    pairs = {"real": pool["rgb"], "syn": pool["rgb"], **{k: pool[k] for k in ("mask", "coords", "target", "obj_index")}}
    idx = torch.arange(6)
    plain = augment_pairs(pairs, idx, 64, 1.5, AugmentConfig(), torch.Generator().manual_seed(2))
    cfg = AugmentConfig(real_occluder_prob=1.0, real_colour_gain=0.0, brightness=0.0)
    occluded = augment_pairs(pairs, idx, 64, 1.5, cfg, torch.Generator().manual_seed(2), (pool, shapes), 1.25)
    # The pair's two images were equal, and stay equal: the occluder covers both alike.
    torch.testing.assert_close(occluded["real"], occluded["syn"])
    assert not torch.equal(occluded["real"], plain["real"])
    # Hidden locations are no longer visible; none becomes visible; the object stays in view.
    assert (occluded["visibility"] <= plain["visibility"] + 1e-6).all()
    assert occluded["visibility"].sum() < plain["visibility"].sum()
    assert (occluded["visibility"].flatten(1).sum(1) > 0).all()
    # occlude() itself: a row's k images change at the same pixels, and only there the mask can drop.
    g = torch.Generator().manual_seed(3)
    img = torch.rand(4, 3, 64, 64) * 255
    m = torch.ones(4, 64, 64, dtype=torch.bool)
    out, m2 = occlude(torch.cat([img, img], 1), m, pool, shapes, 64, 1.25, AugmentConfig(min_visible=0.0), 1.0, g)
    torch.testing.assert_close(out[:, :3], out[:, 3:])
    changed = (out[:, :3] != img).any(1)
    assert (~m2 <= changed).all() and (~m2).any()
    with pytest.raises(StreamError, match="occluders"):
        augment_pairs(pairs, idx, 64, 1.5, cfg, torch.Generator().manual_seed(2))


def test_pool_and_augment_configs_refuse_bad_values() -> None:
    with pytest.raises(StreamError, match="occluder_prob"):
        AugmentConfig(occluder_prob=1.5)
    with pytest.raises(StreamError, match="real_occluder_prob"):
        AugmentConfig(real_occluder_prob=-0.1)
    for bad in ({"contrast": (1.5, 1.2)}, {"saturation": (-0.2, 1.0)}, {"gamma": (0.0, 1.0)}, {"gamma": (1e-30, 1.0)},
                {"gamma": (1.0, float("nan"))}, {"contrast": (1.0, 9.0)}, {"saturation": (1.0,)},
                {"contrast": 1.5}, {"gamma": ("low", "high")}, {"contrast": "12"}, {"saturation": b"\x01\x02"},
                {"gamma": {1: 0, 2: 0}}, {"contrast": None}):
        with pytest.raises(StreamError, match=next(iter(bad))):
            AugmentConfig(**bad)
    assert AugmentConfig(contrast=[0.8, 2]).contrast == (0.8, 2.0)  # a YAML list becomes the range
    with pytest.raises(StreamError, match="pair_oversize"):
        PoolConfig(pair_oversize=1.1)


def test_tone_changes_stay_in_their_ranges_and_draw_nothing_when_off() -> None:
    x = torch.rand(64, 3, 16, 16) * 100 + 75  # no clipping at [0, 255] under any of the changes below
    # Off ((1, 1)): not one random number more, so the batches are those of before the option. With no blur and
    # no noise, the only draws are the gain's (B x 3) and the offset's (B): the generator must end exactly there.
    g = torch.Generator().manual_seed(5)
    off = photometric(x, g, 0.25, 25.0, 0.0, 0.0, (1.0, 1.0), (1.0, 1.0), (1.0, 1.0))
    ref = torch.Generator().manual_seed(5)
    gain, offset = torch.rand(64, 3, 1, 1, generator=ref), torch.rand(64, 1, 1, 1, generator=ref)
    assert torch.equal(g.get_state(), ref.get_state())
    torch.testing.assert_close(off, (x * (1 + (gain * 2 - 1) * 0.25) + (offset * 2 - 1) * 25.0).clamp(0, 255))
    g = torch.Generator().manual_seed(5)
    photometric(x, g, 0.25, 25.0, 0.0, 0.0, contrast=(0.8, 1.2))
    assert not torch.equal(g.get_state(), ref.get_state())  # on: it draws

    def tone(**kw: tuple[float, float]) -> torch.Tensor:
        return photometric(x, torch.Generator().manual_seed(6), 0.0, 0.0, 0.0, 0.0, **kw)

    def spread(t: torch.Tensor) -> torch.Tensor:
        return (t - t.mean((1, 2, 3), keepdim=True)).std((1, 2, 3))

    # Contrast: each image's spread about its mean scales by a factor within the range, the mean stays.
    out = tone(contrast=(0.6, 1.5))
    ratio = spread(out) / spread(x)
    assert ratio.min() >= 0.6 - 1e-4 and ratio.max() <= 1.5 + 1e-4 and ratio.std() > 0.05
    torch.testing.assert_close(out.mean((1, 2, 3)), x.mean((1, 2, 3)))
    # Saturation: the grey of each pixel stays, the colours move away from or toward it within the range.
    luma = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
    out = tone(saturation=(0.5, 1.5))
    torch.testing.assert_close((out * luma).sum(1), (x * luma).sum(1), rtol=1e-4, atol=1e-3)
    chroma = (out - (out * luma).sum(1, keepdim=True)).abs().sum((1, 2, 3)) / (
        x - (x * luma).sum(1, keepdim=True)).abs().sum((1, 2, 3))
    assert chroma.min() >= 0.5 - 1e-4 and chroma.max() <= 1.5 + 1e-4 and chroma.std() > 0.05
    grey = torch.full((2, 3, 4, 4), 90.0)
    torch.testing.assert_close(photometric(grey, torch.Generator(), 0.0, 0.0, 0.0, 0.0, saturation=(0.2, 3.0)), grey)
    # Gamma: black and white stay, mid-grey lands within the exponent range.
    ends = torch.tensor([0.0, 127.5, 255.0]).view(1, 1, 1, 3).expand(32, 3, 1, 3)
    out = photometric(ends, torch.Generator().manual_seed(7), 0.0, 0.0, 0.0, 0.0, gamma=(0.8, 1.5))
    torch.testing.assert_close(out[..., 0], ends[..., 0])
    torch.testing.assert_close(out[..., 2], ends[..., 2])
    mid = out[..., 1] / 255.0
    assert mid.min() >= 0.5 ** 1.5 - 1e-5 and mid.max() <= 0.5 ** 0.8 + 1e-5 and mid.std() > 0.01
    assert torch.isfinite(tone(contrast=(0.1, 4.0), saturation=(0.1, 4.0), gamma=(0.25, 4.0))).all()


def test_estimator_decodes_a_dense_checkpoint_with_the_inlier_ratio_as_score(tmp_path: Path) -> None:
    from featmap_ros.estimator import load_estimator
    from featmap_ros.results import Detection2D

    cfg = NetConfig(task="objects", input_size=32, width=4, feature_dim=8, n_outputs=DENSE_CHANNELS, head="dense")
    torch.manual_seed(0)
    model = FeatureMappingModel(cfg)
    corners = geo.box_corners(np.full(3, -0.05), np.full(3, 0.1))
    meta = {"objects": [{"obj_id": 1, "name": "ape", "corners_m": corners.tolist(), "extent_m": [0.1] * 3,
                         "symmetric": False}],
            "crop": {"size": 32, "window_scale": 1.2}, "head": "dense", "method": "synthetic", "step": 0}
    path = checkpoint.save(tmp_path / "model", model, meta)
    est = load_estimator(path, device="cpu")
    assert est.head == "dense" and json.loads(path.read_text())["net"]["head"] == "dense"
    K = np.array([[572.4, 0, 320], [0, 573.6, 240], [0, 0, 1.0]])
    rgb = np.random.default_rng(0).integers(0, 255, (480, 640, 3), dtype=np.uint8)
    poses = est.estimate(rgb, geo.Intrinsics.from_K(K, 640, 480),
                         [Detection2D(class_id="ape", obj_id=1, box_xywh=np.array([300.0, 200, 60, 60]), score=0.5)])
    # An untrained net gives some pose or none; whatever comes is finite and scored by its inliers.
    for p in poses:
        assert np.isfinite(p.R).all() and np.isfinite(p.t).all()
        assert 0.0 <= p.score <= 0.5


def test_compositing_leaves_no_dark_fringe_at_the_silhouette() -> None:
    """Object pixels warp premultiplied by coverage: an edge pixel lies between object and background colour."""
    P, S = 40, 32
    rgb = torch.zeros(1, P, P, 3, dtype=torch.uint8)
    mask = torch.zeros(1, P, P, dtype=torch.bool)
    rgb[0, 10:30, 12:28], mask[0, 10:30, 12:28] = 250, True
    pool = {"rgb": rgb, "mask": mask, "coords": torch.zeros(1, 3, P, P, dtype=torch.float16),
            "target": torch.zeros(1, 16), "obj_index": torch.zeros(1, dtype=torch.long)}
    quiet = AugmentConfig(occluder_prob=0.0, colour_gain=0.0, brightness=0.0, blur_prob=0.0, noise_std=0.0)
    bg = torch.full((1, S, S, 3), 100, dtype=torch.uint8)
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        img = (augment_synthetic(pool, torch.zeros(1, dtype=torch.long), bg, shape_bank(1, S), S, 1.25, quiet, g)
               ["image"] + 1) * 127.5
        assert img.min() >= 100 - 1e-3 and img.max() <= 250 + 1e-3


def test_confidence_falls_with_the_evidence(lmo_pool) -> None:
    pool, infos, _, cfg = lmo_pool
    P = pool["rgb"].shape[1]
    identity = geo.CropWindow(P / 2 - 0.5, P / 2 - 0.5, float(P), P)
    i = 2
    oid = cfg.obj_ids[int(pool["obj_index"][i])]
    full = _perfect_channels(pool["coords"][i], pool["mask"][i])
    few = full.copy()
    on = np.argwhere(few[0] > 0)
    few[0, on[8:, 0], on[8:, 1]] = -8.0  # only 8 locations still visible
    K = pool["K_crop"][i].double().numpy()
    a = dense.decode(full, identity, K, infos[oid].min_xyz, infos[oid].size_xyz)
    b = dense.decode(few, identity, K, infos[oid].min_xyz, infos[oid].size_xyz)
    assert a.confidence > 0.9 and b.confidence <= 8 / dense.DenseDecodeConfig().full_evidence + 1e-9


@needs_lmo
def test_training_frames_as_backgrounds_lose_their_annotated_objects() -> None:
    from featmap_ros.datasets.bop import BopScene, read_rgb
    from featmap_ros.datasets.pool import photos_without_objects
    from featmap_ros.render.objects import ObjectRenderer

    scene = BopScene(LMO, 2)
    frame = scene.frame(scene.image_ids[0])
    ids = sorted({i.obj_id for i in frame.instances})
    renderer = ObjectRenderer.from_bop(LMO, ids, max_faces=12000)
    (clean,) = photos_without_objects(scene, [frame.im_id], renderer)
    original = read_rgb(frame.rgb_path)
    _, _, masks = renderer.render_batch([i.obj_id for i in frame.instances], [i.R for i in frame.instances],
                                        [i.t for i in frame.instances], [frame.intrinsics.K] * len(frame.instances),
                                        640, 480)
    inside = masks.any(0)
    far = ~cv2.dilate(inside.astype(np.uint8), np.ones((15, 15), np.uint8)).astype(bool)
    assert np.array_equal(clean[far], original[far])  # away from the objects nothing changes
    assert np.abs(clean[inside].astype(int) - original[inside]).mean() > 5  # the objects are painted out


def test_decoding_in_threads_gives_the_poses_and_counts_of_one_thread(tmp_path: Path) -> None:
    from featmap_ros.estimator import EstimatorError, ObjectEstimator
    from featmap_ros.results import Detection2D

    n_obj = 3
    cfg = NetConfig(task="objects", input_size=32, width=4, feature_dim=8, n_outputs=DENSE_CHANNELS * n_obj,
                    head="dense")
    torch.manual_seed(1)
    corners = geo.box_corners(np.full(3, -0.05), np.full(3, 0.1))
    meta = {"task": "objects", "head": "dense", "crop": {"size": 32, "window_scale": 1.2},
            "objects": [{"obj_id": i + 1, "name": f"o{i + 1}", "corners_m": corners.tolist(), "extent_m": [0.1] * 3}
                        for i in range(n_obj)]}
    model = FeatureMappingModel(cfg)
    K = np.array([[572.4, 0, 320], [0, 573.6, 240], [0, 0, 1.0]])
    rgb = np.random.default_rng(0).integers(0, 255, (480, 640, 3), dtype=np.uint8)
    dets = [Detection2D(class_id=f"o{1 + i % n_obj}", obj_id=1 + i % n_obj, score=0.9 - 0.1 * i,
                        box_xywh=np.array([40.0 + 70 * i, 100 + 30 * (i % 3), 60, 70])) for i in range(7)]
    dets += [Detection2D(class_id="nope", obj_id=99, box_xywh=np.array([10.0, 10, 50, 50])),
             Detection2D(class_id="o1", obj_id=1, box_xywh=np.array([10.0, 10, np.nan, 50]))]
    runs = {}
    for threads in (1, 3):
        est = ObjectEstimator(model, meta, device="cpu", decode_threads=threads)
        runs[threads] = (est.estimate(rgb, geo.Intrinsics.from_K(K, 640, 480), dets), dict(est.skipped))
    (one, skipped_one), (three, skipped_three) = runs[1], runs[3]
    assert skipped_one == skipped_three and skipped_one["unknown_object"] == 1 and skipped_one["bad_box"] == 1
    assert [p.obj_id for p in one] == [p.obj_id for p in three] and len(one) >= 3  # random weights still give poses
    for a, b in zip(one, three, strict=True):
        assert np.array_equal(a.R, b.R) and np.array_equal(a.t, b.t) and a.score == b.score
    for bad in (0, True, 1.5):
        with pytest.raises(EstimatorError, match="decode_threads"):
            ObjectEstimator(model, meta, device="cpu", decode_threads=bad)


def test_the_node_parameter_decode_threads_reaches_the_estimator(tmp_path: Path) -> None:
    from featmap_ros.ros.config import NodeConfig
    from featmap_ros.ros.processor import ProcessorError, load_estimator_for

    cfg = NetConfig(task="objects", input_size=32, width=4, feature_dim=8, n_outputs=DENSE_CHANNELS, head="dense")
    corners = geo.box_corners(np.zeros(3), np.full(3, 0.1)).tolist()
    meta = {"objects": [{"obj_id": 1, "name": "ape", "corners_m": corners, "extent_m": [0.1] * 3}],
            "crop": {"size": 32}, "method": "fm", "step": 0}
    path = checkpoint.save(tmp_path / "model", FeatureMappingModel(cfg), meta)
    est = load_estimator_for(NodeConfig(model_path=str(path), backend="torch", device="cpu", decode_threads=2))
    assert est.decode_threads == 2
    with pytest.raises(ProcessorError, match="decode_threads"):
        NodeConfig(decode_threads=0)


def test_the_node_parameter_precision_reaches_the_torch_backend(tmp_path: Path, monkeypatch) -> None:
    from featmap_ros.backends import torch_net
    from featmap_ros.ros.config import NodeConfig
    from featmap_ros.ros.processor import ProcessorError, load_estimator_for

    cfg = NetConfig(task="objects", input_size=32, width=4, feature_dim=8, n_outputs=DENSE_CHANNELS, head="dense")
    corners = geo.box_corners(np.zeros(3), np.full(3, 0.1)).tolist()
    meta = {"objects": [{"obj_id": 1, "name": "ape", "corners_m": corners, "extent_m": [0.1] * 3}],
            "crop": {"size": 32}, "method": "fm", "step": 0}
    path = checkpoint.save(tmp_path / "model", FeatureMappingModel(cfg), meta)
    monkeypatch.setattr(torch_net, "bf16_native", lambda device, cpu_flags=None: True)  # the bf16 path on any CPU
    node = NodeConfig(model_path=str(path), backend="torch", device="cpu")
    assert load_estimator_for(node).net.bf16 is False  # auto: float32 on a CPU
    assert load_estimator_for(dataclasses.replace(node, precision="bf16")).net.bf16 is True
    with pytest.raises(ProcessorError, match="precision"):
        NodeConfig(precision="half")



def test_the_lm_rounds_follow_lm_scales(monkeypatch) -> None:
    # Correspondences of a known pose, a tenth of them moved far: every round refines, one call per scale.
    rng = np.random.default_rng(0)
    K = np.array([[500.0, 0, 32], [0, 500.0, 32], [0, 0, 1]])
    xyz = rng.uniform(-0.05, 0.05, (200, 3))
    rvec, tvec = np.array([0.1, -0.2, 0.05]), np.array([0.01, -0.02, 0.5])
    uv = cv2.projectPoints(xyz, rvec, tvec, K, np.zeros(4))[0].reshape(-1, 2)
    uv[:20] += 30.0
    calls = []
    refine = cv2.solvePnPRefineLM
    monkeypatch.setattr(dense.cv2, "solvePnPRefineLM", lambda *a: calls.append(1) or refine(*a))
    for scales in [(8.0, 4.0, 2.0, 1.0), (4.0, 1.0), (8.0, 1.0)]:
        calls.clear()
        r, t, idx = dense._shrinking_lm(xyz, uv, K, 1.5, len(xyz), scales)
        assert len(calls) == len(scales) and set(idx) == set(range(20, 200))
        np.testing.assert_allclose(t.ravel(), tvec, atol=1e-6)
    # Without a wide first round the outliers' pull on EPnP leaves too few points within the threshold.
    with pytest.raises(geo.GeometryError, match="no pose fits"):
        dense._shrinking_lm(xyz, uv, K, 1.5, len(xyz), (1.0,))
    for bad in [(), (0.0,), (2.0, float("nan"))]:
        with pytest.raises(ValueError, match="lm_scales"):
            dense.DenseDecodeConfig(lm_scales=bad)
    with pytest.raises(ValueError, match="lm_fallback"):
        dense.DenseDecodeConfig(lm_fallback=(4.0, -1.0))
    assert dense.DenseDecodeConfig(lm_fallback=()).lm_fallback == ()  # no fallback: allowed


def test_a_decode_whose_rounds_find_no_pose_falls_back_to_the_wider_schedule(lmo_pool) -> None:
    """One tight round alone cannot shed 20% outliers (the test above); the fallback rounds (8-4-2-1) can."""
    pool, infos, meshes, cfg = lmo_pool
    P = pool["rgb"].shape[1]
    identity = geo.CropWindow(P / 2 - 0.5, P / 2 - 0.5, float(P), P)
    rng = np.random.default_rng(1)
    tight = dense.DenseDecodeConfig(lm_scales=(1.0,), lm_fallback=())
    backed = dense.DenseDecodeConfig(lm_scales=(1.0,))
    errors = []  # of the poses the fallback found where the tight round alone found none
    for i in range(len(pool["rgb"])):
        oid = cfg.obj_ids[int(pool["obj_index"][i])]
        K = pool["K_crop"][i].double().numpy()
        channels = _perfect_channels(pool["coords"][i], pool["mask"][i])
        visible = np.flatnonzero(channels[0].ravel() > 0)
        wrong = rng.choice(visible, size=len(visible) // 5, replace=False)
        channels[1:].reshape(3, -1)[:, wrong] = rng.uniform(-1, 1, (3, len(wrong)))
        args = (channels, identity, K, infos[oid].min_xyz, infos[oid].size_xyz)
        found = dense.decode(*args, backed)
        try:
            alone = dense.decode(*args, tight)
        except geo.GeometryError:
            errors.append(proj_2d(found.R, found.t, pool["R"][i].double().numpy(), pool["t"][i].double().numpy(), K,
                                  meshes[oid].vertices))
            continue
        np.testing.assert_array_equal(found.R, alone.R)  # where the rounds find a pose, the fallback never runs
    assert errors, "no crop needed the fallback: the test does not test it"
    assert max(errors) < 1.0, errors


def _one_object_meta() -> dict:
    """Checkpoint metadata of a one-object dense model (a 10 cm box) with 32 px crops."""
    corners = geo.box_corners(np.full(3, -0.05), np.full(3, 0.1)).tolist()
    return {"objects": [{"obj_id": 1, "name": "ape", "corners_m": corners, "extent_m": [0.1] * 3, "symmetric": False}],
            "crop": {"size": 32, "window_scale": 1.2}, "head": "dense", "method": "synthetic", "step": 0}


def _two_hot(target: torch.Tensor, bins: int) -> torch.Tensor:
    """(B, 3, H, W) coordinates -> (B, 3, bins, H, W) probabilities on the two nearest bins."""
    pos = (target + 1) / 2 * (bins - 1)
    low = pos.floor().clamp(max=bins - 2)
    w = pos - low
    prob = torch.zeros(*target.shape[:2], bins, *target.shape[2:])
    prob.scatter_(2, low.long().unsqueeze(2), (1 - w).unsqueeze(2))
    prob.scatter_add_(2, low.long().unsqueeze(2) + 1, w.unsqueeze(2))
    return prob


@pytest.mark.parametrize("bins", [2, 16])
def test_binned_coordinates_read_out_the_two_hot_target_and_its_loss_is_lowest_there(bins: int) -> None:
    torch.manual_seed(0)
    target = torch.rand(2, 3, 4, 4) * 2 - 1
    target[0, 0, 0, 0], target[0, 1, 0, 0] = -1.0, 1.0  # the ends of the range
    logits = torch.log(_two_hot(target, bins).clamp_min(1e-12))
    out = dense_train.binned_to_coordinates(torch.cat([torch.zeros(2, 1, 4, 4), logits.flatten(1, 2)], 1), bins)
    assert out.shape == (2, DENSE_CHANNELS, 4, 4)
    torch.testing.assert_close(out[:, 1:], target, atol=1e-5, rtol=0)
    ce = dense_train.two_hot_cross_entropy(logits, target)
    assert ce.shape == target.shape
    # Any other distribution (here the target's one moved by a bin) costs more.
    shifted = torch.log(_two_hot((target + 2.0 / (bins - 1)).clamp(-1, 1), bins).clamp_min(1e-12))
    moved = (target + 2.0 / (bins - 1) <= 1).float()
    assert (dense_train.two_hot_cross_entropy(shifted, target) * moved).sum() > (ce * moved).sum() + 1.0


@pytest.mark.parametrize("scale", [1.0, 30.0, 1e4])
def test_the_run_time_expectation_is_the_softmax_expectation_without_overflow(scale: float) -> None:
    """softmax_expectation (what forward and the ONNX graphs compute) = the expectation of the softmax,
    also for logits whose exp overflows float32 (scale 1e4)."""
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 16, 5, 5) * scale
    got = dense_train.softmax_expectation(logits, 2)
    want = dense_train.expected_coordinates(torch.softmax(logits.double(), 2), 2).float()
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert got.abs().max() <= 1.0


def test_a_binned_dense_head_keeps_the_output_layout_and_learns_coordinates() -> None:
    """forward gives the 4-channel layout the decoding reads; the loss on train_outputs fits a fixed target."""
    torch.manual_seed(0)
    cfg = NetConfig(task="objects", input_size=32, width=4, feature_dim=8, n_outputs=2 * DENSE_CHANNELS,
                    head="dense", coord_bins=8)
    model = FeatureMappingModel(cfg)
    x = torch.randn(4, 3, 32, 32)
    feats = model.f_S(x)
    assert model.h.train_outputs(feats).shape == (4, 2 * (1 + 3 * 8), 16, 16)
    out = model(x)
    assert out.shape == (4, 2 * DENSE_CHANNELS, 16, 16)
    idx = torch.tensor([0, 1, 0, 1])
    per_object = torch.tensor([[0.5, -0.3, 0.8], [-0.6, 0.2, 0.0]])  # a target the 1x1 convolution can fit
    coords = per_object[idx].view(4, 3, 1, 1).expand(4, 3, 16, 16)
    vis = torch.ones(4, 16, 16)
    opt = torch.optim.Adam(model.h.parameters(), lr=0.05)
    feats = feats.detach()

    @torch.no_grad()
    def coord_error() -> float:
        o = dense_train.select_object_channels(model.h(feats), idx)
        return float((o[:, 1:] - coords).abs().mean())

    before = coord_error()
    for _ in range(60):
        opt.zero_grad()
        dense_train.dense_loss(model.h.train_outputs(feats, idx), coords, vis, idx, coord_bins=8).backward()
        opt.step()
    assert coord_error() < 0.25 * before
    with pytest.raises(ValueError, match="coord_bins"):
        NetConfig(task="objects", head="bb8", coord_bins=8)
    with pytest.raises(ValueError, match="coord_bins"):
        NetConfig(task="objects", head="dense", feature_dim=32, coord_bins=1)


def test_a_binned_dense_checkpoint_loads_with_the_same_outputs(tmp_path: Path) -> None:
    cfg = NetConfig(task="objects", input_size=32, width=4, feature_dim=8, n_outputs=DENSE_CHANNELS, head="dense",
                    coord_bins=4)
    torch.manual_seed(1)
    model = FeatureMappingModel(cfg).eval()
    path = checkpoint.save(tmp_path / "model", model, _one_object_meta())
    loaded, doc = checkpoint.load(path)
    assert doc["net"]["coord_bins"] == 4 and loaded.cfg.coord_bins == 4
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(x), model(x))


@pytest.mark.parametrize("bins", [0, 8])
def test_the_gathered_training_outputs_are_the_full_convolutions_object_channels(bins: int) -> None:
    """train_outputs(x, obj_index) computes only each sample's object: the same values and gradients."""
    torch.manual_seed(0)
    cfg = NetConfig(task="objects", input_size=32, width=4, feature_dim=8, n_outputs=3 * DENSE_CHANNELS,
                    head="dense", coord_bins=bins)
    model = FeatureMappingModel(cfg)
    per = DENSE_CHANNELS if not bins else 1 + 3 * bins
    x = torch.randn(5, 8, 16, 16)
    idx = torch.tensor([2, 0, 1, 2, 0])
    coords = torch.rand(5, 3, 16, 16) * 2 - 1
    vis = (torch.rand(5, 16, 16) > 0.3).float()
    grads = []
    for gathered in (False, True):
        model.zero_grad()
        out = model.h.train_outputs(x, idx) if gathered else model.h.train_outputs(x)
        assert out.shape == ((5, per, 16, 16) if gathered else (5, 3 * per, 16, 16))
        picked = dense_train.select_object_channels(out, idx, per)
        dense_train.dense_loss(out, coords, vis, idx, coord_bins=bins).backward()
        grads.append((picked.detach(), model.h.conv.weight.grad.clone(), model.h.conv.bias.grad.clone()))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert grads[1][1].view(3, per, -1).abs().sum(dim=(1, 2)).min() > 0  # every object's weights learn


def test_the_coordinate_weight_scales_only_the_coordinate_term() -> None:
    torch.manual_seed(0)
    coords = torch.rand(2, 3, 8, 8) * 2 - 1
    vis = torch.ones(2, 8, 8)
    out = torch.randn(2, DENSE_CHANNELS, 8, 8)
    one, four = (float(dense_train.dense_loss(out, coords, vis, None, coord_weight=w)) for w in (1.0, 4.0))
    vis_only = float(torch.nn.functional.binary_cross_entropy_with_logits(out[:, 0], vis))
    assert four - vis_only == pytest.approx(4.0 * (one - vis_only), rel=1e-5)
    assert one - vis_only > 0.01


def test_a_dense_checkpoint_from_before_coord_bins_loads_as_regression(tmp_path: Path) -> None:
    cfg = NetConfig(task="objects", input_size=32, width=4, feature_dim=8, n_outputs=DENSE_CHANNELS, head="dense")
    model = FeatureMappingModel(cfg).eval()
    path = checkpoint.save(tmp_path / "model", model, _one_object_meta())
    doc = json.loads(path.read_text())
    del doc["net"]["coord_bins"]  # as checkpoints of earlier versions have it
    path.write_text(json.dumps(doc))
    loaded, _ = checkpoint.load(path)
    assert loaded.cfg.coord_bins == 0
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(x), model(x))


def test_the_decode_thins_the_visible_locations_evenly_over_the_object() -> None:
    """spread_visible: at most max_points, all visible, spanning the visible region (not crowding its surest part)."""
    logits = np.full((32, 32), -5.0)
    logits[4:28, 6:30] = 2.0  # 576 visible locations
    logits[10:14, 10:14] = 6.0  # where the net is surest
    keep, n_on = dense.spread_visible(logits, 0.5, 6, 200)
    assert n_on == 576 and len(keep) == 200 and len(np.unique(keep)) == 200
    rows, cols = np.unravel_index(keep, logits.shape)
    assert (logits[rows, cols] > 0).all()
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (4, 27, 6, 29)  # the whole visible box
    top, _ = dense.most_visible(logits, 0.5, 6, 200)  # the keypoint head's choice: the surest first
    assert np.isin(np.ravel_multi_index((np.arange(10, 14).repeat(4), np.tile(np.arange(10, 14), 4)), (32, 32)),
                   top).all()
    few = np.full((32, 32), -5.0)
    few[0, :3] = 1.0  # 3 visible: the 6 most visible, whatever their score
    keep, n_on = dense.spread_visible(few, 0.5, 6, 200)
    assert n_on == 3 and len(keep) == 6 and set(np.arange(3)) <= set(keep.tolist())
    keep, _ = dense.spread_visible(logits, 0.5, 6, 1000)  # under the cap: every visible location
    assert len(keep) == 576
    for bad in ({"max_points": 0}, {"max_points": 5}, {"min_points": 3}):
        with pytest.raises(ValueError, match="min_points"):
            dense.DenseDecodeConfig(**bad)
