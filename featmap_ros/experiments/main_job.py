"""`featmap main`: the whole path on built-in assets, on any machine, in minutes.

1. Built-in assets: the procedural object and a "real-like" camera scene of it (BOP layout).
2. Train a small Feature Mapping model for objects (dense correspondence head; a pool of synthetic
   crops rendered once and augmented on the fly + real/synthetic pairs of the scene's training
   frames) and one for hands (synthetic stream + sensor-domain pairs), unless the same output
   folder already holds them; on a CPU of 2+ cores the two train at once, in two processes.
3. Make replay bags: the scene's test frames (rgb8 + camera_info + detections + ground truth) and a
   smoothly moving hand of another person through another sensor setting (16UC1 depth).
4. Replay both through `bag eval` (the node's processing path) and print the scores and where the
   reports, plots and annotated bags are.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from featmap_ros import assets
from featmap_ros.backends import HAND_RECENTRE


@dataclass(frozen=True)
class MainJobSize:
    """How big the main job is: frames, training steps, net size."""

    real_frames: int = 160  # the built-in real scene: the first 100 train, the rest test
    train_frames: int = 100
    hand_pairs: int = 400
    hand_pool: int = 1200  # clean synthetic hand crops rendered once (online rendering is ~1 s per batch here)
    hand_bag_frames: int = 60
    # (stage 1, stage 2) steps and images per step of each model. Small batches, more steps at about
    # the same images/s: objects 36% -> 54% 2D-proj@5px (batch 32 -> 8) and hands 22.1 -> 20.3 mm
    # (32 -> 16) on validation data (docs/results.md, session 11). With the coordinate bins (below) the object
    # model needs fewer steps: on the validation frames 69% (ADD 64%) at 2,000 + 1,200 (53% without bins),
    # 66% (64%) at 1,200 + 1,200, 63% (59%) at 1,200 + 1,000, 60% (52%) at 1,200 + 800 (session 21); 67% (52%)
    # at 1,000 + 1,100 and 62% (58%) at 900 + 1,150 (session 23); 62% (51%) at 1,000 + 800 and 59% (48%) at
    # 800 + 1,000 (session 24). Stage 2, where the real pairs come in, is what ADD needs. 1,000 + 800 since
    # session 24: the object model ends about 30 s before the hand model and hands it its core, so the job's
    # two trainings end sooner (1,200 + 1,000 in session 23: 82% on the job's test frames, ADD 57%).
    object_steps: tuple[int, int] = (1000, 800)
    object_batch: int = 8
    hand_steps: tuple[int, int] = (1000, 600)
    hand_batch: int = 16
    input_size: int = 64
    width: int = 16
    feature_dim: int = 256  # the FC feature (hand_head "fc")
    dense_feature_dim: int = 32  # channels of the spatial heads' feature maps (objects' dense, hands' vote)
    object_pool: int = 2000  # synthetic object crops rendered once, augmented on the fly
    # Convolutions per encoder stage (NetConfig.blocks; None: its default (2, 2, 3, 3, 3)). One fewer in the
    # first four stages: 14% less training time, equal accuracy on the validation frames (docs/results.md).
    object_blocks: tuple[int, ...] | None = (1, 2, 2, 2, 3)
    object_method: str = "fm"
    object_lr: float = 1e-3
    # The dense head's model coordinates as distributions over this many bins (NetConfig.coord_bins; 0: regressed).
    # 16, as the LM-O experiment's: 53% -> 69% 2D-proj@5px on the validation frames, ADD 38% -> 64% (session 21).
    object_coord_bins: int = 16
    # Replay: passes that crop each object again around its first pose (NodeConfig.recrop; the node's
    # default is 0, the latency setting): +4 points 2D-proj@5px on the validation frames (docs/results.md).
    object_recrop: int = 1
    # Replay: passes that crop each hand again around the palm its joints found (NodeConfig.recentre, the
    # node's default): 19.8 -> 17.6 mm on the hand validation bag (docs/results.md, session 12).
    hand_recentre: int = HAND_RECENTRE
    hand_head: str = "vote"
    hand_width: int = 8
    hand_method: str = "fm_joint"  # as the hands experiment's Feature Mapping model (its budget.fm_method)
    hand_lr: float | None = None  # None: the hands experiment's (HandsBudget.lr)
    # The feature loss's weight (None: the experiment's HandsBudget.lambda_feat). 0.1, the experiment's until
    # session 12, is what this job's hand model was validated with; 0.03 was chosen for the experiment only.
    hand_lambda_feat: float | None = 0.1
    # Whether fm_joint's feature loss reaches f (LossConfig.feat_through_f): g only, as the experiment's
    # (HandsBudget.feat_through_f); on the validation bag, two seeds, 17.70 mm against 18.16 through f.
    hand_feat_through_f: bool = False
    # HandStreamConfig.pair_centre of the sensor pairs: "palm" was 2.3 mm worse on the validation bag (docs/results.md).
    hand_pair_centre: str = "located"
    # The crops' centre-offset augmentation, xy and z alike, in half-cube units (None: HANDS_AUGMENT's 0.05).
    hand_shift_sigma: float | None = None
    # The hand centre refiner: crops of clean renders and of the sensor pairs' frames, rendered once.
    refine_synthetic_frames: int = 400
    refine_sensor_frames: int = 200
    refine_steps: int = 1500
    amp: bool = True  # bf16 autocast where the CPU or GPU computes bf16 natively (TrainConfig.amp)
    hand_seed: int = 0  # the hand model's TrainConfig.seed (initial weights, batch draws); the data keep theirs
    # OptimConfig.ema_decay of each model (0: no weight average; the checkpoint holds the average).
    object_ema: float = 0.0
    hand_ema: float = 0.0
    # On a CPU with 2+ cores, train the object and the hand model at once, in two processes of half the
    # cores each: a small-batch step uses 2 threads poorly (1 thread runs it at 0.79x (objects) and 0.88x
    # (hands) the speed of 2), so two 1-thread trainings finish well before two 2-thread ones in a row.
    parallel_training: bool = True
    # Then, when one ends, the other goes on with every core (take_freed_cores): about 25 s less in session 20,
    # when the hands ended 52 s first (21-24 s first in session 21's runs, after the object model's change). The
    # step where its thread count changes depends on the clock, and so does the float rounding after it: two
    # runs then differ a little (two session-20 runs: objects 61.7 / 63.3%). False: repeatable runs.
    share_freed_cores: bool = True


TINY = MainJobSize(real_frames=12, train_frames=8, hand_pairs=8, hand_pool=16, hand_bag_frames=4,
                   object_steps=(3, 2), object_batch=4, hand_steps=(3, 2), hand_batch=4, input_size=32, width=4,
                   feature_dim=32, dense_feature_dim=8, object_pool=8, hand_width=4, refine_synthetic_frames=3,
                   refine_sensor_frames=2, refine_steps=3)


def _train_config(size: MainJobSize, device: str, net: dict, method: str, lr: float, steps: tuple[int, int],
                  batch: int, loss: Any = None, seed: int = 0, ema: float = 0.0):
    """The main job's TrainConfig; net: NetConfig's fields, built at once so the head resolves its own defaults."""
    from featmap_ros.model.nets import NetConfig
    from featmap_ros.train import LossConfig, OptimConfig, TrainConfig

    return TrainConfig(
        method=method, net=NetConfig(input_size=size.input_size, **net), loss=loss or LossConfig(),
        optim=OptimConfig(lr=lr, warmup_steps=min(50, steps[0] // 5), ema_decay=ema), batch_size=batch,
        stage1_steps=steps[0], stage2_steps=steps[1], checkpoint_every=400, log_every=20,
        device=device, amp=size.amp, tensorboard=False, seed=seed,
    )


def object_train_config(size: MainJobSize, device: str = "cpu"):
    """The TrainConfig of the main job's object model."""
    from featmap_ros.model.nets import DENSE_CHANNELS

    net = {"task": "objects", "width": size.width, "blocks": size.object_blocks, "head": "dense",
           "n_outputs": DENSE_CHANNELS, "feature_dim": size.dense_feature_dim, "dropout": 0.0,
           "coord_bins": size.object_coord_bins}
    return _train_config(size, device, net, size.object_method, size.object_lr, size.object_steps, size.object_batch,
                         ema=size.object_ema)


