"""The ONNX Runtime backend: an exported run-time graph (featmap_ros.export) in an InferenceSession.

No torch here, and onnxruntime is imported only when a network is built: the node runs this path
with neither torch installed nor, until it loads a model, onnxruntime imported.

An export is two files beside each other: `<stem>.onnx` (input `crops` (B, C, S, S) float32 with a
dynamic batch axis; outputs `outputs`, `ood` (B,) and `features` (B, D)) and `<stem>.onnx.json`,
the checkpoint's metadata plus the export's own section (file, sha256, names, opset) and the
sha256 of the weights it was made from. Written next to its checkpoint (same stem), it is that
checkpoint's export: load_estimator finds it there, and ignores it once the weights change.
A hand checkpoint's centre refiner, when it has one (meta hands.refiner), is a third file,
`<stem>.refiner.onnx` (input `crops` (B, 1, S_r, S_r), output `offsets` (B, 3)), named with its
sha256 in the JSON's `refiner_onnx` section. An object model's export has `<stem>.objects.onnx` too
(the `objects_onnx` section): the same graph with a second input `objects` (B,) int64, each crop's
object, whose outputs are that object's alone, which the estimator runs; an export written before it
existed still runs (every object's outputs, cut to each crop's).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import math
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from featmap_ros.backends import BackendError, checked_objects, own_object_outputs

log = logging.getLogger(__name__)

EXPORT_FORMAT = "featmap_ros.onnx_export"
EXPORT_FORMAT_VERSION = 1
EXPORT_SUFFIX = ".onnx.json"
INPUT_NAME = "crops"
OUTPUT_NAMES = ("outputs", "ood", "features")
# An object model's graph with each crop's object as a second input (outputs: that object's alone).
OBJECTS_KEY = "objects_onnx"
OBJECTS_SUFFIX = ".objects.onnx"
OBJECTS_INPUT = "objects"
REFINER_KEY = "refiner_onnx"  # the export JSON's section for the centre refiner's graph
REFINER_SUFFIX = ".refiner.onnx"
REFINER_OUTPUT = "offsets"
# The estimator's order of preference; each is used where onnxruntime offers it.
PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
_SHORT = {"TensorrtExecutionProvider": "tensorrt", "CUDAExecutionProvider": "cuda", "CPUExecutionProvider": "cpu"}
# Keys of the checkpoint metadata the estimator reads, per task (checkpoint.ESTIMATOR_KEYS, which imports torch).
_TASK_KEYS = {"objects": ("objects", "crop"), "hands": ("hands", "crop")}


# nets.HEADS, and "bb8" of hand exports written before hands had a head of their own (nets imports torch).
_HEADS = ("bb8", "dense", "keypoints", "fc", "vote")


def onnxruntime_available() -> bool:
    """Whether onnxruntime can be imported here (without importing it)."""
    return importlib.util.find_spec("onnxruntime") is not None


def is_export(path: str | os.PathLike[str]) -> bool:
    """Whether a path names an export (its .onnx or .onnx.json file) rather than a checkpoint."""
    name = Path(path).name
    return name.endswith(EXPORT_SUFFIX) or name.endswith(".onnx")


def export_json_of(path: str | os.PathLike[str]) -> Path:
    """The export JSON for a checkpoint path (directory, stem, .json, .safetensors) or an export's .onnx.

    Mirrors checkpoint.stem_of, which cannot be imported here (it imports torch).
    """
    p = Path(path)
    if p.name.endswith(EXPORT_SUFFIX):
        return p
    if p.is_dir():
        return p / ("model" + EXPORT_SUFFIX)
    for suffix in (REFINER_SUFFIX, OBJECTS_SUFFIX, ".onnx", ".safetensors", ".json"):
        if p.name.endswith(suffix):
            return p.with_name(p.name[: -len(suffix)] + EXPORT_SUFFIX)
    return p.with_name(p.name + EXPORT_SUFFIX)


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_export(path: str | os.PathLike[str], verify: bool = True) -> dict[str, Any]:
    """Read an export's JSON and check its format, task keys and (verify) the ONNX file's sha256.

    Raises:
        BackendError: missing or foreign JSON, missing keys, missing or corrupt ONNX file.
    """
    json_path = export_json_of(path)
    if not json_path.is_file():
        raise BackendError(f"missing ONNX export description {json_path} (write one with `featmap export`)")
    try:
        doc = json.loads(json_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise BackendError(f"{json_path} is not valid JSON: {err}") from err
    if not isinstance(doc, dict) or doc.get("format") != EXPORT_FORMAT:
        raise BackendError(f"{json_path} is not a featmap_ros ONNX export (format key {EXPORT_FORMAT!r} missing)")
    if doc.get("format_version") != EXPORT_FORMAT_VERSION:
        raise BackendError(f"{json_path} has format_version {doc.get('format_version')}, "
                           f"expected {EXPORT_FORMAT_VERSION}")
    task = doc.get("task")
    if task not in _TASK_KEYS:
        raise BackendError(f"{json_path}: key 'task' is {task!r}, expected one of {list(_TASK_KEYS)}")
    for key in (*_TASK_KEYS[task], "net", "onnx"):
        kind = list if key == "objects" else dict
        if not isinstance(doc.get(key), kind):
            raise BackendError(f"{json_path}: key {key!r} must be a {kind.__name__}, got {doc.get(key)!r:.80}")
    net = doc["net"]
    if not isinstance(net.get("n_outputs"), int) or net.get("head", "bb8") not in _HEADS:
        raise BackendError(f"{json_path}: 'net' needs an integer n_outputs and a head of {_HEADS}, got {net!r:.120}")
    sections = ["onnx"]
    if task == "hands" and "refiner" in doc["hands"]:
        _check_refiner(doc["hands"]["refiner"], json_path)
        if not isinstance(doc.get(REFINER_KEY), dict):
            raise BackendError(f"{json_path}: hands.refiner describes a centre refiner but {REFINER_KEY!r} does not "
                               f"name its graph (export again with `featmap export`)")
        sections.append(REFINER_KEY)
    if task == "objects" and OBJECTS_KEY in doc:  # optional: exports written before it have none
        if not isinstance(doc[OBJECTS_KEY], dict):
            raise BackendError(f"{json_path}: key {OBJECTS_KEY!r} must be a dict, got {doc[OBJECTS_KEY]!r:.80}")
        sections.append(OBJECTS_KEY)
    for key in sections:
        # Only a file name is honoured: a JSON must not point the loader elsewhere on the disk.
        onnx_file = json_path.parent / Path(str(doc[key].get("file", ""))).name
        if not onnx_file.is_file():
            raise BackendError(f"missing ONNX file {onnx_file} named by {json_path}")
        if verify:
            digest = _sha256_file(onnx_file)
            if digest != doc[key].get("sha256"):
                raise BackendError(f"{onnx_file} has sha256 {digest}, {json_path} expects "
                                   f"{doc[key].get('sha256')}: corrupted or replaced")
        doc[key] = {**doc[key], "path": str(onnx_file)}
    return doc


def _check_refiner(refiner: Any, json_path: Path) -> None:
    """The fields of hands.refiner the estimator reads (model.refiner.RefinerConfig, which imports torch)."""
    def positive(key: str, kinds: tuple[type, ...]) -> bool:
        v = refiner.get(key)
        return not isinstance(v, bool) and isinstance(v, kinds) and math.isfinite(v) and v > 0

    if not (isinstance(refiner, dict) and all(positive(k, (int,)) for k in ("input_size", "iterations"))
            and positive("cube_m", (int, float))):
        raise BackendError(f"{json_path}: hands.refiner needs positive integers input_size and iterations and a "
                           f"positive cube_m, got {refiner!r:.120}")


def find_export(model_path: str | os.PathLike[str]) -> Path | None:
    """The export JSON that belongs to model_path: the path itself if it is an export, else the
    `<stem>.onnx.json` beside the checkpoint when it was made from the same weights; else None."""
    if is_export(model_path):
        return export_json_of(model_path)
    json_path = export_json_of(model_path)
    if not json_path.is_file():
        return None
    ckpt_json = json_path.with_name(json_path.name[: -len(EXPORT_SUFFIX)] + ".json")
    try:
        export_doc = json.loads(json_path.read_text())
        weights = json.loads(ckpt_json.read_text()).get("weights") or {}
    except (OSError, json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return None
    source = (export_doc.get("source") or {}).get("weights_sha256") if isinstance(export_doc, dict) else None
    if source is None or source != weights.get("sha256"):
        log.warning("ignoring %s: it was exported from other weights than %s (export again)", json_path, ckpt_json)
        return None
    return json_path


def _device_id(device: str) -> int:
    m = re.fullmatch(r"cuda(?::(\d+))?", device)
    return int(m.group(1) or 0) if m else 0


def choose_providers(device: str, available: Sequence[str]) -> list[str]:
    """Execution providers for a device ('auto', 'cpu', 'cuda', 'cuda:N'): TensorRT, CUDA, CPU where offered.

    Raises:
        BackendError: a CUDA device asked for, but this onnxruntime has no GPU provider.
    """
    if device == "cpu":
        return ["CPUExecutionProvider"]
    gpu = [p for p in PROVIDERS[:2] if p in available]
    if not gpu:
        if device != "auto":
            raise BackendError(f"device {device!r} asked for, but onnxruntime offers only {list(available)} "
                               "(install onnxruntime-gpu for CUDA and TensorRT)")
        log.warning("onnxruntime has no CUDA or TensorRT provider: running the network on the CPU")
    return [*gpu, "CPUExecutionProvider"]


def _provider_options(name: str, device_id: int, input_shape: tuple[int, int, int], max_batch: int,
                      objects_input: bool = False) -> dict[str, Any]:
    if name == "CUDAExecutionProvider":
        return {"device_id": device_id}
    if name == "TensorrtExecutionProvider":
        c, s, _ = input_shape
        # One optimisation profile over every batch the estimator sends (1 .. its chunk size); engines
        # are cached, since building one takes tens of seconds.
        cache = Path(os.environ.get("FEATMAP_TRT_CACHE", Path.home() / ".cache" / "featmap_ros" / "tensorrt"))
        cache.mkdir(parents=True, exist_ok=True)
        shape = f"{INPUT_NAME}:{{0}}x{c}x{s}x{s}" + (f",{OBJECTS_INPUT}:{{0}}" if objects_input else "")
        return {"device_id": device_id, "trt_fp16_enable": True, "trt_engine_cache_enable": True,
                "trt_engine_cache_path": str(cache), "trt_profile_min_shapes": shape.format(1),
                "trt_profile_opt_shapes": shape.format(max(1, max_batch // 2)),
                "trt_profile_max_shapes": shape.format(max_batch)}
    return {}


class OnnxNetwork:
    """An ONNX export in an onnxruntime InferenceSession on the best execution provider available.

    `device` says where it runs: 'onnxruntime:tensorrt:0', 'onnxruntime:cuda:0' or 'onnxruntime:cpu'
    (the provider onnxruntime actually took, which the node's diagnostics show).
    """

    def __init__(self, export_path: str | os.PathLike[str], device: str = "auto", cpu_threads: int = 0,
                 max_batch: int = 16, providers: Sequence[str] | None = None, allow_spinning: bool = False) -> None:
        try:
            import onnxruntime as ort
        except ImportError as err:
            raise BackendError("backend onnxruntime needs the onnxruntime package (pip install onnxruntime, or "
                               "onnxruntime-gpu on a GPU machine)") from err
        self.meta = read_export(export_path)
        net = self.meta["net"]
        self.head = str(net.get("head", "bb8"))
        self.n_outputs = int(net["n_outputs"])
        chosen = list(providers) if providers else choose_providers(device, ort.get_available_providers())
        if chosen[0] != "CPUExecutionProvider" and hasattr(ort, "preload_dlls"):
            try:  # CUDA and cuDNN from the nvidia-* wheels (torch's CUDA build brings them), where they are
                ort.preload_dlls()
            except Exception as err:  # the libraries may be on the system path instead
                log.debug("onnxruntime.preload_dlls: %s", err)
        device_id = _device_id(device)
        c, s = int(net.get("in_channels") or 3), int(self.meta["crop"]["size"])
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.intra_op_num_threads = max(int(cpu_threads), 0)  # 0: onnxruntime's default, one per core
        opts.inter_op_num_threads = 1
        # onnxruntime's worker threads busy-wait after each run by default, taking the cores from whatever
        # runs next (PnP, ROS callbacks, other nodes); allow_spinning=True restores that default.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if allow_spinning else "0")

        def session(path: str, shape: tuple[int, int, int], objects_input: bool = False) -> Any:
            try:
                return ort.InferenceSession(path, opts, providers=[
                    (p, _provider_options(p, device_id, shape, max_batch, objects_input)) for p in chosen])
            except Exception as err:  # onnxruntime raises its own untyped errors: wrap them at the boundary
                raise BackendError(f"onnxruntime cannot load {path}: {err}") from err

        # An object export's objects graph is what the estimator runs; the plain graph (every object's
        # outputs) is then built on its first use only, so a GPU provider builds one engine, not two.
        self._session: Any = None
        self._make_session = lambda: session(self.meta["onnx"]["path"], (c, s, s))
        self.objects_session = None
        if OBJECTS_KEY in self.meta and self.meta["task"] == "objects":
            self.objects_session = session(self.meta[OBJECTS_KEY]["path"], (c, s, s), objects_input=True)
            names = [i.name for i in self.objects_session.get_inputs()]
            if names != [INPUT_NAME, OBJECTS_INPUT]:
                raise BackendError(f"{self.meta[OBJECTS_KEY]['path']} has inputs {names}, an objects graph takes "
                                   f"{[INPUT_NAME, OBJECTS_INPUT]}: export the model again")
        self.refiner_session = None
        if REFINER_KEY in self.meta and "refiner" in (self.meta.get("hands") or {}):
            rs = int(self.meta["hands"]["refiner"]["input_size"])
            self.refiner_session = session(self.meta[REFINER_KEY]["path"], (1, rs, rs))
        first = self.objects_session if self.objects_session is not None else self.session
        self.provider = first.get_providers()[0]
        if device.startswith("cuda") and self.provider == "CPUExecutionProvider":
            raise BackendError(f"device {device!r} asked for, but onnxruntime's GPU providers {chosen[:-1]} did not "
                               "start (see onnxruntime's log above)")
        short = _SHORT.get(self.provider, self.provider)
        self.device = f"onnxruntime:{short}" + (f":{device_id}" if short != "cpu" else "")
        self.input_name = INPUT_NAME
        self._fetch = [OUTPUT_NAMES[0], OUTPUT_NAMES[1]]

    @property
    def session(self) -> Any:
        """The plain graph's session (crops in, every object's outputs), built on first use."""
        if self._session is None:
            self._session = self._make_session()
            self.input_name = self._session.get_inputs()[0].name
        return self._session

    def run(self, batch: np.ndarray, objects: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(B, C, S, S) float32 -> outputs (B, K...) and out-of-domain scores (B,), both float64 numpy.

        objects (B,) of an object model: each crop's object index; the outputs are then that object's
        alone, computed so by the export's objects graph (an export from before it: cut from every
        object's, own_object_outputs).
        """
        x = np.ascontiguousarray(batch, dtype=np.float32)
        n_objects = len(self.meta["objects"]) if self.meta.get("task") == "objects" else 0
        if objects is not None and self.objects_session is not None:
            feed = {INPUT_NAME: x, OBJECTS_INPUT: checked_objects(objects, len(x), n_objects)}
            outputs, ood = self.objects_session.run(self._fetch, feed)
        else:
            session = self.session  # built on first use; it also sets input_name
            outputs, ood = session.run(self._fetch, {self.input_name: x})
            if objects is not None:
                outputs = own_object_outputs(np.asarray(outputs), objects, n_objects)
        return np.asarray(outputs, dtype=np.float64), np.asarray(ood, dtype=np.float64)

    @property
    def has_refiner(self) -> bool:
        """Whether refine() can run (the export carries the centre refiner's graph)."""
        return self.refiner_session is not None

    def refine(self, batch: np.ndarray) -> np.ndarray:
        """(B, 1, S, S) float32 refiner crops -> (B, 3) float64 palm offsets over the refiner's cube_m / 2.

        Raises:
            BackendError: the export has no refiner graph.
        """
        if self.refiner_session is None:
            raise BackendError("this export has no centre refiner graph")
        if len(batch) == 0:
            return np.zeros((0, 3))
        x = np.ascontiguousarray(batch, dtype=np.float32)
        (offsets,) = self.refiner_session.run([REFINER_OUTPUT], {INPUT_NAME: x})
        return np.asarray(offsets, dtype=np.float64)
