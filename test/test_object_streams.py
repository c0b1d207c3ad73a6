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
    RealSyntheticPairs,
    SyntheticObjectStream,
    canonicalise_pose,
    corner_targets,
    exact_symmetry,
    object_loader,
    random_rotation,
    rgb_to_input,
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