def hand_train_config(size: MainJobSize, device: str = "cpu"):
    """The TrainConfig of the main job's hand model (the hands experiment's settings where size leaves None)."""
    from featmap_ros.experiments.hands import HandsBudget
    from featmap_ros.train import LossConfig

    vote = size.hand_head == "vote"
    budget = HandsBudget()  # the experiment's optimisation settings, chosen on its validation frames
    net = {"task": "hands", "width": size.hand_width, "head": size.hand_head,
           "feature_dim": size.dense_feature_dim if vote else size.feature_dim, "dropout": 0.0 if vote else 0.1}
    lr = budget.lr if size.hand_lr is None else size.hand_lr
    lambda_feat = budget.lambda_feat if size.hand_lambda_feat is None else size.hand_lambda_feat
    return _train_config(size, device, net, size.hand_method, lr, size.hand_steps, size.hand_batch,
                         LossConfig(pose=budget.pose_loss, lambda_feat=lambda_feat,
                                    feat_through_f=size.hand_feat_through_f), seed=size.hand_seed, ema=size.hand_ema)


def train_objects(root: Path, out: Path, size: MainJobSize, device: str, train_ids: list[int] | None = None,
                  on_step: Callable[[int], None] | None = None) -> Path:
    """The main job's object model on the built-in scene's frames train_ids (default: all its training frames)."""
    from featmap_ros.datasets.bop import BopScene
    from featmap_ros.datasets.pool import PoolConfig
    from featmap_ros.datasets.streams import ObjectStreamConfig
    from featmap_ros.experiments.data import objects_pool_task_data
    from featmap_ros.train import train

    cfg = object_train_config(size, device)
    train_ids = list(range(size.train_frames)) if train_ids is None else list(train_ids)
    frames = BopScene(root, 1).frames(train_ids)
    # As in the LM-O experiment: viewpoints around the training frames' poses, their backgrounds.
    anchors = tuple((float(i.obj_id), *i.R.ravel().tolist(), *i.t.ravel().tolist())
                    for f in frames for i in f.instances if i.obj_id == assets.OBJ_ID)
    stream_cfg = ObjectStreamConfig(obj_ids=(assets.OBJ_ID,), crop=size.input_size, distance_m=(0.3, 0.7),
                                    pose_anchors=anchors, photo_paths=tuple(str(f.rgb_path) for f in frames),
                                    photo_prob=0.5)
    data = objects_pool_task_data(root, 1, train_ids, (assets.OBJ_ID,), stream_cfg,
                                  PoolConfig(n_per_object=size.object_pool), names={assets.OBJ_ID: assets.OBJ_NAME},
                                  head="dense")
    return train(cfg, data, out, on_step=on_step)


