"""The hand vote head (spatial f, per-location votes) and the on-the-fly hand augmentation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from featmap_ros.datasets.hand_augment import (
    HandAugmentConfig,
    HandAugmentError,
    HandTransform,
    augment_hand_batch,
    augmented,
)
from featmap_ros.geometry import denormalise_uv
from featmap_ros.model.nets import FeatureMappingModel, NetConfig, VoteHead

torch.set_num_threads(1)


def vote_config(**kw) -> NetConfig:
    return NetConfig(task="hands", input_size=32, width=4, feature_dim=8, head="vote", **kw)


# --------------------------------------------------------------------------------------------
# Config


def test_hand_heads_and_the_legacy_name() -> None:
    assert NetConfig(task="hands").head == "fc"  # the field's old default "bb8" means the FC head for hands
    assert NetConfig(task="hands", head="bb8").head == "fc"
    cfg = vote_config()
    assert cfg.spatial and cfg.stride == 4 and cfg.n_outputs == 42
    assert NetConfig(task="objects", head="dense", feature_dim=32).stride == 2
    with pytest.raises(ValueError, match="hands head must be one of"):
        NetConfig(task="hands", head="dense")
    with pytest.raises(ValueError, match="objects head must be one of"):
        NetConfig(task="objects", head="vote")
    with pytest.raises(ValueError, match="stride"):
        NetConfig(task="objects", head="dense", feature_dim=32, stride=4)
    with pytest.raises(ValueError, match="stride"):
        vote_config(stride=3)
    with pytest.raises(ValueError, match="3 outputs per joint"):
        vote_config(n_outputs=40)


@pytest.mark.parametrize("stride", [2, 4])
def test_vote_model_shapes_and_identity_mapping(stride: int) -> None:
    torch.manual_seed(0)
    model = FeatureMappingModel(vote_config(stride=stride, mapping=True)).eval()
    x = torch.rand(3, 1, 32, 32) * 2 - 1
    feats = model.features_syn(x)
    assert feats.shape == (3, 8, 32 // stride, 32 // stride)
    model.init_real_from_syn()
    with torch.no_grad():
        assert torch.allclose(model.features_real(x), feats)  # g is the identity at initialisation
        out = model(x)
    assert out.shape == (3, 42) and torch.isfinite(out).all()


# --------------------------------------------------------------------------------------------
# The head


def test_vote_head_reads_the_peak_location_and_follows_a_shift() -> None:
    head = VoteHead(dim=2, n_outputs=6)  # 2 joints
    with torch.no_grad():
        head.weights.weight.zero_()
        head.weights.bias.zero_()
        head.weights.weight[0, 0] = 50.0  # joint 0 peaks where channel 0 is on
        head.weights.weight[1, 1] = 50.0
    h = w = 8
    feats = torch.zeros(1, 2, h, w)
    feats[0, 0, 2, 5] = 1.0  # row 2, column 5
    feats[0, 1, 6, 1] = 1.0
    grid = VoteHead.grid(h, w, torch.device("cpu"), torch.float32)
    joints = head(feats).reshape(2, 3)
    assert joints[0].tolist() == pytest.approx([grid[0, 2 * w + 5].item(), grid[1, 2 * w + 5].item(), 0.0], abs=1e-4)
    assert joints[1].tolist() == pytest.approx([(2 * 1 + 1) / w - 1, (2 * 6 + 1) / h - 1, 0.0], abs=1e-4)
    # Translation equivariance: the map shifted by one location moves the joints by one location (2 / w).
    shifted = torch.roll(feats, shifts=(1, -1), dims=(2, 3))
    moved = head(shifted).reshape(2, 3)
    assert (moved - joints)[:, :2].flatten().tolist() == pytest.approx([-2 / w, 2 / h] * 2, abs=1e-4)


def test_vote_head_offsets_add_to_the_votes_and_train() -> None:
    torch.manual_seed(1)
    head = VoteHead(dim=4, n_outputs=3)
    with torch.no_grad():
        head.offsets.bias.copy_(torch.tensor([0.1, -0.2, 0.3]))
    feats = torch.rand(2, 4, 4, 4)
    w = torch.softmax(head.weights(feats).reshape(2, 1, 16), -1)
    grid = VoteHead.grid(4, 4, torch.device("cpu"), torch.float32)
    expected_xy = (w[:, 0, None, :] * grid[None]).sum(-1) + torch.tensor([0.1, -0.2])
    out = head(feats)
    assert torch.allclose(out[:, :2], expected_xy, atol=1e-5) and torch.allclose(out[:, 2], torch.tensor(0.3))
    target = torch.tensor([[0.5, -0.5, 0.2]]).expand(2, 3)
    opt = torch.optim.Adam(head.parameters(), lr=0.05)
    first = None
    for _ in range(100):
        loss = (head(feats) - target).pow(2).mean()
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.01 * first


# --------------------------------------------------------------------------------------------
# Augmentation


def dots(joints_norm: np.ndarray, size: int = 64, radius: int = 3) -> torch.Tensor:
    """A crop with a flat disc of depth z at each joint's (x, y): where the augmented joints must land."""
    img = np.ones((size, size), np.float32)
    yy, xx = np.mgrid[0:size, 0:size]
    for (u, v), z in zip(denormalise_uv(joints_norm[:, :2], size), joints_norm[:, 2], strict=True):
        img[(xx - u) ** 2 + (yy - v) ** 2 <= radius**2] = z
    return torch.from_numpy(img)[None, None]


