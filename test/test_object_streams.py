"""Synthetic object stream and real/synthetic pairs: shapes, seeds, workers, labels, symmetry."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from featmap_ros.datasets.bop import ObjectInfo, load_models_info
from featmap_ros.datasets.streams import (
    ObjectStreamConfig,
    PairConfig,
    PhotoBackgrounds,
    RealSyntheticPairs,
    StreamError,
    SyntheticObjectStream,
    anchors_by_object,
    canonicalise_pose,
    corner_targets,
    exact_symmetry,
    look_at_rotation,
    object_loader,
    random_background,
    random_rotation,
    rgb_to_input,
    sample_pose,
    targets_to_uv,
)
from featmap_ros.geometry import normalise_uv, project_model

IDS = (1, 10, 11)  # ape plus the two symmetric objects keeps model loading short



@pytest.fixture(scope="module")
def stream(lmo_root: Path) -> SyntheticObjectStream:
    return SyntheticObjectStream.from_bop(lmo_root, ObjectStreamConfig(obj_ids=IDS, chunk=4, seed=5))


@pytest.fixture(scope="module")
def infos(lmo_root: Path) -> dict[int, ObjectInfo]:
    return load_models_info(lmo_root / "models" / "models_info.json")


def take(it: object, n: int) -> list[dict]:
    it = iter(it)
    return [next(it) for _ in range(n)]


def test_rgb_to_input_maps_bytes_to_minus_one_one() -> None:
    x = rgb_to_input(np.array([[[0, 255, 127]]], np.uint8))
    assert x.shape == (3, 1, 1) and x.dtype == np.float32
    assert x[0, 0, 0] == -1.0 and x[1, 0, 0] == 1.0
    assert rgb_to_input(np.zeros((2, 4, 4, 3), np.uint8)).shape == (2, 3, 4, 4)
    with pytest.raises(ValueError, match="uint8 RGB"):
        rgb_to_input(np.zeros((4, 4, 3), np.float32))


def test_stream_yields_tensors_of_the_promised_shapes(stream: SyntheticObjectStream) -> None:
    s = take(stream, 1)[0]
    assert s["image"].shape == (3, 128, 128) and s["image"].dtype == torch.float32
    assert -1.0 <= float(s["image"].min()) and float(s["image"].max()) <= 1.0
    assert s["target"].shape == (16,) and s["target"].dtype == torch.float32
    assert s["obj_index"].dtype == torch.int64 and 0 <= int(s["obj_index"]) < len(IDS)
    assert s["R"].shape == (3, 3) and s["t"].shape == (3,) and s["K_crop"].shape == (3, 3)


def test_same_seed_same_samples_other_seed_other_samples(stream: SyntheticObjectStream) -> None:
    a, b = take(stream, 5), take(stream, 5)
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x["image"], y["image"]) and torch.equal(x["target"], y["target"])
    other = SyntheticObjectStream(stream.infos, stream.renderer.meshes,
                                  ObjectStreamConfig(obj_ids=IDS, chunk=4, seed=6))
    assert not torch.equal(take(other, 1)[0]["target"], a[0]["target"])


def test_two_workers_draw_different_samples(stream: SyntheticObjectStream) -> None:
    loader = object_loader(stream, batch_size=4, num_workers=2)
    first, second = take(loader, 2)  # batch 0 from worker 0, batch 1 from worker 1
    assert first["image"].shape == (4, 3, 128, 128)
    assert not torch.equal(first["target"], second["target"])


def test_targets_are_the_corners_projected_into_the_window(stream: SyntheticObjectStream) -> None:
    K = np.asarray(stream.cfg.camera_K)
    for s in stream.sample_chunk(np.random.default_rng(1), 12):
        info = stream.infos[s["obj_id"]]
        # Independent path: full-image projection, then the window's affine map.
        uv = s["window"].to_crop(project_model(info.corners, s["R"], s["t"], K))
        assert np.allclose(normalise_uv(uv, 128).reshape(16), s["target"], atol=1e-4)
        # The rendered object lies inside its projected 3D box.
        box_uv = targets_to_uv(s["target"], 128)
        v, u = np.nonzero(s["mask"])
        if len(u):
            assert u.min() >= box_uv[:, 0].min() - 1 and u.max() <= box_uv[:, 0].max() + 1
            assert v.min() >= box_uv[:, 1].min() - 1 and v.max() <= box_uv[:, 1].max() + 1


def test_canonical_pose_is_idempotent_and_equal_for_symmetric_twins(infos: dict[int, ObjectInfo]) -> None:
    rng = np.random.default_rng(0)
    K = np.array([[500.0, 0, 63.5], [0, 500.0, 63.5], [0, 0, 1]])
    t = np.array([0.02, -0.01, 0.7])
    for obj_id in (10, 11):
        info = infos[obj_id]
        assert info.symmetric
        S = exact_symmetry(info.symmetries[0])
        assert np.allclose(S, info.symmetries[0], atol=0.05)  # a snap (glue is 1.5 degrees off a half turn)
        for _ in range(20):
            R = random_rotation(rng)
            Rc, tc = canonicalise_pose(R, t, info)
            Rcc, tcc = canonicalise_pose(Rc, tc, info)
            assert np.allclose(Rc, Rcc, atol=1e-6) and np.allclose(tc, tcc, atol=1e-6)
            R2, t2 = R @ S[:3, :3], R @ S[:3, 3] + t
            Rc2, tc2 = canonicalise_pose(R2, t2, info)
            a, b = corner_targets(info, Rc, tc, K, 128), corner_targets(info, Rc2, tc2, K, 128)
            assert np.abs(a - b).max() < 1e-4
    R = random_rotation(rng)
    Ra, ta = canonicalise_pose(R, t, infos[1])
    assert Ra is not None and np.array_equal(Ra, R) and np.array_equal(ta, t)  # ape is not symmetric


def test_pairs_render_the_object_where_the_real_one_is(lmo_root: Path) -> None:
    root = lmo_root
    pairs = RealSyntheticPairs.from_bop(root, 2, im_ids=[3, 58], obj_ids=IDS, cfg=PairConfig(min_visib=0.1))
    assert len(pairs) >= 3
    for i in range(len(pairs)):
        s = pairs.sample(i)
        win = s["window"]
        x, y, w, h = s["bbox_obj"]
        (u0, v0), (u1, v1) = win.to_crop(np.array([[x, y], [x + w, y + h]]))
        v, u = np.nonzero(s["syn_mask"])
        iou_inter = max(0, min(u1, u.max()) - max(u0, u.min())) * max(0, min(v1, v.max()) - max(v0, v.min()))
        union = (u1 - u0) * (v1 - v0) + (u.max() - u.min()) * (v.max() - v.min()) - iou_inter
        assert iou_inter / union > 0.85, f"pair {i}: render box IoU {iou_inter / union:.2f}"
    item = pairs[0]
    assert item["real"].shape == item["syn"].shape == (3, 128, 128)
    assert item["target"].shape == (16,) and int(item["im_id"]) in (3, 58)
    jittered = RealSyntheticPairs(pairs.scene, pairs.infos, pairs.renderer, [3], IDS, PairConfig(jitter=True))
    assert not np.array_equal(jittered.sample(0)["K_crop"], pairs.sample(0)["K_crop"])


def rotation_angle_deg(Ra: np.ndarray, Rb: np.ndarray) -> float:
    return float(np.degrees(np.arccos(np.clip((np.trace(Ra.T @ Rb) - 1) / 2, -1.0, 1.0))))


def test_poses_drawn_around_anchors_keep_the_view_within_the_spread(infos: dict[int, ObjectInfo]) -> None:
    rng = np.random.default_rng(3)
    info = infos[1]
    c = info.min_xyz + info.size_xyz / 2
    # An anchor seen off-centre (its line of sight is not the optical axis) at about 1 m.
    R_anchor, t_anchor = random_rotation(rng), np.array([0.2, -0.1, 1.0])
    anchors = anchors_by_object([(1.0, *R_anchor.ravel(), *t_anchor)], {1: c})[1]

    def sight_in_model(R: np.ndarray, t: np.ndarray) -> np.ndarray:
        """The direction from the box centre to the camera, in the model frame (what the view shows)."""
        d = -(R @ c + t)
        return R.T @ d / np.linalg.norm(d)

    for spread in (0.0, 25.0):
        cfg = ObjectStreamConfig(anchor_spread_deg=spread)
        for _ in range(50):
            R, t = sample_pose(rng, cfg, info, anchors)
            # Independent of anchors_by_object: the object is seen from the anchor's direction, turned by <= spread.
            cos = float(sight_in_model(R, t) @ sight_in_model(R_anchor, t_anchor))
            assert np.degrees(np.arccos(np.clip(cos, -1, 1))) <= spread + 1e-4
            assert cfg.distance_m[0] - 1e-9 <= np.linalg.norm(R @ c + t) <= cfg.distance_m[1] + 1e-9
            if spread == 0.0:  # and rolled about the line of sight as in the anchor: same view, another ray
                view = anchors_by_object([(1.0, *R.ravel(), *t)], {1: c})[1][0]
                assert rotation_angle_deg(view, anchors[0]) < 1e-4
    with pytest.raises(StreamError):
        anchors_by_object([(1.0, 0.0, 0.0)])


def test_anchor_azimuth_turns_the_object_about_its_up_axis_only(infos: dict[int, ObjectInfo]) -> None:
    rng = np.random.default_rng(8)
    info = infos[1]
    c = info.min_xyz + info.size_xyz / 2
    # An upright object seen from 40 degrees above the table, straight ahead at 1 m.
    R_anchor = look_at_rotation(np.radians(-70.0), np.radians(40.0), 0.0)
    t_anchor = np.array([0.0, 0.0, 1.0]) - R_anchor @ c
    anchors = anchors_by_object([(1.0, *R_anchor.ravel(), *t_anchor)], {1: c})[1]

    def elevation_azimuth(R: np.ndarray, t: np.ndarray) -> tuple[float, float]:
        """The camera's elevation above the model's xy plane and its azimuth about z, seen from the box centre."""
        d = R.T @ -(R @ c + t)
        d /= np.linalg.norm(d)
        return float(np.degrees(np.arcsin(d[2]))), float(np.degrees(np.arctan2(d[1], d[0])))

    for azimuth in (0.0, 90.0, 360.0):
        cfg = ObjectStreamConfig(anchor_spread_deg=0.0, anchor_azimuth_deg=azimuth)
        drawn = [elevation_azimuth(*sample_pose(rng, cfg, info, anchors)) for _ in range(200)]
        el, az = np.array(drawn).T
        np.testing.assert_allclose(el, 40.0, atol=1e-6)  # the anchor's elevation is kept
        turn = (az + 70.0 + 180.0) % 360.0 - 180.0  # signed turn from the anchor's azimuth
        assert np.abs(turn).max() <= azimuth / 2 + 1e-6
        if azimuth == 360.0:  # every side of the object is shown
            assert np.histogram(az, bins=8, range=(-180, 180))[0].min() > 5
    for bad in (-1.0, 400.0, float("nan")):
        with pytest.raises(StreamError, match="anchor_azimuth_deg"):
            sample_pose(rng, ObjectStreamConfig(anchor_azimuth_deg=bad), info, anchors)

def test_stream_draws_only_around_its_anchors(lmo_root: Path) -> None:
    R0 = np.eye(3)
    cfg = ObjectStreamConfig(obj_ids=(1,), chunk=4, pose_anchors=((1.0, *R0.ravel(), 0.0, 0.0, 1.0),),
                             anchor_spread_deg=10.0)
    stream = SyntheticObjectStream.from_bop(lmo_root, cfg)
    for s in take(stream, 8):
        R = s["R"].double().numpy()
        # At most 10 degrees from the anchor's view, plus the turn onto the sample's ray (< 25 deg in the window).
        assert rotation_angle_deg(R, R0) < 10.0 + 25.0


def test_photo_backgrounds_from_a_list_with_a_share(tmp_path: Path) -> None:
    import cv2

    photo = tmp_path / "frame.png"
    cv2.imwrite(str(photo), np.full((60, 80, 3), (10, 20, 30), np.uint8))  # BGR: RGB (30, 20, 10)
    photos = PhotoBackgrounds(paths=[photo])
    rng = np.random.default_rng(0)
    always = [random_background(rng, ("colour", "photo"), 16, photos, photo_prob=1.0) for _ in range(20)]
    assert all((b == (30, 20, 10)).all() for b in always)
    never = [random_background(rng, ("colour", "photo"), 16, photos, photo_prob=0.0) for _ in range(20)]
    assert not any((b == (30, 20, 10)).all() for b in never)
    with pytest.raises(StreamError, match="do not exist"):
        PhotoBackgrounds(paths=[tmp_path / "missing.png"])
    with pytest.raises(StreamError):
        PhotoBackgrounds()


def test_stream_rejects_a_photo_share_outside_zero_one(lmo_root: Path, tmp_path: Path) -> None:
    import cv2

    cv2.imwrite(str(tmp_path / "a.png"), np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(StreamError, match="photo_prob"):
        cfg = ObjectStreamConfig(obj_ids=(1,), photo_paths=(str(tmp_path / "a.png"),), photo_prob=1.5)
        SyntheticObjectStream.from_bop(lmo_root, cfg)