def _train_hands(out: Path, size: MainJobSize, device: str, on_step: Callable[[int], None] | None = None) -> Path:
    import numpy as np

    from featmap_ros.datasets.hand_refine import SensorCropRecorder, refine_pool
    from featmap_ros.datasets.hand_streams import HandStreamConfig, SensorHandSet
    from featmap_ros.experiments.data import hands_task_data
    from featmap_ros.experiments.hands import HANDS_AUGMENT
    from featmap_ros.model import checkpoint
    from featmap_ros.model.refiner import RefinerConfig, train_refiner
    from featmap_ros.render.hand import HandShape
    from featmap_ros.render.sensor import SensorConfig
    from featmap_ros.train import train

    cfg = hand_train_config(size, device)
    stream_cfg = HandStreamConfig(crop_px=size.input_size, pair_centre=size.hand_pair_centre)
    augment = HANDS_AUGMENT if size.hand_shift_sigma is None else dataclasses.replace(
        HANDS_AUGMENT, shift_sigma=size.hand_shift_sigma, depth_sigma=size.hand_shift_sigma)
    shape, sensor_cfg = HandShape.sample(np.random.default_rng(1)), SensorConfig.nominal()
    # The centre refiner's (DeepPrior++'s step) crops of the pairs' frames, made as the pairs render them.
    refiner_cfg = RefinerConfig(input_size=size.input_size, cube_m=stream_cfg.cube_m)
    n_sensor = min(size.refine_sensor_frames, size.hand_pairs)
    recorder = SensorCropRecorder(n_sensor, refiner_cfg, seed=1)
    data = hands_task_data(size.hand_pairs, shape, sensor_cfg, seed=1, stream_cfg=stream_cfg,
                           synthetic_pool=size.hand_pool, augment=augment, on_render=(recorder,))
    path = train(cfg, data, out, on_step=on_step)
    # The refiner from clean renders and the pairs' own frames (rendered here only if training made no pairs).
    pool = refine_pool(size.refine_synthetic_frames, SensorHandSet(size.hand_pairs, shape, sensor_cfg, 1, stream_cfg),
                       n_sensor, config=refiner_cfg, seed=1, recorded=recorder)
    refiner = train_refiner(pool, refiner_cfg, steps=size.refine_steps, seed=1, on_step=on_step)
    return checkpoint.attach_refiner(path, refiner)


