"""The README's main job, in its tiny form: every stage runs and writes what it promises."""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time

import pytest

from featmap_ros.experiments.main_job import TINY, _cpu_cores, _train_hands, _train_models, run_main_job
from featmap_ros.model.checkpoint import read_meta
from featmap_ros.model.refiner import RefinerConfig
from featmap_ros.train import TrainError


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
    # Both models at once in two processes where the CPU has 2+ cores (the bars' line is per process).
    assert ("train_wall_s" in summary["timings"]) == (_cpu_cores() >= 2)
    assert ("both at once" in printed) == (_cpu_cores() >= 2)
    run_main_job(tmp_path, tiny=True, device="cpu")
    again = capsys.readouterr().out
    assert "using the objects model trained before" in again and "both at once" not in again


@pytest.mark.skipif(_cpu_cores() < 2, reason="the two trainings run side by side only on 2+ cores")
def test_a_failing_training_in_a_worker_process_stops_the_job_and_the_other_worker(tmp_path):
    # The objects' config is refused at once; the hands' would train for 100,000 steps: it is stopped,
    # not waited for, and no worker process outlives the error.
    size = dataclasses.replace(TINY, object_method="magic", hand_steps=(100_000, 0))
    with pytest.raises(TrainError, match="method must be one of"):
        _train_models(tmp_path, tmp_path, size, "cpu", True, {})
    assert multiprocessing.active_children() == []
    assert not (tmp_path / "models" / "hands" / "model.json").exists()



def test_the_training_left_takes_the_core_the_other_freed():
    import threading

    import torch

    from featmap_ros.experiments.main_job import take_freed_cores

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        freed = threading.Event()
        hook = take_freed_cores(freed, 2, every=5)
        for step in range(1, 11):
            hook(step)
        assert torch.get_num_threads() == 1  # nothing freed yet
        freed.set()
        hook(11)
        assert torch.get_num_threads() == 1  # looked at every 5 steps only
        hook(15)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


