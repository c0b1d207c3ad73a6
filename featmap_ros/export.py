"""`featmap export`: a checkpoint's run-time graph as ONNX, beside a JSON of its metadata.

What is exported is backends.torch_net.RunTimeGraph, the module the torch backend runs: h(g(f_R(x)))
(h(f_S(x)) for baselines) and the out-of-domain score computed in the graph from the checkpoint's
feature statistics, so ONNX Runtime needs nothing but the files written here (backends/onnx_net.py
reads them). The batch axis is dynamic. Every head the estimator decodes exports (bb8, dense, keypoints, hands).
An object checkpoint of 2+ objects also gets `<stem>.objects.onnx`: the same graph with a second input, `objects`
(B,) int64, each crop's object, whose outputs are that object's alone (the estimator's readout; the
JSON's `objects_onnx` section). A hand checkpoint's centre refiner (model/refiner.py) goes to a
second graph, `<stem>.refiner.onnx` (input `crops` (B, 1, S_r, S_r), output `offsets` (B, 3)), named
with its sha256 in the JSON's `refiner_onnx` section and checked against torch the same way.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
from pathlib import Path
from typing import Any

import numpy as np
import torch

from featmap_ros.backends import onnx_net
from featmap_ros.backends.torch_net import RunTimeGraph
from featmap_ros.errors import FeatmapError
from featmap_ros.model import checkpoint

log = logging.getLogger(__name__)

# Keys of the checkpoint JSON that describe its own files, not the model: the export has its own.
_CHECKPOINT_ONLY = ("format", "format_version", "weights", "optimizer")


class ExportError(FeatmapError, RuntimeError):
    """The exporter failed on a model, or the exported graph does not compute what torch computes."""


def _replace_atomically(path: Path, write: Any) -> None:
    """Call write(tmp) for a temporary file beside path, then move it over path."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _check_with_onnxruntime(onnx_path: Path, graph: torch.nn.Module, example: tuple[torch.Tensor, ...],
                            output_names: tuple[str, ...] = onnx_net.OUTPUT_NAMES) -> dict[str, Any]:
    """Max abs differences of ONNX Runtime (CPU) against torch on the `example` inputs (crops, then each
    crop's object where the graph takes them), or a note where onnxruntime is absent."""
    if not onnx_net.onnxruntime_available():
        return {"skipped": "onnxruntime not installed"}
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    names = (onnx_net.INPUT_NAME, onnx_net.OBJECTS_INPUT)[: len(example)]
    got = session.run(list(output_names), {n: t.numpy() for n, t in zip(names, example, strict=True)})
    with torch.inference_mode():
        out = graph(*example)
        want = [t.numpy() for t in (out if isinstance(out, tuple) else (out,))]
    diffs = {}
    for name, g, w in zip(output_names, got, want, strict=True):
        if g.shape != w.shape:
            raise ExportError(f"exported {name} has shape {g.shape}, torch gives {w.shape}")
        # NaN on both sides agrees (no feature_stats); NaN on one side only is the largest difference.
        d = np.where(np.isnan(g) & np.isnan(w), 0.0, np.abs(g.astype(np.float64) - w))
        diffs[name] = float(np.nan_to_num(d, nan=np.inf).max()) if d.size else 0.0
    return {"batch": int(example[0].shape[0]), "max_abs_diff": diffs}


def _export_checked(graph: torch.nn.Module, shape: tuple[int, int, int], onnx_path: Path,
                    output_names: tuple[str, ...], opset: int | None, tolerance: float, source: Any,
                    n_objects: int = 0) -> dict[str, Any]:
    """Export graph on (batch, *shape) crops to onnx_path (atomically) and check it; return the export section.

    n_objects > 1: the graph takes each crop's object index (batch,) int64 as a second input (RunTimeGraph's
    objects); 0: crops only. Traced at batch 2, checked at batch 3: the batch axis must really be dynamic.
    """
    if n_objects == 1 or n_objects < 0:
        raise ExportError(f"an objects input needs at least 2 objects to choose from, got {n_objects}")
    gen = torch.Generator().manual_seed(0)

    def inputs(batch: int) -> tuple[torch.Tensor, ...]:
        x = torch.rand(batch, *shape, generator=gen) * 2 - 1
        # Every object in turn, from the last: the check reads out objects other than the trace's.
        return (x, (n_objects - 1 - torch.arange(batch)) % n_objects) if n_objects else (x,)

    trace, example = inputs(2), inputs(3)
    batch = torch.export.Dim("batch", max=4096)
    names = [onnx_net.INPUT_NAME, onnx_net.OBJECTS_INPUT][: len(trace)]
    try:
        program = torch.onnx.export(
            graph, trace, dynamo=True, external_data=False, opset_version=opset, verbose=False,
            input_names=names, output_names=list(output_names),
            dynamic_shapes=({"x": {0: batch}, "objects": {0: batch}} if n_objects else {"x": {0: batch}}))
    except Exception as err:  # the exporter raises many kinds: wrap them at the boundary
        raise ExportError(f"torch.onnx.export failed on {source}: {type(err).__name__}: {err}") from err
    _replace_atomically(onnx_path, lambda tmp: program.save(str(tmp), external_data=False))
    check = _check_with_onnxruntime(onnx_path, graph, example, output_names)
    worst = max((check.get("max_abs_diff") or {"": 0.0}).values())
    if worst > tolerance:
        raise ExportError(f"ONNX Runtime differs from torch by {worst:.3g} (> {tolerance:g}) on {onnx_path}: "
                          f"{check['max_abs_diff']}")
    import onnx

    opsets = {o.domain or "ai.onnx": int(o.version) for o in onnx.load(str(onnx_path), load_external_data=False)
              .opset_import}
    return {"file": onnx_path.name, "sha256": hashlib.sha256(onnx_path.read_bytes()).hexdigest(),
            "input": onnx_net.INPUT_NAME, "input_shape": ["batch", *shape], "outputs": list(output_names),
            **({"objects_input": onnx_net.OBJECTS_INPUT} if n_objects else {}),
            "opset": opsets.get("ai.onnx"), "exporter": f"torch {torch.__version__} (dynamo)", "check": check}


