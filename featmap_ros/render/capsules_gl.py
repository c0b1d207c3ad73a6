"""Capsule depth rendering on OpenGL: one screen quad per capsule, the exact ray cast in the fragment shader.

The same analytic ray-capsule intersection as render.hand.render_capsules (the torch reference,
which also runs batched on CUDA), rasterised instead of enumerated: the GPU (or Mesa's llvmpipe on
a CPU machine) runs the fragment shader only on the pixels of each capsule's screen box, and the
z-buffer keeps the nearest hit. Frames of a batch are stacked into one tall framebuffer, so a batch
is one draw call and one read. Depth is z along the optical axis in metres, NaN for background.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    import moderngl

from featmap_ros.render.gl import RenderError, get_context
from featmap_ros.render.hand import capsule_screen_boxes, check_capsules

# Depth-buffer range: hits farther than this (metres) are dropped; a hand is within 2 m of a sensor.
Z_FAR_M = 20.0
FRAMES_PER_PASS = 16

_VERTEX_SHADER = """
#version 330
in vec2 corner;
in vec4 box;          // u0, v0, u1, v1: inclusive pixel box, rows of the stacked framebuffer
in vec4 cap_a_row0;   // end a (camera frame, metres), first framebuffer row of the capsule's frame
in vec4 cap_b_radius; // end b, radius
in float part;
uniform vec2 fb_size;
flat out vec3 A;
flat out vec3 B;
flat out float radius;
flat out float label;
flat out float row0;
void main() {
    // Pixel u covers [u - 0.5, u + 0.5]; window x = u + 0.5 (gl.py's convention: row v = window row v).
    vec2 px = mix(box.xy - 0.5, box.zw + 0.5, corner) + 0.5;
    gl_Position = vec4(px / fb_size * 2.0 - 1.0, 0.0, 1.0);
    A = cap_a_row0.xyz;
    row0 = cap_a_row0.w;
    B = cap_b_radius.xyz;
    radius = cap_b_radius.w;
    label = part;
}
"""

# Mirrors render_capsules term by term (same clamps and branch conditions), so both agree to rounding.
_FRAGMENT_SHADER = """
#version 330
uniform vec4 intrinsics;  // fx, fy, cx, cy
uniform float z_far;
flat in vec3 A;
flat in vec3 B;
flat in float radius;
flat in float label;
flat in float row0;
layout(location = 0) out vec2 depth_label;
void main() {
    float u = gl_FragCoord.x - 0.5;
    float v = gl_FragCoord.y - 0.5 - row0;
    vec3 d = vec3((u - intrinsics.z) / intrinsics.x, (v - intrinsics.w) / intrinsics.y, 1.0);
    vec3 ba = B - A;
    vec3 oa = -A;
    float r2 = radius * radius;
    float baba = dot(ba, ba);
    float baoa = dot(ba, oa);
    float dd = dot(d, d);
    float bard = dot(ba, d);
    float rdoa = dot(oa, d);
    float qa = baba * dd - bard * bard;
    float qb = baba * rdoa - baoa * bard;
    float qc = baba * (dot(oa, oa) - r2) - baoa * baoa;
    float disc = qb * qb - qa * qc;
    float t_cyl = (-qb - sqrt(max(disc, 0.0))) / max(qa, 1e-12);
    float y = baoa + t_cyl * bard;
    float t;
    if (disc >= 0.0 && qa > 1e-12 && y > 0.0 && y < baba) {
        t = t_cyl;
    } else {
        vec3 oc = (y <= 0.0) ? oa : -B;
        float sb = dot(oc, d);
        float sdisc = sb * sb - dd * (dot(oc, oc) - r2);
        if (sdisc < 0.0) discard;
        t = (-sb - sqrt(sdisc)) / dd;
    }
    if (t <= 0.0 || t >= z_far) discard;
    gl_FragDepth = t / z_far;
    depth_label = vec2(t, label);
}
"""


class GLCapsuleRenderer:
    """Ray-cast batches of capsule scenes into (B, H, W) depth (and part labels) with this process's GL context."""

    def __init__(self) -> None:
        self.ctx = get_context()
        try:
            self.prog = self.ctx.program(vertex_shader=_VERTEX_SHADER, fragment_shader=_FRAGMENT_SHADER)
        except Exception as err:  # moderngl raises a bare Error on compile/link failures
            raise RenderError(f"the capsule shaders did not build on this OpenGL ({err})") from err
        corners = np.array([[0, 0], [1, 0], [0, 1], [1, 1]], dtype=np.float32)
        self.quad = self.ctx.buffer(corners.tobytes())
        self.instances = self.ctx.buffer(reserve=4096 * 13 * 4, dynamic=True)
        # The VAO names the buffer object, which keeps its name when orphaned to a larger size.
        self.vao = self.ctx.vertex_array(self.prog, [
            (self.quad, "2f", "corner"),
            (self.instances, "4f 4f 4f 1f /i", "box", "cap_a_row0", "cap_b_radius", "part"),
        ])
        self.max_rows = int(self.ctx.info.get("GL_MAX_RENDERBUFFER_SIZE", 8192))
        self._fbo: moderngl.Framebuffer | None = None

    def _framebuffer(self, width: int, rows: int) -> moderngl.Framebuffer:
        """A framebuffer of this width and at least `rows` rows: reused, and grown (freeing the old one) when short."""
        fbo = self._fbo
        if fbo is None or fbo.width != width or fbo.height < rows:
            if fbo is not None:
                for buffer in (*fbo.color_attachments, fbo.depth_attachment):
                    buffer.release()  # the renderbuffers too: moderngl frees nothing on garbage collection
                fbo.release()
            colour = self.ctx.renderbuffer((width, rows), 2, dtype="f4")
            self._fbo = fbo = self.ctx.framebuffer([colour], self.ctx.depth_renderbuffer((width, rows)))
        return fbo

    def render(
        self, cap_a: np.ndarray, cap_b: np.ndarray, radius: np.ndarray, K: np.ndarray, width: int, height: int,
        part: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """(B, P, 3) ends, (B, P) radii (metres, camera frame) -> depth (B, H, W) float32 NaN background, labels.

        part: (P,) label of each capsule (>= 1) for a (B, H, W) uint8 label image (0 = background), or None.
        """
        cap_a, cap_b = np.asarray(cap_a, np.float32), np.asarray(cap_b, np.float32)
        radius = np.asarray(radius, np.float32)
        check_capsules(cap_a, cap_b, radius)
        B, P = radius.shape
        if max(width, height) > self.max_rows:
            raise RenderError(f"a {width}x{height} frame exceeds this OpenGL's {self.max_rows}-pixel framebuffers")
        a, b, r = cap_a.reshape(-1, 3), cap_b.reshape(-1, 3), radius.reshape(-1)
        u0, v0, w, h = (x.numpy() for x in capsule_screen_boxes(torch.from_numpy(a), torch.from_numpy(b),
                                                                  torch.from_numpy(r), K, width, height))
        labels_of = np.zeros(P, np.float32) if part is None else np.asarray(part, np.float32).reshape(P)
        depth = np.empty((B, height, width), np.float32)
        labels = None if part is None else np.empty((B, height, width), np.uint8)
        # At most 16 frames a pass keeps the framebuffer near 60 MB at 640x480.
        per_pass = max(1, min(FRAMES_PER_PASS, self.max_rows // height))
        self.prog["intrinsics"].value = (float(K[0][0]), float(K[1][1]), float(K[0][2]), float(K[1][2]))
        self.prog["z_far"].value = Z_FAR_M
        for first in range(0, B, per_pass):
            n = min(per_pass, B - first)
            sel = slice(first * P, (first + n) * P)
            keep = np.flatnonzero((w[sel] > 0) & (h[sel] > 0))
            row0 = ((np.arange(n * P) // P) * height).astype(np.float32)[keep]
            u, v = u0[sel][keep].astype(np.float32), v0[sel][keep].astype(np.float32)
            table = np.column_stack([
                u, v + row0, u + w[sel][keep] - 1, v + row0 + h[sel][keep] - 1,
                a[sel][keep], row0, b[sel][keep], r[sel][keep], labels_of[keep % P],
            ]).astype(np.float32)
            out = self._draw(table, width, n * height)
            depth[first:first + n] = out[..., 0].reshape(n, height, width)
            if labels is not None:
                labels[first:first + n] = out[..., 1].reshape(n, height, width).astype(np.uint8)
        depth[depth == 0.0] = np.nan  # cleared pixels: no capsule hit
        return depth, labels

    def _draw(self, table: np.ndarray, width: int, rows: int) -> np.ndarray:
        """One draw call of len(table) capsule quads into a width x rows framebuffer; (rows, width, 2) float32."""
        fbo = self._framebuffer(width, rows)
        fbo.use()
        area = (0, 0, width, rows)  # a reused framebuffer may be taller than this pass
        fbo.viewport = area
        fbo.clear(0.0, 0.0, 0.0, 0.0, depth=1.0, viewport=area)
        if len(table):
            if table.nbytes > self.instances.size:
                self.instances.orphan(table.nbytes)
            self.instances.write(table.tobytes())
            self.prog["fb_size"].value = (float(width), float(rows))
            self.ctx.enable(self.ctx.DEPTH_TEST)
            self.ctx.depth_func = "<"
            self.ctx.disable(self.ctx.CULL_FACE | self.ctx.BLEND)
            self.vao.render(mode=self.ctx.TRIANGLE_STRIP, vertices=4, instances=len(table))
        return np.frombuffer(fbo.read(viewport=area, components=2, dtype="f4"), np.float32).reshape(rows, width, 2)
