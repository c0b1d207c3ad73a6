"""A structured-light depth sensor (Kinect v1-like) and the scene around a hand: the "real" domain.

The clean depth of a scene (hand render plus background surfaces from compose_scene) goes through
apply(), which reproduces what makes NYU's Kinect frames differ from clean renders: projector
shadows, ragged and flying edge pixels, holes on grazing surfaces, axial noise growing with depth
squared (Nguyen et al., 3DIMPVT 2012) and disparity quantised to 1/8 pixel. Depth is HxW float32
metres in the OpenCV camera frame with NaN for invalid pixels, in and out.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import cv2
import numpy as np

from featmap_ros.errors import FeatmapError


class SensorError(FeatmapError, ValueError):
    """A sensor or scene request is malformed."""


def axial_noise_std(z_m: np.ndarray | float) -> np.ndarray | float:
    """Kinect v1 axial noise standard deviation at depth z (metres), in metres (Nguyen et al. 2012)."""
    return 0.0012 + 0.0019 * (np.asarray(z_m) - 0.4) ** 2


@dataclass(frozen=True)
class SensorConfig:
    """Parameters of the structured-light sensor model; lengths in metres, angles in degrees."""

    baseline_m: float = 0.075  # camera-projector distance along the camera's x axis
    # The projector sits at x = projector_side * baseline. NYU's frames show the hand's shadow on its
    # right (+u) side, which puts the projector on the left.
    projector_side: int = -1
    disparity_step_px: float = 0.125  # disparity quantisation (Kinect: 1/8 pixel)
    noise_scale: float = 1.0  # multiplies axial_noise_std()
    shadow_tolerance_px: float = 0.5  # projector-column overlap that counts as occluded
    edge_threshold_m: float = 0.02  # depth jump within 3x3 pixels that makes a depth edge
    edge_jitter_px: int = 1  # edge pixels take the depth of a neighbour up to this far
    edge_jitter_block_px: int = 4  # the jitter field is blocky: one offset per block (correlation window)
    p_edge_hole: float = 0.25  # chance an edge pixel is missing
    p_flying: float = 0.3  # chance a remaining edge pixel lands between foreground and background
    grazing_angle_deg: float = 72.0  # surfaces steeper than this to the line of sight lose pixels
    p_grazing_drop: float = 0.7
    p_dropout: float = 0.002  # isolated missing pixels anywhere
    min_depth_m: float = 0.4
    max_depth_m: float = 4.0
    output_resolution_m: float = 0.001  # depth is stored in whole millimetres (0 keeps floats)

    @classmethod
    def nominal(cls) -> SensorConfig:
        """The sensor the training ("real") frames are simulated with."""
        return cls()

    @classmethod
    def test_time(cls) -> SensorConfig:
        """A deliberately different sensor for test frames: noisier, raggier, wider baseline."""
        return cls(
            baseline_m=0.08, noise_scale=1.4, edge_jitter_px=2, p_edge_hole=0.35, p_flying=0.45,
            grazing_angle_deg=68.0, p_dropout=0.004,
        )

    def varied(self, rng: np.random.Generator, spread: float = 0.3) -> SensorConfig:
        """Return a copy with each continuous parameter scaled by a factor in [1 - spread, 1 + spread]."""

        def f() -> float:
            return float(rng.uniform(1.0 - spread, 1.0 + spread))

        return replace(
            self,
            baseline_m=self.baseline_m * f(),
            noise_scale=self.noise_scale * f(),
            edge_threshold_m=self.edge_threshold_m * f(),
            p_edge_hole=min(1.0, self.p_edge_hole * f()),
            p_flying=min(1.0, self.p_flying * f()),
            grazing_angle_deg=min(89.0, self.grazing_angle_deg * (1.0 + 0.2 * (f() - 1.0))),
            p_grazing_drop=min(1.0, self.p_grazing_drop * f()),
            p_dropout=self.p_dropout * f(),
        )


@dataclass(frozen=True)
class SceneConfig:
    """Background surfaces composed behind a hand: probabilities and ranges in metres."""

    p_torso: float = 0.8  # the person's body (and head) behind the hand
    torso_gap_m: tuple[float, float] = (0.2, 0.45)  # torso front behind the hand's centre
    torso_offset_m: tuple[float, float] = (0.1, 0.3)  # torso centre sideways from the hand (either side)
    p_wall: float = 0.9
    wall_distance_m: tuple[float, float] = (1.4, 3.5)
    wall_tilt_deg: float = 25.0
    p_table: float = 0.3
    table_below_m: tuple[float, float] = (0.15, 0.45)  # table top below the hand's centre
    table_pitch_deg: tuple[float, float] = (-15.0, 25.0)  # camera looking down onto it (+)


_RAYS: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}


def _rays(K: np.ndarray, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    """Cached (H, W) float32 ray slopes x/z and y/z of every pixel."""
    key = (float(K[0, 0]), float(K[1, 1]), float(K[0, 2]), float(K[1, 2]), width, height)
    if key not in _RAYS:
        rx = ((np.arange(width, dtype=np.float32) - key[2]) / key[0])[None, :].repeat(height, 0)
        ry = ((np.arange(height, dtype=np.float32) - key[3]) / key[1])[:, None].repeat(width, 1)
        _RAYS[key] = (rx, ry)
    return _RAYS[key]


def _check(depth: np.ndarray, K: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    depth = np.asarray(depth)
    if depth.ndim != 2:
        raise SensorError(f"depth must be HxW, got shape {depth.shape}")
    K = np.asarray(K, dtype=np.float64)
    if K.shape != (3, 3):
        raise SensorError(f"K must be 3x3, got {K.shape}")
    return depth.astype(np.float32, copy=False), K


def _plane_depth(rx: np.ndarray, ry: np.ndarray, normal: np.ndarray, point: np.ndarray) -> np.ndarray:
    """Depth of the plane n.(X - p) = 0 along each pixel's ray; NaN where it lies behind the camera."""
    denom = normal[0] * rx + normal[1] * ry + np.float32(normal[2])
    with np.errstate(divide="ignore", invalid="ignore"):
        z = np.float32(normal @ point) / denom
    z[~(z > 0)] = np.nan
    return z


