"""Object training data rendered once per experiment, augmented on the fly in batched torch.

Rendering a crop costs about a millisecond of a core; on a 2-core CPU an online stream takes a core
from the training step. Instead the synthetic crops (object over nothing: RGB, mask, model
coordinates, box corners) and the real/synthetic pairs of the training frames are rendered once
into memory (render_object_pool, render_pair_pool), and every batch is made from them by cheap
tensor operations (augment_batch): window jitter (one affine resampling of image, mask, coordinates
and corners together), backgrounds from a bank, occluders (other pool objects or random shapes),
colour, blur and noise. Every method of an experiment draws from the same pools.

Pools store crops `oversize` times larger than the training window (same pixel density), so the
window can be shifted and scaled without leaving the stored crop (what matters for real crops).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from featmap_ros.datasets.bop import BopScene, Mesh, ObjectInfo, read_rgb
from featmap_ros.datasets.streams import (
    ObjectStreamConfig,
    PhotoBackgrounds,
    StreamError,
    anchors_by_object,
    canonicalise_pose,
    corner_targets,
    extreme_vertices,
    random_background,
    random_shape_mask,
    random_square_crop,
    random_texture,
    sample_pose,
)
from featmap_ros.geometry import CropWindow, normalise_uv, project_model
from featmap_ros.heads.dense import model_coordinates, normalise_coordinates
from featmap_ros.heads.dense_train import block_targets
from featmap_ros.render.objects import Lighting, ObjectRenderer

Pool = dict[str, torch.Tensor]


@dataclass(frozen=True)
class AugmentConfig:
    """On-the-fly augmentation of pool crops (synthetic unless marked real)."""

    window_shift: float = 0.08  # max centre shift, fraction of the window side
    window_scale: tuple[float, float] = (0.8, 1.2)
    # In-plane rotation of the window about its centre, uniform in +- this many degrees (0: none, and no random
    # draw): a camera roll, synthetic crops and real pairs alike (image, mask, coordinates and corners together).
    rotation_deg: float = 0.0
    occluder_prob: float = 0.5
    occluder_shape_prob: float = 0.5  # share of occluders that are random shapes, not other pool objects
    min_visible: float = 0.4  # an occluder hiding more than 1 - this of the object is dropped
    colour_gain: float = 0.25  # per-channel gain in [1 - g, 1 + g]
    brightness: float = 25.0  # additive offset in [-b, b], 0-255 units
    blur_prob: float = 0.3
    noise_std: float = 3.0  # 0-255 units
    real_colour_gain: float = 0.1  # real crops: milder colour changes, no backgrounds
    # Synthetic crops only, a draw per image, each (1, 1) for off (and then no random draws): a contrast factor
    # about the image's mean, a saturation factor (a blend with the grey image) and a gamma exponent, uniform in
    # (low, high) (the exponent log-uniform), for the tone response of a camera that the renders lack.
    contrast: tuple[float, float] = (1.0, 1.0)
    saturation: tuple[float, float] = (1.0, 1.0)
    gamma: tuple[float, float] = (1.0, 1.0)
    # Real crops: the share that get an occluder (as the synthetic ones do), pasted alike over the pair's render.
    real_occluder_prob: float = 0.0

    def __post_init__(self) -> None:
        for name in ("occluder_prob", "occluder_shape_prob", "min_visible", "blur_prob", "real_occluder_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise StreamError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        for name in ("contrast", "saturation", "gamma"):
            object.__setattr__(self, name, tone_range(name, getattr(self, name)))
        object.__setattr__(self, "rotation_deg", rotation_bound("rotation_deg", self.rotation_deg))
        lo, hi = self.window_scale
        if not (0 < lo <= hi and self.window_shift >= 0 and self.noise_std >= 0 and self.colour_gain >= 0):
            raise StreamError(f"window_scale must be 0 < lo <= hi and shift, noise, gain >= 0: {self}")


def tone_range(name: str, value: Any) -> tuple[float, float]:
    """A tone change's range (AugmentConfig.contrast, saturation, gamma) as two floats, 0.1 <= low <= high <= 4.

    Raises:
        StreamError: anything else (a number, text, a mapping, NaN, a reversed or out-of-bounds range).
    """
    span: tuple[float, ...] = ()
    if not isinstance(value, str | bytes | Mapping):
        try:
            span = tuple(float(v) for v in value)
        except (TypeError, ValueError):
            span = ()
    if len(span) != 2 or not 0.1 <= span[0] <= span[1] <= 4.0:
        raise StreamError(f"{name} must be a range (low, high) of numbers with 0.1 <= low <= high <= 4, got {value!r}")
    return span[0], span[1]


def rotation_bound(name: str, value: Any) -> float:
    """An in-plane rotation bound in degrees (AugmentConfig.rotation_deg) as a float in [0, 180].

    Raises:
        StreamError: anything else (text, NaN, a negative or larger bound).
    """
    try:
        bound = float(value) if not isinstance(value, str | bytes | bool) else math.nan
    except (TypeError, ValueError):
        bound = math.nan
    if not 0.0 <= bound <= 180.0:  # also refuses NaN
        raise StreamError(f"{name} must be a number of degrees in [0, 180], got {value!r}")
    return bound


# --------------------------------------------------------------------------------------------
# Rendering the pools once


def render_object_pool(infos: Mapping[int, ObjectInfo], meshes: Mapping[int, Mesh], cfg: ObjectStreamConfig,
                       n_per_object: int, oversize: float = 1.25, seed: int = 0,
                       renderer: ObjectRenderer | None = None) -> Pool:
    """Render n_per_object crops of each of cfg.obj_ids over nothing; poses, lighting, viewpoints as cfg.

    Returns tensors: rgb (N, P, P, 3) uint8, mask (N, P, P) bool, coords (N, 3, P, P) float16
    normalised model coordinates, target (N, 16) corners normalised over the stored crop,
    obj_index (N,), R (N, 3, 3), t (N, 3), K_crop (N, 3, 3) of the stored crop; P = round(oversize * crop).
    """
    if n_per_object < 1 or oversize < 1.0:
        raise StreamError(f"need n_per_object >= 1 and oversize >= 1, got {n_per_object}, {oversize}")
    P = int(round(oversize * cfg.crop))
    renderer = renderer or ObjectRenderer({i: meshes[i] for i in cfg.obj_ids}, max_faces=cfg.max_faces)
    hull = {i: extreme_vertices(meshes[i]) for i in cfg.obj_ids}
    anchors = anchors_by_object(cfg.pose_anchors, {i: infos[i].min_xyz + infos[i].size_xyz / 2.0
                                                   for i in cfg.obj_ids})
    K = np.asarray(cfg.camera_K, dtype=np.float64)
    rng = np.random.default_rng(np.random.SeedSequence([seed, 77]))
    plan = [k for k in range(len(cfg.obj_ids)) for _ in range(n_per_object)]
    n = len(plan)
    out: dict[str, Any] = {
        "rgb": np.zeros((n, P, P, 3), np.uint8), "mask": np.zeros((n, P, P), bool),
        "coords": np.zeros((n, 3, P, P), np.float16), "target": np.zeros((n, 16), np.float32),
        "obj_index": np.asarray(plan, np.int64), "R": np.zeros((n, 3, 3), np.float32),
        "t": np.zeros((n, 3), np.float32), "K_crop": np.zeros((n, 3, 3), np.float32),
    }
    chunk = 32
    for s in tqdm(range(0, n, chunk), desc="render object pool", unit_scale=chunk, leave=False):
        ids, Rs, ts, Ks, lights = [], [], [], [], []
        for k in plan[s:s + chunk]:
            oid = cfg.obj_ids[k]
            R, t = sample_pose(rng, cfg, infos[oid], anchors.get(oid, ()))
            uv = project_model(hull[oid], R, t, K)
            lo, hi = uv.min(0), uv.max(0)
            win = CropWindow.around_box(np.r_[lo, hi - lo], P, cfg.window_margin * oversize)
            ids.append(oid)
            Rs.append(R)
            ts.append(t)
            Ks.append(win.intrinsics(K))
            lights.append(Lighting.sample(rng) if cfg.random_lighting else Lighting())
        rgb, depth, mask = renderer.render_batch(ids, Rs, ts, Ks, P, P, lights)
        for j, (oid, R, t, Kc) in enumerate(zip(ids, Rs, ts, Ks, strict=True)):
            i = s + j
            info = infos[oid]
            if cfg.canonical_symmetry:
                R, t = canonicalise_pose(R, t, info)
            xyz = model_coordinates(depth[j], Kc, R, t)
            c = normalise_coordinates(xyz, info.min_xyz, info.size_xyz)
            out["rgb"][i], out["mask"][i] = rgb[j], mask[j]
            out["coords"][i] = np.nan_to_num(c.transpose(2, 0, 1)).astype(np.float16)
            out["target"][i] = corner_targets(info, R, t, Kc, P)
            out["R"][i], out["t"][i], out["K_crop"][i] = R, t, Kc
    return {k: torch.from_numpy(v) for k, v in out.items()}


def render_pair_pool(scene: BopScene, im_ids: Sequence[int], infos: Mapping[int, ObjectInfo],
                     renderer: ObjectRenderer, obj_ids: Sequence[int], crop: int, window_margin: float,
                     oversize: float = 1.5, min_visib: float = 0.1, canonical_symmetry: bool = True) -> Pool:
    """Real crops of the annotated instances with their render at the same pose composited over them.

    Visibility: the instance's render minus what the frame's other annotated objects hide (depth
    test of their renders in the same window); unannotated occluders cannot be known. The render is
    pasted over its visible pixels (paper Fig. 3: the pair differs only where the object is).
    Returns real, syn (N, P, P, 3) uint8, mask, coords, target, obj_index, R, t, K_crop, im_id.
    """
    obj_ids = tuple(int(i) for i in obj_ids)
    P = int(round(oversize * crop))
    rows: dict[str, list[Any]] = {k: [] for k in ("real", "syn", "mask", "coords", "target", "obj_index", "R", "t",
                                                  "K_crop", "im_id")}
    for im_id in tqdm(list(im_ids), desc="render pair pool", leave=False):
        frame = scene.frame(int(im_id))
        known = [i for i in frame.instances if i.obj_id in infos and i.obj_id in renderer.meshes]
        image = None
        for inst in frame.instances:
            if (inst.obj_id not in obj_ids or inst.visib_fract < min_visib or inst.bbox_obj[2] <= 0
                    or inst.bbox_obj[3] <= 0):
                continue
            image = read_rgb(frame.rgb_path) if image is None else image
            win = CropWindow.around_box(inst.bbox_obj, P, window_margin * oversize)
            Kc = win.intrinsics(frame.intrinsics.K)
            others = [o for o in known if o is not inst]
            rgb, depth, mask = renderer.render_batch([inst.obj_id] + [o.obj_id for o in others],
                                                     [inst.R] + [o.R for o in others], [inst.t] + [o.t for o in others],
                                                     [Kc] * (1 + len(others)), P, P)
            front = np.nan_to_num(depth[1:], nan=np.inf).min(0) if others else np.full((P, P), np.inf)
            visible = mask[0] & (np.nan_to_num(depth[0], nan=np.inf) <= front)
            real = win.crop(image)
            syn = real.copy()
            syn[visible] = rgb[0][visible]
            info = infos[inst.obj_id]
            R, t = canonicalise_pose(inst.R, inst.t, info) if canonical_symmetry else (inst.R, inst.t)
            c = normalise_coordinates(model_coordinates(depth[0], Kc, R, t), info.min_xyz, info.size_xyz)
            for key, value in (("real", real), ("syn", syn), ("mask", visible),
                               ("coords", np.nan_to_num(c.transpose(2, 0, 1)).astype(np.float16)),
                               ("target", corner_targets(info, R, t, Kc, P)), ("obj_index", obj_ids.index(inst.obj_id)),
                               ("R", R.astype(np.float32)), ("t", t.astype(np.float32)),
                               ("K_crop", Kc.astype(np.float32)), ("im_id", int(im_id))):
                rows[key].append(value)
    if not rows["real"]:
        raise StreamError(f"no annotated instances of {obj_ids} (visib >= {min_visib}) in frames {list(im_ids)[:5]}...")
    return {k: torch.from_numpy(np.stack(v)) if k not in ("obj_index", "im_id") else torch.tensor(v)
            for k, v in rows.items()}


class ArrayPhotos:
    """Random square crops of photos held in memory (the sampling of streams.PhotoBackgrounds)."""

    def __init__(self, images: Sequence[np.ndarray]) -> None:
        if not images:
            raise StreamError("ArrayPhotos needs at least one photo")
        self.images = list(images)

    def sample(self, rng: np.random.Generator, size: int) -> np.ndarray:
        """A random (size, size, 3) uint8 crop of a random photo."""
        return random_square_crop(rng, self.images[int(rng.integers(len(self.images)))], size)


def photos_without_objects(scene: BopScene, im_ids: Sequence[int], renderer: ObjectRenderer,
                           dilate_px: int = 7) -> list[np.ndarray]:
    """The frames im_ids with every annotated object the renderer knows painted out (OpenCV inpainting).

    Training frames make realistic backgrounds, but they hold the very objects the network learns:
    left in, a real instance would be labelled background in a synthetic crop and object in a real
    one. Their renders at the annotated poses, dilated, mark what to paint out.
    """
    out = []
    kernel = np.ones((dilate_px, dilate_px), np.uint8)
    for im_id in tqdm(list(im_ids), desc="clean background photos", leave=False):
        frame = scene.frame(int(im_id))
        image = read_rgb(frame.rgb_path)
        h, w = image.shape[:2]
        inst = [i for i in frame.instances if i.obj_id in renderer.meshes]
        if inst:
            _, _, masks = renderer.render_batch([i.obj_id for i in inst], [i.R for i in inst], [i.t for i in inst],
                                                [frame.intrinsics.K] * len(inst), w, h)
            hole = cv2.dilate(masks.any(0).astype(np.uint8), kernel)
            # Inpainting at half resolution is about 4x faster; the painted pixels only are replaced.
            small = cv2.inpaint(cv2.resize(image, (w // 2, h // 2), interpolation=cv2.INTER_AREA),
                                cv2.resize(hole, (w // 2, h // 2), interpolation=cv2.INTER_NEAREST), 5,
                                cv2.INPAINT_TELEA)
            image = np.where(hole[..., None] > 0, cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR), image)
        out.append(image)
    return out


def background_bank(n: int, size: int, cfg: ObjectStreamConfig, seed: int = 0,
                    photos: ArrayPhotos | PhotoBackgrounds | None = None) -> torch.Tensor:
    """(n, size, size, 3) uint8 backgrounds drawn as the online stream draws them (photos, colours, textures).

    photos: where photo backgrounds come from; default cfg.photo_dir / cfg.photo_paths as they are.
    """
    rng = np.random.default_rng(np.random.SeedSequence([seed, 91]))
    if photos is None and (cfg.photo_dir or cfg.photo_paths):
        photos = PhotoBackgrounds(cfg.photo_dir, paths=cfg.photo_paths, cache=len(cfg.photo_paths) or 64)
    bank = np.stack([random_background(rng, cfg.backgrounds, size, photos, cfg.photo_prob) for _ in range(n)])
    return torch.from_numpy(bank)


def shape_bank(n: int, size: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """n random occluder shapes: masks (n, size, size) bool and their fills (n, size, size, 3) uint8."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, 93]))
    masks = np.stack([random_shape_mask(rng, size) for _ in range(n)])
    fills = np.stack([random_texture(rng, size) if rng.random() < 0.5
                      else np.broadcast_to(rng.integers(0, 256, 3, dtype=np.uint8), (size, size, 3))
                      for _ in range(n)])
    return torch.from_numpy(masks), torch.from_numpy(np.ascontiguousarray(fills))


