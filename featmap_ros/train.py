"""Training: stage 1 on synthetic images, stage 2 Feature Mapping, and the baselines; one config in, one checkpoint out.

Methods (all get the same number of steps, stage1_steps + stage2_steps, at the same global batch):
  fm         stage 1: f_S, h on synthetic. stage 2: f_R (from f_S) and g on real/synthetic pairs,
             pose(h(g(f_R(real)))) + lambda_feat * ||g(f_R(real)) - f_S(syn)||^2 with f_S frozen,
             while h keeps learning lambda_syn * pose(h(f_S(syn))) from the synthetic stream.
  fm_mmd     fm plus lambda_mmd * MMD(g(f_R(unlabelled real)), f_S(syn)).
  fm_joint   Feature Mapping learned jointly from step 0, one extractor f for both domains: every step
             pose(h(f(syn))) + pose(h(g(f(real)))) + lambda_feat * ||g(f(real)) - f(pair syn)||^2, the
             synthetic features a fixed target (no gradient) for the feature loss, which reaches f too
             unless LossConfig.feat_through_f is False (then it trains g only); run time h(g(f(x))).
             mixed training plus the mapping (g is the identity at the start).
  synthetic  f, h on synthetic only; evaluated on real images as they are.
  real       f, h on the real labelled images only.
  mixed      f, h on a synthetic and a real batch every step, no mapping.
  finetune   stage 1 as fm, then f, h fine-tuned on real images.
The exemplar baseline is a nearest-neighbour predictor built from a trained model by
build_exemplar_bank.

Data-parallel training (torchrun, or a process group the caller already initialised) averages
gradients by hand rather than through DistributedDataParallel: the set of trained parameters
changes between stages (f_R and g join, f_S freezes), which DDP's reducer does not allow without
find_unused_parameters. Streams are infinite, so there is no sampler: each rank gets its own
StreamContext (rank, world_size) and draws its share of the global batch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import re
import time
import types
import typing
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import yaml

from featmap_ros.backends.torch_net import bf16_native
from featmap_ros.errors import FeatmapError
from featmap_ros.heads.dense_train import dense_loss
from featmap_ros.heads.keypoints_train import keypoint_loss
from featmap_ros.heap import heap_for_training
from featmap_ros.model import checkpoint as ckpt
from featmap_ros.model.losses import POSE_LOSSES, feature_loss, mmd, pose_loss
from featmap_ros.model.nets import ExemplarBank, FeatureMappingModel, NetConfig, pooled_features

METHODS = ("fm", "fm_mmd", "fm_joint", "synthetic", "real", "mixed", "finetune")
MAPPING_METHODS = ("fm", "fm_mmd", "fm_joint")  # the methods whose checkpoint has g
CHECKPOINT_STEM = "model"

Batch = dict[str, torch.Tensor]


class TrainError(FeatmapError, RuntimeError):
    """Training cannot start or go on: bad config, missing data stream, non-finite loss."""


# --------------------------------------------------------------------------------------------
# Configuration: one typed source of defaults; YAML files hold only the differences.


@dataclass(frozen=True)
class OptimConfig:
    """AdamW and a per-stage schedule (linear warm-up, then constant or cosine decay)."""

    lr: float = 1e-3
    weight_decay: float = 1e-4
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    warmup_steps: int = 200
    schedule: str = "cosine"
    min_lr_ratio: float = 0.05
    grad_clip: float = 0.0
    # Exponential moving average of the weights (0: off). The checkpoint holds the averaged weights
    # (what is evaluated and deployed); the average restarts at each stage's start and its decay
    # warms up as min(ema_decay, (1 + t) / (10 + t)) over the stage's t-th update, so a stage shorter
    # than ~9 / (1 - ema_decay) steps averages about its last 10% whatever the decay. No gain at the
    # main job's CPU budgets (docs/results.md, session 15): meant for long runs.
    ema_decay: float = 0.0


@dataclass(frozen=True)
class LossConfig:
    """Which pose loss and the weights of the terms (pose_real has weight 1)."""

    pose: str = "mse"
    smooth_l1_beta: float = 0.05
    lambda_feat: float = 1.0
    lambda_syn: float = 1.0
    lambda_mmd: float = 0.1
    # fm_joint only: whether the feature loss reaches f through the real image's pass (True) or trains g
    # alone (False: f(real) detached for that loss). f is shared with the synthetic domain there, so a
    # feature loss that moves f moves the synthetic features too; with False only pose losses shape f.
    # fm and fm_mmd ignore it (their f_R belongs to the real domain alone).
    feat_through_f: bool = True
    # The dense object head: weight of the coordinate term against the visibility term.
    dense_coord_weight: float = 1.0


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run needs besides data; saved as config.yaml next to the checkpoint."""

    method: str = "fm"
    net: NetConfig = field(default_factory=NetConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    batch_size: int = 64  # global: each of N ranks draws batch_size / N
    stage1_steps: int = 20000
    stage2_steps: int = 20000
    max_steps: int = 0  # stop and checkpoint at this global step (0: run all stages), for time-boxed jobs
    checkpoint_every: int = 1000
    log_every: int = 50
    seed: int = 0
    device: str = "auto"  # 'auto' (cuda if available), 'cpu', 'cuda'
    # bf16 autocast of the extractor and the mapping (the heads and losses stay float32) where the
    # device computes bf16 natively (bf16_native): CUDA with bf16, a CPU with AMX or AVX512-BF16.
    # Elsewhere float32: emulated bf16 would be slower, not faster.
    amp: bool = True
    # torch's CPU threads for this process (0: torch's default, one per core). On a CPU shared with
    # other jobs (rendering workers, a second run) fewer threads stall less.
    cpu_threads: int = 0
    # The nets' weights and images in channels_last (NHWC) memory: each step 1.12-1.26x faster in float32 on
    # the Intel Xeon without bf16 (the main job's and LM-O's nets, one and two threads; session 20,
    # bench/bench_memory_format.py; max pooling, slow on NCHW there, is the largest single share). None: on a CPU only,
    # as CUDA was not measured. The checkpoint is the same either way (saved contiguous).
    channels_last: bool | None = None
    resume: bool = True
    tensorboard: bool = True

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise TrainError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.loss.pose not in POSE_LOSSES:
            raise TrainError(f"loss.pose must be one of {POSE_LOSSES}, got {self.loss.pose!r}")
        if self.optim.schedule not in ("constant", "cosine"):
            raise TrainError(f"optim.schedule must be 'constant' or 'cosine', got {self.optim.schedule!r}")
        if self.batch_size < 1 or self.stage1_steps < 0 or self.stage2_steps < 0 or self.max_steps < 0:
            raise TrainError(f"batch_size must be >= 1 and step counts >= 0: {self}")
        if self.checkpoint_every < 1 or self.log_every < 1:
            raise TrainError("checkpoint_every and log_every must be >= 1")
        if self.cpu_threads < 0:
            raise TrainError(f"cpu_threads must be >= 0 (0 = torch's default), got {self.cpu_threads}")
        if self.stage1_steps + self.stage2_steps < 1:
            raise TrainError("stage1_steps + stage2_steps is 0: there is nothing to train")
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device):
            raise TrainError(f"device {self.device!r} is unknown; expected auto, cpu, cuda or cuda:N")
        _check_ranges(self)


