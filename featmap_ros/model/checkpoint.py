"""Self-describing checkpoints: weights in safetensors, everything else in a JSON beside them.

`<stem>.safetensors` holds the model weights, `<stem>.json` the format key and version, the task,
the NetConfig, the SHA-256 of the weights and whatever the caller adds (method, labels,
normalisation, training summary, step, config). With an optimiser, `<stem>.optim.safetensors`
holds its tensors (param_groups go into the JSON), so a run resumes without pickle. Each file is
written to a temporary name and moved into place; the JSON goes last, so a reader either sees
the previous checkpoint whole or a hash mismatch (a crash between the two renames), never a mix.
Exemplar banks (features and targets of synthetic exemplars) use `<stem>.exemplars.safetensors`.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

import featmap_ros
from featmap_ros.model.nets import FeatureMappingModel, NetConfig

FORMAT = "featmap_ros.checkpoint"
FORMAT_VERSION = 1
EXEMPLAR_FORMAT = "featmap_ros.exemplars"
_RESERVED = ("format", "format_version", "code_version", "task", "net", "weights", "optimizer")


class CheckpointError(RuntimeError):
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


def _atomic_write(path: Path, data: bytes) -> None:
    """Write bytes to a temporary file in the same directory, fsync, then rename over path."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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
) -> Path:
    """Write weights, optional optimiser state and the JSON description; return the JSON path.

    Args:
        path: a directory (writes model.*), a stem, or a .json/.safetensors path.
        model: the model; its NetConfig goes into the JSON so load() can rebuild it.
        meta: JSON-able extras, e.g. method, labels, normalisation, training, step, config.
        optimizer: when given, its state goes to <stem>.optim.safetensors for resuming.
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
    _atomic_write(stem.with_name(stem.name + ".safetensors"), weights)
    if optimizer is not None:
        tensors, rest = _optimizer_split(optimizer.state_dict())
        blob = _tensors_bytes(tensors)
        _atomic_write(stem.with_name(stem.name + ".optim.safetensors"), blob)
        doc["optimizer"] = {"file": stem.name + ".optim.safetensors", "sha256": _sha256(blob), **rest}
    try:
        text = json.dumps(doc, indent=2, sort_keys=False)
    except TypeError as err:
        raise CheckpointError(f"meta is not JSON-serialisable: {err}") from err
    json_path = stem.with_name(stem.name + ".json")
    _atomic_write(json_path, text.encode())
    return json_path


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
    if expect_task is not None and doc.get("task") != expect_task:
        raise CheckpointError(f"{json_path} is a {doc.get('task')!r} checkpoint, expected {expect_task!r}")
    return doc


def load(
    path: str | os.PathLike[str], expect_task: str | None = None, device: str | torch.device = "cpu"
) -> tuple[FeatureMappingModel, dict[str, Any]]:
    """Rebuild the model from the JSON alone and load verified weights; return (model in eval mode, JSON dict).

    Raises:
        CheckpointError: missing file, foreign JSON, other task, hash mismatch, unreadable
            safetensors, missing/unexpected keys or shape mismatches.
    """
    stem = stem_of(path)
    doc = read_meta(stem, expect_task)
    try:
        cfg = NetConfig(**doc["net"])
    except (TypeError, ValueError, KeyError) as err:
        raise CheckpointError(f"{stem}.json has an unusable net description: {err}") from err
    if cfg.task != doc["task"]:
        raise CheckpointError(f"{stem}.json says task {doc['task']!r} but its net is for {cfg.task!r}")
    weights = doc.get("weights") or {}
    # Only a file name is honoured: a JSON must not point the loader elsewhere on the disk.
    state = _read_verified(stem.parent / Path(str(weights.get("file", ""))).name, weights.get("sha256") or "missing")
    model = FeatureMappingModel(cfg)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{stem}: weights do not fit: missing {missing[:5]}, unexpected {unexpected[:5]}")
    bad = [
        f"{k}: {tuple(state[k].shape)} != {tuple(v.shape)}" for k, v in expected.items() if v.shape != state[k].shape
    ]
    if bad:
        raise CheckpointError(f"{stem}: shape mismatches (checkpoint vs model): {bad[:5]}")
    model.load_state_dict(state)
    return model.to(device).eval(), doc


def load_optimizer(path: str | os.PathLike[str], optimizer: torch.optim.Optimizer) -> None:
    """Restore an optimiser saved by save(..., optimizer=...) into one built over the same parameters."""
    stem = stem_of(path)
    doc = read_meta(stem)
    info = doc.get("optimizer")
    if not info:
        raise CheckpointError(f"{stem}.json holds no optimiser state")
    tensors = _read_verified(stem.parent / Path(str(info["file"])).name, info["sha256"])
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


def save_exemplars(
    path: str | os.PathLike[str], features: torch.Tensor, targets: torch.Tensor, task: str, meta: dict[str, Any]
) -> Path:
    """Write an exemplar bank (features (N, D), targets (N, n_outputs)) to <stem>.exemplars.safetensors."""
    if features.dim() != 2 or targets.dim() != 2 or len(features) != len(targets):
        raise CheckpointError(f"features (N, D) and targets (N, K) needed, got {features.shape} and {targets.shape}")
    stem = stem_of(path)
    header = {"format": EXEMPLAR_FORMAT, "format_version": str(FORMAT_VERSION), "task": task, "meta": json.dumps(meta)}
    out = stem.with_name(stem.name + ".exemplars.safetensors")
    _atomic_write(out, _tensors_bytes({"features": features, "targets": targets}, metadata=header))
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
