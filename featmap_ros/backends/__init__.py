"""Where the network runs: torch (torch_net) or ONNX Runtime (onnx_net).

Both give the estimator the same thing: `run(batch, objects=None)` of (B, C, S, S) float32 crops ->
outputs and out-of-domain scores as float64 numpy, with `device`, `head` and `n_outputs` beside it;
with objects (each crop's object index, object models), the outputs are each crop's own object's
(own_object_outputs's layout: torch and an export's objects graph compute only those; an export made
before that graph existed cuts them from every object's). Only
torch_net imports torch; onnx_net imports onnxruntime when a network is built, so the ONNX
Runtime path of the estimator and the node runs where torch is not installed.
"""

from __future__ import annotations

import numpy as np

from featmap_ros.errors import FeatmapError

BACKENDS = ("auto", "torch", "onnxruntime")
# The torch backend's precision (torch_net.TorchNetwork: auto = half on CUDA, float32 on a CPU); ONNX
# Runtime runs its export in float32 (TensorRT: fp16) whatever this says.
PRECISIONS = ("auto", "float32", "bf16")
# Object recrop passes at most (estimator.ObjectEstimator; each costs one more network pass and decode).
# Here, beside the other run-time choices, so the node config and the CLI read it without importing the estimator.
MAX_RECROP = 3
# Hand recentre passes (estimator.HandEstimator: crop again around the palm the joints found and run the
# joints network there), at most and by default: 19.8 -> 17.6 mm with 2 on the main job's hand validation
# bag (docs/results.md, session 12), one more network pass each.
MAX_RECENTRE = 3
HAND_RECENTRE = 2


class BackendError(FeatmapError, ValueError):
    """A backend cannot run: missing package or device, or an ONNX export that is foreign or corrupt."""


def checked_objects(objects: np.ndarray, n_rows: int, n_objects: int) -> np.ndarray:
    """objects as int64 (n_rows,), each an object index in [0, n_objects); n_objects 0: not an object model.

    Raises:
        BackendError: not an object model, another shape, a non-integer dtype, or an index out of range.
    """
    if n_objects < 1:
        raise BackendError("objects are an object model's crop labels; this is not an object model")
    objects = np.asarray(objects)
    if objects.shape != (n_rows,) or not np.issubdtype(objects.dtype, np.integer) \
            or (objects < 0).any() or (objects >= n_objects).any():
        raise BackendError(f"objects must hold one index in [0, {n_objects}) per crop ({n_rows}), got {objects!r:.80}")
    return objects.astype(np.int64)


def own_object_outputs(outputs: np.ndarray, objects: np.ndarray, n_objects: int) -> np.ndarray:
    """(B, n_objects * P, ...) outputs of a multi-object head -> (B, P, ...): row b's object objects[b] alone.

    Raises:
        BackendError: objects is not one index in [0, n_objects) per row, or the outputs do not split so.
    """
    objects = checked_objects(objects, len(outputs), n_objects)
    if outputs.shape[1] % n_objects:
        raise BackendError(f"{outputs.shape[1]} outputs do not split into {n_objects} objects")
    per = outputs.shape[1] // n_objects
    rows = objects[:, None] * per + np.arange(per)
    return np.take_along_axis(outputs, rows.reshape(rows.shape + (1,) * (outputs.ndim - 2)), axis=1)
