"""Phong-shaded renders of BOP meshes (vertex colours or UV textures): RGB, metric depth, mask.

Poses are model-to-camera (R, t) in metres, cameras are OpenCV K matrices; to render straight
into a crop window pass CropWindow.intrinsics(K) with the window's output size.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from featmap_ros.datasets.bop import Mesh, load_ply, model_path
from featmap_ros.render.gl import FramebufferPool, RenderError, get_context, projection_from_K

_VERTEX_SHADER = """
#version 330
uniform mat3 R;
uniform vec3 t;
uniform mat4 P;
in vec3 in_pos;
in vec3 in_nrm;
in vec3 in_col;
in vec2 in_uv;
out vec3 v_pos;
out vec3 v_nrm;
out vec3 v_col;
out vec2 v_uv;
void main() {
    vec3 p = R * in_pos + t;
    v_pos = p;
    v_nrm = R * in_nrm;
    v_col = in_col;
    v_uv = in_uv;
    gl_Position = P * vec4(p, 1.0);
}
"""

_FRAGMENT_SHADER = """
#version 330
uniform vec3 light_dir;
uniform vec3 light_col;
uniform float ambient;
uniform float diffuse;
uniform float specular;
uniform float shininess;
uniform float exposure;
uniform bool use_tex;
uniform sampler2D tex;
in vec3 v_pos;
in vec3 v_nrm;
in vec3 v_col;
in vec2 v_uv;
layout(location = 0) out vec4 f_col;
layout(location = 1) out float f_depth;
void main() {
    vec3 n = normalize(v_nrm);
    vec3 v = normalize(-v_pos);
    // Two-sided: a back face seen through a hole in the mesh is lit like its front.
    if (dot(n, v) < 0.0) n = -n;
    vec3 albedo = use_tex ? texture(tex, v_uv).rgb : v_col;
    vec3 l = normalize(light_dir);
    float nl = max(dot(n, l), 0.0);
    float spec = nl > 0.0 ? pow(max(dot(n, normalize(l + v)), 0.0), shininess) : 0.0;
    vec3 c = exposure * (albedo * (ambient + diffuse * nl) + specular * spec) * light_col;
    f_col = vec4(clamp(c, 0.0, 1.0), 1.0);
    f_depth = v_pos.z;
}
"""


@dataclass(frozen=True)
class Lighting:
    """Phong lighting in the camera frame; light_dir points from the surface towards the light."""

    light_dir: tuple[float, float, float] = (0.0, 0.0, -1.0)
    light_color: tuple[float, float, float] = (1.0, 1.0, 1.0)
    ambient: float = 0.5
    diffuse: float = 0.5
    specular: float = 0.1
    shininess: float = 20.0
    exposure: float = 1.0

    @classmethod
    def sample(cls, rng: np.random.Generator) -> Lighting:
        """Draw random lighting: a light somewhere on the camera's side, near-white, random material."""
        # Directions within ~70 degrees of the viewing axis: lights behind the object leave it black.
        d = rng.normal(size=3)
        d[2] = -abs(d[2]) - 1.0
        d /= np.linalg.norm(d)
        tint = rng.uniform(0.8, 1.0, size=3)
        return cls(
            light_dir=tuple(float(x) for x in d),
            light_color=tuple(float(x) for x in tint / tint.max()),
            ambient=float(rng.uniform(0.25, 0.7)),
            diffuse=float(rng.uniform(0.3, 0.8)),
            specular=float(rng.uniform(0.0, 0.4)),
            shininess=float(np.exp(rng.uniform(np.log(2.0), np.log(64.0)))),
            exposure=float(rng.uniform(0.75, 1.3)),
        )


