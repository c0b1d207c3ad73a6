"""The `featmap` command end to end on tiny inputs (the same functions as the library; here the wiring)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from test_bag import hand_model, object_model

from featmap_ros.cli import build_parser, main


def test_every_command_has_help():
    out = subprocess.run([sys.executable, "-m", "featmap_ros.cli", "--help"], capture_output=True, text=True,
                         check=True).stdout
    for cmd in ("main", "render", "train", "evaluate", "experiment", "bag"):
        assert cmd in out
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "cars"])


def test_evaluate_objects_writes_the_report(lmo_root, tmp_path, capsys):
    model = object_model(tmp_path / "model", lmo_root)
    assert main(["evaluate", "objects", "--model", str(model), "--bop", str(lmo_root), "--scene", "2",
                 "--frames", "3,8", "--out", str(tmp_path / "eval"), "--overlays", "1", "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "2D proj@5px" in printed and "visib>=0.5" in printed
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert set(metrics["all"]["per_object"]) == {"1", "5"}
    assert (tmp_path / "eval" / "fm_lmo-test.csv").read_text().startswith("scene_id,im_id,obj_id,score,R,t,time")
    assert len(list((tmp_path / "eval").glob("overlay_*.png"))) == 1
    assert metrics["recrop"] == 0
    # --recrop reaches the estimator: this checkpoint records no silhouettes, so recrop is refused by name.
    assert main(["evaluate", "objects", "--model", str(model), "--bop", str(lmo_root), "--scene", "2",
                 "--frames", "3", "--out", str(tmp_path / "eval1"), "--recrop", "1", "--device", "cpu"]) == 2
    assert "silhouette_m" in capsys.readouterr().err


def test_bag_make_and_eval_for_hands(tmp_path, capsys):
    bag_dir = tmp_path / "bag"
    assert main(["bag", "make", "hands", "--n-frames", "3", "--out", str(bag_dir), "--storage", "sqlite3"]) == 0
    model = hand_model(tmp_path / "model")
    params = Path(__file__).resolve().parents[1] / "config" / "hands.yaml"
    assert main(["bag", "eval", "--bag", str(bag_dir), "--model", str(model), "--out", str(tmp_path / "eval"),
                 "--device", "cpu", "--config", str(params)]) == 0
    printed = capsys.readouterr().out
    assert "# Bag replay: hands" in printed and "annotated bag" in printed


def test_bag_eval_names_the_topics_it_found(lmo_root, tmp_path):
    bag_dir = tmp_path / "bag"
    main(["bag", "make", "objects", "--bop", str(lmo_root), "--frames", "3", "--out", str(bag_dir)])
    model = object_model(tmp_path / "model", lmo_root)
    with pytest.raises(Exception, match="topics found"):
        main(["--debug", "bag", "eval", "--bag", str(bag_dir), "--model", str(model), "--out", str(tmp_path / "e"),
              "--models", str(lmo_root / "models"), "--image-topic", "/nope"])


def test_train_objects_from_a_config_of_differences(tmp_path):
    from featmap_ros import assets
    from featmap_ros.model.checkpoint import read_meta

    root = assets.write_object_models(tmp_path / "toy")
    assets.write_real_scene(root, 4)
    tiny = tmp_path / "tiny.yaml"
    tiny.write_text("net: {input_size: 32, width: 4, feature_dim: 32}\nbatch_size: 4\nstage1_steps: 2\n"
                    "stage2_steps: 1\ncheckpoint_every: 10\ntensorboard: false\ndevice: cpu\n")
    assert main(["train", "objects", "--config", str(tiny), "--method", "fm", "--bop", str(root), "--scene", "1",
                 "--train-frames", "0-3", "--out", str(tmp_path / "obj")]) == 0
    meta = read_meta(tmp_path / "obj" / "model.json", expect_task="objects")
    assert [o["obj_id"] for o in meta["objects"]] == [assets.OBJ_ID]
    assert meta["step"] == 3 and meta["net"]["n_outputs"] == 16


def test_experiment_lmo_budget_file_of_differences(lmo_root, tmp_path, monkeypatch):
    from featmap_ros.experiments import lmo
    from featmap_ros.train import TrainError

    seen = {}
    monkeypatch.setattr(lmo, "run_lmo_experiment", lambda *a, **kw: seen.update(kw) or {})
    (tmp_path / "gpu.yaml").write_text("input_size: 128\nwidth: 64\nstage1_steps: 20000\n")
    assert main(["experiment", "lmo", "--bop", str(lmo_root), "--out", str(tmp_path / "x"),
                 "--budget", str(tmp_path / "gpu.yaml"), "--device", "cuda"]) == 0
    b = seen["budget"]
    assert (b.input_size, b.width, b.stage1_steps, b.stage2_steps) == (128, 64, 20000, lmo.LmoBudget().stage2_steps)
    assert seen["device"] == "cuda"
    (tmp_path / "bad.yaml").write_text("stage1_step: 3\n")
    with pytest.raises(TrainError, match="unknown keys \\['stage1_step'\\]"):
        main(["--debug", "experiment", "lmo", "--bop", str(lmo_root), "--out", str(tmp_path / "y"), "--budget",
              str(tmp_path / "bad.yaml")])


def test_experiment_hands_budget_file_of_differences(tmp_path, monkeypatch):
    from featmap_ros.experiments import hands

    seen = {}
    monkeypatch.setattr(hands, "run_hands_experiment", lambda *a, **kw: seen.update(kw) or {})
    (tmp_path / "b16.yaml").write_text("batch_size: 16\nstage1_steps: 4800\n")
    assert main(["experiment", "hands", "--out", str(tmp_path / "x"), "--budget", str(tmp_path / "b16.yaml")]) == 0
    b = seen["budget"]
    assert (b.batch_size, b.stage1_steps, b.stage2_steps) == (16, 4800, hands.HandsBudget().stage2_steps)
    assert main(["experiment", "hands", "--out", str(tmp_path / "y")]) == 0
    assert seen["budget"] is None and seen["methods"] is None  # the experiment's own default: every method
    assert main(["experiment", "hands", "--out", str(tmp_path / "m"), "--methods", "real,fm_joint"]) == 0
    assert seen["methods"] == ["real", "fm_joint"]
    with pytest.raises(SystemExit, match="--validation-only is for"):
        main(["experiment", "hands", "--out", str(tmp_path / "v"), "--validation-only"])
    with pytest.raises(SystemExit, match="--methods is for"):
        main(["experiment", "nyu", "--out", str(tmp_path / "n"), "--methods", "fm"])
    with pytest.raises(SystemExit, match="--budget is for"):
        main(["experiment", "nyu", "--out", str(tmp_path / "z"), "--budget", str(tmp_path / "b16.yaml")])
    with pytest.raises(SystemExit, match="give one of them"):
        main(["experiment", "hands", "--quick", "--out", str(tmp_path / "q"), "--budget", str(tmp_path / "b16.yaml")])
    # Bad values are refused with a clear error (exit 2), before any training starts.
    for bad in ("head: fcc\n", "batch_size: 0\n", "validation_frames: 2000\n", "stage1_steps: -1\n"):
        (tmp_path / "bad.yaml").write_text(bad)
        assert main(["experiment", "hands", "--out", str(tmp_path / "b"), "--budget", str(tmp_path / "bad.yaml")]) == 2
