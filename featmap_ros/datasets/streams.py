"""Object data streams: infinite synthetic crops with BB8 corner targets, and real/synthetic pairs.

Targets are the 8 corners of the object's 3D box (ObjectInfo.corners) projected into the crop and
normalised with geometry.normalise_uv, flattened to (16,) as (u0, v0, u1, v1, ...). For symmetric
objects the pose is first canonicalised so that equal-looking views get equal targets.
Images enter networks only through rgb_to_input.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
import transforms3d.axangles as ta
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from featmap_ros.datasets.bop import BopScene, Mesh, ObjectInfo, load_models_info, load_ply, model_path, read_rgb
from featmap_ros.errors import FeatmapError
from featmap_ros.geometry import (
    BOX_EDGES,
    CropWindow,
    denormalise_uv,
    matrix_from_quat,
    normalise_uv,
    project_model,
)
from featmap_ros.preprocess import rgb_to_input  # noqa: F401  (re-exported: the one normalisation)
from featmap_ros.render.objects import Lighting, ObjectRenderer

LMO_OBJ_IDS = (1, 5, 6, 8, 9, 10, 11, 12)
LMO_K = ((572.4114, 0.0, 325.2611), (0.0, 573.57043, 242.04899), (0.0, 0.0, 1.0))
BACKGROUND_MODES = ("colour", "noise", "texture", "photo")


class StreamError(FeatmapError, ValueError):
    """A stream or pair dataset was configured with values it cannot use."""


@dataclass(frozen=True)
class ObjectStreamConfig:
    """Synthetic object crops: pose range (LM-O), detector-like window jitter, clutter, rendering."""

    obj_ids: tuple[int, ...] = LMO_OBJ_IDS
    crop: int = 128
    camera_K: tuple[tuple[float, float, float], ...] = LMO_K
    image_size: tuple[int, int] = (640, 480)  # width, height of the virtual camera the window lives in
    distance_m: tuple[float, float] = (0.346, 1.5)
    azimuth_deg: tuple[float, float] = (0.0, 360.0)
    elevation_deg: tuple[float, float] = (-14.0, 89.0)
    inplane_deg: tuple[float, float] = (-180.0, 180.0)
    # Viewpoints to sample around instead of the ranges above: (obj_id, R_m2c row-major 9, t_m2c metres 3)
    # of annotated training instances; each draw takes one at random and turns it by up to anchor_spread_deg.
    pose_anchors: tuple[tuple[float, ...], ...] = ()
    anchor_spread_deg: float = 25.0
    # Each anchored draw also turns the object about its model z axis (up for objects standing on a
    # table, as the BOP models are) by up to +- half this range: 360 keeps the anchors' elevation
    # and camera roll but shows the object from every side, which a few training views cannot.
    anchor_azimuth_deg: float = 0.0
    window_margin: float = 1.2  # window side = margin * max(w, h) of the object's projected box
    window_shift: float = 0.08  # max centre shift, fraction of the window side (about 10 px of 128)
    window_scale: tuple[float, float] = (0.8, 1.2)
    occluder_prob: float = 0.5
    occluder_shape_prob: float = 0.5  # share of occluders that are random 2D shapes, not other models
    min_visible: float = 0.4  # an occluder hiding more than 1 - this of the object is dropped
    backgrounds: tuple[str, ...] = BACKGROUND_MODES
    photo_dir: str | None = None  # real photos for the "photo" background mode (ignored when None)
    photo_paths: tuple[str, ...] = ()  # or an explicit list of photos (e.g. only a dataset's training frames)
    photo_prob: float | None = None  # chance of a photo background when photos are given; None: one mode of many
    random_lighting: bool = True
    noise_std: float = 0.0  # Gaussian pixel noise, 0-255 units
    blur_prob: float = 0.0  # chance of a Gaussian blur (sigma 0.5-1.2 px)
    max_faces: int | None = 12000  # mesh simplification for small crops (keeps >= 600 crops/s on 1 core)
    canonical_symmetry: bool = True
    chunk: int = 16  # crops rendered per GL pass
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 <= self.anchor_azimuth_deg <= 360.0:
            raise StreamError(f"anchor_azimuth_deg is {self.anchor_azimuth_deg}; expected degrees in [0, 360]")


@dataclass(frozen=True)
class PairConfig:
    """Real crops around annotated instances with a render at the ground-truth pose (paper Fig. 3)."""

    crop: int = 128
    window_margin: float = 1.2
    jitter: bool = False  # training: shift and scale the window like ObjectStreamConfig
    window_shift: float = 0.08
    window_scale: tuple[float, float] = (0.8, 1.2)
    min_visib: float = 0.1
    composite: bool = False  # render over the real crop instead of a plain background
    background_rgb: tuple[int, int, int] = (0, 0, 0)
    canonical_symmetry: bool = True
    cache_images: int = 128
    seed: int = 0


# --------------------------------------------------------------------------------------------
# Targets and input normalisation


def exact_symmetry(S: np.ndarray) -> np.ndarray:
    """Snap a 4x4 model-frame symmetry to an exact rotation by 2*pi/n (n <= 12) about a fixed line.

    models_info gives symmetries to 6 digits (eggbox's is 0.2 degrees short of a half turn), so
    applying one twice would not return the pose; snapped, the symmetric twins form a true group.
    """
    axis, angle = ta.mat2axangle(S[:3, :3])
    n = max(1, min(12, round(2 * math.pi / max(abs(angle), 1e-9))))
    R = ta.axangle2mat(axis, math.copysign(2 * math.pi / n, angle))
    # A rotation about the line through p moves x to R x + p - R p: fit p to the given translation.
    p = np.linalg.lstsq(np.eye(3) - R, S[:3, 3], rcond=None)[0]
    T = np.eye(4)
    T[:3, :3], T[:3, 3] = R, p - R @ p
    return T


def canonicalise_pose(
    R: np.ndarray, t: np.ndarray, info: ObjectInfo, R_ref: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Pick, among a pose and its symmetric equivalents, the one whose rotation is nearest R_ref (camera frame).

    A symmetry S (4x4, model frame) makes (R S_R, R S_t + t) look like (R, t), so the choice is a
    function of appearance. What a crop shows is the rotation relative to the line of sight, so
    R_ref defaults to the rotation taking the optical axis onto the ray through the object's box
    centre: equal-looking crops anywhere in the image get the same twin. Asymmetric objects pass through.
    """
    R = np.asarray(R, dtype=np.float64).reshape(3, 3)
    t = np.asarray(t, dtype=np.float64).reshape(3)
    if not info.symmetric:
        return R, t
    if R_ref is None:
        ray = R @ (info.min_xyz + info.size_xyz / 2.0) + t
        ref = _ray_rotation(ray / np.linalg.norm(ray)) if np.linalg.norm(ray) > 0 else np.eye(3)
    else:
        ref = np.asarray(R_ref, dtype=np.float64)
    best, best_score = (R, t), np.trace(ref.T @ R)
    for S in map(exact_symmetry, info.symmetries):
        Rs = R @ S[:3, :3]
        score = np.trace(ref.T @ Rs)  # larger trace = smaller angle to ref
        if score > best_score + 1e-9:
            best, best_score = (Rs, R @ S[:3, 3] + t), score
    return best


def corner_targets(info: ObjectInfo, R: np.ndarray, t: np.ndarray, K_crop: np.ndarray, crop: int) -> np.ndarray:
    """Project the box corners with the crop camera and normalise: (16,) float32 (u0, v0, ..., u7, v7)."""
    uv = project_model(info.corners, R, t, K_crop)
    return normalise_uv(uv, crop).reshape(16).astype(np.float32)


def targets_to_uv(target: np.ndarray, crop: int) -> np.ndarray:
    """Inverse of the normalisation: (16,) targets -> (8, 2) crop pixels."""
    return denormalise_uv(np.asarray(target, dtype=np.float64).reshape(8, 2), crop)


# --------------------------------------------------------------------------------------------
# Poses, windows, backgrounds, occluders


def look_at_rotation(azimuth: float, elevation: float, inplane: float) -> np.ndarray:
    """Model-to-camera rotation of a camera on the view sphere (radians; model z up) looking at the origin."""
    c = np.array([math.cos(elevation) * math.cos(azimuth), math.cos(elevation) * math.sin(azimuth),
                  math.sin(elevation)])
    z = -c
    x = np.cross(z, [0.0, 0.0, 1.0])
    x /= max(np.linalg.norm(x), 1e-12)
    y = np.cross(z, x)
    return ta.axangle2mat([0.0, 0.0, 1.0], inplane) @ np.stack([x, y, z])


def _ray_rotation(ray: np.ndarray) -> np.ndarray:
    """The rotation taking the optical axis onto a unit ray (camera frame)."""
    axis = np.cross([0.0, 0.0, 1.0], ray)
    angle = math.asin(min(1.0, float(np.linalg.norm(axis))))
    return ta.axangle2mat(axis, angle) if angle > 1e-9 else np.eye(3)


def anchors_by_object(
    anchors: Sequence[Sequence[float]], centres: Mapping[int, np.ndarray] | None = None
) -> dict[int, list[np.ndarray]]:
    """ObjectStreamConfig.pose_anchors -> per object the anchors' viewpoints (R relative to their line of sight).

    centres: each object's box centre in its model frame (metres); the line of sight runs through
    it, as sample_pose puts it on the drawn ray. Without it, through the model origin.
    """
    out: dict[int, list[np.ndarray]] = {}
    for a in anchors:
        if len(a) != 13:
            raise StreamError(f"a pose anchor is (obj_id, R row-major 9, t 3): 13 numbers, got {len(a)}")
        obj_id = int(a[0])
        R, t = np.asarray(a[1:10], dtype=np.float64).reshape(3, 3), np.asarray(a[10:13], dtype=np.float64)
        sight = R @ np.asarray(centres[obj_id] if centres and obj_id in centres else np.zeros(3)) + t
        out.setdefault(obj_id, []).append(_ray_rotation(sight / np.linalg.norm(sight)).T @ R)
    return out


def sample_pose(rng: np.random.Generator, cfg: ObjectStreamConfig, info: ObjectInfo,
                anchors: Sequence[np.ndarray] = ()) -> tuple[np.ndarray, np.ndarray]:
    """Draw a model-to-camera pose in the configured range, with the box centre on a random image ray.

    anchors: viewpoints (rotations relative to the line of sight) to draw around instead of the
    azimuth/elevation/in-plane ranges: a random one, turned about the model's z axis by up to
    +- cfg.anchor_azimuth_deg / 2, then about a random axis by up to cfg.anchor_spread_deg.
    """
    if len(anchors):
        axis = rng.normal(size=3)
        turn = ta.axangle2mat(axis / np.linalg.norm(axis), math.radians(rng.uniform(0.0, cfg.anchor_spread_deg)))
        R_view = turn @ anchors[int(rng.integers(len(anchors)))]
        if cfg.anchor_azimuth_deg > 0:
            half = cfg.anchor_azimuth_deg / 2.0
            R_view = R_view @ ta.axangle2mat([0.0, 0.0, 1.0], math.radians(rng.uniform(-half, half)))
    else:
        az, el, ip = (math.radians(rng.uniform(*r)) for r in (cfg.azimuth_deg, cfg.elevation_deg, cfg.inplane_deg))
        R_view = look_at_rotation(az, el, ip)
    w, h = cfg.image_size
    uv = np.array([rng.uniform(0.3 * w, 0.7 * w), rng.uniform(0.3 * h, 0.7 * h), 1.0])
    ray = np.linalg.solve(np.asarray(cfg.camera_K), uv)
    ray /= np.linalg.norm(ray)
    # Rotate the optical axis onto the ray so the viewpoint relative to the line of sight is kept.
    R = _ray_rotation(ray) @ R_view
    centre = info.min_xyz + info.size_xyz / 2.0
    t = rng.uniform(*cfg.distance_m) * ray - R @ centre
    return R, t


def extreme_vertices(mesh: Mesh, n_dirs: int = 256) -> np.ndarray:
    """Vertices extreme along n_dirs directions: an (M, 3) stand-in for the hull, for fast 2D boxes."""
    i = np.arange(n_dirs) + 0.5
    phi, theta = np.arccos(1 - 2 * i / n_dirs), math.pi * (1 + 5**0.5) * i
    dirs = np.stack([np.cos(theta) * np.sin(phi), np.sin(theta) * np.sin(phi), np.cos(phi)], axis=1)
    v = np.asarray(mesh.vertices, dtype=np.float64)
    return v[np.unique(np.argmax(v @ dirs.T, axis=0))]


def jittered_window(
    box_xywh: np.ndarray, out: int, margin: float, rng: np.random.Generator | None, shift: float,
    scale: tuple[float, float],
) -> CropWindow:
    """Square window on a 2D box; with an rng, shifted and scaled like a noisy detector."""
    win = CropWindow.around_box(box_xywh, out, margin)
    if rng is None:
        return win
    side = win.size_px * rng.uniform(*scale)
    du, dv = rng.uniform(-shift, shift, size=2) * win.size_px
    return CropWindow(win.cu + du, win.cv + dv, side, out)


def _two_colour(rng: np.random.Generator, weight: np.ndarray) -> np.ndarray:
    a, b = rng.uniform(0, 255, size=(2, 3))
    return (a + (b - a) * weight[..., None]).astype(np.float32)


def random_texture(rng: np.random.Generator, size: int) -> np.ndarray:
    """A random (size, size, 3) uint8 texture: smoothed noise, stripes or blobs."""
    kind = rng.integers(3)
    if kind == 0:
        w = cv2.GaussianBlur(rng.random((size, size), dtype=np.float32), (0, 0), rng.uniform(1.0, size / 8))
        w = (w - w.min()) / max(float(np.ptp(w)), 1e-6)
        return np.clip(_two_colour(rng, w), 0, 255).astype(np.uint8)
    if kind == 1:
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
        a = rng.uniform(0, math.pi)
        w = 0.5 + 0.5 * np.sin((xx * math.cos(a) + yy * math.sin(a)) * rng.uniform(0.1, 1.0) + rng.uniform(0, 6.3))
        return np.clip(_two_colour(rng, w), 0, 255).astype(np.uint8)
    img = np.empty((size, size, 3), np.uint8)
    img[:] = rng.integers(0, 256, size=3, dtype=np.uint8)
    for _ in range(int(rng.integers(3, 15))):
        centre = tuple(int(c) for c in rng.integers(0, size, size=2))
        axes = tuple(int(a) for a in rng.integers(2, max(3, size // 3), size=2))
        cv2.ellipse(img, centre, axes, float(rng.uniform(0, 180)), 0, 360, rng.integers(0, 256, 3).tolist(), -1)
    return img


class PhotoBackgrounds:
    """Random square crops of photos (a folder searched recursively for jpg/png, or a list); decodes are cached."""

    def __init__(self, folder: str | Path | None = None, cache: int = 64, paths: Sequence[str | Path] = ()) -> None:
        found = [] if folder is None else [p for p in Path(folder).rglob("*")
                                           if p.suffix.lower() in (".jpg", ".jpeg", ".png")]
        self.paths = sorted(found) + [Path(p) for p in paths]
        if not self.paths:
            raise StreamError(f"no .jpg/.png photos under {folder} or in the {len(paths)} paths given "
                              "for the 'photo' background mode")
        absent = [str(p) for p in self.paths if not p.is_file()]
        if absent:
            raise StreamError(f"{len(absent)} background photos do not exist, e.g. {absent[0]}")
        self.cache = cache
        self._images: OrderedDict[int, np.ndarray] = OrderedDict()

    def sample(self, rng: np.random.Generator, size: int) -> np.ndarray:
        """Return a random (size, size, 3) uint8 crop of a random photo."""
        i = int(rng.integers(len(self.paths)))
        if i not in self._images:
            self._images[i] = read_rgb(self.paths[i])
            if len(self._images) > self.cache:
                self._images.popitem(last=False)
        return random_square_crop(rng, self._images[i], size)


def random_square_crop(rng: np.random.Generator, img: np.ndarray, size: int) -> np.ndarray:
    """A random square of 20-100% of the image's short side, resized to (size, size)."""
    h, w = img.shape[:2]
    side = int(rng.uniform(0.2, 1.0) * min(h, w))
    y, x = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
    return cv2.resize(img[y:y + side, x:x + side], (size, size), interpolation=cv2.INTER_AREA)


def random_background(
    rng: np.random.Generator, modes: Sequence[str], size: int, photos: PhotoBackgrounds | None = None,
    photo_prob: float | None = None,
) -> np.ndarray:
    """A (size, size, 3) uint8 background in one of the modes: colour, noise, texture, photo.

    photo_prob: with photos, the chance of a photo (the other modes share the rest); None draws
    every usable mode with equal chance.
    """
    usable = [m for m in modes if m != "photo" or photos is not None]
    others = [m for m in usable if m != "photo"]
    if photo_prob is not None and photos is not None and "photo" in usable:
        mode = "photo" if rng.random() < photo_prob or not others else others[int(rng.integers(len(others)))]
    else:
        mode = usable[int(rng.integers(len(usable)))]
    if mode == "colour":
        return np.broadcast_to(rng.integers(0, 256, size=3, dtype=np.uint8), (size, size, 3)).copy()
    if mode == "noise":
        cells = int(rng.integers(2, size + 1))
        small = rng.integers(0, 256, size=(cells, cells, 3), dtype=np.uint8)
        return cv2.resize(small, (size, size), interpolation=cv2.INTER_NEAREST)
    if mode == "texture":
        return random_texture(rng, size)
    return photos.sample(rng, size)


def random_shape_mask(rng: np.random.Generator, size: int) -> np.ndarray:
    """A (size, size) bool mask of a random polygon or ellipse reaching in from somewhere in the crop."""
    mask = np.zeros((size, size), np.uint8)
    centre = rng.uniform(0, size, size=2)
    if rng.random() < 0.5:
        r = rng.uniform(0.1, 0.35) * size
        ang = np.sort(rng.uniform(0, 2 * math.pi, size=int(rng.integers(3, 8))))
        pts = centre + np.stack([np.cos(ang), np.sin(ang)], 1) * r * rng.uniform(0.5, 1.0, size=(len(ang), 1))
        cv2.fillPoly(mask, [np.round(pts).astype(np.int32)], 1)
    else:
        axes = tuple(int(a) for a in rng.uniform(0.05, 0.3, size=2) * size)
        cv2.ellipse(mask, tuple(int(c) for c in centre), axes, float(rng.uniform(0, 180)), 0, 360, 1, -1)
    return mask.astype(bool)


def random_rotation(rng: np.random.Generator) -> np.ndarray:
    """A uniformly random rotation matrix (a normalised Gaussian quaternion is uniform on SO(3))."""
    return matrix_from_quat(rng.normal(size=4))


# --------------------------------------------------------------------------------------------
# Synthetic stream


def _to_tensors(sample: dict) -> dict:
    out = {
        "image": torch.from_numpy(rgb_to_input(sample["rgb"])),
        "target": torch.from_numpy(sample["target"]),
        "obj_index": torch.tensor(sample["obj_index"], dtype=torch.int64),
        "R": torch.from_numpy(sample["R"].astype(np.float32)),
        "t": torch.from_numpy(sample["t"].astype(np.float32)),
        "K_crop": torch.from_numpy(sample["K_crop"].astype(np.float32)),
    }
    return out


class SyntheticObjectStream(IterableDataset):
    """Infinite synthetic object crops; each DataLoader worker draws its own reproducible sequence.

    Yields dicts: image (3, S, S) float32 in [-1, 1], target (16,) float32, obj_index int64 (into
    cfg.obj_ids), R (3, 3), t (3,) metres (canonical for symmetric objects), K_crop (3, 3).
    """

    def __init__(
        self, infos: Mapping[int, ObjectInfo], meshes: Mapping[int, Mesh], cfg: ObjectStreamConfig | None = None,
        *, rank: int = 0,
    ) -> None:
        super().__init__()
        self.cfg = cfg or ObjectStreamConfig()
        missing = [i for i in self.cfg.obj_ids if i not in infos or i not in meshes]
        if missing:
            raise StreamError(f"objects {missing} have no models_info entry or mesh")
        bad = set(self.cfg.backgrounds) - set(BACKGROUND_MODES)
        if bad or not self.cfg.backgrounds:
            raise StreamError(f"background modes {sorted(bad)} unknown; expected some of {BACKGROUND_MODES}")
        self.infos = {i: infos[i] for i in self.cfg.obj_ids}
        self.renderer = ObjectRenderer({i: meshes[i] for i in self.cfg.obj_ids}, max_faces=self.cfg.max_faces)
        self.hull = {i: extreme_vertices(meshes[i]) for i in self.cfg.obj_ids}
        self.anchors = anchors_by_object(self.cfg.pose_anchors,
                                         {i: info.min_xyz + info.size_xyz / 2.0 for i, info in self.infos.items()})
        has_photos = self.cfg.photo_dir or self.cfg.photo_paths
        self.photos = PhotoBackgrounds(self.cfg.photo_dir, paths=self.cfg.photo_paths) if has_photos else None
        if self.cfg.photo_prob is not None and not 0.0 <= self.cfg.photo_prob <= 1.0:
            raise StreamError(f"photo_prob is {self.cfg.photo_prob}; expected a probability in [0, 1]")
        self.rank = int(rank)

    @classmethod
    def from_bop(
        cls, root: str | Path, cfg: ObjectStreamConfig | None = None, *, rank: int = 0
    ) -> SyntheticObjectStream:
        """Load the models and models_info of a BOP dataset root."""
        cfg = cfg or ObjectStreamConfig()
        infos = load_models_info(Path(root) / "models" / "models_info.json")
        meshes = {i: load_ply(model_path(root, i)) for i in cfg.obj_ids}
        return cls(infos, meshes, cfg, rank=rank)

    def rng_for_worker(self) -> np.random.Generator:
        """The generator of this process: seeded by (cfg.seed, rank, DataLoader worker id)."""
        info = get_worker_info()
        worker = 0 if info is None else info.id
        return np.random.default_rng(np.random.SeedSequence([self.cfg.seed, self.rank, worker]))

    def __iter__(self) -> Iterator[dict]:
        rng = self.rng_for_worker()
        while True:
            for sample in self.sample_chunk(rng, self.cfg.chunk):
                yield _to_tensors(sample)

    def sample_chunk(self, rng: np.random.Generator, n: int) -> list[dict]:
        """Draw n samples as numpy dicts (rgb uint8 crop, target, obj_index, obj_id, R, t, K_crop, window, mask)."""
        cfg, S = self.cfg, self.cfg.crop
        K = np.asarray(cfg.camera_K, dtype=np.float64)
        plans, ids, Rs, ts, Ks, lights = [], [], [], [], [], []
        for _ in range(n):
            k = int(rng.integers(len(cfg.obj_ids)))
            obj_id = cfg.obj_ids[k]
            R, t = sample_pose(rng, cfg, self.infos[obj_id], self.anchors.get(obj_id, ()))
            uv = project_model(self.hull[obj_id], R, t, K)
            lo, hi = uv.min(0), uv.max(0)
            win = jittered_window(np.r_[lo, hi - lo], S, cfg.window_margin, rng, cfg.window_shift, cfg.window_scale)
            Kc = win.intrinsics(K)
            light = Lighting.sample(rng) if cfg.random_lighting else Lighting()
            plan = {"k": k, "obj_id": obj_id, "R": R, "t": t, "win": win, "K_crop": Kc, "occ": None}
            views = [(obj_id, R, t, Kc, light)]
            if rng.random() < cfg.occluder_prob:
                if rng.random() < cfg.occluder_shape_prob:
                    plan["occ"] = ("shape", random_shape_mask(rng, S))
                else:
                    occ_id = cfg.obj_ids[int(rng.integers(len(cfg.obj_ids)))]
                    # In front of the object, through a random point of the window.
                    p = np.r_[rng.uniform(0.0, S, size=2), 1.0]
                    ray = np.linalg.solve(Kc, p)
                    z = float(t[2]) * rng.uniform(0.55, 0.9)
                    R_o = random_rotation(rng)
                    info_o = self.infos[occ_id]
                    t_o = ray / ray[2] * z - R_o @ (info_o.min_xyz + info_o.size_xyz / 2.0)
                    plan["occ"] = ("model", len(ids) + 1)
                    views.append((occ_id, R_o, t_o, Kc, Lighting.sample(rng) if cfg.random_lighting else Lighting()))
            plans.append(plan)
            for obj, R_v, t_v, K_v, light_v in views:
                ids.append(obj)
                Rs.append(R_v)
                ts.append(t_v)
                Ks.append(K_v)
                lights.append(light_v)
        rgb, depth, mask = self.renderer.render_batch(ids, Rs, ts, Ks, S, S, lights)
        out, j = [], 0
        for plan in plans:
            img = random_background(rng, cfg.backgrounds, S, self.photos, cfg.photo_prob)
            m = mask[j]
            img[m] = rgb[j][m]
            occ = plan["occ"]
            if occ is not None:
                if occ[0] == "shape":
                    hide = occ[1]
                    fill = random_texture(rng, S) if rng.random() < 0.5 else rng.integers(0, 256, 3, dtype=np.uint8)
                    patch = np.broadcast_to(fill, (S, S, 3))
                else:
                    i_o = occ[1]
                    hide = mask[i_o] & (~m | (np.nan_to_num(depth[i_o], nan=np.inf) < np.nan_to_num(depth[j], nan=0)))
                    patch = rgb[i_o]
                visible = (m & ~hide).sum() / max(int(m.sum()), 1)
                if visible >= cfg.min_visible:
                    img[hide] = patch[hide]
                    m = m & ~hide
            j += 2 if occ is not None and occ[0] == "model" else 1
            if cfg.blur_prob > 0 and rng.random() < cfg.blur_prob:
                img = cv2.GaussianBlur(img, (0, 0), rng.uniform(0.5, 1.2))
            if cfg.noise_std > 0:
                img = np.clip(img + rng.normal(0, cfg.noise_std, img.shape), 0, 255).astype(np.uint8)
            info = self.infos[plan["obj_id"]]
            R, t = plan["R"], plan["t"]
            if cfg.canonical_symmetry:
                R, t = canonicalise_pose(R, t, info)
            out.append({
                "rgb": img, "target": corner_targets(info, R, t, plan["K_crop"], S), "obj_index": plan["k"],
                "obj_id": plan["obj_id"], "R": R, "t": t, "K_crop": plan["K_crop"], "window": plan["win"],
                "mask": m,
            })
        return out


# --------------------------------------------------------------------------------------------
# Real / synthetic pairs


class RealSyntheticPairs(Dataset):
    """Annotated real crops with renders at the same pose in the same window (map-style).

    Items: real, syn (3, S, S) float32 in [-1, 1], syn_mask (S, S) bool, target (16,), obj_index
    (into obj_ids), R, t (canonical for symmetric objects), K_crop, im_id.
    """

    def __init__(
        self, scene: BopScene, infos: Mapping[int, ObjectInfo], renderer: ObjectRenderer,
        im_ids: Sequence[int] | None = None, obj_ids: Sequence[int] = LMO_OBJ_IDS, cfg: PairConfig | None = None,
    ) -> None:
        self.scene, self.infos, self.renderer = scene, infos, renderer
        self.obj_ids = tuple(int(i) for i in obj_ids)
        self.cfg = cfg or PairConfig()
        self.items: list[tuple[int, int]] = []
        for im_id in scene.image_ids if im_ids is None else im_ids:
            for n, inst in enumerate(scene.frame(im_id).instances):
                if inst.obj_id in self.obj_ids and inst.visib_fract >= self.cfg.min_visib and inst.bbox_obj[2] > 0:
                    self.items.append((int(im_id), n))
        self._images: OrderedDict[int, np.ndarray] = OrderedDict()
        self._rng: tuple[int, np.random.Generator] | None = None

    @classmethod
    def from_bop(
        cls, root: str | Path, scene_id: int, im_ids: Sequence[int] | None = None,
        obj_ids: Sequence[int] = LMO_OBJ_IDS, cfg: PairConfig | None = None, max_faces: int | None = None,
    ) -> RealSyntheticPairs:
        """Open a BOP scene and load the models it needs."""
        infos = load_models_info(Path(root) / "models" / "models_info.json")
        renderer = ObjectRenderer.from_bop(root, obj_ids, max_faces=max_faces)
        return cls(BopScene(root, scene_id), infos, renderer, im_ids, obj_ids, cfg)

    def __len__(self) -> int:
        return len(self.items)

    def image(self, im_id: int) -> np.ndarray:
        """The real RGB image of im_id, from a small per-process cache."""
        if im_id in self._images:
            self._images.move_to_end(im_id)
            return self._images[im_id]
        img = read_rgb(self.scene.frame(im_id).rgb_path)
        self._images[im_id] = img
        if len(self._images) > self.cfg.cache_images:
            self._images.popitem(last=False)
        return img

    def _jitter_rng(self) -> np.random.Generator:
        info = get_worker_info()
        worker = 0 if info is None else info.id
        if self._rng is None or self._rng[0] != worker:
            self._rng = (worker, np.random.default_rng(np.random.SeedSequence([self.cfg.seed, worker])))
        return self._rng[1]

    def sample(self, index: int) -> dict:
        """Item `index` as numpy: real and syn uint8 crops, syn_mask, target, pose, window, ids."""
        cfg, S = self.cfg, self.cfg.crop
        im_id, n = self.items[index]
        frame = self.scene.frame(im_id)
        inst = frame.instances[n]
        rng = self._jitter_rng() if cfg.jitter else None
        win = jittered_window(inst.bbox_obj, S, cfg.window_margin, rng, cfg.window_shift, cfg.window_scale)
        K_crop = win.intrinsics(frame.intrinsics.K)
        real = win.crop(self.image(im_id))
        rgb, _, mask = self.renderer.render(inst.obj_id, inst.R, inst.t, K_crop, S, S)
        syn = real.copy() if cfg.composite else np.broadcast_to(np.uint8(cfg.background_rgb), (S, S, 3)).copy()
        syn[mask] = rgb[mask]
        info = self.infos[inst.obj_id]
        R, t = canonicalise_pose(inst.R, inst.t, info) if cfg.canonical_symmetry else (inst.R, inst.t)
        return {
            "real": real, "syn": syn, "syn_mask": mask, "target": corner_targets(info, R, t, K_crop, S),
            "obj_index": self.obj_ids.index(inst.obj_id), "obj_id": inst.obj_id, "R": R, "t": t,
            "K_crop": K_crop, "window": win, "im_id": im_id, "bbox_obj": inst.bbox_obj,
        }

    def __getitem__(self, index: int) -> dict:
        s = self.sample(index)
        out = _to_tensors({**s, "rgb": s["real"]})
        out["real"] = out.pop("image")
        out["syn"] = torch.from_numpy(rgb_to_input(s["syn"]))
        out["syn_mask"] = torch.from_numpy(s["syn_mask"])
        out["im_id"] = torch.tensor(s["im_id"], dtype=torch.int64)
        return out


def object_loader(dataset: Dataset, batch_size: int, num_workers: int = 0, **kwargs: object) -> DataLoader:
    """A DataLoader whose workers start by forkserver: EGL set up in this process cannot be forked into them."""
    if num_workers > 0:
        kwargs.setdefault("multiprocessing_context", "forkserver")
        kwargs.setdefault("persistent_workers", True)
    return DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, **kwargs)


# --------------------------------------------------------------------------------------------
# Pictures for people


def draw_box(rgb: np.ndarray, uv: np.ndarray, colour: tuple[int, int, int] = (0, 255, 0), thickness: int = 1) -> None:
    """Draw the 12 edges of projected box corners (8, 2) pixels onto an RGB image, in place."""
    p = np.round(np.asarray(uv, dtype=np.float64) * 4).astype(np.int32)  # 2 bits of sub-pixel precision
    for a, b in BOX_EDGES:
        cv2.line(rgb, tuple(p[a]), tuple(p[b]), colour, thickness, cv2.LINE_AA, shift=2)


def write_contact_sheet(
    path: str | Path, stream: SyntheticObjectStream | None = None, pairs: RealSyntheticPairs | None = None,
    n: int = 16, seed: int = 0,
) -> Path:
    """Write a PNG grid: n stream samples, then n (real | syn) pairs, each with its target box drawn."""
    tiles: list[np.ndarray] = []
    if stream is not None:
        for s in stream.sample_chunk(np.random.default_rng(seed), n):
            img = s["rgb"].copy()
            draw_box(img, targets_to_uv(s["target"], stream.cfg.crop))
            tiles.append(img)
    if pairs is not None and len(pairs):
        for i in np.linspace(0, len(pairs) - 1, min(n, len(pairs))).astype(int):
            s = pairs.sample(int(i))
            uv = targets_to_uv(s["target"], pairs.cfg.crop)
            real, syn = s["real"].copy(), s["syn"].copy()
            draw_box(real, uv)
            draw_box(syn, uv, (255, 0, 0))
            tiles += [real, syn]
    if not tiles:
        raise StreamError("write_contact_sheet needs a stream or non-empty pairs")
    from featmap_ros.report import tile_grid

    sheet = tile_grid(tiles, cols=8)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), cv2.cvtColor(sheet, cv2.COLOR_RGB2BGR))
    return path


def write_gt_overlay(
    path: str | Path, scene: BopScene, im_id: int, renderer: ObjectRenderer, infos: Mapping[int, ObjectInfo],
    alpha: float = 0.5,
) -> Path:
    """Blend renders of every annotated model at its ground-truth pose over a real frame; draw the boxes; write PNG."""
    frame = scene.frame(im_id)
    img = read_rgb(frame.rgb_path).astype(np.float32)
    K, w, h = frame.intrinsics.K, frame.intrinsics.width, frame.intrinsics.height
    insts = [i for i in frame.instances if i.obj_id in renderer.meshes]
    rgb, depth, mask = renderer.render_batch([i.obj_id for i in insts], [i.R for i in insts],
                                             [i.t for i in insts], [K] * len(insts), w, h)
    # Nearest instance wins where renders overlap.
    z = np.where(mask, depth, np.inf)
    front = np.argmin(z, axis=0) if insts else None
    for k in range(len(insts)):
        sel = mask[k] & (front == k)
        img[sel] = (1 - alpha) * img[sel] + alpha * rgb[k][sel]
    out = np.clip(img, 0, 255).astype(np.uint8)
    for inst in insts:
        draw_box(out, project_model(infos[inst.obj_id].corners, inst.R, inst.t, K))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), cv2.cvtColor(out, cv2.COLOR_RGB2BGR))
    return path