def _ellipsoid_depth(
    out: np.ndarray, K: np.ndarray, centre: np.ndarray, axes: np.ndarray
) -> None:
    """Draw an axis-aligned ellipsoid (centre, semi-axes in metres) into `out` by nearest depth."""
    H, W = out.shape
    if centre[2] - axes[2] <= 0.05:
        return
    lo = centre - axes
    hi = centre + axes
    zmin = max(lo[2], 0.05)
    us = K[0, 0] * np.array([lo[0], hi[0]])[:, None] / np.array([zmin, hi[2]])[None, :] + K[0, 2]
    vs = K[1, 1] * np.array([lo[1], hi[1]])[:, None] / np.array([zmin, hi[2]])[None, :] + K[1, 2]
    u0, u1 = max(int(np.floor(us.min())), 0), min(int(np.ceil(us.max())), W - 1)
    v0, v1 = max(int(np.floor(vs.min())), 0), min(int(np.ceil(vs.max())), H - 1)
    if u0 > u1 or v0 > v1:
        return
    rx, ry = _rays(K, W, H)
    # Scale space so the ellipsoid becomes the unit sphere; the ray stays a ray from the origin.
    dx = rx[v0:v1 + 1, u0:u1 + 1] / axes[0]
    dy = ry[v0:v1 + 1, u0:u1 + 1] / axes[1]
    dz = np.float32(1.0 / axes[2])
    c = (centre / axes).astype(np.float32)
    a = dx * dx + dy * dy + dz * dz
    b = dx * c[0] + dy * c[1] + dz * c[2]
    disc = b * b - a * (np.float32(c @ c) - 1.0)
    with np.errstate(invalid="ignore"):
        z = (b - np.sqrt(disc)) / a
    roi = out[v0:v1 + 1, u0:u1 + 1]
    np.fmin(roi, np.where(disc >= 0, z, np.nan), out=roi)