def _train_task(task: str, root: Path, folder: Path, size: MainJobSize, device: str,
                on_step: Callable[[int], None] | None = None) -> Path:
    if task == "objects":
        return train_objects(root, folder, size, device, on_step=on_step)
    return _train_hands(folder, size, device, on_step)


# In a training worker: the event the parent sets when the other training has ended (_init_worker).
_CORES_FREED: Any = None


def _init_worker(freed: Any) -> None:
    """ProcessPoolExecutor's initializer: keep the parent's event (events pass to a process only at its start)."""
    global _CORES_FREED
    _CORES_FREED = freed


def take_freed_cores(freed: Any, threads: int, every: int = 20) -> Callable[[int], None]:
    """A train() on_step hook: once `freed` is set (the other training ended), train with `threads` threads.

    The two trainings rarely end together (the hand model first by 50-100 s in session 20 and 21-24 s in
    session 21 on the Intel Xeon without bf16; since session 24 the object model first, by about 30 s), and
    a step at two threads runs 1.5-2.2x as fast as at one here (bench/bench_memory_format.py), so the one
    left takes the other's core. torch's thread count is per calling thread under OpenMP, hence a hook
    between steps in the training's own thread.
    """
    import torch

    def on_step(step: int) -> None:
        if step % every == 0 and torch.get_num_threads() < threads and freed.is_set():
            torch.set_num_threads(threads)

    return on_step


def exit_with_parent(parent: int, poll_s: float = 1.0) -> None:
    """End this worker process soon after its parent (pid `parent`) is gone: no training goes on unwatched.

    The parent's pid is the caller's to give: a worker whose parent died before it got here sees
    another parent already and ends at once. Checkpoints are written atomically, so the exit at any
    instant leaves the last complete one and a rerun resumes from it.
    """
    import os
    import threading

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_s)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def _train_task_in_child(task: str, root: Path, folder: Path, size: MainJobSize, device: str, threads: int,
                         bar_line: int, parent: int) -> tuple[str, float]:
    """One model's training in a worker process with `threads` torch threads; its progress bars on line bar_line."""
    import os

    import torch

    exit_with_parent(parent)
    torch.set_num_threads(threads)
    os.environ["TQDM_POSITION"] = str(bar_line)  # every tqdm bar of this process (tqdm >= 4.66 reads TQDM_*)
    t = time.perf_counter()
    share = size.share_freed_cores and _CORES_FREED is not None
    on_step = take_freed_cores(_CORES_FREED, _cpu_cores()) if share else None
    path = _train_task(task, root, folder, size, device, on_step)
    return str(path), time.perf_counter() - t


