"""Networks, losses, exemplar bank and checkpoints of featmap_ros.model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from featmap_ros.model import checkpoint as ckpt
from featmap_ros.model.checkpoint import CheckpointError
from featmap_ros.model.losses import feature_loss, mmd, pose_loss
from featmap_ros.model.nets import ExemplarBank, FeatureMappingModel, Mapping, NetConfig


def tiny(task: str, mapping: bool = False, size: int = 32) -> NetConfig:
    return NetConfig(task=task, input_size=size, width=4, feature_dim=32, dropout=0.0, mapping=mapping)


@pytest.mark.parametrize(("task", "channels", "outputs"), [("objects", 3, 16), ("hands", 1, 42)])
def test_task_defaults_follow_the_paper(task: str, channels: int, outputs: int) -> None:
    cfg = NetConfig(task=task)
    assert (cfg.in_channels, cfg.n_outputs, cfg.input_size, cfg.feature_dim) == (channels, outputs, 128, 1024)
    assert len(cfg.blocks) == (5 if task == "objects" else 4)


@pytest.mark.parametrize("task", ["objects", "hands"])
@pytest.mark.parametrize("size", [32, 64])
def test_every_path_gives_outputs_and_features_of_the_right_shape(task: str, size: int) -> None:
    cfg = tiny(task, mapping=True, size=size)
    model = FeatureMappingModel(cfg)
    x = torch.rand(3, cfg.in_channels, size, size) * 2 - 1
    for pred in (model.predict_real(x), model.predict_syn(x)):
        assert pred.outputs.shape == (3, cfg.n_outputs)
        assert pred.features.shape == (3, 32)
    assert model(x).shape == (3, cfg.n_outputs)


def test_baseline_models_have_no_mapping_and_use_f_S_for_real_images() -> None:
    model = FeatureMappingModel(tiny("objects")).eval()
    x = torch.rand(2, 3, 32, 32)
    assert model.f_R is None and model.g is None
    torch.testing.assert_close(model.features_real(x), model.features_syn(x))


def test_bad_net_configs_are_refused() -> None:
    with pytest.raises(ValueError, match="task"):
        NetConfig(task="cars")
    with pytest.raises(ValueError, match="multiple of 32"):
        NetConfig(input_size=100)
    with pytest.raises(ValueError, match="stages"):
        NetConfig(task="hands", blocks=(1, 1))


def test_g_is_the_identity_at_initialisation() -> None:
    g = Mapping(16, n_blocks=2)
    x = torch.randn(5, 16)
    torch.testing.assert_close(g(x), x)


def test_g_is_identity_plus_residual_once_trained() -> None:
    g = Mapping(16, n_blocks=1)
    block = g.blocks[0]
    with torch.no_grad():
        block.fc2.weight.normal_()
        block.fc2.bias.normal_()
    x = torch.randn(5, 16)
    assert not torch.allclose(g(x), x)
    torch.testing.assert_close(g(x) - x, block.residual(x))


def test_mapping_starts_as_identity_so_f_R_from_f_S_reproduces_synthetic_predictions() -> None:
    model = FeatureMappingModel(tiny("hands", mapping=True)).eval()
    model.init_real_from_syn()
    x = torch.rand(2, 1, 32, 32)
    torch.testing.assert_close(model.predict_real(x).outputs, model.predict_syn(x).outputs)


@pytest.mark.parametrize("kind", ["mse", "smooth_l1"])
def test_pose_loss_is_zero_for_equal_inputs_and_positive_otherwise(kind: str) -> None:
    a = torch.randn(4, 16)
    assert pose_loss(a, a.clone(), kind).item() == 0.0
    assert pose_loss(a, a + 0.1, kind).item() > 0.0
    with pytest.raises(ValueError, match="pose loss"):
        pose_loss(a, a, "l3")
    with pytest.raises(ValueError, match="target"):
        pose_loss(a, a[:, :8])


def test_feature_loss_is_zero_for_equal_inputs_and_the_mean_squared_difference_otherwise() -> None:
    a = torch.randn(4, 8)
    assert feature_loss(a, a.clone()).item() == 0.0
    assert feature_loss(a, a + 2.0).item() == pytest.approx(4.0)


def test_mmd_is_near_zero_for_one_distribution_and_larger_for_a_shifted_one() -> None:
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(128, 16, generator=gen), torch.randn(128, 16, generator=gen)
    shifted = torch.randn(128, 16, generator=gen) + 1.0
    same, apart = mmd(x, y).item(), mmd(x, shifted).item()
    assert mmd(x, x).item() == pytest.approx(0.0, abs=1e-6)
    assert same < 0.05
    assert apart > 5 * same


def test_mmd_gives_gradients_to_both_samples() -> None:
    x = torch.randn(16, 4, requires_grad=True)
    y = (torch.randn(16, 4) + 1).requires_grad_(True)
    mmd(x, y).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0 and y.grad is not None


def test_exemplar_bank_returns_the_target_of_the_nearest_exemplar() -> None:
    feats = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    targets = torch.tensor([[1.0], [2.0], [3.0]])
    bank = ExemplarBank(feats, targets)
    query = torch.tensor([[9.0, 1.0], [0.5, 8.0], [0.1, 0.1]])
    torch.testing.assert_close(bank.predict(query, chunk=2), torch.tensor([[2.0], [3.0], [1.0]]))
    torch.testing.assert_close(bank.predict(query[:1], k=2), torch.tensor([[1.5]]))


# ---- checkpoints


def saved(tmp_path: Path, task: str = "objects", mapping: bool = True) -> tuple[FeatureMappingModel, Path]:
    torch.manual_seed(0)
    model = FeatureMappingModel(tiny(task, mapping=mapping))
    path = ckpt.save(tmp_path / "ckpt", model, {"method": "fm", "step": 7, "labels": ["ape"]})
    return model, path


def test_checkpoint_round_trip_rebuilds_the_model_from_the_json_alone(tmp_path: Path) -> None:
    model, path = saved(tmp_path)
    assert path == tmp_path / "ckpt.json" and (tmp_path / "ckpt.safetensors").is_file()
    loaded, meta = ckpt.load(tmp_path / "ckpt", expect_task="objects")
    assert meta["format"] == ckpt.FORMAT and meta["step"] == 7 and meta["labels"] == ["ape"]
    assert meta["net"]["width"] == 4 and len(meta["weights"]["sha256"]) == 64 and meta["code_version"]
    assert loaded.cfg == model.cfg and not loaded.training
    x = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(loaded(x), model.eval()(x))
    for alias in (path, tmp_path / "ckpt.safetensors"):
        ckpt.load(alias)
    # No temporary files are left behind by the atomic writes.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.json", "ckpt.safetensors"]


def test_a_directory_means_its_model_checkpoint(tmp_path: Path) -> None:
    model = FeatureMappingModel(tiny("hands"))
    assert ckpt.save(tmp_path, model, {}) == tmp_path / "model.json"
    assert ckpt.load(tmp_path)[0].cfg.task == "hands"


def test_reserved_meta_keys_are_refused(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="reserved"):
        ckpt.save(tmp_path / "x", FeatureMappingModel(tiny("hands")), {"task": "objects"})


def test_a_missing_checkpoint_is_refused(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="missing"):
        ckpt.load(tmp_path / "nothing")
    saved(tmp_path)
    (tmp_path / "ckpt.safetensors").unlink()
    with pytest.raises(CheckpointError, match="missing"):
        ckpt.load(tmp_path / "ckpt")


def test_a_tampered_weights_file_is_refused(tmp_path: Path) -> None:
    saved(tmp_path)
    weights = tmp_path / "ckpt.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0x01
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256"):
        ckpt.load(tmp_path / "ckpt")


def test_a_foreign_json_is_refused(tmp_path: Path) -> None:
    (tmp_path / "other.json").write_text(json.dumps({"task": "objects", "net": {}}))
    with pytest.raises(CheckpointError, match="format"):
        ckpt.load(tmp_path / "other.json")
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="JSON"):
        ckpt.load(tmp_path / "broken")


def test_a_checkpoint_of_another_task_is_refused(tmp_path: Path) -> None:
    saved(tmp_path, task="hands")
    with pytest.raises(CheckpointError, match="expected 'objects'"):
        ckpt.load(tmp_path / "ckpt", expect_task="objects")


def test_weights_of_another_task_behind_our_json_are_refused(tmp_path: Path) -> None:
    saved(tmp_path, task="objects")
    ckpt.save(tmp_path / "hand", FeatureMappingModel(tiny("hands")), {})
    (tmp_path / "hand.safetensors").replace(tmp_path / "ckpt.safetensors")
    with pytest.raises(CheckpointError, match="sha256"):
        ckpt.load(tmp_path / "ckpt")
    # Even with the hash made to match, the tensors do not fit the objects model.
    doc = json.loads((tmp_path / "ckpt.json").read_text())
    doc["weights"]["sha256"] = ckpt._sha256((tmp_path / "ckpt.safetensors").read_bytes())
    (tmp_path / "ckpt.json").write_text(json.dumps(doc))
    with pytest.raises(CheckpointError, match="shape|fit"):
        ckpt.load(tmp_path / "ckpt")


def test_unparseable_safetensors_and_missing_keys_are_refused(tmp_path: Path) -> None:
    saved(tmp_path, mapping=True)
    doc = json.loads((tmp_path / "ckpt.json").read_text())
    garbage = b"\xff" * 64
    (tmp_path / "ckpt.safetensors").write_bytes(garbage)
    doc["weights"]["sha256"] = ckpt._sha256(garbage)
    (tmp_path / "ckpt.json").write_text(json.dumps(doc))
    with pytest.raises(CheckpointError, match="safetensors"):
        ckpt.load(tmp_path / "ckpt")
    # A JSON that claims a mapping over weights saved without one: missing f_R/g keys.
    saved(tmp_path, mapping=False)
    doc = json.loads((tmp_path / "ckpt.json").read_text())
    doc["net"]["mapping"] = True
    (tmp_path / "ckpt.json").write_text(json.dumps(doc))
    with pytest.raises(CheckpointError, match="missing"):
        ckpt.load(tmp_path / "ckpt")


def test_optimiser_state_round_trips_without_pickle(tmp_path: Path) -> None:
    model = FeatureMappingModel(tiny("objects"))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.8, 0.9))
    model(torch.rand(2, 3, 32, 32)).sum().backward()
    opt.step()
    ckpt.save(tmp_path / "c", model, {}, optimizer=opt)
    fresh = torch.optim.AdamW(model.parameters(), lr=5.0)
    ckpt.load_optimizer(tmp_path / "c", fresh)
    a, b = opt.state_dict(), fresh.state_dict()
    assert a["param_groups"] == b["param_groups"]
    for idx, entry in a["state"].items():
        for key, value in entry.items():
            torch.testing.assert_close(b["state"][idx][key], value)


def test_exemplar_banks_round_trip_and_refuse_another_task(tmp_path: Path) -> None:
    feats, targets = torch.randn(10, 8), torch.randn(10, 16)
    path = ckpt.save_exemplars(tmp_path / "model", feats, targets, "objects", {"n": 10})
    assert path.name == "model.exemplars.safetensors"
    f2, t2, meta = ckpt.load_exemplars(tmp_path / "model", expect_task="objects")
    torch.testing.assert_close(f2, feats)
    torch.testing.assert_close(t2, targets)
    assert meta == {"n": 10}
    with pytest.raises(CheckpointError, match="expected 'hands'"):
        ckpt.load_exemplars(tmp_path / "model", expect_task="hands")
    # The model weights are safetensors too, but not an exemplar bank.
    ckpt.save(tmp_path / "w", FeatureMappingModel(tiny("objects")), {})
    (tmp_path / "w.safetensors").replace(tmp_path / "w.exemplars.safetensors")
    with pytest.raises(CheckpointError, match="not a featmap_ros exemplar bank"):
        ckpt.load_exemplars(tmp_path / "w")


@pytest.mark.parametrize("head", ["bb8", "dense", "vote", "fc"])
def test_under_bf16_autocast_the_extractor_runs_in_bf16_and_the_heads_in_float32(head: str) -> None:
    task = "hands" if head in ("vote", "fc") else "objects"
    model = FeatureMappingModel(NetConfig(task=task, input_size=32, width=4, feature_dim=16, head=head,
                                          dropout=0.0, mapping=True))
    x = torch.randn(2, model.cfg.in_channels, 32, 32)
    reference = model.predict_real(x).outputs
    with torch.autocast("cpu", dtype=torch.bfloat16):
        pred = model.predict_real(x)
    assert pred.features.dtype == torch.bfloat16 and pred.outputs.dtype == torch.float32
    # bf16 features (8 bits of mantissa), float32 head: close to the float32 run, not equal.
    torch.testing.assert_close(pred.outputs, reference, atol=0.05, rtol=0.05)



def test_the_torch_backend_runs_bf16_only_when_asked_and_only_where_it_is_native(monkeypatch) -> None:
    from featmap_ros.backends import BackendError, torch_net

    model = FeatureMappingModel(NetConfig(task="hands", input_size=32, width=4, feature_dim=8, head="vote",
                                          mapping=True, shared_extractor=True, dropout=0.0))
    meta = {"feature_stats": {"mean": [0.1] * 8, "std": [0.5] * 8}}
    cpu, x = torch.device("cpu"), np.random.default_rng(0).uniform(-1, 1, (4, 1, 32, 32)).astype(np.float32)
    monkeypatch.setattr(torch_net, "bf16_native", lambda device, cpu_flags=None: True)  # the bf16 path on any CPU
    auto, fp32, bf16 = (torch_net.TorchNetwork(model, meta, cpu, precision=p) for p in ("auto", "float32", "bf16"))
    assert not auto.bf16 and not auto.half and not fp32.bf16 and bf16.bf16
    (out_a, ood_a), (out_f, ood_f), (out_b, ood_b) = auto.run(x), fp32.run(x), bf16.run(x)
    np.testing.assert_array_equal(out_a, out_f)  # auto is float32 on a CPU
    np.testing.assert_array_equal(ood_a, ood_f)
    assert out_b.dtype == np.float64 and np.isfinite(out_b).all() and np.isfinite(ood_b).all()
    # bf16 features (8 bits of mantissa) into the float32 head: close, not equal.
    assert 0 < np.abs(out_b - out_f).max() < 0.05 and np.abs(ood_b - ood_f).max() < 0.05 * ood_f.max()
    monkeypatch.setattr(torch_net, "bf16_native", lambda device, cpu_flags=None: False)
    with pytest.raises(BackendError, match="natively"):
        torch_net.TorchNetwork(model, meta, cpu, precision="bf16")
    with pytest.raises(BackendError, match="precision"):
        torch_net.TorchNetwork(model, meta, cpu, precision="fp16")


@pytest.mark.parametrize(("n_objects", "bins"), [(2, 4), (1, 0)])  # (1, 0): the main job's kind of model
def test_the_torch_backend_on_a_cpu_runs_channels_last_with_the_models_own_outputs(n_objects: int, bins: int) -> None:
    from featmap_ros.backends import torch_net
    from featmap_ros.model.nets import DENSE_CHANNELS

    torch.manual_seed(0)
    model = FeatureMappingModel(NetConfig(task="objects", input_size=32, width=4, feature_dim=8, head="dense",
                                          n_outputs=n_objects * DENSE_CHANNELS, coord_bins=bins, mapping=True,
                                          dropout=0.0))
    x = np.random.default_rng(0).uniform(-1, 1, (3, 3, 32, 32)).astype(np.float32)
    objects = np.array([0, 1, 1]) % n_objects
    with torch.no_grad():  # the model as it is, in the default (NCHW) format
        reference = model.eval().predict_real(torch.from_numpy(x), torch.from_numpy(objects), n_objects).outputs
    reference = reference.numpy()
    net = torch_net.TorchNetwork(model, {"objects": [{}] * n_objects}, torch.device("cpu"))
    conv = next(m for m in net.model.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3))
    assert net.memory_format == torch.channels_last and conv.weight.is_contiguous(memory_format=torch.channels_last)
    out, _ = net.run(x, objects)
    assert out.shape == reference.shape and out.flags.c_contiguous  # numpy's own row-major layout for callers
    np.testing.assert_allclose(out, reference, rtol=1e-4, atol=1e-5)


def test_group_norm_runs_bf16_channels_last_maps_in_nchw_and_float32_ones_as_they_are(monkeypatch) -> None:
    from featmap_ros.model import nets

    torch.manual_seed(0)
    norm = nets.GroupNorm(2, 8)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-1, 1)
    plain = torch.nn.GroupNorm(2, 8)
    plain.load_state_dict(norm.state_dict())  # the same parameters, under the same names
    seen: list[tuple[torch.dtype, bool]] = []
    group_norm = torch.nn.functional.group_norm

    def spy(x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        seen.append((x.dtype, x.is_contiguous()))
        return group_norm(x, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "group_norm", spy)
    x = (3 * torch.randn(4, 8, 16, 16) + 1).contiguous(memory_format=torch.channels_last)
    for dtype in (torch.bfloat16, torch.float32):
        a = x.to(dtype).detach().clone(memory_format=torch.channels_last).requires_grad_()
        b = x.to(dtype).detach().contiguous().requires_grad_()
        grad = torch.randn(4, 8, 16, 16).to(dtype)
        out = norm(a)
        ref = plain(b)
        out.backward(grad.contiguous(memory_format=torch.channels_last))
        ref.backward(grad)
        assert out.dtype == dtype and out.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(out, ref, rtol=0, atol=0 if dtype == torch.bfloat16 else 1e-5)
        torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=0 if dtype == torch.bfloat16 else 1e-5)
    # bf16: the NCHW kernel, as the reference's; float32: channels_last, as the convolutions' output came
    assert seen == [(torch.bfloat16, True), (torch.bfloat16, True), (torch.float32, False), (torch.float32, True)]
    model = FeatureMappingModel(NetConfig(task="hands", input_size=32, width=4, feature_dim=8))
    kinds = {type(m) for m in model.modules() if isinstance(m, torch.nn.GroupNorm)}
    assert kinds == {nets.GroupNorm}
