"""Training killed at any instant resumes, loses at most one checkpoint interval and ends at the planned step."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import random
import signal
import time
import traceback
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_train import fake_data, tiny_config

from featmap_ros.model import checkpoint as ckpt
from featmap_ros.train import train

EVERY = 2  # checkpoint interval, steps: many saves, so random kills often land inside one
KILLED_STAGE1 = 8  # the killed run's stage 1: a short one, so kills land in both stages


def planned(steps: int, stage1: int | None = None) -> object:
    s1 = steps // 2 if stage1 is None else stage1
    return tiny_config(method="fm", stage1_steps=s1, stage2_steps=steps - s1, checkpoint_every=EVERY, batch_size=4)


def history_steps(out: Path) -> list[int]:
    path = out / "history.jsonl"
    if not path.is_file():
        return []
    steps = []
    for line in path.read_text().splitlines():
        try:
            steps.append(json.loads(line)["step"])
        except (json.JSONDecodeError, KeyError):
            pass  # the partial line of a killed write
    return steps


def resumable_step(out: Path) -> int:
    """The step a rerun would resume from (0 when no checkpoint generation is complete yet)."""
    found = ckpt.latest_complete(out / "model")
    return 0 if found is None else int(ckpt.read_meta(found)["step"])


def assert_same_weights(out: Path, reference: Path) -> None:
    a, b = load_file(str(out / "model.safetensors")), load_file(str(reference / "model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=0, msg=key)


def _child(out: str, steps: int) -> None:
    """One training run in a forked process (killed by the test at a random instant)."""
    torch.set_num_threads(1)
    real = os.replace

    def slow_replace(src: object, dst: object) -> None:
        real(src, dst)  # type: ignore[arg-type]
        time.sleep(0.003)  # widens the windows between a save's renames, so random kills land there too

    os.replace = slow_replace  # type: ignore[assignment]
    try:
        train(planned(steps, KILLED_STAGE1), fake_data(), out)  # type: ignore[arg-type]
    except BaseException:
        Path(out, f"child_error_{os.getpid()}.txt").write_text(traceback.format_exc())
        raise


def test_training_killed_at_20_random_instants_resumes_and_ends_at_the_planned_step(tmp_path: Path) -> None:
    steps, out = 30, tmp_path / "killed"
    train(planned(steps, KILLED_STAGE1), fake_data(), tmp_path / "whole")  # type: ignore[arg-type]
    # A fork server that imported torch once: each run starts in milliseconds, and no thread of
    # this process is forked.
    ctx = mp.get_context("forkserver")
    # torch.optim imports torch._dynamo on first use: 2 s a run without it.
    ctx.set_forkserver_preload(["torch._dynamo", "tqdm", "featmap_ros.train", "test_train", __name__])
    warm = ctx.Process(target=time.sleep, args=(0,))  # starts the fork server before the first kill
    warm.start()
    warm.join(60)
    rng = random.Random(14)
    killed_mid_run = torn = 0
    for i in range(20):
        before = resumable_step(out)
        proc = ctx.Process(target=_child, args=(str(out), steps))
        proc.start()
        # The instant is random in progress, not in seconds, so that the kills spread over the run
        # however busy the CPU: after 0-3 new steps (0: during the start and resume), then a
        # random time on into the next step, history write or save.
        target, deadline = before + rng.randint(0, 3), time.time() + 20
        while before < steps and max(history_steps(out), default=0) < target and time.time() < deadline:
            time.sleep(0.002)
        time.sleep(rng.uniform(0.0, 0.15))
        proc.kill()  # SIGKILL: no handler, no cleanup, as the OOM killer or a pre-empted job
        proc.join(30)
        errors = sorted(out.glob("child_error_*.txt"))
        assert not errors, f"kill {i}: the rerun failed instead of resuming:\n{errors[0].read_text()}"
        assert proc.exitcode in (0, -signal.SIGKILL), f"kill {i}: exit code {proc.exitcode}"
        killed_mid_run += proc.exitcode == -signal.SIGKILL
        try:
            ckpt.verify(out / "model")
        except ckpt.CheckpointError:
            torn += (out / "model.json").is_file()  # killed inside a save: the previous generation serves
        reached = max(history_steps(out), default=0)
        after = resumable_step(out)
        assert after >= before, f"kill {i}: the checkpoint went back from step {before} to {after}"
        assert after >= reached - EVERY, f"kill {i}: reached step {reached}, resumable only from {after}"
    assert killed_mid_run >= 10  # most kills land while a run is going on
    print(f"{killed_mid_run} of 20 kills mid-run, {torn} inside a save's renames")
    final = train(planned(steps, KILLED_STAGE1), fake_data(), out)  # type: ignore[arg-type]
    assert json.loads(final.read_text())["step"] == steps
    assert history_steps(out) == list(range(1, steps + 1))
    assert_same_weights(out, tmp_path / "whole")
    assert not list(out.glob(".*.tmp")), "temporary files of killed writes are cleaned up on resume"


class Killed(BaseException):
    """Stands in for SIGKILL at one rename: nothing after it runs (BaseException, like KeyboardInterrupt)."""


def test_a_kill_at_each_rename_of_a_run_resumes_to_the_same_end(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every os.replace of a 6-step run (config, history, three saves) in turn is where it dies."""
    reference = tmp_path / "whole"
    train(planned(6), fake_data(), reference)  # type: ignore[arg-type]
    real = os.replace
    kill_at, calls = 0, 0

    def dying_replace(src: object, dst: object) -> None:
        nonlocal calls
        calls += 1
        if calls == kill_at:
            raise Killed(f"killed at rename {kill_at}: {dst}")
        real(src, dst)  # type: ignore[arg-type]

    while True:
        kill_at, calls = kill_at + 1, 0
        out = tmp_path / f"killed_{kill_at}"
        monkeypatch.setattr(os, "replace", dying_replace)
        try:
            train(planned(6), fake_data(), out)  # type: ignore[arg-type]
        except Killed:
            pass
        else:
            break  # the run has fewer renames than kill_at: every one was tried
        finally:
            monkeypatch.setattr(os, "replace", real)
        final = train(planned(6), fake_data(), out)  # type: ignore[arg-type]
        assert json.loads(final.read_text())["step"] == 6, f"kill at rename {kill_at}"
        assert history_steps(out) == [1, 2, 3, 4, 5, 6], f"kill at rename {kill_at}"
        assert_same_weights(out, reference)
    assert kill_at > 15  # config, three saves of 3-6 renames each, history trims