def _stop_workers(pool: Any) -> None:
    """Terminate a ProcessPoolExecutor's workers now (Python >= 3.14 has terminate_workers; before, its processes)."""
    if hasattr(pool, "terminate_workers"):
        pool.terminate_workers()
        return
    for proc in list((getattr(pool, "_processes", None) or {}).values()):
        proc.terminate()
    pool.shutdown(wait=True, cancel_futures=True)


def _cpu_cores() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


TRAINED_MARK = "trained.json"  # beside a model that its whole training wrote (a killed one leaves a checkpoint only)


# MainJobSize fields added after marks were first written, with the value a mark without them was trained with.
_FIELDS_ADDED: dict[str, Any] = {"object_coord_bins": 0, "share_freed_cores": True}


def _size_doc(size: MainJobSize) -> dict[str, Any]:
    return json.loads(json.dumps(dataclasses.asdict(size)))  # tuples as lists, as the mark file holds them


def _mark_trained(folder: Path, size: MainJobSize) -> None:
    """Record that folder's model finished its training (pose net and, for hands, the refiner) with `size`."""
    from featmap_ros.model.checkpoint import atomic_write

    # atomic: a kill leaves the old mark or none, never half of one
    atomic_write(folder / TRAINED_MARK, json.dumps({"size": _size_doc(size)}, indent=1).encode())


OTHER_SIZES = "it was trained with other sizes"  # _finished_model's reason for a finished model of other sizes


def _finished_model(folder: Path, size: MainJobSize) -> str | None:
    """None where folder holds a model trained to the end with this size, else why it must be trained (again)."""
    if not (folder / "model.json").is_file():
        return "no model yet"
    try:
        mark = json.loads((folder / TRAINED_MARK).read_text())
    except (OSError, ValueError):
        return "its training did not finish: it resumes from its last checkpoint"
    trained = mark.get("size") if isinstance(mark, dict) else None
    if not isinstance(trained, dict) or {**_FIELDS_ADDED, **trained} != _size_doc(size):
        return OTHER_SIZES
    return None


def _start_afresh(folder: Path) -> None:
    """Remove a finished model's folder before it is trained again (--retrain, other sizes).

    train() resumes from a checkpoint of the same method and net, and one that has reached the new step count
    counts as done: without this the old model would come back unchanged and be marked with the new sizes.
    """
    import shutil

    if folder.is_dir():
        shutil.rmtree(folder)


def _worker_died(why: str) -> RuntimeError:
    # The pool fails every pending job alike, so which of the two trainings died is not known here.
    return RuntimeError(f"a training process died before it finished ({why}); run the job again: "
                        "each unfinished training resumes from its last checkpoint")