def compose_scene(
    depth_hand: np.ndarray,
    K: np.ndarray,
    rng: np.random.Generator,
    config: SceneConfig = SceneConfig(),
    hand_centre_xyz: np.ndarray | None = None,
) -> np.ndarray:
    """Put background surfaces (torso and head, wall, table) behind a clean hand depth image.

    Args:
        depth_hand: HxW float32 metres, NaN where there is no hand.
        K: (3, 3) camera matrix.
        rng: random source for which surfaces appear and where.
        config: probabilities and ranges of the surfaces.
        hand_centre_xyz: (3,) hand centre in metres; the mean of the hand's pixels when None.

    Returns:
        HxW float32 metres: the nearest surface at each pixel, NaN where there is none.
    """
    depth_hand, K = _check(depth_hand, K)
    H, W = depth_hand.shape
    rx, ry = _rays(K, W, H)
    if hand_centre_xyz is None:
        valid = np.isfinite(depth_hand)
        if not valid.any():
            raise SensorError("no hand pixels to compose a scene around, and no hand centre given")
        z = float(depth_hand[valid].mean())
        hand_centre_xyz = np.array([rx[valid].mean() * z, ry[valid].mean() * z, z])
    c = np.asarray(hand_centre_xyz, dtype=np.float64).reshape(3)
    out = np.full((H, W), np.nan, dtype=np.float32)
    if rng.random() < config.p_wall:
        tilt = np.deg2rad(rng.uniform(-config.wall_tilt_deg, config.wall_tilt_deg, 2))
        n = np.array([np.sin(tilt[0]), np.sin(tilt[1]), 1.0])
        np.fmin(out, _plane_depth(rx, ry, n / np.linalg.norm(n), np.array([0.0, 0.0, rng.uniform(
            *config.wall_distance_m)])), out=out)
    if rng.random() < config.p_table:
        pitch = np.deg2rad(rng.uniform(*config.table_pitch_deg))
        # Up is camera -y; a camera pitched down by `pitch` sees the table normal tilted toward it.
        n = np.array([0.0, -np.cos(pitch), -np.sin(pitch)])
        p = c + np.array([0.0, rng.uniform(*config.table_below_m), 0.0])
        table = _plane_depth(rx, ry, n, p)
        # The table lies behind the hand (else the nearest blob would be the table, not the hand) and ends.
        table[(table < c[2] + 0.1) | (table > c[2] + 1.2)] = np.nan
        np.fmin(out, table, out=out)
    if rng.random() < config.p_torso:
        side = rng.choice([-1.0, 1.0])
        axes = np.array([rng.uniform(0.17, 0.23), rng.uniform(0.3, 0.4), rng.uniform(0.1, 0.14)])
        gap = rng.uniform(*config.torso_gap_m)
        centre = c + np.array([side * rng.uniform(*config.torso_offset_m), rng.uniform(0.1, 0.3), gap + axes[2]])
        _ellipsoid_depth(out, K, centre, axes)
        head = centre + np.array([rng.normal(0.0, 0.03), -axes[1] - 0.1, 0.0])
        _ellipsoid_depth(out, K, head, np.array([0.08, 0.11, 0.1]))
    return np.fmin(depth_hand, out)


def shadow_mask(depth_m: np.ndarray, fx: float, baseline_m: float, projector_side: int, tol_px: float) -> np.ndarray:
    """HxW bool: pixels the projector cannot light because a nearer surface blocks its ray.

    With a rectified projector at x = side * baseline, pixel u lights from projector column
    u - side * d (d = baseline * fx / z). Along a row, a visible surface has increasing projector
    columns (for side -1; decreasing for +1); a pixel whose column is already passed by a pixel on
    the projector's side is behind that pixel as seen from the projector.
    """
    with np.errstate(divide="ignore", invalid="ignore"):
        d = np.float32(baseline_m * fx) / depth_m
    u = np.arange(depth_m.shape[1], dtype=np.float32)[None, :]
    if projector_side < 0:
        col = u + d
        col[~np.isfinite(col)] = -np.inf
        seen = np.maximum.accumulate(col, axis=1)
        seen = np.concatenate([np.full_like(seen[:, :1], -np.inf), seen[:, :-1]], axis=1)
        return seen > col + tol_px
    col = u - d
    col[~np.isfinite(col)] = np.inf
    seen = np.minimum.accumulate(col[:, ::-1], axis=1)[:, ::-1]
    seen = np.concatenate([seen[:, 1:], np.full_like(seen[:, :1], np.inf)], axis=1)
    return seen < col - tol_px


