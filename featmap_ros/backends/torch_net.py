"""The torch backend: a checkpoint's run-time graph on a torch device.

RunTimeGraph is the one definition of what runs on the robot: h(g(f_R(x))) and the out-of-domain
score of the pooled feature under the synthetic feature statistics. TorchNetwork runs it here;
featmap_ros.export writes the same module to ONNX, so both backends compute the same thing (in float32;
TorchNetwork's precision "bf16" is the torch backend's own, a CPU speed-up where bf16 is native). A hand
checkpoint's centre refiner (model/refiner.py), when it has one, runs beside it (refine()), in
float32 whatever the device.
"""

from __future__ import annotations

import functools
import logging
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from featmap_ros.backends import PRECISIONS, BackendError, checked_objects
from featmap_ros.model import checkpoint
from featmap_ros.model.nets import FeatureMappingModel, pooled_features
from featmap_ros.model.refiner import OFFSET_DIM, CentreRefiner

log = logging.getLogger(__name__)


def resolve_device(device: str = "auto") -> torch.device:
    """'auto' -> CUDA when available, else CPU with one warning; 'cuda' without a GPU is an error."""
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        log.warning("no CUDA device found: running the network on the CPU")
        return torch.device("cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise BackendError(f"device {device!r} asked for, but torch sees no CUDA device")
    return torch.device(device)


def bf16_native(device: torch.device, cpu_flags: str | None = None) -> bool:
    """Whether `device` computes bf16 natively: CUDA's own check; on a CPU the AMX-BF16 or AVX512-BF16 flag.

    cpu_flags: the CPU's flags as /proc/cpuinfo lists them (read from there when None; no file: False).
    """
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    flags = _cpu_flags() if cpu_flags is None else set(re.findall(r"[a-z0-9_]+", cpu_flags))
    return bool(flags & {"amx_bf16", "avx512_bf16"})


@functools.cache
def _cpu_flags() -> frozenset[str]:
    """The words of /proc/cpuinfo (read once per process; empty where there is no such file)."""
    try:
        return frozenset(re.findall(r"[a-z0-9_]+", Path("/proc/cpuinfo").read_text()))
    except OSError:
        return frozenset()


class RunTimeGraph(nn.Module):
    """(B, C, S, S) crops -> outputs (B, K) or (B, K, S/2, S/2), out-of-domain score (B,), pooled feature (B, D).

    The score is the RMS z-score of the pooled mapped feature under the synthetic feature
    distribution (diagonal Gaussian, meta feature_stats): about 1 in domain, growing as the image
    leaves what the network was trained on; NaN when the checkpoint has no statistics.
    """

    def __init__(self, model: FeatureMappingModel, feature_stats: dict[str, Any] | None = None,
                 n_objects: int | None = None) -> None:
        """n_objects: an object model's objects (its checkpoint's list), which a readout of each crop's
        own object splits the head's channels by."""
        super().__init__()
        self.model = model
        self.n_objects = n_objects
        stats = feature_stats or {}
        have = "mean" in stats and "std" in stats
        self.register_buffer("feat_mean", torch.tensor(stats["mean"], dtype=torch.float32) if have else None)
        self.register_buffer(
            "feat_std", torch.tensor(stats["std"], dtype=torch.float32).clamp_min(1e-6) if have else None
        )

    def forward(self, x: torch.Tensor, objects: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, C, S, S) -> (outputs, ood, features), all float32; objects (B,) int64: each crop's own
        object's outputs only (FeatureMappingModel.predict_real; the export traces the graph both ways)."""
        pred = self.model.predict_real(x, objects, self.n_objects)
        feats = pooled_features(pred.features).float()
        if self.feat_mean is None or self.feat_std is None:
            ood = torch.full_like(feats[:, 0], float("nan"))
        else:
            ood = (((feats - self.feat_mean) / self.feat_std) ** 2).mean(dim=1).sqrt()
        return pred.outputs.float(), ood, feats


class TorchNetwork:
    """A loaded model on a torch device with its out-of-domain statistics.

    precision "auto": half precision on CUDA, float32 on a CPU. "float32": float32 on every device.
    "bf16": bf16 autocast as in training (the extractor and the mapping in bf16, the heads in their
    float32 weights); only where the device computes bf16 natively (bf16_native), since emulated bf16
    is slower than float32. The centre refiner always runs in float32.

    Raises:
        BackendError: an unknown precision, or bf16 on a device without native bf16.
    """

    def __init__(self, model: FeatureMappingModel, meta: dict[str, Any], device: torch.device,
                 refiner: CentreRefiner | None = None, precision: str = "auto") -> None:
        if precision not in PRECISIONS:
            raise BackendError(f"precision must be one of {list(PRECISIONS)}, got {precision!r}")
        if precision == "bf16" and not bf16_native(device):
            raise BackendError(f"precision bf16 asked for, but {device} does not compute bf16 natively "
                               "(CPUs need AMX-BF16 or AVX512-BF16): use auto or float32")
        self.meta = meta
        self.device = device
        self.precision = precision
        self.half = device.type == "cuda" and precision == "auto"
        self.bf16 = precision == "bf16"
        self.head = model.cfg.head
        self.n_outputs = int(model.cfg.n_outputs)
        self.model = model.to(device).eval()
        if self.half:
            self.model = self.model.half()
        # On a CPU the convolutions run in channels_last (NHWC) memory: the network 1.3-1.6x faster for 8 object
        # crops on the Intel Xeon without bf16 (session 20, docs/results.md; no gain on a single crop); the same
        # numbers to float rounding. CUDA keeps the default format (not measured there).
        self.memory_format = torch.channels_last if device.type == "cpu" else torch.contiguous_format
        self.model = self.model.to(memory_format=self.memory_format)
        # The statistics stay float32 when the model is half: the score is computed in float32.
        self.n_objects = len(meta.get("objects") or ()) if model.cfg.task == "objects" else 0
        self.graph = RunTimeGraph(self.model, meta.get("feature_stats"), self.n_objects or None).to(device).eval()
        self.refiner = None if refiner is None else refiner.to(device).eval().to(memory_format=self.memory_format)

    @property
    def has_refiner(self) -> bool:
        """Whether refine() can run (the checkpoint carries a centre refiner)."""
        return self.refiner is not None

    @torch.inference_mode()
    def refine(self, batch: np.ndarray) -> np.ndarray:
        """(B, 1, S, S) float32 refiner crops -> (B, 3) float64 palm offsets over the refiner's cube_m / 2.

        Raises:
            BackendError: the checkpoint has no refiner.
        """
        if self.refiner is None:
            raise BackendError("this checkpoint has no centre refiner (model.checkpoint.attach_refiner adds one)")
        if len(batch) == 0:
            return np.zeros((0, OFFSET_DIM))
        x = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32)).to(self.device)
        return self.refiner(x.contiguous(memory_format=self.memory_format)).cpu().numpy().astype(np.float64)

    @torch.inference_mode()
    def run(self, batch: np.ndarray, objects: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(B, C, S, S) float32 -> outputs (B, K...) and out-of-domain scores (B,), both float64 numpy.

        objects (B,) of an object model: each crop's object index; outputs are then that object's alone,
        (B, K / n_objects, ...), the cheaper readout (backends.own_object_outputs's layout).
        """
        x = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32)).to(self.device, non_blocking=True)
        x = x.contiguous(memory_format=self.memory_format) if x.dim() == 4 else x
        index = (None if objects is None
                 else torch.from_numpy(checked_objects(objects, len(batch), self.n_objects)).to(self.device))
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            outputs, ood, _ = self.graph(x.half() if self.half else x, index)
        # Row-major float64 whatever the memory format the graph computed in (as onnxruntime's arrays).
        return (np.ascontiguousarray(outputs.cpu().numpy(), dtype=np.float64),
                np.ascontiguousarray(ood.cpu().numpy(), dtype=np.float64))


def load(model_path: str | Path, device: str = "auto", cpu_threads: int = 0, precision: str = "auto") -> TorchNetwork:
    """A checkpoint's network on `device`; cpu_threads > 0 caps torch's intra-op threads; precision: TorchNetwork's.

    Raises:
        featmap_ros.model.checkpoint.CheckpointError: missing, foreign, tampered or corrupt checkpoint.
        BackendError: a CUDA device asked for where torch sees none.
    """
    if cpu_threads > 0:
        torch.set_num_threads(cpu_threads)
    model, meta = checkpoint.load(model_path, device="cpu", require_estimator_meta=True)
    found = checkpoint.load_refiner(model_path) if meta["task"] == "hands" else None
    return TorchNetwork(model, meta, resolve_device(device), refiner=None if found is None else found[0],
                        precision=precision)