def _train_models(root: Path, out: Path, size: MainJobSize, device: str, retrain: bool,
                  timings: dict[str, float], build_assets: Callable[[], None] | None = None) -> dict[str, Path]:
    """Both models (or the ones out/models lacks), at once in two processes where that is faster.

    build_assets (timed as timings['assets_s']) writes what the object model trains on: it runs before any
    training, except that the hand model, which needs none of it, starts first in its own process.
    """
    import multiprocessing
    import os
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
    from concurrent.futures.process import BrokenProcessPool

    import torch

    def assets_first() -> None:
        if build_assets is not None:
            t = time.perf_counter()
            build_assets()
            timings["assets_s"] = time.perf_counter() - t

    models: dict[str, Path] = {}
    todo = []
    for task in ("objects", "hands"):
        folder = out / "models" / task
        why = "--retrain" if retrain else _finished_model(folder, size)
        if why:
            print(f"[2/4] training Feature Mapping for {task} -> {folder} ({why})")
            if retrain or why == OTHER_SIZES:  # not a killed training, which resumes from its checkpoint
                _start_afresh(folder)
            todo.append(task)
        else:
            print(f"[2/4] using the {task} model trained before: {folder / 'model.json'} (--retrain to train again)")
            models[task] = folder / "model.json"
            timings[f"train_{task}_s"] = 0.0
    on_cpu = device == "cpu" or (device == "auto" and not torch.cuda.is_available())
    cores = _cpu_cores()
    t = time.perf_counter()  # train_wall_s: both trainings, the assets written meanwhile
    if len(todo) == 2 and size.parallel_training and on_cpu and cores >= 2:
        threads = cores // 2
        print(f"      both at once: two processes of {threads} thread{'s' * (threads > 1)} each")
        # spawn: a fresh interpreter per model (forking a process whose torch threads exist can hang them).
        # When one training ends, the parent sets `freed` and the other goes on with every core (take_freed_cores).
        spawn = multiprocessing.get_context("spawn")
        freed = spawn.Event()
        pool = ProcessPoolExecutor(2, mp_context=spawn, initializer=_init_worker, initargs=(freed,))

        def submit(task: str) -> Any:
            return pool.submit(_train_task_in_child, task, root, out / "models" / task, size, device, threads,
                               todo.index(task), os.getpid())

        try:
            # The hand model first: it trains on its own renders while this process writes the assets on the
            # other core (one core idled through them before: 9 s of the job's 5 minutes).
            pending = {"hands": submit("hands")}
            assets_first()
            pending["objects"] = submit("objects")
            while pending:
                done, _ = wait(pending.values(), timeout=1.0, return_when=FIRST_COMPLETED)
                for task in [k for k, job in pending.items() if job in done]:
                    path, seconds = pending.pop(task).result()
                    models[task], timings[f"train_{task}_s"] = Path(path), seconds
                    _mark_trained(out / "models" / task, size)
                    if pending:
                        print(f"      {task} trained: the {next(iter(pending))} training takes its core")
                        freed.set()
                # The pool itself can miss a worker that died while the other was being spawned (CPython's
                # executor watches the workers it knew of when it last woke up), so look at them too.
                codes = [proc.exitcode for proc in (getattr(pool, "_processes", None) or {}).values()]
                if pending and any(code is not None for code in codes):
                    raise BrokenProcessPool(f"exit codes {codes}")
        except BaseException as e:
            _stop_workers(pool)  # one failed (or Ctrl-C): do not wait for the other to finish its training
            if isinstance(e, BrokenProcessPool):  # a worker killed from outside (the OOM killer, a signal)
                raise _worker_died(str(e)) from e
            raise
        pool.shutdown()
        timings["train_wall_s"] = time.perf_counter() - t
        return models
    assets_first()
    for task in todo:
        t = time.perf_counter()
        models[task] = _train_task(task, root, out / "models" / task, size, device)
        timings[f"train_{task}_s"] = time.perf_counter() - t
        _mark_trained(out / "models" / task, size)
    return models


