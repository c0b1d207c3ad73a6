"""Built-in assets for the main job: a procedural textured object and a "real-like" camera scene of it.

Nothing here is downloaded. The object is a 9 x 6 x 4 cm box with a different pattern on each
face (so every view tells its pose). The "real" scene is rendered too, but through a camera
domain that the synthetic stream never uses: a fixed cluttered table photo-like background,
a warm colour cast and gamma, vignetting, sensor noise, blur and JPEG compression. That gap
plays the role of the real/synthetic gap of LINEMOD, in a form that runs anywhere.

Both are written in the BOP layout, so every BOP tool of the project reads them unchanged.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from plyfile import PlyData, PlyElement
from tqdm import tqdm

OBJ_ID = 1
OBJ_NAME = "toybox"
SIZE_M = np.array([0.09, 0.06, 0.04])
CAMERA = {"fx": 572.4114, "fy": 573.57043, "cx": 325.2611, "cy": 242.04899, "width": 640, "height": 480}

# One pattern per face: (axis, sign) -> two colours and a pattern kind.
FACES = (
    ((0, +1), (220, 40, 40), (250, 220, 60), "stripes"),
    ((0, -1), (40, 90, 220), (240, 240, 240), "checker"),
    ((1, +1), (40, 170, 70), (20, 20, 20), "dots"),
    ((1, -1), (240, 140, 30), (60, 20, 120), "stripes_v"),
    ((2, +1), (230, 230, 230), (200, 30, 120), "cross"),
    ((2, -1), (90, 60, 40), (120, 200, 220), "checker_fine"),
)


def _pattern(kind: str, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Weight in [0, 1] of the second colour at face coordinates a, b in [0, 1]."""
    if kind == "stripes":
        return (np.floor(a * 6) % 2).astype(float)
    if kind == "stripes_v":
        return (np.floor(b * 5) % 2).astype(float)
    if kind == "checker":
        return ((np.floor(a * 4) + np.floor(b * 3)) % 2).astype(float)
    if kind == "checker_fine":
        return ((np.floor(a * 8) + np.floor(b * 6)) % 2).astype(float)
    if kind == "dots":
        return (((a * 4) % 1 - 0.5) ** 2 + ((b * 3) % 1 - 0.5) ** 2 < 0.09).astype(float)
    # cross: an off-centre cross, so this face is not symmetric either
    return ((np.abs(a - 0.35) < 0.08) | (np.abs(b - 0.6) < 0.08)).astype(float)