def _saved_generations(tmp_path: Path) -> tuple[Path, torch.nn.Module, torch.optim.Optimizer]:
    from featmap_ros.model.nets import FeatureMappingModel

    model = FeatureMappingModel(planned(6).net)  # type: ignore[attr-defined]
    opt = torch.optim.AdamW(model.parameters())
    stem = tmp_path / "model"
    for step in (2, 4):
        with torch.no_grad():
            next(model.parameters()).add_(1.0)
        ckpt.save(stem, model, {"step": step}, opt, keep_previous=True)
    return stem, model, opt


@pytest.mark.parametrize("kill_at", range(1, 7))  # 2 links + the previous JSON, then weights, optimiser, JSON
def test_a_kill_between_the_renames_of_a_save_falls_back_to_the_newest_complete_generation(
    tmp_path: Path, die_at_rename, kill_at: int
) -> None:
    stem, model, opt = _saved_generations(tmp_path)
    with torch.no_grad():
        next(model.parameters()).add_(1.0)  # new weights, so a torn pair shows as a hash mismatch
    restore = die_at_rename(kill_at, Killed)
    with pytest.raises(Killed):
        ckpt.save(stem, model, {"step": 6}, opt, keep_previous=True)
    restore()
    if kill_at in (5, 6):  # the new weights (and optimiser) moved in under the old JSON: torn
        with pytest.raises(ckpt.CheckpointError, match="sha256"):
            ckpt.load(stem)
    found = ckpt.latest_complete(stem)
    assert found is not None and ckpt.read_meta(found)["step"] == 4
    assert ckpt.recover(stem) == stem.with_name("model.json")
    loaded, meta = ckpt.load(stem)
    assert meta["step"] == 4
    ckpt.load_optimizer(stem, torch.optim.AdamW(loaded.parameters()))
    # The next save after the repair works as usual and keeps step 4 as the previous generation.
    ckpt.save(stem, model, {"step": 6}, opt, keep_previous=True)
    assert ckpt.load(stem)[1]["step"] == 6 and ckpt.load(ckpt.previous_stem(stem))[1]["step"] == 4


def test_a_checkpoint_broken_by_hand_is_still_refused(tmp_path: Path) -> None:
    stem, _, _ = _saved_generations(tmp_path)
    for name in ("model.safetensors", "model.prev.safetensors"):
        (tmp_path / name).write_bytes(b"garbage")
    with pytest.raises(ckpt.CheckpointError, match="sha256"):
        ckpt.recover(stem)
