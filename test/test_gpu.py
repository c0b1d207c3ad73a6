"""GPU checks (marker gpu; bench/gpu_suite.sh runs them): the CUDA estimator in half precision against
the CPU, ONNX Runtime's CUDA and TensorRT providers against its CPU provider, the torch hand caster
on CUDA, and the EGL context on the NVIDIA driver. Each skips, with the reason, where its GPU part is missing."""

from __future__ import annotations

import shutil
import subprocess
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the GPU checks need PyTorch")

from featmap_ros import geometry as geo  # noqa: E402
from featmap_ros.datasets.nyu import NYU_INTRINSICS  # noqa: E402

pytestmark = pytest.mark.gpu

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="no CUDA device visible to torch")


def ort_providers() -> list[str]:
    try:
        import onnxruntime
    except ImportError:
        return []
    return onnxruntime.get_available_providers()


def nvidia_gpu() -> bool:
    """Whether the NVIDIA driver reports a GPU (nvidia-smi -L)."""
    smi = shutil.which("nvidia-smi")
    return bool(smi) and subprocess.run([smi, "-L"], capture_output=True).returncode == 0


@pytest.fixture(scope="module")
def onnx_models(tmp_path_factory):
    """The parity models of test_onnx (bb8, dense, hands), exported; skips where the exporter is missing."""
    pytest.importorskip("onnxscript", reason="torch.onnx's exporter needs onnxscript")
    from test_onnx import tiny_checkpoint

    from featmap_ros.export import export_onnx

    folder = tmp_path_factory.mktemp("gpu_onnx")
    return {kind: (ckpt, export_onnx(ckpt, folder)) for kind in ("bb8", "dense", "hands")
            for ckpt in [tiny_checkpoint(folder, kind)]}


@needs_cuda
@pytest.mark.parametrize("kind", ["bb8", "dense", "hands"])
def test_the_cuda_estimator_in_half_precision_matches_the_cpu(tmp_path, kind) -> None:
    from test_onnx import INTR, UV_TRUE, crops_for, hand_depth, object_frame, tiny_checkpoint

    from featmap_ros.estimator import load_estimator

    ckpt = tiny_checkpoint(tmp_path, kind)
    # One network pass per hand (no recentre): the precisions are compared, not crops that moved apart.
    cpu = load_estimator(ckpt, device="cpu", backend="torch", recentre=0)
    gpu = load_estimator(ckpt, device="cuda", backend="torch", recentre=0)
    assert gpu.device.startswith("cuda") and gpu.net.half
    x = crops_for(kind, 8)
    (out_c, ood_c), (out_g, ood_g) = cpu.net.run(x), gpu.net.run(x)
    diff = float(np.abs(out_g - out_c).max())
    print(f"{kind}: max |cuda fp16 - cpu fp32| {diff:.2e}, out-of-domain {np.abs(ood_g - ood_c).max():.2e}")
    assert diff < 2e-2 and np.allclose(ood_g, ood_c, rtol=2e-2, atol=2e-2)
    if kind == "bb8":
        rgb, dets = object_frame()
        (pc, _), (pg, _) = cpu.estimate(rgb, INTR, dets), gpu.estimate(rgb, INTR, dets)
        assert np.abs(pc.corners_uv - UV_TRUE).max() < 10 and np.abs(pg.corners_uv - pc.corners_uv).max() < 0.5
    elif kind == "hands":
        (hc,), (hg,) = cpu.estimate(hand_depth(), NYU_INTRINSICS), gpu.estimate(hand_depth(), NYU_INTRINSICS)
        uv = np.abs(geo.project(hg.joints_xyz, NYU_INTRINSICS.K) - geo.project(hc.joints_xyz, NYU_INTRINSICS.K))
        assert uv.max() < 0.5


def offered(provider: str, atol: float) -> Any:
    """A provider as a parameter, skipped (before any export) where this onnxruntime does not offer it."""
    why = f"onnxruntime offers no {provider} here ({ort_providers()}; install onnxruntime-gpu)"
    return pytest.param(provider, atol, marks=pytest.mark.skipif(provider not in ort_providers(), reason=why))


@pytest.mark.parametrize("provider,atol", [offered("CUDAExecutionProvider", 1e-3),
                                           offered("TensorrtExecutionProvider", 2e-2)])
@pytest.mark.parametrize("kind", ["bb8", "dense", "hands"])
def test_onnxruntime_gpu_providers_match_its_cpu_provider(onnx_models, provider, atol, kind) -> None:
    from test_onnx import crops_for

    from featmap_ros.backends.onnx_net import OnnxNetwork

    _, export = onnx_models[kind]
    gpu = OnnxNetwork(export, "cuda", providers=[provider, "CPUExecutionProvider"])
    if gpu.provider != provider:
        pytest.skip(f"{provider} is offered but did not start (runtime libraries missing?); got {gpu.provider}")
    cpu = OnnxNetwork(export, "cpu")
    x = crops_for(kind, 8)
    (out_c, ood_c), (out_g, ood_g) = cpu.run(x), gpu.run(x)
    diff = float(np.abs(out_g - out_c).max())
    print(f"{kind} on {gpu.device}: max |gpu - cpu| {diff:.2e}")
    assert diff < atol and np.allclose(ood_g, ood_c, rtol=atol, atol=atol)


@needs_cuda
def test_the_torch_hand_caster_on_cuda_matches_the_cpu() -> None:
    from featmap_ros.render.hand import HandRenderer, HandShape, sample_poses

    shape = HandShape.nominal()
    pose = sample_poses(np.random.default_rng(3), 8, shape)
    d_cpu = HandRenderer(backend="torch").render(shape, pose).depth
    d_gpu = HandRenderer(device="cuda", backend="torch").render(shape, pose).depth
    d_gpu = d_gpu.cpu().numpy() if hasattr(d_gpu, "cpu") else np.asarray(d_gpu)
    hit_c, hit_g = np.isfinite(d_cpu), np.isfinite(d_gpu)
    assert hit_c.sum() > 10_000 and (hit_c ^ hit_g).sum() < 1e-3 * hit_c.sum()
    assert np.quantile(np.abs(d_cpu - d_gpu)[hit_c & hit_g], 0.999) < 1e-4


@pytest.mark.skipif(not nvidia_gpu(), reason="no NVIDIA GPU (nvidia-smi -L)")
def test_the_egl_context_is_on_the_nvidia_driver() -> None:
    from featmap_ros.render.gl import get_context

    renderer = get_context().info.get("GL_RENDERER", "")
    assert "NVIDIA" in renderer.upper(), f"EGL picked {renderer!r}, not the NVIDIA driver (libEGL_nvidia missing?)"