# --------------------------------------------------------------------------------------------
# Batches from the pools


def jitter_thetas(g: torch.Generator, n: int, oversize: float, shift: float, scale: tuple[float, float],
                  rotation_deg: float = 0.0) -> torch.Tensor:
    """(n, 2, 3) affine_grid matrices: output window (scale s, shift d of the window side, turned by up to
    +- rotation_deg about its centre) in the stored crop. rotation_deg 0 draws no angle (the same stream as before)."""
    s = torch.empty(n).uniform_(scale[0], scale[1], generator=g)
    d = (torch.rand(n, 2, generator=g) * 2 - 1) * shift
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = s / oversize
    if rotation_deg > 0:
        a = torch.deg2rad((torch.rand(n, generator=g) * 2 - 1) * rotation_deg)
        c, si = torch.cos(a) * s / oversize, torch.sin(a) * s / oversize
        theta[:, 0, 0], theta[:, 0, 1], theta[:, 1, 0], theta[:, 1, 1] = c, -si, si, c
    theta[:, :, 2] = 2 * d / oversize
    return theta


def warp(images: torch.Tensor, theta: torch.Tensor, out: int, mode: str) -> torch.Tensor:
    """(B, C, P, P) -> (B, C, out, out) resampled with affine_grid matrices theta (outside: 0)."""
    grid = F.affine_grid(theta, [len(images), images.shape[1], out, out], align_corners=False)
    return F.grid_sample(images, grid, mode=mode, padding_mode="zeros", align_corners=False)


