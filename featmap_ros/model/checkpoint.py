"""Self-describing checkpoints: weights in safetensors, everything else in a JSON beside them.

`<stem>.safetensors` holds the model weights, `<stem>.json` the format key and version, the task,
the NetConfig, the SHA-256 of the weights and whatever the caller adds (method, labels,
normalisation, training summary, step, config). With an optimiser, `<stem>.optim.safetensors`
holds its tensors (param_groups go into the JSON), so a run resumes without pickle. Each file is
written to a temporary name and moved into place; the JSON goes last, so a reader either sees
the previous checkpoint whole or a hash mismatch (a kill between the renames), never a mix.
Exemplar banks (features and targets of synthetic exemplars) use `<stem>.exemplars.safetensors`.
A hand checkpoint may also carry a centre refiner (model/refiner.py): its tensors in the same
weights file under REFINER_PREFIX, its RefinerConfig in meta['hands']['refiner'] (attach_refiner,
load_refiner); checkpoints without one load as before.

Kill safety (save(..., keep_previous=True), as training saves): before the new files move in, the
current checkpoint, if complete, becomes the previous generation `<stem>.prev.*` (hard links, so
no copy of the weights). At every instant one generation is complete, and latest_complete()
finds the newest: a kill at any point loses at most the checkpoint being written.

load() validates the metadata the estimator reads (objects, crop, hands, head, feature_stats)
once, naming the bad key, so a bad checkpoint fails at load rather than on every frame.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import secrets
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

import featmap_ros
from featmap_ros.errors import FeatmapError
from featmap_ros.model.nets import TASKS, FeatureMappingModel, NetConfig
from featmap_ros.model.refiner import REFINER_PREFIX, CentreRefiner, RefinerConfig

log = logging.getLogger(__name__)

FORMAT = "featmap_ros.checkpoint"
FORMAT_VERSION = 1
EXEMPLAR_FORMAT = "featmap_ros.exemplars"
_LIVE = "live."  # prefix of the live weights in an optimiser-state file (an averaged model's checkpoint)
_RESERVED = ("format", "format_version", "code_version", "task", "net", "weights", "optimizer")
PREVIOUS = ".prev"  # <stem>.prev.* holds the previous generation of a checkpoint saved with keep_previous
# The metadata keys that make a checkpoint one the estimator can run, per task (see estimator.py).
ESTIMATOR_KEYS = {"objects": ("objects", "crop"), "hands": ("hands", "crop")}


class CheckpointError(FeatmapError, RuntimeError):
    """A checkpoint is missing, foreign, of another task, corrupted or does not fit the model."""


def stem_of(path: str | os.PathLike[str]) -> Path:
    """Map a directory, a stem or a .json/.safetensors path to the checkpoint stem (dir/model for a dir)."""
    p = Path(path)
    if p.is_dir():
        return p / "model"
    for suffix in (".optim.safetensors", ".exemplars.safetensors", ".safetensors", ".json"):
        if p.name.endswith(suffix):
            return p.with_name(p.name[: -len(suffix)])
    return p


def previous_stem(path: str | os.PathLike[str]) -> Path:
    """The stem of a checkpoint's previous generation (dir/model -> dir/model.prev)."""
    stem = stem_of(path)
    return stem.with_name(stem.name + PREVIOUS)


def _tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")