def test_augmented_joints_land_on_the_augmented_image() -> None:
    rng = np.random.default_rng(0)
    joints = np.column_stack([rng.uniform(-0.5, 0.5, (5, 2)), rng.uniform(-0.4, 0.4, 5)]).astype(np.float32)
    batch = {"image": dots(joints).repeat(4, 1, 1, 1), "target": torch.from_numpy(joints.reshape(1, -1)).repeat(4, 1)}
    cfg = HandAugmentConfig(rotation_deg=90, shift_sigma=0.1, depth_sigma=0.1, scale=0.2)
    out = augment_hand_batch(batch, cfg, torch.Generator().manual_seed(3), ("image",), ("target",))
    assert not torch.equal(out["target"], batch["target"])
    for b in range(4):
        new = out["target"][b].reshape(-1, 3).numpy()
        img = out["image"][b, 0].numpy()
        for (u, v), z in zip(denormalise_uv(new[:, :2], 64), new[:, 2], strict=True):
            assert img[int(round(v)), int(round(u))] == pytest.approx(z, abs=1e-4)
    # The background stays the background and every value stays in the crop's range.
    assert (out["image"] == 1.0).float().mean() > 0.8 and out["image"].abs().max() <= 1.0
    assert batch["image"].shape == out["image"].shape


def test_known_transform_moves_joints_as_the_formula_says() -> None:
    tf = HandTransform(angle=torch.tensor([math.pi / 2]), shift=torch.tensor([[0.1, 0.0, -0.2]]),
                       scale=torch.tensor([2.0]))
    out = tf.joints(torch.tensor([[0.3, 0.1, 0.05]]))
    # R(90 deg) (0.3, 0.1) = (-0.1, 0.3); times 2, plus the shift.
    assert out[0].tolist() == pytest.approx([-0.2 + 0.1, 0.6, 0.1 - 0.2], abs=1e-6)


def test_pairs_move_together_and_identity_when_off() -> None:
    torch.manual_seed(0)
    batch = {"real": torch.rand(6, 1, 16, 16), "target": torch.rand(6, 42)}
    batch["syn"] = batch["real"].clone()
    cfg = HandAugmentConfig(rotation_deg=45, shift_sigma=0.05)
    out = augment_hand_batch(batch, cfg, torch.Generator().manual_seed(0), ("real", "syn"), ("target",))
    assert torch.equal(out["real"], out["syn"])  # one transform per sample for both images
    assert augment_hand_batch(batch, HandAugmentConfig(), torch.Generator(), ("real",), ("target",)) is batch
    none = augment_hand_batch(batch, HandAugmentConfig(rotation_deg=45, probability=0.0), torch.Generator(),
                              ("real",), ("target",))
    assert none is batch
    with pytest.raises(HandAugmentError, match="different batch sizes"):
        augment_hand_batch({"real": batch["real"], "target": batch["target"][:3]}, cfg, torch.Generator(),
                           ("real",), ("target",))


@pytest.mark.parametrize("bad", [dict(rotation_deg=-1.0), dict(scale=1.0), dict(shift_sigma=float("nan")),
                                 dict(probability=1.5), dict(depth_sigma=float("inf"))])
def test_bad_augment_config(bad: dict) -> None:
    with pytest.raises(HandAugmentError):
        HandAugmentConfig(**bad)


def test_augmented_stream_resumes_with_the_same_transforms() -> None:
    torch.manual_seed(0)
    fixed = [{"image": torch.rand(2, 1, 8, 8), "target": torch.rand(2, 3)} for _ in range(5)]
    cfg = HandAugmentConfig(rotation_deg=30, scale=0.1)
    full = list(augmented(iter(fixed), cfg, (1, 2), 0, ("image",), ("target",)))
    resumed = list(augmented(iter(fixed[3:]), cfg, (1, 2), 3, ("image",), ("target",)))
    for a, b in zip(full[3:], resumed, strict=True):
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["target"], b["target"])
    again = list(augmented(iter(fixed[:1] * 2), cfg, (1, 2), 0, ("image",), ("target",)))
    assert not torch.equal(again[0]["target"], again[1]["target"])  # each batch draws its own transforms