@pytest.mark.skipif(_cpu_cores() < 2, reason="the two trainings run side by side only on 2+ cores")
@pytest.mark.parametrize("share", [True, False])
def test_when_one_training_ends_the_other_goes_on_with_every_core(tmp_path, share):
    # The tiny hand model ends within seconds; the object model, given many more steps, is still
    # training then, and ends with all the cores (its checkpoint records the threads it ended with),
    # unless the job is asked to keep one thread each (MainJobSize.share_freed_cores: repeatable runs).
    from featmap_ros import assets

    size = dataclasses.replace(TINY, object_steps=(1200, 0), share_freed_cores=share)
    assets.write_object_models(tmp_path / "assets")
    assets.write_real_scene(tmp_path / "assets", size.real_frames, seed=0)
    timings: dict[str, float] = {}
    _train_models(tmp_path / "assets", tmp_path, size, "cpu", True, timings)
    assert timings["train_objects_s"] > timings["train_hands_s"]
    objects = read_meta(tmp_path / "models" / "objects" / "model.json", expect_task="objects")
    hands = read_meta(tmp_path / "models" / "hands" / "model.json", expect_task="hands")
    assert hands["training"]["cpu_threads"] == _cpu_cores() // 2
    assert objects["training"]["cpu_threads"] == (_cpu_cores() if share else _cpu_cores() // 2)


_ORPHAN = """
import multiprocessing, os, sys, time
from featmap_ros.experiments.main_job import exit_with_parent

def child(parent):
    exit_with_parent(parent, poll_s=0.1)
    time.sleep(60)

if __name__ == "__main__":
    p = multiprocessing.get_context("spawn").Process(target=child, args=(os.getpid(),))
    p.start()
    print(p.pid, flush=True)
    time.sleep(60)
"""


def test_a_worker_ends_soon_after_its_parent_is_killed(tmp_path):
    script = tmp_path / "orphan.py"
    script.write_text(_ORPHAN)
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    parent.kill()  # at once: before or after the child's watch starts, the child must end
    parent.wait()
    for _ in range(300):  # up to 30 s (a loaded CPU: the child may still be importing); it polls every 0.1 s
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        os.kill(child, signal.SIGKILL)
        pytest.fail("the worker went on after its parent was killed")


def test_the_sequential_path_trains_in_this_process(tmp_path, monkeypatch):
    import featmap_ros.experiments.main_job as mj

    calls = []
    def fake_train(task, root, folder, size, device):
        calls.append(task)
        folder.mkdir(parents=True)
        return folder

    monkeypatch.setattr(mj, "_train_task", fake_train)
    timings: dict[str, float] = {}
    size = dataclasses.replace(TINY, parallel_training=False)
    models = _train_models(tmp_path, tmp_path, size, "cpu", True, timings, lambda: calls.append("assets"))
    assert calls == ["assets", "objects", "hands"] and set(models) == {"objects", "hands"}
    assert "train_wall_s" not in timings and "assets_s" in timings


@pytest.mark.skipif(_cpu_cores() < 2, reason="the two trainings run side by side only on 2+ cores")
def test_the_hand_model_trains_while_the_assets_are_written(tmp_path):
    """The hand model needs none of the assets: its worker has started training before they are written."""
    from featmap_ros import assets

    root, started = tmp_path / "assets", []

    def build_assets():
        config = tmp_path / "models" / "hands" / "config.yaml"  # train() writes it before its first step
        for _ in range(900):  # up to 90 s: the worker imports torch first, on a loaded CPU too
            if config.is_file():
                break
            time.sleep(0.1)
        started.append(config.is_file())
        assets.write_object_models(root)
        assets.write_real_scene(root, TINY.real_frames, seed=0)

    timings: dict[str, float] = {}
    models = _train_models(root, tmp_path, TINY, "cpu", True, timings, build_assets)
    assert started == [True] and set(models) == {"objects", "hands"}
    assert timings["train_wall_s"] >= timings["assets_s"] > 0


def test_only_models_whose_training_finished_with_these_sizes_are_reused(tmp_path, monkeypatch, capsys):
    """A killed training leaves a checkpoint but no mark: the next run trains it again (train() resumes)."""
    import featmap_ros.experiments.main_job as mj

    calls = []

    found = []  # whether each call found its folder's old checkpoint (train() would resume from it)

    def fake_train(task, root, folder, size, device):
        calls.append(task)
        found.append((folder / "model.json").is_file())
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "model.json").write_text("{}")
        return folder / "model.json"

    monkeypatch.setattr(mj, "_train_task", fake_train)
    size = dataclasses.replace(TINY, parallel_training=False)
    _train_models(tmp_path, tmp_path, size, "cpu", False, {})
    assert calls == ["objects", "hands"]
    _train_models(tmp_path, tmp_path, size, "cpu", False, {})  # both finished: nothing trains
    assert calls == ["objects", "hands"]
    (tmp_path / "models" / "hands" / mj.TRAINED_MARK).unlink()  # killed after its last checkpoint
    _train_models(tmp_path, tmp_path, size, "cpu", False, {})
    assert calls[2:] == ["hands"] and "did not finish" in capsys.readouterr().out
    (tmp_path / "models" / "objects" / mj.TRAINED_MARK).write_text('{"model": "model.js')  # a truncated mark
    _train_models(tmp_path, tmp_path, size, "cpu", False, {})
    assert calls[3:] == ["objects"]
    assert found == [False, False, True, True]  # a killed training keeps its checkpoint, to resume from it
    _train_models(tmp_path, tmp_path, dataclasses.replace(size, hand_steps=(5, 1)), "cpu", False, {})
    assert calls[4:] == ["objects", "hands"] and "other sizes" in capsys.readouterr().out  # the whole size is compared
    # Trained with other sizes: a fresh start, not a resume (train() would call a checkpoint at or past the new
    # step count done and give the old model back).
    assert found[4:] == [False, False]
    assert json.loads((tmp_path / "models" / "hands" / mj.TRAINED_MARK).read_text())["size"]["hand_steps"] == [5, 1]
    assert not list(tmp_path.glob("models/*/*.tmp"))
    # A mark written before a size field existed holds what was trained then (object_coord_bins: 0).
    size = dataclasses.replace(size, hand_steps=(5, 1), object_coord_bins=0)
    for task in ("objects", "hands"):
        mark = tmp_path / "models" / task / mj.TRAINED_MARK
        doc = json.loads(mark.read_text())
        del doc["size"]["object_coord_bins"]
        mark.write_text(json.dumps(doc))
    _train_models(tmp_path, tmp_path, size, "cpu", False, {})
    assert calls[6:] == []
    _train_models(tmp_path, tmp_path, dataclasses.replace(size, object_coord_bins=16), "cpu", False, {})
    assert calls[6:] == ["objects", "hands"] and found[6:] == [False, False]
    (tmp_path / "models" / "hands" / "history.jsonl").write_text("{}\n")
    _train_models(tmp_path, tmp_path, dataclasses.replace(size, object_coord_bins=16), "cpu", True, {})  # --retrain
    assert calls[8:] == ["objects", "hands"] and found[8:] == [False, False]
    assert not (tmp_path / "models" / "hands" / "history.jsonl").exists()  # the old training's files are gone