def atomic_write(path: Path, data: bytes) -> None:
    """Write bytes to a temporary file in the same directory, fsync, then rename over path.

    The file gets the mode any new file gets (0666 less the umask), not mkstemp's 0600.
    """
    tmp = _tmp_name(path)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _atomic_link(src: Path, dst: Path) -> None:
    """Make dst hold src's bytes atomically: a hard link moved into place (a copy where links fail)."""
    if dst.exists() and os.path.samefile(src, dst):
        return  # already one file (rename would leave the temporary link behind)
    tmp = _tmp_name(dst)
    try:
        try:
            os.link(src, tmp)
        except OSError:  # a file system without hard links
            shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _fsync_dir(path: Path) -> None:
    """Make the renames in a directory durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _tensors_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    """Serialise tensors (moved to CPU, contiguous, unshared) with safetensors."""
    return st_save({k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}, metadata=metadata)


def _read_verified(path: Path, sha256: str | None) -> dict[str, torch.Tensor]:
    """Read a safetensors file, check its hash when one is given, and parse it."""
    if not path.is_file():
        raise CheckpointError(f"missing checkpoint file {path}")
    data = path.read_bytes()
    if sha256 is not None and _sha256(data) != sha256:
        raise CheckpointError(f"{path} has sha256 {_sha256(data)}, the JSON expects {sha256}: corrupted or replaced")
    try:
        return st_load(data)
    except (SafetensorError, ValueError, OSError) as err:
        raise CheckpointError(f"{path} is not a readable safetensors file: {err}") from err


def _optimizer_split(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split an optimiser state_dict into named tensors and JSON-able rest (param_groups, scalars)."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {}
    for idx, entry in state["state"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{idx}.{key}"] = value
            else:
                scalars[f"state.{idx}.{key}"] = value
    groups = [{k: list(v) if isinstance(v, tuple) else v for k, v in g.items()} for g in state["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars}


def save(
    path: str | os.PathLike[str],
    model: FeatureMappingModel,
    meta: dict[str, Any],
    optimizer: torch.optim.Optimizer | None = None,
    keep_previous: bool = False,
    live_weights: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write weights, optional optimiser state and the JSON description; return the JSON path.

    Args:
        path: a directory (writes model.*), a stem, or a .json/.safetensors path.
        model: the model; its NetConfig goes into the JSON so load() can rebuild it.
        meta: JSON-able extras, e.g. method, labels, normalisation, training, step, config.
        optimizer: when given, its state goes to <stem>.optim.safetensors for resuming.
        keep_previous: keep the checkpoint being replaced, if complete, as <stem>.prev.* so that
            a kill during this save leaves a complete one (latest_complete finds it). Without,
            a previous generation left in place is removed once the new checkpoint is whole.
        live_weights: when the model holds an average of the weights (OptimConfig.ema_decay), the
            weights training goes on from; stored beside the optimiser state (load_live_weights).
    """
    clash = sorted(set(meta) & set(_RESERVED))
    if clash:
        raise CheckpointError(f"meta keys {clash} are reserved for the checkpoint format")
    stem = stem_of(path)
    stem.parent.mkdir(parents=True, exist_ok=True)
    weights = _tensors_bytes(model.state_dict())
    doc: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "code_version": featmap_ros.__version__,
        "task": model.cfg.task,
        "net": model.cfg.to_dict(),
        "weights": {"file": stem.name + ".safetensors", "sha256": _sha256(weights)},
        "optimizer": None,
        **meta,
    }
    blob = b""
    if live_weights is not None and optimizer is None:
        raise CheckpointError("live_weights are stored with the optimiser state: pass the optimizer too")
    if optimizer is not None:
        tensors, rest = _optimizer_split(optimizer.state_dict())
        tensors.update({f"{_LIVE}{k}": v for k, v in (live_weights or {}).items()})
        blob = _tensors_bytes(tensors)
        doc["optimizer"] = {"file": stem.name + ".optim.safetensors", "sha256": _sha256(blob), **rest}
    try:
        text = json.dumps(doc, indent=2, sort_keys=False)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"meta is not JSON-serialisable: {err}") from err
    return _write_generation(stem, text, weights, blob if optimizer is not None else None,
                             link_previous=keep_previous, keep_previous=keep_previous)