def run_main_job(out: Path, tiny: bool = False, device: str = "auto", retrain: bool = False) -> dict:
    """Run the main job into `out`; return the summary it prints (also saved as summary.json)."""
    size = TINY if tiny else MainJobSize()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    root = out / "assets"
    stamp = root / "test" / "000001" / "scene_gt.json"
    write = retrain or not stamp.is_file() or len(json.loads(stamp.read_text())) != size.real_frames
    if write:
        print(f"[1/4] built-in assets: procedural object, {size.real_frames} real-like frames -> {root}")

    def build_assets() -> None:
        if write:
            assets.write_object_models(root)
            assets.write_real_scene(root, size.real_frames, seed=0)

    models = _train_models(root, out, size, device, retrain, timings, build_assets)

    # Imported only now: the bag and replay modules bring torch, rendering and plotting into this process
    # (2-4 s of a core), which before the training delayed the hand worker's start by as much.
    import numpy as np

    from featmap_ros.bag import make as bag
    from featmap_ros.bag.replay import default_node_config, eval_bag
    from featmap_ros.datasets.nyu import NYU_INTRINSICS
    from featmap_ros.estimator import model_meta
    from featmap_ros.render.hand import HandShape

    t = time.perf_counter()
    test_ids = f"{size.train_frames}-{size.real_frames - 1}"
    print(f"[3/4] replay bags: objects (test frames {test_ids}), hands ({size.hand_bag_frames} frames)")
    obj_bag = bag.make_bop_bag(root, 1, out / "bags" / "objects", frames=test_ids, detections="gt-jitter",
                               names={assets.OBJ_ID: assets.OBJ_NAME})
    other_person = HandShape.sample(np.random.default_rng(7))
    hand_bag = bag.write_hand_frames(out / "bags" / "hands",
                                     bag.hand_sequence(size.hand_bag_frames, seed=7, shape=other_person),
                                     NYU_INTRINSICS, total=size.hand_bag_frames)
    timings["bags_s"] = time.perf_counter() - t

    t = time.perf_counter()
    print("[4/4] bag eval: replaying through the node's processing path")
    obj_meta = model_meta(models["objects"])
    recrop = size.object_recrop
    if recrop and not all("silhouette_m" in o for o in obj_meta["objects"]):
        print("      the objects model was trained before recrop existed: replaying without it (--retrain for it)")
        recrop = 0
    obj_cfg = dataclasses.replace(default_node_config("objects", str(models["objects"]), obj_meta), recrop=recrop)
    obj = eval_bag(obj_bag, models["objects"], out / "eval" / "objects", models_dir=root / "models",
                   config=obj_cfg, device=device)
    hand_cfg = dataclasses.replace(default_node_config("hands", str(models["hands"]), model_meta(models["hands"])),
                                   recentre=size.hand_recentre)
    hand = eval_bag(hand_bag, models["hands"], out / "eval" / "hands", config=hand_cfg, device=device)
    timings["eval_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - t0

    o = obj.metrics["all"]["mean_over_objects"]
    summary = {
        "objects": {"instances": obj.metrics["all"]["n_instances"], "proj_5px": o["proj_5px"], "add_10": o["add_10"],
                    "cm5_deg5": o["cm5_deg5"], "report": str(out / "eval" / "objects" / "report.md"),
                    "annotated_bag": str(obj.output_bag)},
        "hands": {"frames_scored": hand.metrics.get("frames_scored"),
                  "mean_error_mm": hand.metrics.get("mean_error_mm"),
                  "max_error_fraction": hand.metrics.get("max_error_fraction"),
                  "report": str(out / "eval" / "hands" / "report.md"), "annotated_bag": str(hand.output_bag)},
        "models": {k: str(v) for k, v in models.items()},
        "timings": {k: round(v, 1) for k, v in timings.items()},
        "size": dataclasses.asdict(size),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print("\nfeatmap main: results (measured now, on the built-in test data)")
    print(f"  objects: {summary['objects']['instances']} instances, 2D proj@5px {100 * o['proj_5px']:.1f}%, "
          f"ADD@10% {100 * o['add_10']:.1f}%, 5cm5deg {100 * o['cm5_deg5']:.1f}%")
    if hand.metrics.get("mean_error_mm") is not None:
        frac = hand.metrics["max_error_fraction"]
        print(f"  hands:   {hand.metrics['frames_scored']} frames, mean joint error "
              f"{hand.metrics['mean_error_mm']:.1f} mm, max error <= 40 mm on {100 * frac['40mm']:.0f}% of frames")
    else:
        print("  hands:   no frame scored (no hand found)")
    print(f"  reports: {summary['objects']['report']}, {summary['hands']['report']}")
    print(f"  annotated bags: {obj.output_bag}, {hand.output_bag}")
    print(f"  wall time: {timings['total_s']:.0f} s  ({', '.join(f'{k} {v:.0f}' for k, v in timings.items())})")
    return summary