def warp_corners(target: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """(B, 2 n) points (corners, keypoints) normalised over the stored crop -> normalised over the output window."""
    uv = target.view(len(target), -1, 2)
    A, b = theta[:, :, :2], theta[:, :, 2]
    out = torch.linalg.solve(A, (uv - b[:, None, :]).transpose(1, 2)).transpose(1, 2)
    return out.reshape(target.shape)


def add_keypoints(pool: Pool, keypoints_m: Sequence[np.ndarray] | np.ndarray) -> Pool:
    """Add pool['keypoints'] (N, 2 n): each row's object keypoints (keypoints_m[obj_index], (n, 3) model
    metres) projected with the row's pose and stored crop camera, normalised over the stored crop
    (as its corner targets). The keypoint head's targets; returns the pool."""
    kp = torch.as_tensor(np.asarray(keypoints_m, np.float64), dtype=torch.float64)[pool["obj_index"].long()]
    R, t, K = (pool[k].double() for k in ("R", "t", "K_crop"))
    cam = kp @ R.transpose(1, 2) + t[:, None, :]
    if (cam[..., 2] <= 0).any():
        raise StreamError("a pool keypoint is behind its crop camera")
    pix = cam @ K.transpose(1, 2)
    uv = pix[..., :2] / pix[..., 2:]
    pool["keypoints"] = torch.from_numpy(normalise_uv(uv.numpy(), pool["mask"].shape[-1])).reshape(len(kp), -1).float()
    return pool


def _keypoint_batch(pool: Pool, idx: torch.Tensor, theta: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"keypoints": warp_corners(pool["keypoints"][idx], theta)} if "keypoints" in pool else {}


_BLUR_SIGMAS = (0.5, 0.8, 1.2)


def _blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    r = 2
    k = torch.exp(-torch.arange(-r, r + 1, dtype=torch.float32) ** 2 / (2 * sigma * sigma))
    k = (k / k.sum()).to(x.dtype)
    c = x.shape[1]
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="replicate"), k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(F.pad(x, (0, 0, r, r), mode="replicate"), k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


# ITU-R BT.601 luma weights: the grey image a saturation change blends with.
_LUMA = (0.299, 0.587, 0.114)


def photometric(x: torch.Tensor, g: torch.Generator, gain: float, brightness: float, blur_prob: float,
                noise_std: float, contrast: tuple[float, float] = (1.0, 1.0),
                saturation: tuple[float, float] = (1.0, 1.0), gamma: tuple[float, float] = (1.0, 1.0)
                ) -> torch.Tensor:
    """(B, 3, S, S) float 0-255 -> colour gain and offset, contrast, saturation, gamma, blur, Gaussian noise;
    clipped to [0, 255]. contrast, saturation, gamma: AugmentConfig's ranges; (1, 1) draws no random numbers."""
    b = len(x)

    def draw(span: tuple[float, float]) -> torch.Tensor:
        return span[0] + torch.rand(b, 1, 1, 1, generator=g) * (span[1] - span[0])

    x = x * (1 + (torch.rand(b, 3, 1, 1, generator=g) * 2 - 1) * gain)
    x = x + (torch.rand(b, 1, 1, 1, generator=g) * 2 - 1) * brightness
    if tuple(contrast) != (1.0, 1.0):
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        x = (x - mean) * draw(contrast) + mean
    if tuple(saturation) != (1.0, 1.0):
        grey = (x * torch.tensor(_LUMA, dtype=x.dtype).view(1, 3, 1, 1)).sum(1, keepdim=True)
        x = grey + (x - grey) * draw(saturation)
    if tuple(gamma) != (1.0, 1.0):
        exponent = torch.exp(draw((math.log(gamma[0]), math.log(gamma[1]))))
        x = 255.0 * (x.clamp(0, 255) / 255.0) ** exponent
    if blur_prob > 0:
        which = torch.randint(len(_BLUR_SIGMAS), (b,), generator=g)
        on = torch.rand(b, generator=g) < blur_prob
        for k, sigma in enumerate(_BLUR_SIGMAS):
            sel = torch.nonzero(on & (which == k)).flatten()
            if len(sel):
                x[sel] = _blur(x[sel], sigma)
    if noise_std > 0:
        x = x + torch.randn(x.shape, generator=g) * noise_std
    return x.clamp(0, 255)


@dataclass(frozen=True)
class PoolConfig:
    """Sizes of the pools an experiment renders once, and their augmentation."""

    n_per_object: int = 1500  # synthetic crops per object
    oversize: float = 1.25  # stored synthetic crops cover this many training windows (side)
    pair_oversize: float = 1.5  # the same for real crops: jitter must never leave the real image crop
    n_backgrounds: int = 2048
    n_shapes: int = 512
    augment: AugmentConfig = AugmentConfig()

    def __post_init__(self) -> None:
        if self.n_per_object < 1 or self.n_backgrounds < 1 or self.n_shapes < 1:
            raise StreamError(f"pool sizes must be >= 1: {self}")
        need = max(self.augment.window_scale[1], 1.0) + 2 * self.augment.window_shift
        if self.pair_oversize < need or self.oversize < 1.0:
            raise StreamError(f"pair_oversize {self.pair_oversize} must cover the jittered window ({need:.2f}) "
                              f"and oversize >= 1, got {self.oversize}")


def _to_input(x: torch.Tensor) -> torch.Tensor:
    """0-255 float -> [-1, 1], as preprocess.rgb_to_input."""
    return x / 127.5 - 1.0


def occlude(images: torch.Tensor, m: torch.Tensor, objects: Pool, shapes: tuple[torch.Tensor, torch.Tensor],
            crop: int, oversize: float, cfg: AugmentConfig, prob: float, g: torch.Generator
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Occluders over a batch: (B, 3k, S, S) float 0-255 images (k images a row, all covered alike: a real
    crop and its render) and the object's visible mask m (B, S, S) -> both with the occluders.

    With probability prob a row gets another object of the pool `objects` pushed anywhere over the window
    or (cfg.occluder_shape_prob of them) one of the random shapes with its texture or colour fill; an
    occluder that would leave less than cfg.min_visible of the visible object is dropped.
    """
    b = len(images)
    occ = torch.rand(b, generator=g) < prob
    use_shape = torch.rand(b, generator=g) < cfg.occluder_shape_prob
    o_idx = torch.randint(len(objects["rgb"]), (b,), generator=g)
    o_theta = jitter_thetas(g, b, oversize, 0.5, cfg.window_scale)
    o_warp = warp(torch.cat([objects["rgb"][o_idx].permute(0, 3, 1, 2).float(),
                             objects["mask"][o_idx].float().unsqueeze(1)], 1), o_theta, crop, "bilinear")
    o_rgb, o_alpha = o_warp[:, :3], o_warp[:, 3:]
    o_mask = o_alpha[:, 0] > 0.5
    s_idx = torch.randint(len(shapes[0]), (b,), generator=g)
    s_mask = shapes[0][s_idx]
    if s_mask.shape[-1] != crop:
        s_mask = F.interpolate(s_mask.float().unsqueeze(1), size=(crop, crop), mode="nearest")[:, 0] > 0.5
    s_fill = F.interpolate(shapes[1][s_idx].permute(0, 3, 1, 2).float(), size=(crop, crop), mode="nearest")
    hide = torch.where(use_shape.view(-1, 1, 1), s_mask, o_mask) & occ.view(-1, 1, 1)
    before = m.flatten(1).sum(1).clamp_min(1)
    after = (m & ~hide).flatten(1).sum(1)
    keep = (occ & (after >= cfg.min_visible * before)).view(-1, 1, 1)
    hide &= keep
    fill = torch.where(use_shape.view(-1, 1, 1, 1), s_fill, o_rgb)
    # Shapes cover fully; object occluders composite with their coverage as alpha (premultiplied).
    alpha_o = torch.where(use_shape.view(-1, 1, 1, 1), hide.unsqueeze(1).float(), o_alpha * keep.unsqueeze(1))
    # (B, k, 3, S, S): each of a row's k images under the row's one occluder.
    x, a = images.view(b, -1, 3, crop, crop), alpha_o.unsqueeze(1)
    x = torch.where(use_shape.view(-1, 1, 1, 1, 1), x * (1 - a) + fill.unsqueeze(1) * a,
                    x * (1 - a) + (o_rgb * keep.unsqueeze(1)).unsqueeze(1))
    return x.reshape(images.shape), m & ~hide


def augment_synthetic(pool: Pool, idx: torch.Tensor, backgrounds: torch.Tensor,
                      shapes: tuple[torch.Tensor, torch.Tensor],
                      crop: int, oversize: float, cfg: AugmentConfig, g: torch.Generator) -> dict[str, torch.Tensor]:
    """A training batch from pool rows idx: image (B, 3, S, S) in [-1, 1], target (B, 16), obj_index,
    coords (B, 3, S/2, S/2) and visibility (B, S/2, S/2) of the dense head."""
    b = len(idx)
    theta = jitter_thetas(g, b, oversize, cfg.window_shift, cfg.window_scale, cfg.rotation_deg)
    rgb = pool["rgb"][idx].permute(0, 3, 1, 2).float()
    mask = pool["mask"][idx].float().unsqueeze(1)
    coords = pool["coords"][idx].float()
    # The render is black off the object, so its bilinear warp is colour premultiplied by coverage:
    # compositing with the bilinear mask as alpha leaves no dark fringe (a cue real images lack).
    img = warp(torch.cat([rgb, mask], 1), theta, crop, "bilinear")
    img, alpha = img[:, :3], img[:, 3:]
    geo_maps = warp(torch.cat([mask, coords], 1), theta, crop, "nearest")
    m, c = geo_maps[:, 0] > 0.5, geo_maps[:, 1:]
    bg = backgrounds[torch.randint(len(backgrounds), (b,), generator=g)].permute(0, 3, 1, 2).float()
    img = img + (1.0 - alpha) * bg
    if cfg.occluder_prob > 0:
        img, m = occlude(img, m, pool, shapes, crop, oversize, cfg, cfg.occluder_prob, g)
    img = photometric(img, g, cfg.colour_gain, cfg.brightness, cfg.blur_prob, cfg.noise_std, cfg.contrast,
                      cfg.saturation, cfg.gamma)
    coords_t, vis = block_targets(c, m)
    return {"image": _to_input(img), "target": warp_corners(pool["target"][idx], theta),
            "obj_index": pool["obj_index"][idx], "coords": coords_t, "visibility": vis,
            **_keypoint_batch(pool, idx, theta)}


def augment_pairs(pool: Pool, idx: torch.Tensor, crop: int, oversize: float, cfg: AugmentConfig,
                  g: torch.Generator, occluders: tuple[Pool, tuple[torch.Tensor, torch.Tensor]] | None = None,
                  occluder_oversize: float = PoolConfig.oversize) -> dict[str, torch.Tensor]:
    """A batch of real/synthetic pairs, both resampled in the same jittered window (real colours jittered).

    occluders: the synthetic pool and shape bank that cfg.real_occluder_prob draws occluders from (stored
    at occluder_oversize), each pasted over the real crop and its render alike; needed when that is > 0.
    """
    b = len(idx)
    theta = jitter_thetas(g, b, oversize, cfg.window_shift, cfg.window_scale, cfg.rotation_deg)
    both = torch.cat([pool["real"][idx].permute(0, 3, 1, 2).float(), pool["syn"][idx].permute(0, 3, 1, 2).float()], 1)
    both = warp(both, theta, crop, "bilinear")
    geo_maps = warp(torch.cat([pool["mask"][idx].float().unsqueeze(1), pool["coords"][idx].float()], 1), theta, crop,
                    "nearest")
    m = geo_maps[:, 0] > 0.5
    if cfg.real_occluder_prob > 0:
        if occluders is None:
            raise StreamError("real_occluder_prob > 0 needs the pool and shapes to draw the occluders from")
        both, m = occlude(both, m, occluders[0], occluders[1], crop, occluder_oversize, cfg, cfg.real_occluder_prob, g)
    coords_t, vis = block_targets(geo_maps[:, 1:], m)
    real = photometric(both[:, :3], g, cfg.real_colour_gain, cfg.brightness / 2, 0.0, 0.0)
    return {"real": _to_input(real), "syn": _to_input(both[:, 3:]), "target": warp_corners(pool["target"][idx], theta),
            "obj_index": pool["obj_index"][idx], "coords": coords_t, "visibility": vis,
            **_keypoint_batch(pool, idx, theta)}


def endless_batches(n: int, batch_size: int, seed: int, start_step: int,
                    make: Any) -> Iterator[dict[str, torch.Tensor]]:
    """Batches make(idx, generator) of random rows of an n-row pool, reproducible from (seed, start_step)."""
    g = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(start_step))
    while True:
        yield make(torch.randint(n, (batch_size,), generator=g), g)