def export_onnx(model_path: str | os.PathLike[str], out_dir: str | os.PathLike[str],
                opset: int | None = None, tolerance: float = 1e-3) -> Path:
    """Write `<out_dir>/<stem>.onnx` and `<stem>.onnx.json` for a checkpoint; return the JSON path.

    An object checkpoint of two or more objects also gets `<stem>.objects.onnx`, a hand checkpoint
    with a centre refiner `<stem>.refiner.onnx`.

    Args:
        model_path: the checkpoint (directory, stem or .json).
        out_dir: where the files go; the checkpoint's own folder makes the export its default.
        opset: ONNX opset (None: the exporter's default).
        tolerance: largest abs difference of ONNX Runtime's outputs from torch's on random crops
            at a batch other than the one traced (checked when onnxruntime is installed).

    Raises:
        featmap_ros.model.checkpoint.CheckpointError: the checkpoint cannot be loaded.
        ExportError: the exporter failed, or the exported graph disagrees with torch.
    """
    model, doc = checkpoint.load(model_path, device="cpu", require_estimator_meta=True)
    cfg = model.cfg
    n_objects = len(doc["objects"]) if doc["task"] == "objects" else 0
    graph = RunTimeGraph(model, doc.get("feature_stats"), n_objects or None).eval()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = checkpoint.stem_of(model_path).name
    onnx_path = out / f"{stem}.onnx"
    json_path = out / f"{stem}{onnx_net.EXPORT_SUFFIX}"
    section = _export_checked(graph, (cfg.in_channels, cfg.input_size, cfg.input_size), onnx_path,
                              onnx_net.OUTPUT_NAMES, opset, tolerance, model_path)
    check = section.pop("check")
    meta = {k: v for k, v in doc.items() if k not in _CHECKPOINT_ONLY}
    export_doc = {
        "format": onnx_net.EXPORT_FORMAT,
        "format_version": onnx_net.EXPORT_FORMAT_VERSION,
        **meta,
        "onnx": {**section, "out_of_domain": "in the graph" if "feature_stats" in doc else "NaN (no feature_stats)"},
        "source": {"checkpoint": checkpoint.stem_of(model_path).name + ".json",
                   "weights_sha256": (doc.get("weights") or {}).get("sha256")},
        "check": check,
    }
    if n_objects > 1:
        # The same graph with each crop's object as an input: the estimator's readout (only that object's
        # channels are computed; with coordinate bins, most of the head's time is in the others'). A
        # one-object model's outputs are that object's already.
        export_doc[onnx_net.OBJECTS_KEY] = _export_checked(
            graph, (cfg.in_channels, cfg.input_size, cfg.input_size), out / f"{stem}{onnx_net.OBJECTS_SUFFIX}",
            onnx_net.OUTPUT_NAMES, opset, tolerance, f"{model_path} (own-object readout)", n_objects=n_objects)
    found = checkpoint.load_refiner(model_path) if doc["task"] == "hands" else None
    if found is not None:
        refiner, rcfg = found
        export_doc[onnx_net.REFINER_KEY] = _export_checked(
            refiner.eval(), (1, rcfg.input_size, rcfg.input_size), out / f"{stem}{onnx_net.REFINER_SUFFIX}",
            (onnx_net.REFINER_OUTPUT,), opset, tolerance, f"{model_path} (centre refiner)")
    _replace_atomically(json_path, lambda tmp: tmp.write_text(json.dumps(export_doc, indent=2)))
    log.info("exported %s -> %s (%s)", model_path, onnx_path, check)
    return json_path