# (section, field) -> (low, high, whether high is excluded); every float must also be finite.
_RANGES: dict[tuple[str, str], tuple[float, float, bool]] = {
    ("optim", "lr"): (0.0, math.inf, False),
    ("optim", "weight_decay"): (0.0, math.inf, False),
    ("optim", "beta1"): (0.0, 1.0, True),
    ("optim", "beta2"): (0.0, 1.0, True),
    ("optim", "eps"): (1e-30, math.inf, False),
    ("optim", "warmup_steps"): (0, math.inf, False),
    ("optim", "min_lr_ratio"): (0.0, 1.0, False),
    ("optim", "grad_clip"): (0.0, math.inf, False),
    ("optim", "ema_decay"): (0.0, 1.0, True),
    ("loss", "smooth_l1_beta"): (0.0, math.inf, False),
    ("loss", "lambda_feat"): (0.0, math.inf, False),
    ("loss", "lambda_syn"): (0.0, math.inf, False),
    ("loss", "lambda_mmd"): (0.0, math.inf, False),
    ("loss", "dense_coord_weight"): (0.0, math.inf, False),
}


def method_net(net: NetConfig, method: str) -> NetConfig:
    """The net a method trains: with g (and f_R, unless fm_joint's one shared f) for the mapping methods."""
    return dataclasses.replace(net, mapping=method in MAPPING_METHODS, shared_extractor=method == "fm_joint")