def toybox_mesh(n: int = 24) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(vertices metres (V, 3), faces (F, 3), normals (V, 3), colours (V, 3) uint8) of the procedural object."""
    half = SIZE_M / 2.0
    verts, faces, normals, colours = [], [], [], []
    g = np.linspace(0.0, 1.0, n + 1)
    aa, bb = np.meshgrid(g, g, indexing="ij")
    for (axis, sign), c0, c1, kind in FACES:
        u_ax, v_ax = [i for i in range(3) if i != axis]
        p = np.zeros((n + 1, n + 1, 3))
        p[..., axis] = sign * half[axis]
        p[..., u_ax] = (aa - 0.5) * SIZE_M[u_ax]
        p[..., v_ax] = (bb - 0.5) * SIZE_M[v_ax]
        w = _pattern(kind, aa, bb)[..., None]
        col = (1 - w) * np.array(c0) + w * np.array(c1)
        base = sum(len(v) for v in verts)
        idx = np.arange((n + 1) ** 2).reshape(n + 1, n + 1) + base
        quads = np.stack([idx[:-1, :-1], idx[1:, :-1], idx[1:, 1:], idx[:-1, 1:]], -1).reshape(-1, 4)
        tri = np.concatenate([quads[:, [0, 1, 2]], quads[:, [0, 2, 3]]])
        # Outward winding: flip where the parametrisation runs clockwise seen from outside.
        normal = np.zeros(3)
        normal[axis] = sign
        e1, e2 = p[1, 0] - p[0, 0], p[0, 1] - p[0, 0]
        if np.dot(np.cross(e1, e2), normal) < 0:
            tri = tri[:, ::-1]
        verts.append(p.reshape(-1, 3))
        faces.append(tri)
        normals.append(np.tile(normal, ((n + 1) ** 2, 1)))
        colours.append(col.reshape(-1, 3))
    return (np.concatenate(verts), np.concatenate(faces), np.concatenate(normals).astype(np.float32),
            np.clip(np.concatenate(colours), 0, 255).astype(np.uint8))


def write_ply_mm(path: Path, vertices_m: np.ndarray, faces: np.ndarray, normals: np.ndarray,
                 colours: np.ndarray) -> None:
    """Write a BOP-style PLY (millimetres, normals, vertex colours)."""
    v = np.empty(len(vertices_m), dtype=[("x", "f4"), ("y", "f4"), ("z", "f4"), ("nx", "f4"), ("ny", "f4"),
                                         ("nz", "f4"), ("red", "u1"), ("green", "u1"), ("blue", "u1")])
    v["x"], v["y"], v["z"] = (vertices_m * 1000.0).T
    v["nx"], v["ny"], v["nz"] = normals.T
    v["red"], v["green"], v["blue"] = colours.T
    f = np.empty(len(faces), dtype=[("vertex_indices", "i4", (3,))])
    f["vertex_indices"] = faces
    PlyData([PlyElement.describe(v, "vertex"), PlyElement.describe(f, "face")], text=False).write(str(path))


def write_object_models(root: Path) -> Path:
    """Write models/ and models_eval/ (PLY + models_info.json, millimetres) of the procedural object."""
    verts, faces, normals, colours = toybox_mesh()
    info = {str(OBJ_ID): {"diameter": float(np.linalg.norm(SIZE_M) * 1000.0),
                          **{f"min_{a}": float(-SIZE_M[i] / 2 * 1000.0) for i, a in enumerate("xyz")},
                          **{f"size_{a}": float(SIZE_M[i] * 1000.0) for i, a in enumerate("xyz")}}}
    for sub in ("models", "models_eval"):
        (root / sub).mkdir(parents=True, exist_ok=True)
        write_ply_mm(root / sub / f"obj_{OBJ_ID:06d}.ply", verts, faces, normals, colours)
        (root / sub / "models_info.json").write_text(json.dumps(info, indent=1))
    (root / "camera.json").write_text(json.dumps({**CAMERA, "depth_scale": 1.0}, indent=1))
    return root


@dataclass(frozen=True)
class RealDomain:
    """The "real camera" look of the built-in scene (never used by the synthetic stream)."""

    gamma: float = 0.8
    colour_gain: tuple[float, float, float] = (1.12, 1.0, 0.82)  # warm white balance
    vignetting: float = 0.35
    noise_std: float = 6.0  # 0-255 units
    blur_sigma_px: float = 0.9
    jpeg_quality: int = 70


def table_background(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """A fixed photo-like table scene: wood-like grain, a few soft objects and shading (HxWx3 uint8)."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    grain = 0.5 + 0.5 * np.sin(xx * 0.05 + 3 * np.sin(yy * 0.01) + rng.uniform(0, 6))
    base = np.stack([150 + 50 * grain, 110 + 35 * grain, 70 + 20 * grain], -1)
    img = base.astype(np.uint8)
    for _ in range(12):
        c = (int(rng.integers(0, width)), int(rng.integers(0, height)))
        ax = (int(rng.integers(15, 90)), int(rng.integers(10, 60)))
        cv2.ellipse(img, c, ax, float(rng.uniform(0, 180)), 0, 360, rng.integers(30, 230, 3).tolist(), -1)
    shade = 0.75 + 0.25 * (1 - yy / height)
    return np.clip(cv2.GaussianBlur(img, (0, 0), 2.0) * shade[..., None], 0, 255).astype(np.uint8)