def _write_generation(stem: Path, text: str, weights: bytes, optimizer_blob: bytes | None,
                      link_previous: bool, keep_previous: bool) -> Path:
    """Move a new generation (weights, optional optimiser state, then the JSON) into place at stem.

    link_previous: first make the current checkpoint, if complete, the previous generation, so a
    kill before the JSON's rename leaves a complete one. keep_previous: leave the previous
    generation afterwards (else it is removed once the new one is whole).
    """
    json_path = stem.with_name(stem.name + ".json")
    prev = previous_stem(stem)
    if link_previous and _complete(stem):
        _link_generation(stem, prev)
    # From here until the JSON's rename the current generation is torn and the previous one whole.
    atomic_write(stem.with_name(stem.name + ".safetensors"), weights)
    if optimizer_blob is not None:
        atomic_write(stem.with_name(stem.name + ".optim.safetensors"), optimizer_blob)
    atomic_write(json_path, text.encode())
    if not keep_previous:
        for suffix in (".json", ".safetensors", ".optim.safetensors"):  # the JSON first: never a torn pair
            prev.with_name(prev.name + suffix).unlink(missing_ok=True)
    _fsync_dir(stem.parent)
    return json_path


def _link_generation(src: Path, dst: Path) -> None:
    """Make the (complete) checkpoint at stem src also the one at stem dst; dst's JSON moves in last."""
    doc = json.loads(src.with_name(src.name + ".json").read_text())
    for key, suffix in (("weights", ".safetensors"), ("optimizer", ".optim.safetensors")):
        if doc.get(key):
            _atomic_link(src.parent / Path(str(doc[key]["file"])).name, dst.with_name(dst.name + suffix))
            doc[key] = {**doc[key], "file": dst.name + suffix}
    atomic_write(dst.with_name(dst.name + ".json"), json.dumps(doc, indent=2).encode())
    _fsync_dir(dst.parent)


def recover(path: str | os.PathLike[str]) -> Path | None:
    """Make the checkpoint at path complete again after a kill; return its JSON path, None if there is none.

    A torn current generation (a kill inside save) is replaced by the previous one, so the caller
    resumes from the checkpoint before: at most one checkpoint interval is lost.

    Raises:
        CheckpointError: no generation is complete (see latest_complete).
    """
    stem = stem_of(path)
    for tmp in stem.parent.glob(f".{stem.name}.*.tmp"):  # left by a kill inside atomic_write
        tmp.unlink(missing_ok=True)
    found = latest_complete(stem)
    if found is None:
        return None
    if found != stem:
        log.warning("%s.json is torn (a kill inside a save?): going back to the previous checkpoint %s.json",
                    stem, found)
        _link_generation(found, stem)
    return stem.with_name(stem.name + ".json")


def _complete(stem: Path) -> bool:
    """Whether stem's JSON is ours and its weights (and optimiser state, if named) match their hashes."""
    try:
        verify(stem)
    except CheckpointError:
        return False
    return True


def latest_complete(path: str | os.PathLike[str]) -> Path | None:
    """The stem of the newest complete generation of a checkpoint (stem or stem.prev), None if neither exists.

    The current generation is newer whenever it is complete: the previous one is only ever written
    from it. A torn current one (a kill inside save) falls back to the previous generation.

    Raises:
        CheckpointError: a checkpoint is there but no generation is complete (corrupted or
            replaced by hand, which a kill cannot cause); the message is the current one's fault.
    """
    stem = stem_of(path)
    prev = previous_stem(stem)
    candidates = [s for s in (stem, prev) if s.with_name(s.name + ".json").is_file()]
    if not candidates:
        return None
    for s in candidates:
        if _complete(s):
            return s
    verify(candidates[0])  # raises, naming what is wrong
    raise CheckpointError(f"{stem}: no complete checkpoint generation")  # pragma: no cover - verify raised


