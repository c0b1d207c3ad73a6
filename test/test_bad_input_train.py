"""Hostile input to training, checkpoints, node parameters and the CLI: a clear error naming the value, never a crash.

Issue 14, items 1-2 (resume), 7 (checkpoint metadata), 8 (config values), 9 (a 0 + 0 step run),
14 (one error root, one line from the CLI) and 15 (checkpoint file modes).
"""

from __future__ import annotations

import json
import math
import os
import stat
from pathlib import Path
from typing import Any

import pytest
import torch
from test_train import fake_data, tiny_config

from featmap_ros.cli import main
from featmap_ros.errors import FeatmapError
from featmap_ros.model import checkpoint as ckpt
from featmap_ros.model.checkpoint import CheckpointError
from featmap_ros.model.nets import FeatureMappingModel, NetConfig
from featmap_ros.ros.config import NodeConfig, ProcessorError
from featmap_ros.train import TrainConfig, TrainError, load_config, train

# ---- item 8: training config values


BAD_CONFIGS = [
    ("optim:\n  lr: -0.001\n", "optim.lr = -0.001 is outside"),
    ("optim:\n  lr: .nan\n", "optim.lr = nan must be a finite number"),
    ("optim:\n  lr: .inf\n", "optim.lr = inf must be a finite number"),
    ("optim:\n  min_lr_ratio: -0.1\n", "optim.min_lr_ratio = -0.1 is outside"),
    ("optim:\n  min_lr_ratio: 1.5\n", "optim.min_lr_ratio = 1.5 is outside"),
    ("optim:\n  beta1: 1.0\n", r"optim.beta1 = 1.0 is outside \[0.0, 1.0\)"),
    ("optim:\n  beta2: -0.5\n", "optim.beta2 = -0.5 is outside"),
    ("optim:\n  warmup_steps: -1\n", "optim.warmup_steps = -1 is outside"),
    ("optim:\n  eps: 0.0\n", "optim.eps = 0.0 is outside"),
    ("optim:\n  weight_decay: -1.0\n", "optim.weight_decay = -1.0 is outside"),
    ("optim:\n  grad_clip: .nan\n", "optim.grad_clip = nan must be a finite number"),
    ("loss:\n  lambda_feat: -1.0\n", "loss.lambda_feat = -1.0 is outside"),
    ("loss:\n  lambda_syn: -0.1\n", "loss.lambda_syn = -0.1 is outside"),
    ("loss:\n  lambda_mmd: .nan\n", "loss.lambda_mmd = nan must be a finite number"),
    ("loss:\n  smooth_l1_beta: -.inf\n", "loss.smooth_l1_beta = -inf must be a finite number"),
    ("net:\n  dropout: .nan\n", "dropout"),
    ("device: tpu\n", "device 'tpu' is unknown; expected auto, cpu, cuda or cuda:N"),
    ("device: 'cuda:x'\n", "device 'cuda:x' is unknown"),
    ("net: [1, 2]\n", r"net: expected a mapping of NetConfig fields, got \[1, 2\]"),
    ("stage1_steps: 0\nstage2_steps: 0\n", "stage1_steps \\+ stage2_steps is 0: there is nothing to train"),
]


@pytest.mark.parametrize(("yaml_text", "message"), BAD_CONFIGS, ids=[c[0].split(":")[0] + "/" + c[1][:24]
                                                                      for c in BAD_CONFIGS])
@pytest.mark.parametrize("task", [None, "objects"])
def test_a_bad_config_value_is_a_train_error_naming_the_key(
    tmp_path: Path, yaml_text: str, message: str, task: str | None
) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(yaml_text)
    with pytest.raises(TrainError, match=message) as err:
        load_config(path, task=task)
    assert str(path) in str(err.value)  # and the file it came from
    assert isinstance(err.value, FeatmapError) and isinstance(err.value, RuntimeError)