def vertex_normals(vertices: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """Area-weighted unit vertex normals (V, 3) float32 of a triangle mesh."""
    v = np.asarray(vertices, dtype=np.float64)
    f = np.asarray(faces, dtype=np.int64)
    fn = np.cross(v[f[:, 1]] - v[f[:, 0]], v[f[:, 2]] - v[f[:, 0]])
    n = np.zeros_like(v)
    for k in range(3):
        np.add.at(n, f[:, k], fn)
    n /= np.maximum(np.linalg.norm(n, axis=1, keepdims=True), 1e-12)
    return n.astype(np.float32)


def simplify_mesh(mesh: Mesh, cell_m: float) -> Mesh:
    """Vertex-cluster a mesh on a cell_m grid (metres): average positions, normals and colours per cell.

    Cells below a pixel leave renders unchanged to the eye while cutting the triangles that
    dominate a software rasteriser's time. UV-textured meshes are returned unchanged.
    """
    if mesh.uv is not None or cell_m <= 0:
        return mesh
    v = np.asarray(mesh.vertices, dtype=np.float64)
    _, inv, counts = np.unique(np.floor((v - v.min(0)) / cell_m).astype(np.int64), axis=0,
                               return_inverse=True, return_counts=True)
    inv = inv.reshape(-1)

    def mean(a: np.ndarray) -> np.ndarray:
        out = np.zeros((len(counts), a.shape[1]))
        np.add.at(out, inv, a.astype(np.float64))
        return out / counts[:, None]

    f = inv[np.asarray(mesh.faces)]
    f = f[(f[:, 0] != f[:, 1]) & (f[:, 1] != f[:, 2]) & (f[:, 0] != f[:, 2])]
    _, first = np.unique(np.sort(f, axis=1), axis=0, return_index=True)
    f = f[np.sort(first)]
    normals = None
    if mesh.normals is not None:
        normals = mean(mesh.normals)
        normals = (normals / np.maximum(np.linalg.norm(normals, axis=1, keepdims=True), 1e-12)).astype(np.float32)
    colors = None if mesh.colors is None else np.clip(np.round(mean(mesh.colors)), 0, 255).astype(np.uint8)
    return dataclasses.replace(mesh, vertices=mean(v), faces=f, normals=normals, colors=colors)


def reduce_mesh(mesh: Mesh, max_faces: int) -> Mesh:
    """Simplify with growing grid cells until the mesh has at most max_faces triangles."""
    if len(mesh.faces) <= max_faces:
        return mesh
    extent = float(np.ptp(np.asarray(mesh.vertices), axis=0).max())
    cell = extent / 300.0
    out = simplify_mesh(mesh, cell)
    while len(out.faces) > max_faces and cell < extent / 8.0:
        # A surface's triangle count falls with the square of the cell size.
        cell *= max(1.1, 1.05 * np.sqrt(len(out.faces) / max_faces))
        out = simplify_mesh(mesh, cell)
    return out


class ObjectRenderer:
    """Render BOP meshes at model-to-camera poses; GL state is made lazily, once per process.

    Args:
        meshes: obj_id -> Mesh (metres). Each is uploaded once, on its first render.
        near, far: clipping range in metres.
        max_faces: simplify larger meshes to about this many triangles (for small crops; None keeps all).
        cull_back_faces: skip faces turned away from the camera (about 1.5x faster; meshes must be closed).
    """

    # Tiles are stacked vertically in one framebuffer; keep it under common GL size limits.
    MAX_FBO_HEIGHT = 8192

    def __init__(
        self, meshes: Mapping[int, Mesh], *, near: float = 0.01, far: float = 20.0, max_faces: int | None = None,
        cull_back_faces: bool = True,
    ) -> None:
        self.meshes = {int(k): m if max_faces is None else reduce_mesh(m, max_faces) for k, m in meshes.items()}
        self.near, self.far = float(near), float(far)
        self.cull_back_faces = bool(cull_back_faces)
        self._gl_pid: int | None = None

    @classmethod
    def from_bop(cls, root: str | Path, obj_ids: Sequence[int], **kwargs: float | bool | None) -> ObjectRenderer:
        """Load models/obj_NNNNNN.ply of a BOP dataset root for the given object ids."""
        return cls({int(i): load_ply(model_path(root, i)) for i in obj_ids}, **kwargs)

    # GL objects cannot cross processes: a pickled or forked renderer rebuilds them on first use.
    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        for k in ("ctx", "prog", "pool", "_vaos", "_u"):
            state.pop(k, None)
        state["_gl_pid"] = None
        return state

    def _gl(self) -> None:
        pid = os.getpid()
        if self._gl_pid == pid:
            return
        self.ctx = get_context()
        self.prog = self.ctx.program(vertex_shader=_VERTEX_SHADER, fragment_shader=_FRAGMENT_SHADER)
        self.pool = FramebufferPool(self.ctx)
        self._vaos: dict[int, tuple] = {}
        self._u = {k: self.prog[k] for k in ("R", "t", "P", "light_dir", "light_col", "ambient", "diffuse",
                                             "specular", "shininess", "exposure", "use_tex")}
        self._gl_pid = pid

    def _vao(self, obj_id: int) -> tuple:
        if obj_id in self._vaos:
            return self._vaos[obj_id]
        if obj_id not in self.meshes:
            raise RenderError(f"object {obj_id} has no mesh; this renderer holds {sorted(self.meshes)}")
        m = self.meshes[obj_id]
        n = len(m.vertices)
        normals = m.normals if m.normals is not None else vertex_normals(m.vertices, m.faces)
        colors = m.colors.astype(np.float32) / 255.0 if m.colors is not None else np.full((n, 3), 0.7, np.float32)
        textured = m.uv is not None and m.texture_path is not None
        uv = m.uv if m.uv is not None else np.zeros((n, 2), np.float32)
        data = np.hstack([m.vertices, normals, colors, uv]).astype(np.float32)
        # Faces in order of their first vertex keep llvmpipe's vertex cache warm: about 2x faster.
        faces = np.asarray(m.faces, dtype=np.int32)
        faces = faces[np.argsort(faces.min(axis=1), kind="stable")]
        vbo = self.ctx.buffer(data.tobytes())
        ibo = self.ctx.buffer(faces.tobytes())
        vao = self.ctx.vertex_array(
            self.prog, [(vbo, "3f 3f 3f 2f", "in_pos", "in_nrm", "in_col", "in_uv")], ibo, index_element_size=4
        )
        tex = None
        if textured:
            bgr = cv2.imread(str(m.texture_path), cv2.IMREAD_COLOR)
            if bgr is None:
                raise RenderError(f"cannot read texture {m.texture_path} of object {obj_id}")
            # PLY texture v runs bottom-up (OpenGL's convention); GL's first texture row is v = 0.
            img = np.ascontiguousarray(np.flipud(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)))
            tex = self.ctx.texture((img.shape[1], img.shape[0]), 3, img.tobytes())
            tex.build_mipmaps()
        self._vaos[obj_id] = (vao, vbo, ibo, tex)
        return self._vaos[obj_id]

    def render(
        self, obj_id: int, R: np.ndarray, t: np.ndarray, K: np.ndarray, width: int, height: int,
        lighting: Lighting | None = None,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Render one object: (H, W, 3) uint8 RGB (black background), (H, W) float32 depth m (NaN off), mask."""
        rgb, depth, mask = self.render_batch([obj_id], [R], [t], [K], width, height, [lighting])
        return rgb[0], depth[0], mask[0]

    def render_batch(
        self, obj_ids: Sequence[int], Rs: Sequence[np.ndarray], ts: Sequence[np.ndarray], Ks: Sequence[np.ndarray],
        width: int, height: int, lightings: Sequence[Lighting | None] | None = None,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Render N (object, pose, camera) views of one size in one pass: (N,H,W,3) RGB, (N,H,W) depth, mask."""
        n = len(obj_ids)
        if not (len(Rs) == len(ts) == len(Ks) == n):
            raise RenderError(f"render_batch needs equal lengths, got {n} ids, {len(Rs)} R, {len(ts)} t, {len(Ks)} K")
        lightings = [None] * n if lightings is None else list(lightings)
        if len(lightings) != n:
            raise RenderError(f"render_batch got {len(lightings)} lightings for {n} views")
        width, height = int(width), int(height)
        rgb = np.zeros((n, height, width, 3), np.uint8)
        depth = np.zeros((n, height, width), np.float32)
        if n == 0:
            return rgb, depth, depth > 0
        self._gl()
        per_pass = max(1, self.MAX_FBO_HEIGHT // height)
        for s in range(0, n, per_pass):
            e = min(n, s + per_pass)
            rgb[s:e], depth[s:e] = self._draw_tiles(
                obj_ids[s:e], Rs[s:e], ts[s:e], Ks[s:e], lightings[s:e], width, height
            )
        mask = depth > 0
        depth[~mask] = np.nan
        return rgb, depth, mask

    def _draw_tiles(self, obj_ids: Sequence[int], Rs: Sequence[np.ndarray], ts: Sequence[np.ndarray],
                    Ks: Sequence[np.ndarray], lightings: Sequence[Lighting | None], width: int, height: int,
                    ) -> tuple[np.ndarray, np.ndarray]:
        n = len(obj_ids)
        targets = self.pool.get(width, height * n)
        fbo = targets.fbo
        fbo.use()
        fbo.scissor = None
        fbo.clear(0.0, 0.0, 0.0, 0.0, depth=1.0)
        self.ctx.enable(self.ctx.DEPTH_TEST)
        if self.cull_back_faces:
            # The projection mirrors y (see gl.py), so outward (counter-clockwise) faces arrive clockwise.
            self.ctx.enable(self.ctx.CULL_FACE)
            self.ctx.front_face = "cw"
        else:
            self.ctx.disable(self.ctx.CULL_FACE)
        u = self._u
        default = Lighting()
        for i in range(n):
            R = np.asarray(Rs[i], dtype=np.float32).reshape(3, 3)
            t = np.asarray(ts[i], dtype=np.float32).reshape(3)
            if not (np.isfinite(R).all() and np.isfinite(t).all()):
                raise RenderError(f"view {i} has a non-finite pose")
            vao, _, _, tex = self._vao(int(obj_ids[i]))
            P = projection_from_K(Ks[i], width, height, self.near, self.far)
            lt = lightings[i] or default
            # Scissor too: the viewport alone lets a rasteriser's guard band spill into the next tile.
            fbo.viewport = (0, i * height, width, height)
            fbo.scissor = (0, i * height, width, height)
            # GLSL matrices are column-major: writing the transpose's bytes uploads the matrix itself.
            u["R"].write(np.ascontiguousarray(R.T).tobytes())
            u["t"].write(t.tobytes())
            u["P"].write(np.ascontiguousarray(P.T).tobytes())
            u["light_dir"].value = lt.light_dir
            u["light_col"].value = lt.light_color
            u["ambient"].value = lt.ambient
            u["diffuse"].value = lt.diffuse
            u["specular"].value = lt.specular
            u["shininess"].value = lt.shininess
            u["exposure"].value = lt.exposure
            u["use_tex"].value = tex is not None
            if tex is not None:
                tex.use(0)
            vao.render()
        fbo.scissor = None
        rgb, depth = self.pool.read(targets)
        return rgb.reshape(n, height, width, 3), depth.reshape(n, height, width)
