"""Headless OpenGL through moderngl + EGL: one lazy context per process, projection, framebuffers.

Conventions: the camera is OpenCV's (x right, y down, z forward, metres). The projection built
here maps image row v to GL window row v, so a framebuffer read (which starts at the GL bottom
row) comes back top row first, with no flip; the price is a mirrored winding, so renderers here
draw without face culling.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from featmap_ros.errors import FeatmapError

try:
    import moderngl
except ImportError:  # pragma: no cover - depends on the machine
    moderngl = None

EGL_HINT = "install the EGL runtime, e.g. `sudo apt-get install libegl1 libegl-mesa0 libgl1-mesa-dri`"


class RenderError(FeatmapError, RuntimeError):
    """Rendering could not start (no EGL / OpenGL) or got input it cannot draw."""


# The context is per process: a forked DataLoader worker must not touch its parent's context
# (the driver's threads did not survive the fork), so the cache is keyed by pid.
_CONTEXT: tuple[int, object] | None = None


def get_context() -> moderngl.Context:
    """Return this process's headless moderngl context, creating it on first use (EGL, GL >= 3.3)."""
    global _CONTEXT
    pid = os.getpid()
    if _CONTEXT is not None and _CONTEXT[0] == pid:
        return _CONTEXT[1]
    if _CONTEXT is not None:
        # Mesa's EGL state does not survive fork(): a new context in the child hangs. Fail loudly instead.
        raise RenderError(
            f"process {pid} was forked from process {_CONTEXT[0]} after it had started OpenGL; start workers "
            "with multiprocessing_context='spawn' or 'forkserver' (see featmap_ros.datasets.streams.object_loader)"
        )
    if moderngl is None:
        raise RenderError(f"moderngl is not installed (pip install moderngl); then {EGL_HINT}")
    try:
        ctx = moderngl.create_context(standalone=True, backend="egl", require=330)
    except Exception as err:  # moderngl/glcontext raise bare Exception subclasses
        raise RenderError(f"cannot create a headless EGL OpenGL 3.3 context ({err}); {EGL_HINT}") from err
    _CONTEXT = (pid, ctx)
    return ctx


def projection_from_K(K: np.ndarray, width: int, height: int, near: float = 0.01, far: float = 20.0) -> np.ndarray:
    """Return the (4, 4) float32 OpenGL projection of an OpenCV camera K for a width x height image.

    Pixel centres are integer (u, v): pixel u covers [u - 0.5, u + 0.5], so the image spans
    NDC -1..1 over u in [-0.5, width - 0.5]. Camera-frame points (z forward, metres) go in with
    w = 1; clip w = z, and z in [near, far] maps to NDC [-1, 1]. Row v = 0 lands on NDC y = -1
    (the first row a framebuffer read returns). Row-major: clip = P @ [x, y, z, 1].
    """
    K = np.asarray(K, dtype=np.float64)
    if K.shape != (3, 3) or not np.isfinite(K).all():
        raise RenderError(f"K must be a finite 3x3 matrix, got shape {K.shape}")
    if not (0 < near < far):
        raise RenderError(f"need 0 < near < far, got near={near} far={far}")
    fx, fy, cx, cy, s = K[0, 0], K[1, 1], K[0, 2], K[1, 2], K[0, 1]
    P = np.zeros((4, 4))
    P[0] = [2 * fx / width, 2 * s / width, (2 * cx + 1) / width - 1, 0]
    P[1] = [0, 2 * fy / height, (2 * cy + 1) / height - 1, 0]
    P[2] = [0, 0, (far + near) / (far - near), -2 * far * near / (far - near)]
    P[3] = [0, 0, 1, 0]
    return P.astype(np.float32)


@dataclass
class Targets:
    """An offscreen framebuffer: RGBA8 colour, R32F linear depth in metres (0 = nothing), z-buffer."""

    fbo: moderngl.Framebuffer
    width: int
    height: int


class FramebufferPool:
    """Offscreen framebuffers of a context, reused by size (creating one per frame is slow)."""

    def __init__(self, ctx: moderngl.Context, max_cached: int = 8) -> None:
        self.ctx = ctx
        self.max_cached = max_cached
        self._cache: dict[tuple[int, int], Targets] = {}

    def get(self, width: int, height: int) -> Targets:
        """Return a (width x height) colour + metric-depth framebuffer, cleared by the caller."""
        key = (int(width), int(height))
        if key in self._cache:
            return self._cache[key]
        limit = self.ctx.info.get("GL_MAX_RENDERBUFFER_SIZE", 8192)
        if not (0 < key[0] <= limit and 0 < key[1] <= limit):
            raise RenderError(f"framebuffer {key[0]}x{key[1]} is outside 1..{limit} pixels")
        if len(self._cache) >= self.max_cached:
            old = self._cache.pop(next(iter(self._cache)))
            old.fbo.release()
        colour = self.ctx.renderbuffer(key, 4, dtype="f1")
        depth_m = self.ctx.renderbuffer(key, 1, dtype="f4")
        zbuf = self.ctx.depth_renderbuffer(key)
        targets = Targets(self.ctx.framebuffer([colour, depth_m], zbuf), key[0], key[1])
        self._cache[key] = targets
        return targets

    @staticmethod
    def read(targets: Targets) -> tuple[np.ndarray, np.ndarray]:
        """Read back (H, W, 3) uint8 RGB and (H, W) float32 depth (0 where nothing was drawn)."""
        w, h = targets.width, targets.height
        rgba = np.frombuffer(targets.fbo.read(components=4, attachment=0, dtype="f1"), np.uint8)
        depth = np.frombuffer(targets.fbo.read(components=1, attachment=1, dtype="f4"), np.float32)
        return rgba.reshape(h, w, 4)[:, :, :3], depth.reshape(h, w)

    def release(self) -> None:
        """Free every cached framebuffer."""
        for t in self._cache.values():
            t.fbo.release()
        self._cache.clear()