def verify(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Check a checkpoint's JSON and the hashes of its files without building the model; return the JSON."""
    stem = stem_of(path)
    doc = read_meta(stem)
    for key in ("weights", "optimizer"):
        info = doc.get(key)
        if key == "optimizer" and not info:
            continue
        if not isinstance(info, dict):
            raise CheckpointError(f"{stem}.json: {key!r} must name a file and its sha256, got {info!r}")
        file = stem.parent / Path(str(info.get("file", ""))).name
        if not file.is_file():
            raise CheckpointError(f"missing checkpoint file {file}")
        digest = _sha256(file.read_bytes())
        if digest != info.get("sha256"):
            raise CheckpointError(f"{file} has sha256 {digest}, the JSON expects {info.get('sha256')}: corrupted")
    return doc


def read_meta(path: str | os.PathLike[str], expect_task: str | None = None) -> dict[str, Any]:
    """Read and validate a checkpoint's JSON (format key, version, task) without touching weights."""
    stem = stem_of(path)
    json_path = stem.with_name(stem.name + ".json")
    if not json_path.is_file():
        raise CheckpointError(f"missing checkpoint description {json_path}")
    try:
        doc = json.loads(json_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{json_path} is not valid JSON: {err}") from err
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise CheckpointError(f"{json_path} is not a featmap_ros checkpoint (format key {FORMAT!r} missing)")
    if doc.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{json_path} has format_version {doc.get('format_version')}, expected {FORMAT_VERSION}")
    if doc.get("task") not in TASKS:
        raise CheckpointError(f"{json_path}: key 'task' is {doc.get('task')!r}, expected one of {list(TASKS)}")
    if expect_task is not None and doc.get("task") != expect_task:
        raise CheckpointError(f"{json_path} is a {doc.get('task')!r} checkpoint, expected {expect_task!r}")
    return doc


def load(
    path: str | os.PathLike[str],
    expect_task: str | None = None,
    device: str | torch.device = "cpu",
    require_estimator_meta: bool = False,
) -> tuple[FeatureMappingModel, dict[str, Any]]:
    """Rebuild the model from the JSON alone and load verified weights; return (model in eval mode, JSON dict).

    The estimator's metadata is validated (validate_meta); it is required when
    require_estimator_meta is set or the JSON carries any of it (a training checkpoint has none).

    Raises:
        CheckpointError: missing file, foreign JSON, other task, bad or missing metadata, hash
            mismatch, unreadable safetensors, missing/unexpected keys or shape mismatches.
    """
    stem = stem_of(path)
    doc = read_meta(stem, expect_task)
    if not isinstance(doc.get("net"), dict):
        raise CheckpointError(f"{stem}.json: key 'net' must be a mapping of NetConfig fields, got {doc.get('net')!r}")
    try:
        cfg = NetConfig(**doc["net"])
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{stem}.json has an unusable net description: {err}") from err
    if cfg.task != doc["task"]:
        raise CheckpointError(f"{stem}.json says task {doc['task']!r} but its net is for {cfg.task!r}")
    validate_meta(doc, cfg, require=require_estimator_meta, where=f"{stem}.json")
    state, refiner_state = _split_refiner(_read_weights(stem, doc))
    model = FeatureMappingModel(cfg)
    _load_fitting(model, state, f"{stem}")
    _refiner_from(doc, refiner_state, f"{stem}")  # a hand checkpoint's refiner must fit too
    return model.to(device).eval(), doc


def _read_weights(stem: Path, doc: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The checkpoint's verified weight tensors (model and refiner)."""
    weights = doc.get("weights") or {}
    # Only a file name is honoured: a JSON must not point the loader elsewhere on the disk.
    return _read_verified(stem.parent / Path(str(weights.get("file", ""))).name, weights.get("sha256") or "missing")


def _split_refiner(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(model tensors, refiner tensors without REFINER_PREFIX) of a checkpoint's weights."""
    n = len(REFINER_PREFIX)
    refiner = {k[n:]: v for k, v in state.items() if k.startswith(REFINER_PREFIX)}
    return {k: v for k, v in state.items() if not k.startswith(REFINER_PREFIX)}, refiner


def _load_fitting(module: torch.nn.Module, state: dict[str, torch.Tensor], where: str, what: str = "weights") -> None:
    """Load state into module after checking its keys and shapes; CheckpointError naming what does not fit."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{where}: {what} do not fit: missing {missing[:5]}, unexpected {unexpected[:5]}")
    bad = [
        f"{k}: {tuple(state[k].shape)} != {tuple(v.shape)}" for k, v in expected.items() if v.shape != state[k].shape
    ]
    if bad:
        raise CheckpointError(f"{where}: {what} shape mismatches (checkpoint vs model): {bad[:5]}")
    module.load_state_dict(state)


def _refiner_from(doc: dict[str, Any], state: dict[str, torch.Tensor], where: str) -> CentreRefiner | None:
    """The refiner described by doc['hands']['refiner'] with its tensors loaded (eval mode), None without one.

    Raises:
        CheckpointError: refiner tensors without a description, a description without tensors, or
            tensors that do not fit the described refiner.
    """
    hands = doc.get("hands")
    described = isinstance(hands, dict) and "refiner" in hands
    if not described:
        if state:
            raise CheckpointError(f"{where}: the weights hold {len(state)} {REFINER_PREFIX}* tensors but the JSON "
                                  "has no hands.refiner to describe them")
        return None
    if not state:
        raise CheckpointError(f"{where}: hands.refiner describes a centre refiner but the weights hold no "
                              f"{REFINER_PREFIX}* tensors")
    refiner = CentreRefiner(_refiner_config(hands["refiner"], where))
    _load_fitting(refiner, state, where, "refiner weights")
    return refiner.eval()


def _refiner_config(value: Any, where: str) -> RefinerConfig:
    try:
        return RefinerConfig.from_dict(value)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{where}: hands.refiner is not a usable RefinerConfig: {err}") from err


def load_refiner(path: str | os.PathLike[str], device: str | torch.device = "cpu",
                 ) -> tuple[CentreRefiner, RefinerConfig] | None:
    """The hand checkpoint's centre refiner (eval mode, on device) and its config; None when it has none.

    Raises:
        CheckpointError: missing or foreign checkpoint, hash mismatch, or a malformed refiner section.
    """
    stem = stem_of(path)
    doc = read_meta(stem)
    refiner = _refiner_from(doc, _split_refiner(_read_weights(stem, doc))[1], f"{stem}")
    return None if refiner is None else (refiner.to(device), refiner.config)


def attach_refiner(model_path: str | os.PathLike[str], refiner: CentreRefiner,
                   config: RefinerConfig | None = None, keep_previous: bool = False) -> Path:
    """Rewrite a saved hand checkpoint so it carries a centre refiner; return the JSON path.

    The refiner's tensors join the weights under REFINER_PREFIX (replacing a refiner attached
    before) and its RefinerConfig goes to meta['hands']['refiner']. Kill-safe like
    save(keep_previous=True): the checkpoint being rewritten stays complete as <stem>.prev.* until
    the new JSON is in place (recover() goes back to it after a kill); keep_previous leaves it there.
    The weights' hash changes, so an ONNX export made before is stale: export again.

    Args:
        model_path: a hand checkpoint with the estimator's metadata (directory, stem or .json).
        refiner: the trained refiner.
        config: its RefinerConfig (default refiner.config); must equal refiner.config.

    Raises:
        CheckpointError: not a complete hand checkpoint the estimator can run, or a config that
            does not describe the refiner.
    """
    stem = stem_of(model_path)
    config = refiner.config if config is None else config
    if config != refiner.config:
        raise CheckpointError(f"attach_refiner: config {config} does not describe the refiner ({refiner.config})")
    doc = verify(stem)  # the hashes of every file, the optimiser's too
    load(stem, expect_task="hands", require_estimator_meta=True)  # the whole checkpoint, validated
    state, _ = _split_refiner(_read_weights(stem, doc))
    state.update({REFINER_PREFIX + k: v for k, v in refiner.state_dict().items()})
    weights = _tensors_bytes(state)
    doc["hands"] = {**doc["hands"], "refiner": config.to_dict()}
    doc["weights"] = {"file": stem.name + ".safetensors", "sha256": _sha256(weights)}
    doc["code_version"] = featmap_ros.__version__
    _refiner_from(doc, _split_refiner(state)[1], f"{stem}")  # fails here, not at the next load
    return _write_generation(stem, json.dumps(doc, indent=2), weights, None,
                             link_previous=True, keep_previous=keep_previous)


def _numbers(value: Any, where: str, shape: tuple[int, ...] | None = None) -> np.ndarray:
    """A JSON list of finite numbers as float64 (of the given shape), or CheckpointError naming where."""
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{where} must be a list of numbers, got {value!r:.80}") from err
    if isinstance(value, (bool, str)) or arr.ndim == 0 or arr.size == 0:
        raise CheckpointError(f"{where} must be a non-empty list of numbers, got {value!r:.80}")
    if shape is not None and arr.shape != shape:
        raise CheckpointError(f"{where} must have shape {shape}, got {arr.shape}")
    if not np.isfinite(arr).all():
        raise CheckpointError(f"{where} holds non-finite values")
    return arr


def _positive(value: Any, where: str, kind: type = float) -> None:
    ok_type = isinstance(value, int) if kind is int else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok_type or not (math.isfinite(value) and value > 0):
        raise CheckpointError(f"{where} must be a positive {kind.__name__}, got {value!r}")


def _mapping(doc: dict[str, Any], key: str, where: str) -> dict[str, Any]:
    value = doc.get(key)
    if not isinstance(value, dict):
        what = "missing" if key not in doc else f"{value!r:.80}"
        raise CheckpointError(f"{where}: key {key!r} must be a mapping, got {what}")
    return value


def validate_meta(doc: dict[str, Any], cfg: NetConfig, require: bool = False, where: str = "checkpoint") -> None:
    """Check the metadata the estimator reads against the net; raise CheckpointError naming the bad key.

    objects: 'objects' [{obj_id, name, corners_m (8, 3), extent_m (3,), symmetric?}], 'crop' {size
    (= net input_size), window_scale?}, 'head' (default 'bb8': 16 outputs per object). hands:
    'hands' {joint_names, cube_m, refiner? (RefinerConfig fields)}, 'crop' {size}. Both: optional
    'feature_stats' {mean, std}.
    Keys this function does not know are allowed. With require False and none of the task's
    keys present (a training checkpoint), only feature_stats is checked.
    """
    task = cfg.task
    keys = ESTIMATOR_KEYS[task]
    if require or any(k in doc for k in keys):
        for key in keys:
            if key not in doc:
                raise CheckpointError(f"{where}: key {key!r} is missing; a {task} checkpoint needs {list(keys)}")
        crop = _mapping(doc, "crop", where)
        _positive(crop.get("size"), f"{where}: crop.size", int)
        if crop["size"] != cfg.input_size:
            raise CheckpointError(f"{where}: crop.size is {crop['size']} but the net takes {cfg.input_size} px inputs")
        if "window_scale" in crop:
            _positive(crop["window_scale"], f"{where}: crop.window_scale")
        if task == "objects":
            _validate_objects(doc, cfg, where)
        else:
            _validate_hands(doc, cfg, where)
    stats = doc.get("feature_stats")
    if stats is not None:
        if not isinstance(stats, dict) or "mean" not in stats or "std" not in stats:
            raise CheckpointError(f"{where}: key 'feature_stats' must be a mapping with 'mean' and 'std'")
        mean = _numbers(stats["mean"], f"{where}: feature_stats.mean")
        std = _numbers(stats["std"], f"{where}: feature_stats.std")
        if mean.shape != std.shape:
            raise CheckpointError(f"{where}: feature_stats.mean has shape {mean.shape}, feature_stats.std {std.shape}")
        if (std < 0).any():
            raise CheckpointError(f"{where}: feature_stats.std holds negative values")
        # The dense head may keep per-channel statistics of its own size, named by feature_stats.dim.
        dim, source = (stats["dim"], "feature_stats.dim") if "dim" in stats else (cfg.feature_dim, "net feature_dim")
        if mean.ndim == 1 and len(mean) != dim:
            raise CheckpointError(f"{where}: feature_stats.mean has {len(mean)} values, expected {dim} ({source})")


def _validate_objects(doc: dict[str, Any], cfg: NetConfig, where: str) -> None:
    objects = doc["objects"]
    if not isinstance(objects, list) or not objects:
        raise CheckpointError(f"{where}: key 'objects' must be a non-empty list, got {objects!r:.80}")
    seen: set[int] = set()
    for i, obj in enumerate(objects):
        at = f"{where}: objects[{i}]"
        if not isinstance(obj, dict):
            raise CheckpointError(f"{at} must be a mapping, got {obj!r:.80}")
        for key in ("obj_id", "name", "corners_m", "extent_m"):
            if key not in obj:
                raise CheckpointError(f"{at}: key {key!r} is missing")
        if isinstance(obj["obj_id"], bool) or not isinstance(obj["obj_id"], int) or obj["obj_id"] in seen:
            raise CheckpointError(f"{at}.obj_id must be an integer not given before, got {obj['obj_id']!r}")
        seen.add(obj["obj_id"])
        if not isinstance(obj["name"], str) or not obj["name"]:
            raise CheckpointError(f"{at}.name must be a non-empty string, got {obj['name']!r}")
        _numbers(obj["corners_m"], f"{at}.corners_m", (8, 3))
        _numbers(obj["extent_m"], f"{at}.extent_m", (3,))
        if "silhouette_m" in obj:
            sil = _numbers(obj["silhouette_m"], f"{at}.silhouette_m")
            if sil.ndim != 2 or sil.shape[1] != 3 or len(sil) < 4:
                raise CheckpointError(f"{at}.silhouette_m must be (M >= 4, 3) model points, got shape {sil.shape}")
        if not isinstance(obj.get("symmetric", False), bool):
            raise CheckpointError(f"{at}.symmetric must be true or false, got {obj['symmetric']!r}")
    net_head = getattr(cfg, "head", "bb8")
    head = doc.get("head", net_head)
    if not isinstance(head, str) or not head:
        raise CheckpointError(f"{where}: key 'head' must name the pose head (e.g. 'bb8'), got {head!r}")
    if head != net_head:
        raise CheckpointError(f"{where}: key 'head' is {head!r} but the net's head is {net_head!r}")
    if head == "bb8" and cfg.n_outputs != 16 * len(objects):
        raise CheckpointError(
            f"{where}: the bb8 head has {cfg.n_outputs} outputs for {len(objects)} objects; expected 16 each"
        )
    if head == "keypoints":
        # The keypoint head decodes against the model keypoints it was trained on: every object has them.
        counts = set()
        for i, obj in enumerate(objects):
            if "keypoints_m" not in obj:
                raise CheckpointError(f"{where}: objects[{i}]: key 'keypoints_m' is missing (the keypoint head's)")
            kp = _numbers(obj["keypoints_m"], f"{where}: objects[{i}].keypoints_m")
            if kp.ndim != 2 or kp.shape[1] != 3 or len(kp) < 4:
                raise CheckpointError(f"{where}: objects[{i}].keypoints_m must be (n >= 4, 3), got shape {kp.shape}")
            counts.add(len(kp))
        if len(counts) != 1 or cfg.n_outputs != (1 + 2 * min(counts)) * len(objects):
            raise CheckpointError(f"{where}: the keypoint head has {cfg.n_outputs} outputs for {len(objects)} objects "
                                  f"with {sorted(counts)} keypoints; expected 1 + 2 n each, one n for all")


def _validate_hands(doc: dict[str, Any], cfg: NetConfig, where: str) -> None:
    hands = _mapping(doc, "hands", where)
    names = hands.get("joint_names")
    if not isinstance(names, list) or not names or not all(isinstance(n, str) and n for n in names):
        raise CheckpointError(f"{where}: hands.joint_names must be a non-empty list of names, got {names!r:.80}")
    if len(set(names)) != len(names):
        raise CheckpointError(f"{where}: hands.joint_names names a joint twice")
    _positive(hands.get("cube_m"), f"{where}: hands.cube_m")
    if "refiner" in hands:
        _refiner_config(hands["refiner"], where)
    if "head" not in doc and cfg.n_outputs != 3 * len(names):
        raise CheckpointError(f"{where}: the head has {cfg.n_outputs} outputs for {len(names)} joints; expected 3 each")


def load_optimizer(path: str | os.PathLike[str], optimizer: torch.optim.Optimizer) -> None:
    """Restore an optimiser saved by save(..., optimizer=...) into one built over the same parameters."""
    stem = stem_of(path)
    doc = read_meta(stem)
    info = doc.get("optimizer")
    if not info:
        raise CheckpointError(f"{stem}.json holds no optimiser state")
    tensors = _read_verified(stem.parent / Path(str(info["file"])).name, info["sha256"])
    tensors = {k: v for k, v in tensors.items() if not k.startswith(_LIVE)}
    state: dict[int, dict[str, Any]] = {}
    for key, value in [*tensors.items(), *info["scalars"].items()]:
        _, idx, name = key.split(".", 2)
        state.setdefault(int(idx), {})[name] = value
    groups = [{k: tuple(v) if k == "betas" else v for k, v in g.items()} for g in info["param_groups"]]
    if len(groups) != len(optimizer.param_groups) or any(
        len(a["params"]) != len(b["params"]) for a, b in zip(groups, optimizer.param_groups, strict=True)
    ):
        raise CheckpointError(f"{stem}: optimiser state is for a different set of parameters")
    try:
        optimizer.load_state_dict({"state": state, "param_groups": groups})
    except (ValueError, KeyError, RuntimeError) as err:
        raise CheckpointError(f"{stem}: optimiser state does not fit: {err}") from err


def load_live_weights(path: str | os.PathLike[str]) -> dict[str, torch.Tensor] | None:
    """The live weights saved beside an averaged model's optimiser state, or None if the checkpoint has none."""
    stem = stem_of(path)
    info = read_meta(stem).get("optimizer")
    if not info:
        return None
    tensors = _read_verified(stem.parent / Path(str(info["file"])).name, info["sha256"])
    live = {k[len(_LIVE):]: v for k, v in tensors.items() if k.startswith(_LIVE)}
    return live or None


def save_exemplars(
    path: str | os.PathLike[str], features: torch.Tensor, targets: torch.Tensor, task: str, meta: dict[str, Any]
) -> Path:
    """Write an exemplar bank (features (N, D), targets (N, n_outputs)) to <stem>.exemplars.safetensors."""
    if features.dim() != 2 or targets.dim() != 2 or len(features) != len(targets):
        raise CheckpointError(f"features (N, D) and targets (N, K) needed, got {features.shape} and {targets.shape}")
    stem = stem_of(path)
    header = {"format": EXEMPLAR_FORMAT, "format_version": str(FORMAT_VERSION), "task": task, "meta": json.dumps(meta)}
    out = stem.with_name(stem.name + ".exemplars.safetensors")
    atomic_write(out, _tensors_bytes({"features": features, "targets": targets}, metadata=header))
    return out


def load_exemplars(
    path: str | os.PathLike[str], expect_task: str | None = None
) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """Read an exemplar bank; return (features (N, D), targets (N, K), meta)."""
    stem = stem_of(path)
    file = stem.with_name(stem.name + ".exemplars.safetensors")
    if not file.is_file():
        raise CheckpointError(f"missing exemplar bank {file}")
    data = file.read_bytes()
    try:
        # The header is the first 8 bytes (length) then JSON: read our metadata without torch.
        n = int.from_bytes(data[:8], "little")
        header = json.loads(data[8 : 8 + n]).get("__metadata__") or {}
        tensors = st_load(data)
    except (SafetensorError, ValueError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{file} is not a readable safetensors file: {err}") from err
    if header.get("format") != EXEMPLAR_FORMAT:
        raise CheckpointError(f"{file} is not a featmap_ros exemplar bank (format key {EXEMPLAR_FORMAT!r} missing)")
    if expect_task is not None and header.get("task") != expect_task:
        raise CheckpointError(f"{file} is a {header.get('task')!r} bank, expected {expect_task!r}")
    if set(tensors) != {"features", "targets"}:
        raise CheckpointError(f"{file} holds {sorted(tensors)}, expected features and targets")
    return tensors["features"], tensors["targets"], json.loads(header.get("meta", "{}"))
