"""The README's main job, in its tiny form: every stage runs and writes what it promises."""

from __future__ import annotations

import json

from featmap_ros.experiments.main_job import run_main_job
from featmap_ros.model.checkpoint import read_meta
from featmap_ros.model.refiner import RefinerConfig


def test_tiny_main_job_runs_end_to_end_and_reuses_its_models(tmp_path, capsys):
    summary = run_main_job(tmp_path, tiny=True, device="cpu")
    printed = capsys.readouterr().out
    assert "featmap main: results" in printed and "annotated bags" in printed
    assert summary["objects"]["instances"] == 4 and 0.0 <= summary["objects"]["proj_5px"] <= 1.0
    assert summary["hands"]["frames_scored"] >= 1
    for task in ("objects", "hands"):
        meta = read_meta(tmp_path / "models" / task / "model.json", expect_task=task)
        assert meta["method"] == ("fm_joint" if task == "hands" else "fm") and "feature_stats" in meta
        assert (tmp_path / "eval" / task / "report.md").is_file()
        assert (tmp_path / "eval" / task / "output_bag" / "metadata.yaml").is_file()
    hands = read_meta(tmp_path / "models" / "hands" / "model.json", expect_task="hands")
    assert hands["net"]["head"] == "vote" and hands["hands"]["refiner"]["iterations"] == RefinerConfig().iterations
    assert hands["net"]["shared_extractor"] and hands["net"]["mapping"] and hands["net"]["stride"] == 4
    assert json.loads((tmp_path / "summary.json").read_text())["size"]["object_steps"] == [3, 2]
    run_main_job(tmp_path, tiny=True, device="cpu")
    assert "using the objects model trained before" in capsys.readouterr().out