@pytest.mark.skipif(_cpu_cores() < 2, reason="the two trainings run side by side only on 2+ cores")
def test_a_worker_killed_from_outside_gives_a_clear_error(tmp_path):
    """SIGKILL (the OOM killer's way) of a training worker: a clear error, the other stopped, no mark written."""
    import threading

    def kill_a_worker():
        for _ in range(600):  # the workers start within seconds; give up after 60 s
            children = multiprocessing.active_children()
            if children:
                time.sleep(1.0)
                os.kill(children[0].pid, signal.SIGKILL)
                return
            time.sleep(0.1)

    from featmap_ros import assets

    root = tmp_path / "assets"  # both trainings must have what they need, or one fails before the kill
    assets.write_object_models(root)
    assets.write_real_scene(root, TINY.real_frames, seed=0)
    killer = threading.Thread(target=kill_a_worker, daemon=True)
    killer.start()
    size = dataclasses.replace(TINY, object_steps=(100_000, 0), hand_steps=(100_000, 0))
    with pytest.raises(RuntimeError, match="training process died before it finished.*last checkpoint"):
        _train_models(root, tmp_path, size, "cpu", True, {})
    killer.join()
    assert multiprocessing.active_children() == []
    assert not list(tmp_path.glob("models/*/trained.json"))


class _Captured(Exception):
    pass


@pytest.mark.parametrize("through_f,seed", [(False, 0), (True, 3)])
def test_hand_training_takes_the_sizes_loss_and_seed(tmp_path, monkeypatch, through_f, seed):
    """MainJobSize.hand_feat_through_f and hand_seed reach the hand model's TrainConfig (no training run)."""
    import featmap_ros.experiments.data as xdata
    import featmap_ros.train as train_mod

    def capture(cfg, data, out, on_step=None):
        raise _Captured(cfg)

    monkeypatch.setattr(xdata, "hands_task_data", lambda *a, **k: None)
    monkeypatch.setattr(train_mod, "train", capture)
    size = dataclasses.replace(TINY, hand_feat_through_f=through_f, hand_seed=seed, hand_lambda_feat=0.1,
                               hand_ema=0.9 if through_f else 0.0)
    with pytest.raises(_Captured) as got:
        _train_hands(tmp_path, size, "cpu")
    cfg = got.value.args[0]
    assert (cfg.loss.feat_through_f, cfg.seed, cfg.loss.lambda_feat, cfg.method) == (through_f, seed, 0.1, "fm_joint")
    assert cfg.optim.ema_decay == size.hand_ema


def test_the_hand_refiner_trains_with_the_same_on_step_hook(tmp_path, monkeypatch):
    """The core the object training frees reaches the hand refiner's training too (no training run)."""
    import featmap_ros.datasets.hand_refine as hand_refine
    import featmap_ros.experiments.data as xdata
    import featmap_ros.model.refiner as refiner_mod
    import featmap_ros.train as train_mod

    hooks = {}

    def fake_train(cfg, data, out, on_step=None):
        hooks["train"] = on_step
        return tmp_path / "model.json"

    def fake_refiner(pool, config, steps, seed, on_step=None):
        hooks["refiner"] = on_step
        raise _Captured()

    monkeypatch.setattr(xdata, "hands_task_data", lambda *a, **k: None)
    monkeypatch.setattr(train_mod, "train", fake_train)
    monkeypatch.setattr(hand_refine, "refine_pool", lambda *a, **k: {})
    monkeypatch.setattr(refiner_mod, "train_refiner", fake_refiner)

    def hook(step: int) -> None:
        pass

    with pytest.raises(_Captured):
        _train_hands(tmp_path, TINY, "cpu", on_step=hook)
    assert hooks == {"train": hook, "refiner": hook}