def _check_ranges(cfg: TrainConfig) -> None:
    """Every float of the config finite, and the optimiser's and losses' values in range; name the key."""
    for section in ("optim", "loss", "net"):
        part = getattr(cfg, section)
        for f in dataclasses.fields(part):
            value = getattr(part, f.name)
            key = f"{section}.{f.name}"
            if isinstance(value, float) and not math.isfinite(value):
                raise TrainError(f"{key} = {value} must be a finite number")
            if (section, f.name) in _RANGES:
                low, high, open_high = _RANGES[(section, f.name)]
                if not (low <= value and (value < high if open_high else value <= high)):
                    span = f"[{low}, {high})" if open_high else f"[{low}, {high}]"
                    raise TrainError(f"{key} = {value} is outside {span}")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check a YAML value against a type hint and convert lists/dicts; raise TrainError naming the key."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, where)
            except TrainError:
                pass
        raise TrainError(f"{where}: expected {tp}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise TrainError(f"{where}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return _build(tp, value, where)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise TrainError(f"{where}: expected a list, got {value!r}")
        (item,) = {a for a in typing.get_args(tp) if a is not Ellipsis}
        return tuple(_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value))
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp in (int, str, bool) and isinstance(value, tp) and not (tp is int and isinstance(value, bool)):
        return value
    raise TrainError(f"{where}: expected {getattr(tp, '__name__', tp)}, got {type(value).__name__} {value!r}")