def apply_real_domain(rgb: np.ndarray, rng: np.random.Generator, d: RealDomain = RealDomain()) -> np.ndarray:
    """Colour cast, gamma, vignetting, blur, noise and JPEG: the built-in "real camera"."""
    h, w = rgb.shape[:2]
    x = (rgb.astype(np.float32) / 255.0) ** d.gamma * np.array(d.colour_gain, np.float32)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    r2 = ((xx - w / 2) / (w / 2)) ** 2 + ((yy - h / 2) / (h / 2)) ** 2
    x *= (1.0 - d.vignetting * r2 / 2.0)[..., None]
    x = cv2.GaussianBlur(x, (0, 0), d.blur_sigma_px)
    x = np.clip(x * 255.0 + rng.normal(0, d.noise_std, x.shape), 0, 255).astype(np.uint8)
    ok, buf = cv2.imencode(".jpg", x[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, d.jpeg_quality])
    return cv2.imdecode(buf, cv2.IMREAD_COLOR)[..., ::-1].copy()


def write_real_scene(root: Path, n_frames: int, scene_id: int = 1, seed: int = 0,
                     distance_m: tuple[float, float] = (0.3, 0.7), domain: RealDomain = RealDomain()) -> list[int]:
    """Render n "real" frames of the object over the table in the real domain, with BOP ground truth."""
    from featmap_ros.datasets.bop import load_models_info, load_ply
    from featmap_ros.datasets.streams import ObjectStreamConfig, sample_pose
    from featmap_ros.geometry import Intrinsics
    from featmap_ros.render.objects import Lighting, ObjectRenderer

    rng = np.random.default_rng(seed)
    intr = Intrinsics(CAMERA["fx"], CAMERA["fy"], CAMERA["cx"], CAMERA["cy"], CAMERA["width"], CAMERA["height"])
    infos = load_models_info(root / "models" / "models_info.json")
    renderer = ObjectRenderer({OBJ_ID: load_ply(root / "models" / f"obj_{OBJ_ID:06d}.ply")})
    cfg = ObjectStreamConfig(obj_ids=(OBJ_ID,), distance_m=distance_m, camera_K=tuple(map(tuple, intr.K)))
    scene = root / "test" / f"{scene_id:06d}"
    (scene / "rgb").mkdir(parents=True, exist_ok=True)
    background = table_background(rng, intr.width, intr.height)
    gt, cam, info = {}, {}, {}
    for im_id in tqdm(range(n_frames), desc="real scene", unit="frame"):
        R, t = sample_pose(rng, cfg, infos[OBJ_ID])
        light = Lighting.sample(rng)
        rgb, _, mask = renderer.render(OBJ_ID, R, t, intr.K, intr.width, intr.height, light)
        img = np.where(mask[..., None], rgb, background)
        cv2.imwrite(str(scene / "rgb" / f"{im_id:06d}.png"), cv2.cvtColor(apply_real_domain(img, rng, domain),
                                                                           cv2.COLOR_RGB2BGR))
        v, u = np.nonzero(mask)
        box = [-1] * 4
        if len(u):
            box = [int(u.min()), int(v.min()), int(u.max() - u.min() + 1), int(v.max() - v.min() + 1)]
        gt[str(im_id)] = [{"cam_R_m2c": R.ravel().tolist(), "cam_t_m2c": (t * 1000.0).tolist(), "obj_id": OBJ_ID}]
        cam[str(im_id)] = {"cam_K": intr.K.ravel().tolist(), "depth_scale": 1.0}
        info[str(im_id)] = [{"bbox_obj": box, "bbox_visib": box, "px_count_all": int(mask.sum()),
                             "px_count_visib": int(mask.sum()), "visib_fract": 1.0 if len(u) else 0.0}]
    for name, data in (("scene_gt.json", gt), ("scene_camera.json", cam), ("scene_gt_info.json", info)):
        (scene / name).write_text(json.dumps(data))
    return list(range(n_frames))