def test_good_edge_values_and_every_device_form_are_accepted() -> None:
    for device in ("auto", "cpu", "cuda", "cuda:1"):
        assert TrainConfig(device=device).device == device
    cfg = load_config(None)
    edge = {"lr": 0.0, "min_lr_ratio": 1.0, "beta1": 0.0, "warmup_steps": 0}
    import dataclasses

    assert dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, **edge)).optim.lr == 0.0


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error where torch sees no CUDA device")
def test_cuda_without_a_gpu_is_refused_not_run_on_the_cpu(tmp_path: Path) -> None:
    with pytest.raises(TrainError, match="'cuda:0' asked for, but torch sees no CUDA device"):
        train(tiny_config(device="cuda:0"), fake_data(), tmp_path)  # type: ignore[arg-type]
    assert not (tmp_path / "model.json").exists()


# ---- item 9: nothing to train


def test_a_0_plus_0_step_run_is_refused_and_writes_no_checkpoint(tmp_path: Path, capsys: Any) -> None:
    with pytest.raises(TrainError, match="nothing to train"):
        tiny_config(stage1_steps=0, stage2_steps=0)
    (tmp_path / "zero.yaml").write_text("stage1_steps: 0\nstage2_steps: 0\n")
    assert main(["train", "hands", "--config", str(tmp_path / "zero.yaml"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr()
    assert "checkpoint:" not in err.out and "nothing to train" in err.err
    assert not (tmp_path / "out" / "model.json").exists()


# ---- item 2: history.jsonl


@pytest.mark.parametrize("partial", ['{"step": 5, "sta', '{"step"', "{", '{"stage": "syn"}', "[1, 2]"])
def test_a_partial_last_history_line_does_not_break_resume(tmp_path: Path, partial: str) -> None:
    train(tiny_config(method="fm", max_steps=4), fake_data(), tmp_path)  # type: ignore[arg-type]
    with open(tmp_path / "history.jsonl", "a") as f:
        f.write(partial)  # a kill in the middle of writing the next line
    final = train(tiny_config(method="fm"), fake_data(), tmp_path)  # type: ignore[arg-type]
    assert json.loads(final.read_text())["step"] == 6
    steps = [json.loads(line)["step"] for line in (tmp_path / "history.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_a_broken_line_inside_the_history_is_named(tmp_path: Path) -> None:
    train(tiny_config(method="fm", max_steps=4), fake_data(), tmp_path)  # type: ignore[arg-type]
    lines = (tmp_path / "history.jsonl").read_text().splitlines()
    lines[1] = "not json"
    (tmp_path / "history.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(TrainError, match=r"history.jsonl:2 is not a history record"):
        train(tiny_config(method="fm"), fake_data(), tmp_path)  # type: ignore[arg-type]


# ---- item 7: checkpoint metadata, validated once at load

CORNERS = [[x, y, z] for x in (-0.04, 0.04) for y in (-0.05, 0.05) for z in (-0.03, 0.03)]


def object_checkpoint(tmp_path: Path, n_objects: int = 1) -> Path:
    model = FeatureMappingModel(NetConfig(task="objects", input_size=32, width=4, feature_dim=32,
                                          n_outputs=16 * n_objects))
    objects = [{"obj_id": i + 1, "name": f"o{i + 1}", "corners_m": CORNERS, "extent_m": [0.08, 0.1, 0.06],
                "symmetric": False} for i in range(n_objects)]
    meta = {"method": "fm", "objects": objects, "crop": {"size": 32, "window_scale": 1.2},
            "feature_stats": {"mean": [0.0] * 32, "std": [1.0] * 32, "n": 8}}
    return ckpt.save(tmp_path / "obj", model, meta)


def hand_checkpoint(tmp_path: Path) -> Path:
    model = FeatureMappingModel(NetConfig(task="hands", input_size=32, width=4, feature_dim=32))
    meta = {"hands": {"joint_names": [f"j{i}" for i in range(14)], "cube_m": 0.3}, "crop": {"size": 32}}
    return ckpt.save(tmp_path / "hand", model, meta)


def edited(path: Path, edit: Any) -> Path:
    doc = json.loads(path.read_text())
    edit(doc)
    path.write_text(json.dumps(doc))
    return path


def _del(*keys: Any) -> Any:
    def edit(doc: dict) -> None:
        for k in keys[:-1]:
            doc = doc[k]
        del doc[keys[-1]]

    return edit


def _set(value: Any, *keys: Any) -> Any:
    def edit(doc: dict) -> None:
        for k in keys[:-1]:
            doc = doc[k]
        doc[keys[-1]] = value

    return edit


BAD_OBJECT_META = [
    ("no objects", _del("objects"), "key 'objects' is missing"),
    ("no crop", _del("crop"), "key 'crop' is missing"),
    ("no task", _del("task"), "key 'task' is None"),
    ("task of a car", _set("cars", "task"), "key 'task' is 'cars'"),
    ("no net", _del("net"), "key 'net' must be a mapping"),
    ("no corners_m", _del("objects", 0, "corners_m"), r"objects\[0\]: key 'corners_m' is missing"),
    ("no extent_m", _del("objects", 0, "extent_m"), r"objects\[0\]: key 'extent_m' is missing"),
    ("7 corners", _set(CORNERS[:7], "objects", 0, "corners_m"), r"objects\[0\].corners_m must have shape \(8, 3\)"),
    ("8x2 corners", _set([c[:2] for c in CORNERS], "objects", 0, "corners_m"), r"corners_m must have shape \(8, 3\)"),
    ("nan corner", _set([[math.nan, 0, 0]] + CORNERS[1:], "objects", 0, "corners_m"), "corners_m holds non-finite"),
    ("text corners", _set("box", "objects", 0, "corners_m"), "corners_m must be a"),
    ("objects not a list", _set({"1": "ape"}, "objects"), "key 'objects' must be a non-empty list"),
    ("no objects at all", _set([], "objects"), "key 'objects' must be a non-empty list"),
    ("bool obj_id", _set(True, "objects", 0, "obj_id"), r"objects\[0\].obj_id must be an integer"),
    ("empty name", _set("", "objects", 0, "name"), r"objects\[0\].name must be a non-empty string"),
    ("symmetric text", _set("yes", "objects", 0, "symmetric"), r"objects\[0\].symmetric must be true or false"),
    ("crop size 48", _set(48, "crop", "size"), "crop.size is 48 but the net takes 32 px inputs"),
    ("crop size text", _set("32", "crop", "size"), "crop.size must be a positive int"),
    ("crop not a mapping", _set(32, "crop"), "key 'crop' must be a mapping"),
    ("window_scale 0", _set(0, "crop", "window_scale"), "crop.window_scale must be a positive float"),
    ("stats of 5", _set({"mean": [0.0] * 5, "std": [1.0] * 5}, "feature_stats"),
     r"feature_stats.mean has 5 values, expected 32 \(net feature_dim\)"),
    ("stats std of 5", _set([1.0] * 5, "feature_stats", "std"), "feature_stats.mean has shape"),
    ("negative std", _set([-1.0] * 32, "feature_stats", "std"), "feature_stats.std holds negative values"),
    ("stats not a mapping", _set([0.0] * 32, "feature_stats"), "key 'feature_stats' must be a mapping"),
    ("stats dim disagrees", _set(16, "feature_stats", "dim"), r"has 32 values, expected 16 \(feature_stats.dim\)"),
    ("head of another net", _set("dense", "head"), "key 'head' is 'dense' but the net's head is 'bb8'"),
    ("head not a name", _set(3, "head"), "key 'head' must name the pose head"),
]


@pytest.mark.parametrize(("edit", "message"), [c[1:] for c in BAD_OBJECT_META], ids=[c[0] for c in BAD_OBJECT_META])
def test_bad_object_checkpoint_metadata_fails_at_load_naming_the_key(tmp_path: Path, edit: Any, message: str) -> None:
    path = edited(object_checkpoint(tmp_path), edit)
    with pytest.raises(CheckpointError, match=message) as err:
        ckpt.load(path)
    assert isinstance(err.value, FeatmapError) and isinstance(err.value, RuntimeError)


def test_a_bb8_head_must_have_16_outputs_per_object(tmp_path: Path) -> None:
    path = object_checkpoint(tmp_path)
    two = json.loads(path.read_text())["objects"] * 2
    two[1] = {**two[1], "obj_id": 2}
    with pytest.raises(CheckpointError, match="the bb8 head has 16 outputs for 2 objects; expected 16 each"):
        ckpt.load(edited(path, _set(two, "objects")))
    twice = [two[0], two[0]]
    with pytest.raises(CheckpointError, match=r"objects\[1\].obj_id must be an integer not given before"):
        ckpt.load(edited(path, _set(twice, "objects")))


def test_metadata_it_does_not_know_and_per_channel_stats_of_their_own_size_load(tmp_path: Path) -> None:
    path = object_checkpoint(tmp_path)
    edited(path, _set({"future": [1, 2]}, "extra_key"))
    edited(path, _set({"mean": [0.0] * 8, "std": [1.0] * 8, "dim": 8}, "feature_stats"))
    edited(path, _set("bb8", "head"))
    _, meta = ckpt.load(path)
    assert meta["extra_key"] == {"future": [1, 2]} and meta["feature_stats"]["dim"] == 8
    edited(path, _set({"mean": [[0.0] * 4] * 2, "std": [[1.0] * 4] * 2}, "feature_stats"))  # not 1-D: no length rule
    ckpt.load(path)


BAD_HAND_META = [
    ("no hands", _del("hands"), "key 'hands' is missing"),
    ("no crop", _del("crop"), "key 'crop' is missing"),
    ("no joint names", _del("hands", "joint_names"), "hands.joint_names must be a non-empty list"),
    ("13 joints", _set([f"j{i}" for i in range(13)], "hands", "joint_names"), "42 outputs for 13 joints"),
    ("a joint twice", _set(["j0"] * 14, "hands", "joint_names"), "hands.joint_names names a joint twice"),
    ("negative cube", _set(-0.3, "hands", "cube_m"), "hands.cube_m must be a positive float, got -0.3"),
    ("nan cube", _set(math.nan, "hands", "cube_m"), "hands.cube_m must be a positive float, got nan"),
    ("crop size 64", _set(64, "crop", "size"), "crop.size is 64 but the net takes 32 px inputs"),
]


@pytest.mark.parametrize(("edit", "message"), [c[1:] for c in BAD_HAND_META], ids=[c[0] for c in BAD_HAND_META])
def test_bad_hand_checkpoint_metadata_fails_at_load_naming_the_key(tmp_path: Path, edit: Any, message: str) -> None:
    with pytest.raises(CheckpointError, match=message):
        ckpt.load(edited(hand_checkpoint(tmp_path), edit))


def test_a_training_checkpoint_without_estimator_metadata_loads_unless_it_is_required(tmp_path: Path) -> None:
    path = ckpt.save(tmp_path / "t", FeatureMappingModel(NetConfig(task="hands", input_size=32, width=4,
                                                                   feature_dim=32)), {"step": 3})
    assert ckpt.load(path)[1]["step"] == 3
    with pytest.raises(CheckpointError, match="key 'hands' is missing"):
        ckpt.load(path, require_estimator_meta=True)


# ---- item 15: file modes


def test_checkpoint_files_get_the_umask_mode_not_0600(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        model = FeatureMappingModel(NetConfig(task="hands", input_size=32, width=4, feature_dim=32))
        opt = torch.optim.AdamW(model.parameters())
        ckpt.save(tmp_path / "m", model, {}, opt, keep_previous=True)
        ckpt.save(tmp_path / "m", model, {}, opt, keep_previous=True)  # and the previous generation
        ckpt.save_exemplars(tmp_path / "m", torch.zeros(2, 3), torch.zeros(2, 4), "hands", {})
    finally:
        os.umask(old)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["m.exemplars.safetensors", "m.json", "m.optim.safetensors", "m.prev.json",
                     "m.prev.optim.safetensors", "m.prev.safetensors", "m.safetensors"]
    for p in tmp_path.iterdir():
        assert stat.S_IMODE(p.stat().st_mode) == 0o644, p.name


# ---- item 8: node parameters

BAD_NODE_PARAMS = [
    ("max_age_s", math.inf, "max_age_s = inf must be a finite number"),
    ("max_age_s", math.nan, "max_age_s = nan must be a finite number"),
    ("max_age_s", -1.0, r"max_age_s -1.0 must be in \[0, 1e\+06\] seconds"),
    ("max_age_s", 1e7, r"max_age_s 10000000.0 must be in \[0, 1e\+06\] seconds"),
    ("marker_lifetime_s", math.inf, "marker_lifetime_s = inf must be a finite number"),
    ("marker_lifetime_s", 1e300, r"marker_lifetime_s 1e\+300 must be in \[0, 1e\+06\] seconds"),
    ("marker_lifetime_s", -0.5, "marker_lifetime_s -0.5 must be in"),
    ("sync_slop_s", math.inf, "sync_slop_s = inf must be a finite number"),
    ("sync_slop_s", -math.inf, "sync_slop_s = -inf must be a finite number"),
    ("sync_slop_s", 0.0, r"sync_slop_s 0.0 must be in \(0, 1e\+06\] seconds"),
    ("sync_slop_s", 2e6, "sync_slop_s 2000000.0 must be in"),
    ("min_score", math.nan, "min_score = nan must be a finite number"),
    ("min_score", 1.5, r"min_score 1.5 is outside \[0, 1\]"),
]


@pytest.mark.parametrize(("name", "value", "message"), BAD_NODE_PARAMS)
def test_a_bad_node_parameter_is_refused_at_start_up_naming_it(name: str, value: float, message: str) -> None:
    with pytest.raises(ProcessorError, match=message) as err:
        NodeConfig(**{name: value})
    assert err.value.kind == "config" and isinstance(err.value, FeatmapError)
    with pytest.raises(ProcessorError, match=message):
        NodeConfig.from_params({name: value}, source="launch")


def test_every_double_node_parameter_refuses_inf() -> None:
    from featmap_ros.ros.config import parameter_specs

    doubles = [s.name for s in parameter_specs() if s.ros_type == "double"]
    assert {"max_age_s", "marker_lifetime_s", "sync_slop_s", "min_score"} <= set(doubles)
    for name in doubles:
        with pytest.raises(ProcessorError, match=f"{name} = inf must be a finite number"):
            NodeConfig(**{name: math.inf})


# ---- item 14: one error root; the CLI prints one line and exits 2


def test_every_project_error_derives_from_featmap_error_and_keeps_its_old_base() -> None:
    import importlib
    import re

    root = Path(__file__).resolve().parents[1] / "featmap_ros"
    found = []
    for path in root.rglob("*.py"):
        for name in re.findall(r"^class (\w+Error)\(", path.read_text(), flags=re.M):
            module = ".".join(path.relative_to(root.parent).with_suffix("").parts)
            if module.endswith("ros.node"):
                continue  # imports rclpy; its errors are the node's own edge
            try:
                cls = getattr(importlib.import_module(module), name)
            except ImportError as err:  # an optional dependency (e.g. EGL) missing here
                pytest.skip(f"{module}: {err}")
            found.append(cls)
            if cls is not FeatmapError:
                assert issubclass(cls, FeatmapError), f"{module}.{name} does not derive from FeatmapError"
                assert issubclass(cls, (ValueError, RuntimeError)), f"{module}.{name} lost its old base"
    assert len(found) >= 15


def test_the_cli_prints_one_line_and_exits_2_on_a_project_error(tmp_path: Path, capsys: Any) -> None:
    (tmp_path / "bad.yaml").write_text("optim:\n  lr: -1.0\n")
    args = ["train", "hands", "--config", str(tmp_path / "bad.yaml"), "--out", str(tmp_path / "out")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("featmap: error: ") and "optim.lr = -1.0" in err
    assert "Traceback" not in err


def test_the_cli_with_debug_raises_for_the_traceback(tmp_path: Path) -> None:
    (tmp_path / "bad.yaml").write_text("optim:\n  lr: -1.0\n")
    with pytest.raises(TrainError, match="optim.lr"):
        main(["--debug", "train", "hands", "--config", str(tmp_path / "bad.yaml"), "--out", str(tmp_path / "o")])


def test_the_cli_names_a_missing_model_in_one_line(tmp_path: Path, capsys: Any) -> None:
    code = main(["bag", "eval", "--bag", str(tmp_path / "nothing"), "--model", str(tmp_path / "none.json"),
                 "--out", str(tmp_path / "e")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("featmap: error: ") and err.count("\n") == 1