def apply(
    depth_clean: np.ndarray, K: np.ndarray, rng: np.random.Generator, config: SensorConfig = SensorConfig()
) -> np.ndarray:
    """Turn a clean HxW depth image (metres, NaN empty) into what the structured-light sensor would report.

    Returns:
        HxW float32 metres with NaN where the sensor gives no depth.
    """
    z, K = _check(depth_clean, K)
    if config.projector_side not in (-1, 1):
        raise SensorError(f"projector_side must be -1 or +1, got {config.projector_side}")
    H, W = z.shape
    fx = float(K[0, 0])
    valid = np.isfinite(z) & (z > 0)
    shadow = shadow_mask(np.where(valid, z, np.nan), fx, config.baseline_m, config.projector_side,
                         config.shadow_tolerance_px)

    # Depth edges: a big depth range in the 3x3 neighbourhood (empty pixels count as far away).
    far = np.float32(100.0)
    zf = np.where(valid, z, far)
    zmax = cv2.dilate(zf, None)
    zmin = cv2.erode(zf, None)
    edge = valid & (zmax - zmin > config.edge_threshold_m)
    out = z.copy()
    ev, eu = np.nonzero(edge)
    if len(ev):
        # Ragged edges: each block of pixels borrows depth from one shared neighbour offset.
        bs, j = max(1, config.edge_jitter_block_px), config.edge_jitter_px
        offs = rng.integers(-j, j + 1, size=(2, H // bs + 1, W // bs + 1))
        su = np.clip(eu + offs[0, ev // bs, eu // bs], 0, W - 1)
        sv = np.clip(ev + offs[1, ev // bs, eu // bs], 0, H - 1)
        moved = z[sv, su]
        # Flying pixels: the correlation window straddles both sides and averages them.
        fly = (rng.random(len(ev)) < config.p_flying) & (zmax[ev, eu] < far)
        mix = rng.random(len(ev)).astype(np.float32)
        moved = np.where(fly, zmin[ev, eu] + mix * (zmax[ev, eu] - zmin[ev, eu]), moved)
        moved[rng.random(len(ev)) < config.p_edge_hole] = np.nan
        out[ev, eu] = moved

    # Grazing surfaces: the slope of z per metre sideways, from the depth gradient.
    gx = cv2.Sobel(zf, cv2.CV_32F, 1, 0, ksize=3) * np.float32(0.125 * fx)
    gy = cv2.Sobel(zf, cv2.CV_32F, 0, 1, ksize=3) * np.float32(0.125 * K[1, 1])
    slope2 = (gx * gx + gy * gy) / (zf * zf)
    steep = valid & ~edge & (slope2 > np.tan(np.deg2rad(config.grazing_angle_deg)) ** 2)
    drop = steep & (rng.random((H, W), dtype=np.float32) < config.p_grazing_drop)
    drop |= rng.random((H, W), dtype=np.float32) < config.p_dropout

    # Axial noise in disparity, then 1/8 px quantisation. The added noise leaves room for the
    # quantisation's own variance (step^2 / 12) so the total matches axial_noise_std().
    bf = np.float32(config.baseline_m * fx)
    with np.errstate(divide="ignore", invalid="ignore"):
        d = bf / out
        sd_z = np.float32(config.noise_scale) * axial_noise_std(out).astype(np.float32)
        sd_d = sd_z * d / out
        step = np.float32(config.disparity_step_px)
        sd_add = np.sqrt(np.maximum(sd_d * sd_d - step * step / 12.0, 0.0))
        d = d + sd_add * rng.standard_normal((H, W), dtype=np.float32)
        d = np.round(d / step) * step
        out = bf / d
    if config.output_resolution_m > 0:
        res = np.float32(config.output_resolution_m)
        out = np.round(out / res) * res
    bad = shadow | drop | ~np.isfinite(out) | (out < config.min_depth_m) | (out > config.max_depth_m)
    out[bad] = np.nan
    return out.astype(np.float32, copy=False)
