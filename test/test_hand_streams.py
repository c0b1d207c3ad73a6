"""Synthetic hand stream and simulated real/synthetic pairs: shapes, dtypes, seeds, cubes."""

from __future__ import annotations

import itertools
from dataclasses import replace

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from featmap_ros.datasets.hand_streams import HandStreamConfig, HandStreamError, SensorHandSet, SyntheticHandStream
from featmap_ros.datasets.nyu import NYU_INTRINSICS, PALM
from featmap_ros.geometry import crop_depth_cube
from featmap_ros.render.hand import HandShape, forward_kinematics, sample_poses

SMALL = HandStreamConfig(render_batch=4)


def take(stream: SyntheticHandStream, n: int) -> list[dict[str, torch.Tensor]]:
    return list(itertools.islice(iter(stream), n))


def test_stream_items_have_the_documented_shapes_and_ranges() -> None:
    for item in take(SyntheticHandStream(0, SMALL), 6):
        assert item["image"].shape == (1, 128, 128) and item["image"].dtype == torch.float32
        assert item["target"].shape == (42,) and item["target"].dtype == torch.float32
        assert item["centre"].shape == (3,) and item["joints"].shape == (14, 3)
        assert item["image"].min() >= -1.0 and item["image"].max() <= 1.0
        assert (item["image"] < 1.0).float().mean() > 0.05  # the hand is in the crop
        expected = (item["joints"] - item["centre"]) / 0.15
        assert torch.allclose(item["target"].reshape(14, 3), expected, atol=1e-5)
        # The centre is the palm plus a few millimetres.
        assert torch.linalg.norm(item["centre"] - item["joints"][-1]) < 0.03


def test_stream_is_reproducible_and_seeds_differ() -> None:
    a, b = take(SyntheticHandStream(3, SMALL), 5), take(SyntheticHandStream(3, SMALL), 5)
    c = take(SyntheticHandStream(4, SMALL), 5)
    assert all(torch.equal(x["image"], y["image"]) and torch.equal(x["target"], y["target"]) for x, y in zip(a, b))
    assert not torch.equal(a[0]["target"], c[0]["target"])


def test_dataloader_workers_draw_different_frames() -> None:
    cfg = replace(SMALL, render_batch=1)
    loader = DataLoader(SyntheticHandStream(0, cfg), batch_size=2, num_workers=2)
    b0, b1 = itertools.islice(iter(loader), 2)  # one batch from each worker
    assert b0["image"].shape == (2, 1, 128, 128)
    assert not torch.equal(b0["target"], b1["target"])


def test_rotation_augmentation_keeps_targets_consistent() -> None:
    item = take(SyntheticHandStream(1, replace(SMALL, rotation_deg=180.0)), 1)[0]
    assert torch.allclose(item["target"].reshape(14, 3), (item["joints"] - item["centre"]) / 0.15, atol=1e-5)


def test_the_300mm_cube_contains_all_joints_of_sampled_poses() -> None:
    shape = HandShape.nominal()
    joints = forward_kinematics(shape, sample_poses(np.random.default_rng(0), 1000, shape)).nyu_joints
    for j in joints:
        _, cube = crop_depth_cube(np.full((480, 640), np.nan, np.float32), NYU_INTRINSICS.K, j[-1])
        assert cube.contains(j).all()


def test_sensor_pairs_share_the_cube_and_differ_by_the_sensor() -> None:
    shape = HandShape.sample(np.random.default_rng(1))
    data = SensorHandSet(3, shape, seed=2)
    item = data[0]
    for key in ("real", "syn"):
        assert item[key].shape == (1, 128, 128) and item[key].dtype == torch.float32
    assert item["target"].shape == (42,) and item["syn_target"].shape == (42,)
    assert torch.allclose(item["target"].reshape(14, 3), (item["joints"] - item["centre"]) / 0.15, atol=1e-5)
    # Same pose, nominal hand: the joints agree to within the shapes' difference (a few cm).
    assert (item["syn_target"] - item["target"]).abs().max() * 0.15 < 0.03
    assert not torch.equal(item["real"], item["syn"])
    assert (item["syn"] < 1).float().mean() > 0.05
    again = SensorHandSet(3, shape, seed=2)[0]
    assert torch.equal(again["real"], item["real"])
    assert 0 <= data.fallbacks <= 1
    with pytest.raises(IndexError):
        data[3]
    with pytest.raises(HandStreamError):
        SensorHandSet(0, shape)


def test_pairs_rendered_with_the_frames_own_hand_have_its_joints() -> None:
    shape = HandShape.sample(np.random.default_rng(1))
    cfg = HandStreamConfig(crop_px=32, pair_shape="same")
    item = SensorHandSet(1, shape, seed=2, config=cfg)[0]
    nominal = SensorHandSet(1, shape, seed=2, config=replace(cfg, pair_shape="nominal"))[0]
    assert torch.allclose(item["syn_target"], item["target"], atol=1e-5)  # the same hand at the same pose
    assert torch.equal(item["real"], nominal["real"]) and not torch.equal(item["syn"], nominal["syn"])
    with pytest.raises(HandStreamError, match="pair_shape"):
        SensorHandSet(1, shape, seed=2, config=replace(cfg, pair_shape="fitted"))[0]


def test_pairs_cropped_at_the_palm_have_it_within_their_noise() -> None:
    shape = HandShape.sample(np.random.default_rng(1))
    cfg = HandStreamConfig(crop_px=32, pair_centre="palm", pair_centre_sigma_m=0.0075)

    def offsets(config: HandStreamConfig) -> np.ndarray:
        data = SensorHandSet(6, shape, seed=2, config=config)
        items = [data[i] for i in range(6)]
        assert data.fallbacks == 0 or config.pair_centre == "located"
        for item in items:
            assert torch.allclose(item["target"].reshape(14, 3), (item["joints"] - item["centre"]) / 0.15, atol=1e-5)
        return np.stack([(it["centre"] - it["joints"][PALM]).numpy() for it in items]).astype(np.float64)

    noise, doubled = offsets(cfg), offsets(replace(cfg, pair_centre_sigma_m=0.015))
    assert np.abs(offsets(replace(cfg, pair_centre_sigma_m=0.0))).max() < 1e-6  # exactly at the palm
    assert np.allclose(doubled, 2 * noise, atol=1e-6)  # the same draws, scaled by the sigma
    assert 0.002 < np.linalg.norm(noise, axis=1).mean() < 4.5 * 0.0075
    # The centre of mass lands further off (the forearm pulls it).
    located = offsets(replace(cfg, pair_centre="located"))
    assert np.median(np.linalg.norm(noise, axis=1)) < np.median(np.linalg.norm(located, axis=1))
    for bad in ({"pair_centre": "refined"}, {"pair_centre_sigma_m": -0.01}, {"pair_centre_sigma_m": float("nan")},
                {"pair_shape": "fitted"}):
        with pytest.raises(HandStreamError, match=next(iter(bad))):
            replace(cfg, **bad)