def _build(cls: type, data: dict[str, Any], where: str) -> Any:
    """Build a (nested) config dataclass from a dict, refusing unknown keys and wrong types."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise TrainError(f"{where}: unknown keys {unknown}; known keys are {sorted(names)}")
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}") for k, v in data.items()}
    try:
        return cls(**kwargs)
    except (ValueError, TrainError) as err:  # NetConfig validates itself with ValueError
        raise TrainError(f"{where}: {err}") from err


def _read_mapping(path: str | os.PathLike[str]) -> dict[str, Any]:
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as err:
        raise TrainError(f"cannot read config {path}: {err}") from err
    if not isinstance(data, dict):
        raise TrainError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def load_dataclass_yaml(cls: type, path: str | os.PathLike[str]) -> Any:
    """Build config dataclass cls from a YAML of differences from its defaults (unknown keys, wrong types fail)."""
    return dataclass_from_mapping(cls, _read_mapping(path), str(path))


def dataclass_from_mapping(cls: type, data: dict[str, Any], where: str) -> Any:
    """Build config dataclass cls from a mapping of differences from its defaults, as load_dataclass_yaml does."""
    return _build(cls, data, where)


def dataclass_from_overrides(cls: type, items: list[str], where: str = "--set") -> tuple[Any, dict[str, Any]]:
    """cls from FIELD=VALUE strings (a command line's --set; each VALUE read as YAML); (config, the changes).

    Raises:
        TrainError: an item without '=', or what dataclass_from_mapping refuses.
    """
    changes: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise TrainError(f"{where} {item}: expected FIELD=VALUE")
        changes[key] = yaml.safe_load(value)
    return _build(cls, changes, where), changes


def load_config(path: str | os.PathLike[str] | None = None, task: str | None = None) -> TrainConfig:
    """Read a YAML of differences from the defaults; task (objects|hands) sets net.task and its defaults."""
    data: dict[str, Any] = {}
    where = "config"
    if path is not None:
        where = str(path)
        data = _read_mapping(path)
    if task is not None:
        if not isinstance(data.get("net") or {}, dict):
            raise TrainError(f"{where}.net: expected a mapping of NetConfig fields, got {data['net']!r}")
        net = dict(data.get("net") or {})
        if net.get("task", task) != task:
            raise TrainError(f"{where}: net.task is {net['task']!r} but the command asks for {task!r}")
        data = {**data, "net": {**net, "task": task}}
    return _build(TrainConfig, data, where)


def config_to_dict(cfg: TrainConfig) -> dict[str, Any]:
    """Plain dict (lists, not tuples) of a config, as written to YAML and into checkpoints."""

    def plain(v: Any) -> Any:
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(dataclasses.asdict(cfg))


def save_config(cfg: TrainConfig, path: str | os.PathLike[str]) -> None:
    """Write the full resolved config as YAML (load_config reads it back to an equal config)."""
    ckpt.atomic_write(Path(path), yaml.safe_dump(config_to_dict(cfg), sort_keys=False).encode())


# --------------------------------------------------------------------------------------------
# The data interface the streams plug into.


@dataclass(frozen=True)
class StreamContext:
    """What a stream needs to know: its share of the batch, its seed, its rank, where to restart."""

    batch_size: int  # this rank's share of the global batch
    seed: int
    rank: int
    world_size: int
    start_step: int  # batches this stream already delivered to the run (non-zero on resume)


@dataclass
class TaskData:
    """Stream factories; each returns an endless iterator of batches on CPU.

    synthetic: {'image': (B, C, S, S), 'target': (B, D)} rendered images.
    pairs: {'real': (B, C, S, S), 'syn': (B, C, S, S), 'target': (B, D)}: real images, renders at
        the same pose, and their targets (the real baseline uses 'real' and 'target').
    unlabeled_real: {'image': (B, C, S, S)} for the MMD term; pairs' real images when None.
    """

    synthetic: Callable[[StreamContext], Iterator[Batch]] | None = None
    pairs: Callable[[StreamContext], Iterator[Batch]] | None = None
    unlabeled_real: Callable[[StreamContext], Iterator[Batch]] | None = None
    labels: tuple[str, ...] = ()  # object names or joint names, for the checkpoint
    normalisation: str = ""  # how images and targets were normalised, for the checkpoint
    meta: dict[str, Any] = field(default_factory=dict)  # what the estimator needs (objects, hands, crop), JSON-able
    feature_stats_batches: int = 8  # synthetic batches whose f_S features give the out-of-domain statistics


@dataclass(frozen=True)
class Stage:
    """A run of steps [start, end) with one kind of loss and the streams it draws from."""

    name: str  # 'syn', 'real', 'mixed', 'fm' or 'fm_joint'
    start: int
    end: int
    streams: tuple[str, ...]


def plan_stages(cfg: TrainConfig, has_unlabeled: bool = False) -> list[Stage]:
    """The stages of a method; every method spends stage1_steps + stage2_steps steps."""
    s1, total = cfg.stage1_steps, cfg.stage1_steps + cfg.stage2_steps
    m = cfg.method
    if m == "synthetic":
        return [Stage("syn", 0, total, ("synthetic",))]
    if m == "real":
        return [Stage("real", 0, total, ("pairs",))]
    if m == "mixed":
        return [Stage("mixed", 0, total, ("synthetic", "pairs"))]
    if m == "fm_joint":
        return [Stage("fm_joint", 0, total, ("synthetic", "pairs"))]
    second = Stage("real", s1, total, ("pairs",))
    if m in ("fm", "fm_mmd"):
        extra = ("unlabeled_real",) if m == "fm_mmd" and has_unlabeled else ()
        second = Stage("fm", s1, total, ("synthetic", "pairs", *extra))
    return [s for s in (Stage("syn", 0, s1, ("synthetic",)), second) if s.end > s.start]


def _consumed(stages: list[Stage], stream: str, step: int) -> int:
    """How many batches a stream delivered before a global step (so resumed streams do not replay)."""
    return sum(max(0, min(step, s.end) - s.start) for s in stages if stream in s.streams)


def lr_at(step: int, stage: Stage, optim: OptimConfig) -> float:
    """Learning rate at a global step: warm-up from each stage's start, then constant or cosine."""
    k = step - stage.start
    if k < optim.warmup_steps:
        return optim.lr * (k + 1) / optim.warmup_steps
    if optim.schedule == "constant":
        return optim.lr
    span = max(1, stage.end - stage.start - optim.warmup_steps)
    cos = 0.5 * (1 + math.cos(math.pi * min(1.0, (k - optim.warmup_steps) / span)))
    return optim.lr * (optim.min_lr_ratio + (1 - optim.min_lr_ratio) * cos)


class WeightAverage:
    """An exponential moving average of a model's floating-point state (parameters and buffers).

    The decay warms up as min(decay, (1 + t) / (10 + t)) over the t-th update since the last reset, so a
    short stage is not dominated by the weights it started from.
    """

    def __init__(self, model: torch.nn.Module, decay: float) -> None:
        state = model.state_dict()  # detached views of the live tensors: copies into them move the model
        self.names = [k for k, v in state.items() if v.is_floating_point()]
        self._live = [state[k] for k in self.names]
        self.shadow = [v.detach().clone() for v in self._live]
        self.decay = decay
        self.updates = 0

    @torch.no_grad()
    def reset(self) -> None:
        """Start the average again at the model's current weights."""
        for s, v in zip(self.shadow, self._live, strict=True):
            s.copy_(v)
        self.updates = 0

    @torch.no_grad()
    def update(self) -> None:
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        torch._foreach_lerp_(self.shadow, self._live, 1.0 - d)
        self.updates += 1

    @torch.no_grad()
    def copy_to_model(self) -> None:
        for s, v in zip(self.shadow, self._live, strict=True):
            v.copy_(s)

    def live_weights(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in zip(self.names, self._live, strict=True)}

    @contextlib.contextmanager
    def applied(self) -> Iterator[dict[str, torch.Tensor]]:
        """Inside the block the model holds the averaged weights (the block gets the live ones); after, its own."""
        live = self.live_weights()
        self.copy_to_model()
        try:
            yield live
        finally:
            with torch.no_grad():
                for k, v in zip(self.names, self._live, strict=True):
                    v.copy_(live[k])


# --------------------------------------------------------------------------------------------
# Losses of one step, by stage.


def select_outputs(pred: torch.Tensor, obj_index: torch.Tensor | None, width: int) -> torch.Tensor:
    """(B, width * n_objects) -> (B, width): each sample's own object's slice of a multi-object head.

    One network serves several objects: the head has `width` outputs per object (16 corners
    coordinates for BB8) and a sample's loss sees only the slice of its object.
    """
    if pred.shape[1] == width:
        return pred
    if obj_index is None:
        raise TrainError(f"head has {pred.shape[1]} outputs for targets of {width}, but the batch has no obj_index")
    cols = obj_index.long().view(-1, 1) * width + torch.arange(width, device=pred.device).view(1, -1)
    return pred.gather(1, cols)


def stage_losses(
    model: FeatureMappingModel, stage: str, batches: dict[str, Batch], loss: LossConfig, with_mmd: bool
) -> dict[str, torch.Tensor]:
    """Named, unweighted losses of one step; batches maps stream name to its batch (on device)."""

    def pose(features: torch.Tensor, batch: Batch, key: str = "target") -> torch.Tensor:
        """The pose loss of h on these features (the dense head's loss reads its training outputs)."""
        if model.cfg.head == "dense":
            idx = batch.get("obj_index")
            return dense_loss(model.h.train_outputs(features, idx), batch["coords"], batch["visibility"], idx,
                              loss.smooth_l1_beta, coord_weight=loss.dense_coord_weight,
                              coord_bins=model.cfg.coord_bins)
        pred = model.h(features)
        if model.cfg.head == "keypoints":
            if "keypoints" not in batch:
                raise TrainError("the keypoint head needs batches with 'keypoints' (pools made with head='keypoints')")
            return keypoint_loss(pred, batch["keypoints"], batch["visibility"], batch.get("obj_index"),
                                 loss.smooth_l1_beta)
        pred = select_outputs(pred, batch.get("obj_index"), batch[key].shape[1])
        return pose_loss(pred.float(), batch[key].float(), loss.pose, loss.smooth_l1_beta)

    out: dict[str, torch.Tensor] = {}
    if stage in ("syn", "mixed"):
        syn = batches["synthetic"]
        out["pose_syn"] = pose(model.features_syn(syn["image"]), syn)
    if stage in ("real", "mixed"):
        pairs = batches["pairs"]
        out["pose_real"] = pose(model.features_real(pairs["real"]), pairs)
    if stage in ("fm", "fm_joint"):
        syn, pairs = batches["synthetic"], batches["pairs"]
        # The pair's synthetic features are a fixed target: the feature loss trains g and the real image's f.
        # fm: f_S is frozen (and in eval mode), so the stream's features are fixed too; fm_joint: the one f
        # keeps learning from the synthetic stream.
        with torch.no_grad():
            f_pair = model.features_syn(pairs["syn"]).float()
        with torch.no_grad() if stage == "fm" else contextlib.nullcontext():
            f_stream = model.features_syn(syn["image"])
        f_stream = f_stream.float() if stage == "fm" else f_stream
        if stage == "fm_joint" and not loss.feat_through_f:
            f_real = model.f_S(pairs["real"])
            mapped = model.g(f_real)
            feat_in = model.g(f_real.detach())  # the feature loss trains g only
        else:
            mapped = feat_in = model.features_real(pairs["real"])
        out["pose_real"] = pose(mapped, pairs)
        out["feat"] = feature_loss(feat_in.float(), f_pair)
        out["pose_syn"] = pose(f_stream, syn)
        if with_mmd:
            unl = batches["unlabeled_real"]["image"] if "unlabeled_real" in batches else None
            mapped_unl = mapped if unl is None else model.features_real(unl)
            out["mmd"] = mmd(pooled_features(mapped_unl).float(), pooled_features(f_stream))
    return out


def _weighted_total(losses: dict[str, torch.Tensor], loss: LossConfig) -> torch.Tensor:
    weights = {"pose_real": 1.0, "pose_syn": loss.lambda_syn, "feat": loss.lambda_feat, "mmd": loss.lambda_mmd}
    return sum(weights[k] * v for k, v in losses.items())  # type: ignore[return-value]


def _set_trainable(model: FeatureMappingModel, stage: str) -> None:
    """Freeze f_S during the mapping stage; everything else trains (unused parts just get no gradient)."""
    model.train()
    for p in model.parameters():
        p.requires_grad_(True)
    if stage == "fm":
        model.f_S.eval()
        for p in model.f_S.parameters():
            p.requires_grad_(False)


def _average_gradients(params: list[torch.nn.Parameter], world_size: int) -> None:
    """All-reduce the gradients that exist, as one flat buffer, and divide by the world size."""
    grads = [p.grad for p in params if p.grad is not None]
    if world_size == 1 or not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world_size
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


# The batch keys that hold the images f reads (a stream's, a pair's two).
IMAGE_KEYS = ("image", "real", "syn")


def _to_device(batch: Batch, device: torch.device, channels_last: bool = False) -> Batch:
    """The batch on device; with channels_last, its 4-D images (IMAGE_KEYS) in that memory format."""
    out = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    if channels_last:
        for k in IMAGE_KEYS:
            if k in out and out[k].dim() == 4:
                out[k] = out[k].contiguous(memory_format=torch.channels_last)
    return out


def uses_channels_last(cfg: TrainConfig, device: torch.device) -> bool:
    """TrainConfig.channels_last resolved for the device (None: a CPU's yes, CUDA's no)."""
    return device.type == "cpu" if cfg.channels_last is None else bool(cfg.channels_last)


# --------------------------------------------------------------------------------------------
# The training run.


def train(config: TrainConfig, data: TaskData, out_dir: str | os.PathLike[str], method: str | None = None,
          on_step: Callable[[int], None] | None = None) -> Path:
    """Train one method and return the path of the final checkpoint's JSON (out_dir/model.json).

    A checkpoint with optimiser state is written every checkpoint_every steps and at the end; with
    config.resume a rerun continues from it at its step. Raises TrainError on bad input or a
    non-finite loss (naming the step and the loss). on_step: called between steps with the step
    reached, in the training's thread (where torch's thread count can change: main_job's hand-over).
    """
    cfg = dataclasses.replace(config, method=method) if method is not None else config
    # ---- setup: process group, device, seeds
    created_group = False
    if not (dist.is_available() and dist.is_initialized()) and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        created_group = True
    distributed = dist.is_available() and dist.is_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    if cfg.batch_size % world:
        raise TrainError(f"batch_size {cfg.batch_size} is not divisible by the world size {world}")
    use_cuda = cfg.device.startswith("cuda") or (cfg.device == "auto" and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        raise TrainError(f"device {cfg.device!r} asked for, but torch sees no CUDA device")
    if use_cuda and distributed and dist.get_backend() == "nccl":
        local = int(os.environ.get("LOCAL_RANK", rank))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device(cfg.device if cfg.device.startswith("cuda") else "cuda" if use_cuda else "cpu")
    if device.type == "cpu" and cfg.cpu_threads > 0:
        torch.set_num_threads(cfg.cpu_threads)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / CHECKPOINT_STEM
    stages = plan_stages(cfg, data.unlabeled_real is not None)
    total = stages[-1].end if stages else 0
    needed = {s for st in stages for s in st.streams}
    missing = sorted(s for s in needed if getattr(data, s) is None)
    if missing:
        raise TrainError(f"method {cfg.method!r} needs the data streams {missing}, which TaskData lacks")

    # ---- model and optimiser (same seed on every rank gives the same initial weights)
    torch.manual_seed(cfg.seed)
    net_cfg = method_net(cfg.net, cfg.method)
    model = FeatureMappingModel(net_cfg).to(device)
    channels_last = uses_channels_last(cfg, device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    params = list(model.parameters())
    o = cfg.optim
    optimizer = torch.optim.AdamW(params, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, weight_decay=o.weight_decay)

    # ---- resume
    step = 0
    live: dict[str, torch.Tensor] | None = None
    json_path = stem.with_name(stem.name + ".json")
    if cfg.resume:
        _recover(stem, rank, distributed)
    if cfg.resume and json_path.is_file():
        saved, doc = ckpt.load(stem, expect_task=net_cfg.task)
        # The saved net as read (fields added since it was written take their defaults), not its raw JSON.
        if doc.get("method") != cfg.method or saved.cfg.to_dict() != net_cfg.to_dict():
            raise TrainError(
                f"{json_path} holds method {doc.get('method')!r} with net {doc.get('net')}; this run is "
                f"{cfg.method!r} with {net_cfg.to_dict()}: use another out_dir or resume=False"
            )
        model.load_state_dict(saved.state_dict())
        ckpt.load_optimizer(stem, optimizer)
        step = int(doc["step"])
        live = ckpt.load_live_weights(stem)
    average = WeightAverage(model, o.ema_decay) if o.ema_decay > 0 else None
    if live is not None:  # the checkpoint's weights are an average; training goes on from the live ones
        model.load_state_dict({**model.state_dict(), **live})
        if average is not None:
            stage_now = next((s for s in stages if s.start <= step < s.end), None)
            average.updates = step - stage_now.start if stage_now is not None else 0
    stop = min(total, cfg.max_steps) if cfg.max_steps else total
    if step >= stop:  # nothing left to do: keep the checkpoint (and its summary) as it is
        if created_group:
            dist.destroy_process_group()
        return json_path
    if rank == 0:
        save_config(cfg, out / "config.yaml")
        _trim_history(out / "history.jsonl", step)

    # Dropout draws differ per rank and after a resume, like the data.
    torch.manual_seed(cfg.seed + 1_000_003 * rank + step)
    streams: dict[str, Iterator[Batch]] = {}
    for name in sorted(needed):
        ctx = StreamContext(cfg.batch_size // world, cfg.seed, rank, world, _consumed(stages, name, step))
        streams[name] = getattr(data, name)(ctx)

    writer = None
    if rank == 0 and cfg.tensorboard:
        from torch.utils.tensorboard import SummaryWriter  # slow import, rank 0 only

        writer = SummaryWriter(str(out / "tb"))
    from tqdm import tqdm

    bar = tqdm(total=stop, initial=step, disable=rank != 0, desc=f"{net_cfg.task}/{cfg.method}", dynamic_ncols=True)
    use_amp = cfg.amp and bf16_native(device)
    window: dict[str, float] = {}
    window_n = 0
    last_logged: dict[str, float] = {}
    t0 = time.time()
    current: Stage | None = None

    def save_checkpoint(at: int, final: bool = False) -> Path:
        if average is None:
            return write_checkpoint(at, final, None)
        with average.applied() as live_now:  # the average is what is evaluated and deployed
            return write_checkpoint(at, final, live_now)

    def write_checkpoint(at: int, final: bool, live_now: dict[str, torch.Tensor] | None) -> Path:
        # Every rank takes part in drawing the statistics' batches (cheap), only rank 0 writes.
        stats = feature_statistics(model, data, cfg, rank, world, device) if final else None
        if rank == 0:
            meta = {
                **data.meta,
                "method": cfg.method,
                "step": at,
                "labels": list(data.labels),
                "normalisation": data.normalisation,
                "input_size": net_cfg.input_size,
                "training": {
                    "total_steps": total,
                    "stages": [dataclasses.asdict(s) for s in stages],
                    "global_batch": cfg.batch_size,
                    "world_size": world,
                    "device": str(device),
                    "bf16_autocast": use_amp,
                    "channels_last": channels_last,
                    "cpu_threads": torch.get_num_threads() if device.type == "cpu" else None,  # at this checkpoint
                    "ema_decay": o.ema_decay,
                    "last_losses": last_logged,
                    "wall_s_this_session": round(time.time() - t0, 1),
                },
                "config": config_to_dict(cfg),
            }
            if stats is not None:
                meta["feature_stats"] = stats
            ckpt.save(stem, model, meta, optimizer, keep_previous=True, live_weights=live_now)
        if distributed:
            dist.barrier()
        return json_path

    heap = contextlib.ExitStack()
    try:
        # Built above, outside: the streams' data (where a cached set pins glibc's mmap threshold).
        heap.enter_context(heap_for_training())
        # ---- loop
        while step < stop:
            stage = next(s for s in stages if s.start <= step < s.end)
            if stage is not current:
                if step == stage.start and step > 0 and average is not None:
                    average.copy_to_model()  # a stage goes on from the previous stage's averaged weights
                if stage.name == "fm" and step == stage.start:
                    model.init_real_from_syn()
                if step == stage.start and average is not None:
                    average.reset()
                _set_trainable(model, stage.name)
                current = stage
            lr = lr_at(step, stage, o)
            for group in optimizer.param_groups:
                group["lr"] = lr
            batches = {name: _to_device(next(streams[name]), device, channels_last) for name in stage.streams}

            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                losses = stage_losses(model, stage.name, batches, cfg.loss, cfg.method == "fm_mmd")
            total_loss = _weighted_total(losses, cfg.loss)
            # One small all-reduce of the loss values: every rank sees the same numbers, so a
            # non-finite loss stops all ranks together instead of leaving the others hanging.
            values = torch.stack([v.detach().float() for v in (*losses.values(), total_loss)])
            if distributed:
                dist.all_reduce(values)
                values /= world
            named = dict(zip([*losses, "total"], values.tolist(), strict=True))
            bad = {k: v for k, v in named.items() if not math.isfinite(v)}
            if bad:
                raise TrainError(f"non-finite loss at step {step} (stage {stage.name}, method {cfg.method}): {bad}")

            optimizer.zero_grad(set_to_none=True)
            total_loss.backward()
            _average_gradients(params, world)
            if o.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_([p for p in params if p.grad is not None], o.grad_clip)
            optimizer.step()
            if average is not None:
                average.update()
            step += 1
            if on_step is not None:
                on_step(step)

            for k, v in named.items():
                window[k] = window.get(k, 0.0) + v
            window_n += 1
            if step % cfg.log_every == 0 or step == stop:
                last_logged = {k: v / window_n for k, v in window.items()}
                window, window_n = {}, 0
                if rank == 0:
                    record = {"step": step, "stage": stage.name, "lr": lr, **last_logged}
                    with open(out / "history.jsonl", "a") as f:
                        f.write(json.dumps(record) + "\n")
                    if writer is not None:
                        for k, v in last_logged.items():
                            writer.add_scalar(f"loss/{k}", v, step)
                        writer.add_scalar("lr", lr, step)
                    bar.set_postfix({k: f"{v:.4g}" for k, v in last_logged.items()})
            bar.update(1)
            if step % cfg.checkpoint_every == 0 and step != stop:
                save_checkpoint(step)

        return save_checkpoint(step, final=step >= total)
    finally:
        heap.close()
        bar.close()
        if writer is not None:
            writer.close()
        if created_group:
            dist.destroy_process_group()


@torch.no_grad()
def feature_statistics(model: FeatureMappingModel, data: TaskData, cfg: TrainConfig, rank: int, world: int,
                       device: torch.device) -> dict[str, list[float]] | None:
    """Mean and standard deviation (D,) of f_S over synthetic batches: the estimator's out-of-domain reference."""
    if data.synthetic is None or data.feature_stats_batches < 1:
        return None
    was_training = model.training
    model.eval()
    stream = data.synthetic(StreamContext(max(1, cfg.batch_size // world), cfg.seed + 7919, rank, world, 0))
    feats = [pooled_features(model.features_syn(next(stream)["image"].to(device))).float().cpu()
             for _ in range(data.feature_stats_batches)]
    model.train(was_training)
    f = torch.cat(feats)
    return {"mean": f.mean(0).tolist(), "std": f.std(0).tolist(), "n": len(f)}


def _recover(stem: Path, rank: int, distributed: bool) -> None:
    """Rank 0 mends a checkpoint torn by a kill inside a save (back to the previous generation)."""
    failed: ckpt.CheckpointError | None = None
    if rank == 0:
        try:
            ckpt.recover(stem)
        except ckpt.CheckpointError as err:
            failed = err  # raised after the barrier, so the other ranks do not wait for rank 0 forever
    if distributed:
        dist.barrier()
    if failed is not None:
        raise failed


def _trim_history(path: Path, step: int) -> None:
    """Drop history lines past the resumed step (logged after the last checkpoint of a killed run).

    A kill while a line is written leaves it partial: the last line may be dropped, any other bad
    line is an error naming it.
    """
    if not path.is_file():
        return
    lines = path.read_text().splitlines()
    keep = []
    for i, line in enumerate(lines):
        try:
            record = json.loads(line) if line.strip() else None
            at = record["step"] if isinstance(record, dict) else None
        except (json.JSONDecodeError, KeyError):
            at = None
        if isinstance(at, int) and not isinstance(at, bool):
            if at <= step:
                keep.append(line)
        elif line.strip() and i < len(lines) - 1:
            raise TrainError(f"{path}:{i + 1} is not a history record with a step: {line[:80]!r}")
    ckpt.atomic_write(path, "".join(line + "\n" for line in keep).encode())


# --------------------------------------------------------------------------------------------
# The exemplar baseline.


@torch.no_grad()
def build_exemplar_bank(
    model: FeatureMappingModel, data: TaskData, n: int, batch_size: int = 64, seed: int = 12345
) -> ExemplarBank:
    """Collect f_S features (N, D) and targets (N, n_outputs) of n synthetic exemplars from data.synthetic.

    Query the bank with model.features_real(x_real): with a mapping that is g(f_R(x)), so real
    images are matched in the synthetic feature space; without, f_S(x).
    """
    if data.synthetic is None:
        raise TrainError("an exemplar bank needs TaskData.synthetic")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    feats, targets = [], []
    stream = data.synthetic(StreamContext(batch_size, seed, 0, 1, 0))
    have = 0
    while have < n:
        batch = next(stream)
        feats.append(pooled_features(model.features_syn(batch["image"].to(device))).float().cpu())
        targets.append(batch["target"].float().cpu())
        have += len(batch["image"])
    model.train(was_training)
    return ExemplarBank(torch.cat(feats)[:n], torch.cat(targets)[:n])
