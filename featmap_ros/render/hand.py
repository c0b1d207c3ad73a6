"""An articulated capsule hand (right hand, with forearm) and a batched analytic depth renderer.

Hand frame (metres): origin at the wrist centre, x toward the thumb (radial), y toward the
fingers (distal), z out of the palm (palmar); for a right hand x cross y = z. Flexion curls a
finger toward +z. A pose maps the hand frame to the OpenCV camera frame: x_cam = R_h2c x + t_h2c.

Geometry is a union of capsules (segments swept by a sphere). The renderer casts one ray per
pixel of each capsule's projected bounding box and keeps the nearest hit: render_capsules is plain
torch (batched on CPU or CUDA), render.capsules_gl rasterises the same casts with OpenGL (faster on
a CPU, through Mesa's llvmpipe). Depth is z along the optical axis, NaN for background.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch

from featmap_ros.datasets.nyu import JOINT_NAMES as NYU_JOINT_NAMES
from featmap_ros.datasets.nyu import NYU_INTRINSICS
from featmap_ros.errors import FeatmapError
from featmap_ros.geometry import Intrinsics
from featmap_ros.heap import pin_mmap_threshold

if TYPE_CHECKING:
    from featmap_ros.render.capsules_gl import GLCapsuleRenderer


log = logging.getLogger(__name__)


class HandModelError(FeatmapError, ValueError):
    """A hand shape, pose or render request is malformed."""


FINGERS = ("thumb", "index", "middle", "ring", "pinky")
PART_NAMES = ("background", "palm", "thumb", "index", "middle", "ring", "pinky", "forearm")

# All joints the model produces, in this order, as (B, len(HAND_JOINTS), 3) arrays.
HAND_JOINTS = (
    "wrist", "wrist_1", "wrist_2", "palm",
    "thumb_cmc", "thumb_mcp", "thumb_ip", "thumb_tip",
    "index_mcp", "index_pip", "index_dip", "index_tip",
    "middle_mcp", "middle_pip", "middle_dip", "middle_tip",
    "ring_mcp", "ring_pip", "ring_dip", "ring_tip",
    "pinky_mcp", "pinky_pip", "pinky_dip", "pinky_tip",
)
# NYU's labels: a finger's "mid" is its PIP; on the thumb the real frame puts "mid" 25 mm from the
# tip (the IP joint) and "base" 47 mm further (the MCP). wrist_1 is the ulnar (pinky) side.
_NYU_ALIAS = {"thumb_mid": "thumb_ip", "thumb_base": "thumb_mcp"}
NYU_FROM_HAND = np.array(
    [HAND_JOINTS.index(_NYU_ALIAS.get(n, n.replace("_mid", "_pip"))) for n in NYU_JOINT_NAMES]
)

ARTICULATION_NAMES = (
    "thumb_cmc_flex", "thumb_cmc_abd", "thumb_mcp_flex", "thumb_ip_flex",
    *(f"{f}_{j}" for f in FINGERS[1:] for j in ("mcp_flex", "mcp_abd", "pip_flex", "dip_flex")),
    "wrist_flex", "wrist_dev",
)
_LIMITS_DEG = {
    "thumb_cmc_flex": (-20.0, 50.0), "thumb_cmc_abd": (-20.0, 40.0),
    "thumb_mcp_flex": (-10.0, 60.0), "thumb_ip_flex": (-15.0, 80.0),
    "mcp_flex": (0.0, 90.0), "mcp_abd": (-20.0, 20.0), "pip_flex": (0.0, 110.0), "dip_flex": (0.0, 80.0),
    "wrist_flex": (-60.0, 60.0), "wrist_dev": (-20.0, 30.0),
}
# (22, 2) lower/upper limits in radians, ARTICULATION_NAMES order.
JOINT_LIMITS = np.deg2rad(
    np.array([_LIMITS_DEG.get(n, _LIMITS_DEG.get(n.split("_", 1)[1])) for n in ARTICULATION_NAMES])
)
_A = {n: i for i, n in enumerate(ARTICULATION_NAMES)}

# Finger bases as fractions of (palm width, palm length) and their rest splay (degrees, + = radial).
_MCP_FRAC = np.array([[0.37, 0.96], [0.12, 1.0], [-0.13, 0.95], [-0.37, 0.86]])
_SPLAY_DEG = np.array([4.0, 0.0, -5.0, -10.0])
_PALM_CENTRE_FRAC = 0.65


@dataclass(frozen=True)
class HandShape:
    """Bone lengths and radii of one person's right hand, in metres, all multiplied by `scale`."""

    scale: float = 1.0
    palm_length_m: float = 0.115  # wrist centre to the middle finger's MCP
    palm_width_m: float = 0.080  # index MCP to pinky MCP, roughly
    palm_radius_m: float = 0.013  # half the palm's thickness
    wrist_width_m: float = 0.035  # between the two NYU wrist points
    # Per finger (thumb, index, middle, ring, pinky): three bones from the base. The thumb's are
    # metacarpal, proximal, distal; the others' proximal, middle, distal (to the tip).
    bone_lengths_m: tuple[tuple[float, float, float], ...] = (
        (0.046, 0.034, 0.028), (0.043, 0.025, 0.022), (0.047, 0.029, 0.023),
        (0.044, 0.028, 0.022), (0.035, 0.020, 0.020),
    )
    bone_radii_m: tuple[tuple[float, float, float], ...] = (
        (0.0135, 0.0105, 0.0095), (0.0095, 0.0085, 0.0078), (0.0097, 0.0087, 0.0080),
        (0.0090, 0.0082, 0.0075), (0.0082, 0.0075, 0.0070),
    )
    forearm_radius_m: float = 0.019  # wrist about 59 x 38 mm (two capsules side by side)
    forearm_length_m: float = 0.25

    @classmethod
    def nominal(cls) -> HandShape:
        """The hand the synthetic domain is rendered with."""
        return cls()

    @classmethod
    def sample(cls, rng: np.random.Generator, spread: float = 1.0) -> HandShape:
        """Draw another person's hand: overall scale ~8%, each bone ~5%, radii ~7% (times `spread`)."""
        n = cls()

        def jitter(value: float, sd: float) -> float:
            return float(value * np.clip(1.0 + spread * sd * rng.standard_normal(), 0.7, 1.3))

        return cls(
            scale=float(np.clip(1.0 + spread * 0.08 * rng.standard_normal(), 0.8, 1.2)),
            palm_length_m=jitter(n.palm_length_m, 0.05),
            palm_width_m=jitter(n.palm_width_m, 0.05),
            palm_radius_m=jitter(n.palm_radius_m, 0.07),
            wrist_width_m=jitter(n.wrist_width_m, 0.05),
            bone_lengths_m=tuple(tuple(jitter(v, 0.05) for v in f) for f in n.bone_lengths_m),
            bone_radii_m=tuple(tuple(jitter(v, 0.07) for v in f) for f in n.bone_radii_m),
            forearm_radius_m=jitter(n.forearm_radius_m, 0.07),
            forearm_length_m=n.forearm_length_m,
        )

    def bone_lengths(self) -> np.ndarray:
        """(5, 3) scaled bone lengths in metres, FINGERS order."""
        return self.scale * np.asarray(self.bone_lengths_m, dtype=np.float64)

    def palm_centre(self) -> np.ndarray:
        """(3,) palm centre in the hand frame, metres (the palm is rigid, so it needs no pose)."""
        return np.array([0.0, _PALM_CENTRE_FRAC * self.scale * self.palm_length_m, 0.0])


@dataclass
class HandPose:
    """B hand poses: articulation (B, 22) radians in ARTICULATION_NAMES order, R_h2c (B, 3, 3), t_h2c (B, 3) m."""

    articulation: np.ndarray
    R_h2c: np.ndarray
    t_h2c: np.ndarray

    def __len__(self) -> int:
        return len(self.articulation)

    def __getitem__(self, index: int | slice | np.ndarray) -> HandPose:
        idx = np.atleast_1d(np.arange(len(self))[index])
        return HandPose(self.articulation[idx], self.R_h2c[idx], self.t_h2c[idx])

    def rotated_about_ray(self, centre_xyz: np.ndarray, angle_rad: np.ndarray) -> HandPose:
        """Rotate each pose about the camera ray through centre_xyz (B, 3) by angle_rad (B,): in-plane rotation."""
        c = np.asarray(centre_xyz, dtype=np.float64).reshape(-1, 3)
        axis = c / np.linalg.norm(c, axis=1, keepdims=True)
        Q = _axis_angle(axis, np.asarray(angle_rad, dtype=np.float64).reshape(-1))
        R = Q @ self.R_h2c
        t = np.einsum("bij,bj->bi", Q, self.t_h2c - c) + c
        return HandPose(self.articulation.copy(), R, t)


@dataclass
class HandGeometry:
    """Posed hands in the camera frame: joints (B, J, 3), capsules a/b (B, P, 3), radius (B, P), part (P,)."""

    joints: np.ndarray
    cap_a: np.ndarray
    cap_b: np.ndarray
    radius: np.ndarray
    part: np.ndarray

    @property
    def nyu_joints(self) -> np.ndarray:
        """(B, 14, 3) the NYU evaluation joints in featmap_ros.datasets.nyu.JOINT_NAMES order."""
        return self.joints[:, NYU_FROM_HAND]


# --------------------------------------------------------------------------------------------
# Kinematics


def _rot_x(t: np.ndarray) -> np.ndarray:
    c, s = np.cos(t), np.sin(t)
    o, z = np.ones_like(t), np.zeros_like(t)
    return np.stack([o, z, z, z, c, -s, z, s, c], axis=-1).reshape(*t.shape, 3, 3)


def _rot_y(t: np.ndarray) -> np.ndarray:
    c, s = np.cos(t), np.sin(t)
    o, z = np.ones_like(t), np.zeros_like(t)
    return np.stack([c, z, s, z, o, z, -s, z, c], axis=-1).reshape(*t.shape, 3, 3)


def _rot_z(t: np.ndarray) -> np.ndarray:
    c, s = np.cos(t), np.sin(t)
    o, z = np.ones_like(t), np.zeros_like(t)
    return np.stack([c, -s, z, s, c, z, z, z, o], axis=-1).reshape(*t.shape, 3, 3)


def _axis_angle(axis: np.ndarray, angle: np.ndarray) -> np.ndarray:
    """(B, 3) unit axes and (B,) angles -> (B, 3, 3) rotations (Rodrigues)."""
    k = np.zeros((len(axis), 3, 3))
    k[:, 0, 1], k[:, 0, 2], k[:, 1, 2] = -axis[:, 2], axis[:, 1], -axis[:, 0]
    k = k - k.transpose(0, 2, 1)
    s, c = np.sin(angle)[:, None, None], np.cos(angle)[:, None, None]
    return np.eye(3) + s * k + (1.0 - c) * (k @ k)


# The thumb's rest frame: swung 35 deg radially, tilted 20 deg palmar, pronated 60 deg so that its
# flexion (+z of its frame) curls toward the pinky across the palm (opposition).
_THUMB_REST = _rot_z(np.deg2rad(-35.0)) @ _rot_x(np.deg2rad(20.0)) @ _rot_y(np.deg2rad(-60.0))
_Y = np.array([0.0, 1.0, 0.0])


def _as_shapes(shapes: HandShape | Sequence[HandShape], n: int) -> list[HandShape]:
    if isinstance(shapes, HandShape):
        return [shapes] * n
    shapes = list(shapes)
    if len(shapes) != n:
        raise HandModelError(f"got {len(shapes)} hand shapes for {n} poses")
    return shapes


def forward_kinematics(shapes: HandShape | Sequence[HandShape], pose: HandPose) -> HandGeometry:
    """Pose B hands: named joints (HAND_JOINTS order) and capsules, in the camera frame, metres."""
    q = np.asarray(pose.articulation, dtype=np.float64)
    if q.ndim != 2 or q.shape[1] != len(ARTICULATION_NAMES):
        raise HandModelError(f"articulation must be (B, {len(ARTICULATION_NAMES)}), got {q.shape}")
    B = len(q)
    sh = _as_shapes(shapes, B)
    scale = np.array([s.scale for s in sh])[:, None]
    L = np.array([s.bone_lengths() for s in sh])  # (B, 5, 3)
    rad = scale[:, :, None] * np.array([s.bone_radii_m for s in sh])  # (B, 5, 3)
    palm_l = scale[:, 0] * np.array([s.palm_length_m for s in sh])
    palm_w = scale[:, 0] * np.array([s.palm_width_m for s in sh])
    palm_r = scale[:, 0] * np.array([s.palm_radius_m for s in sh])
    wrist_w = scale[:, 0] * np.array([s.wrist_width_m for s in sh])
    fore_r = scale[:, 0] * np.array([s.forearm_radius_m for s in sh])
    fore_l = scale[:, 0] * np.array([s.forearm_length_m for s in sh])
    zeros = np.zeros(B)

    def pt(x: np.ndarray, y: np.ndarray, z: np.ndarray | float = 0.0) -> np.ndarray:
        return np.stack(np.broadcast_arrays(x, y, z + zeros), axis=-1)

    J: dict[str, np.ndarray] = {"wrist": np.zeros((B, 3))}
    caps: list[tuple[np.ndarray, np.ndarray, np.ndarray, int]] = []  # (a, b, radius, part)
    J["palm"] = pt(zeros, _PALM_CENTRE_FRAC * palm_l)

    # Wrist and forearm: the hand bends relative to the forearm, i.e. the forearm swings the other way.
    R_w = _rot_x(-q[:, _A["wrist_flex"]]) @ _rot_z(q[:, _A["wrist_dev"]])
    J["wrist_1"] = np.einsum("bij,bj->bi", R_w, pt(-wrist_w / 2, zeros))
    J["wrist_2"] = np.einsum("bij,bj->bi", R_w, pt(wrist_w / 2, zeros))
    # Split along its length so each piece's screen bounding box stays tight (render speed).
    n_fore = 4
    for side in (-1.0, 1.0):
        x = side * 0.55 * fore_r
        for k in range(n_fore):
            y0 = 0.015 * scale[:, 0] - fore_l * k / n_fore
            y1 = 0.015 * scale[:, 0] - fore_l * (k + 1) / n_fore
            a = np.einsum("bij,bj->bi", R_w, pt(x, y0))
            b = np.einsum("bij,bj->bi", R_w, pt(x, y1))
            caps.append((a, b, fore_r, PART_NAMES.index("forearm")))

    # Palm: one capsule per metacarpal from the carpus to each finger's MCP, and one across the carpus.
    caps.append((pt(-0.3 * palm_w, 0.12 * palm_l), pt(0.3 * palm_w, 0.12 * palm_l), 1.15 * palm_r, 1))
    for i, f in enumerate(FINGERS[1:]):
        mcp = pt(_MCP_FRAC[i, 0] * palm_w, _MCP_FRAC[i, 1] * palm_l)
        carpal = pt(0.45 * _MCP_FRAC[i, 0] * palm_w, 0.15 * palm_l)
        caps.append((carpal, mcp, palm_r * (1.0 - 0.04 * i), 1))
        a = q[:, _A[f"{f}_mcp_flex"]], q[:, _A[f"{f}_mcp_abd"]], q[:, _A[f"{f}_pip_flex"]], q[:, _A[f"{f}_dip_flex"]]
        R = _rot_z(-np.deg2rad(_SPLAY_DEG[i]) - a[1]) @ _rot_x(a[0])
        names = (f"{f}_mcp", f"{f}_pip", f"{f}_dip", f"{f}_tip")
        J[names[0]] = mcp
        for k, bend in enumerate((None, a[2], a[3])):
            if bend is not None:
                R = R @ _rot_x(bend)
            J[names[k + 1]] = J[names[k]] + L[:, i + 1, k, None] * (R @ _Y)
            caps.append((J[names[k]], J[names[k + 1]], rad[:, i + 1, k], 2 + i + 1))

    # Thumb: CMC (two axes), MCP, IP.
    J["thumb_cmc"] = pt(0.26 * palm_w, 0.16 * palm_l, 0.6 * palm_r)
    R = _THUMB_REST @ _rot_z(-q[:, _A["thumb_cmc_abd"]]) @ _rot_x(q[:, _A["thumb_cmc_flex"]])
    names = ("thumb_cmc", "thumb_mcp", "thumb_ip", "thumb_tip")
    for k, bend in enumerate((None, q[:, _A["thumb_mcp_flex"]], q[:, _A["thumb_ip_flex"]])):
        if bend is not None:
            R = R @ _rot_x(bend)
        J[names[k + 1]] = J[names[k]] + L[:, 0, k, None] * (R @ _Y)
        caps.append((J[names[k]], J[names[k + 1]], rad[:, 0, k], 2))

    # To the camera frame.
    Rc, tc = np.asarray(pose.R_h2c, dtype=np.float64), np.asarray(pose.t_h2c, dtype=np.float64)

    def to_cam(p: np.ndarray) -> np.ndarray:
        return np.einsum("bij,b...j->b...i", Rc, p) + tc.reshape(B, *([1] * (p.ndim - 2)), 3)

    joints = to_cam(np.stack([J[n] for n in HAND_JOINTS], axis=1))
    cap_a = to_cam(np.stack([c[0] for c in caps], axis=1))
    cap_b = to_cam(np.stack([c[1] for c in caps], axis=1))
    radius = np.stack([np.broadcast_to(c[2], (B,)) for c in caps], axis=1)
    part = np.array([c[3] for c in caps], dtype=np.int64)
    return HandGeometry(joints=joints, cap_a=cap_a, cap_b=cap_b, radius=radius, part=part)


# --------------------------------------------------------------------------------------------
# Pose sampling


@dataclass(frozen=True)
class PoseSamplerConfig:
    """Ranges of sampled hand poses; angles in degrees, distances in metres, image positions as fractions."""

    distance_m: tuple[float, float] = (0.5, 1.0)  # palm centre depth
    u_frac: tuple[float, float] = (0.3, 0.7)  # palm centre column, fraction of the image width
    v_frac: tuple[float, float] = (0.3, 0.7)  # palm centre row, fraction of the image height
    roll_sd_deg: float = 30.0  # in-plane rotation about the optical axis (fingers up at 0)
    roll_max_deg: float = 75.0
    yaw_deg: tuple[float, float] = (-70.0, 70.0)  # turning the palm left/right (0 = palm to the camera)
    # + tips the fingers toward the camera and the forearm away from it, toward the body (NYU: about +15)
    pitch_deg: tuple[float, float] = (-20.0, 50.0)
    p_independent_finger: float = 0.25  # chance that a finger ignores the shared grasp level
    wrist_sd_deg: tuple[float, float] = (20.0, 10.0)  # flexion, deviation


def sample_articulation(
    rng: np.random.Generator, n: int, config: PoseSamplerConfig = PoseSamplerConfig()
) -> np.ndarray:
    """Draw (n, 22) plausible articulations, radians: finger curls share a grasp level, limits hold."""
    lo, hi = JOINT_LIMITS[:, 0], JOINT_LIMITS[:, 1]
    q = np.zeros((n, len(ARTICULATION_NAMES)))
    # Shared grasp level: a third open hands, a sixth fists, the rest anywhere between.
    mode = rng.random(n)
    grasp = np.where(mode < 0.33, rng.uniform(0.0, 0.15, n), np.where(mode < 0.5, rng.uniform(0.8, 1.0, n),
                                                                           rng.uniform(0.0, 1.0, n)))
    spread = rng.uniform(-0.3, 1.0, n)  # fingers together .. fanned out
    abd_dir = np.deg2rad(np.array([12.0, 2.0, -8.0, -16.0]))
    for i, f in enumerate(FINGERS[1:]):
        own = rng.random(n) < config.p_independent_finger
        curl = np.clip(np.where(own, rng.random(n), grasp + 0.12 * rng.standard_normal(n)), 0.0, 1.0)
        for name, frac_sd in (("mcp_flex", 0.15), ("pip_flex", 0.1)):
            j = _A[f"{f}_{name}"]
            q[:, j] = lo[j] + (hi[j] - lo[j]) * np.clip(curl + frac_sd * rng.standard_normal(n), 0.0, 1.0)
        # The DIP follows the PIP (tendon coupling, about two thirds).
        q[:, _A[f"{f}_dip_flex"]] = 0.67 * q[:, _A[f"{f}_pip_flex"]] + np.deg2rad(8.0) * rng.standard_normal(n)
        q[:, _A[f"{f}_mcp_abd"]] = (abd_dir[i] * spread * (1.0 - curl) + np.deg2rad(4.0) * rng.standard_normal(n))
    t_curl = np.clip(grasp + 0.3 * rng.standard_normal(n), 0.0, 1.0)
    for name, w in (("cmc_flex", 0.8), ("mcp_flex", 0.7), ("ip_flex", 0.6)):
        j = _A[f"thumb_{name}"]
        q[:, j] = lo[j] + (hi[j] - lo[j]) * np.clip(w * t_curl + 0.15 * rng.standard_normal(n) + 0.15, 0.0, 1.0)
    q[:, _A["thumb_cmc_abd"]] = rng.uniform(lo[_A["thumb_cmc_abd"]], hi[_A["thumb_cmc_abd"]], n)
    q[:, _A["wrist_flex"]] = np.deg2rad(config.wrist_sd_deg[0]) * rng.standard_normal(n)
    q[:, _A["wrist_dev"]] = np.deg2rad(config.wrist_sd_deg[1]) * rng.standard_normal(n)
    return np.clip(q, lo, hi)


def sample_poses(
    rng: np.random.Generator,
    n: int,
    shape: HandShape = HandShape(),
    intrinsics: Intrinsics = NYU_INTRINSICS,
    config: PoseSamplerConfig = PoseSamplerConfig(),
) -> HandPose:
    """Draw n hand poses facing the camera roughly like NYU, palm centre at 0.5-1.0 m inside the image."""
    q = sample_articulation(rng, n, config)
    # At rest the palm faces the camera with the fingers up: hand x -> camera x, y -> -y, z -> -z.
    R0 = np.diag([1.0, -1.0, -1.0])
    roll = np.deg2rad(np.clip(config.roll_sd_deg * rng.standard_normal(n), -config.roll_max_deg, config.roll_max_deg))
    yaw = np.deg2rad(rng.uniform(*config.yaw_deg, n))
    pitch = np.deg2rad(rng.uniform(*config.pitch_deg, n))
    # About camera x, the fingers (camera -y) tip toward the camera (-z) for pitch > 0.
    R = _rot_z(roll) @ _rot_y(yaw) @ _rot_x(pitch) @ R0
    z = rng.uniform(*config.distance_m, n)
    u = rng.uniform(*config.u_frac, n) * intrinsics.width
    v = rng.uniform(*config.v_frac, n) * intrinsics.height
    palm_cam = np.stack([(u - intrinsics.cx) * z / intrinsics.fx, (v - intrinsics.cy) * z / intrinsics.fy, z], axis=1)
    t = palm_cam - R @ shape.palm_centre()
    return HandPose(articulation=q, R_h2c=R, t_h2c=t)


# --------------------------------------------------------------------------------------------
# Rendering


@dataclass
class HandRender:
    """Rendered frames: depth (B, H, W) float32 metres NaN background, labels (B, H, W) uint8 PART_NAMES or None."""

    depth: np.ndarray
    labels: np.ndarray | None
    geometry: HandGeometry = field(repr=False)


def check_capsules(cap_a: np.ndarray | torch.Tensor, cap_b: np.ndarray | torch.Tensor,
                   radius: np.ndarray | torch.Tensor) -> None:
    """Raise HandModelError unless the ends are (B, P, 3) each and the radii (B, P)."""
    if cap_a.shape != cap_b.shape or cap_a.ndim != 3 or cap_a.shape[2] != 3 or radius.shape != cap_a.shape[:2]:
        raise HandModelError(f"capsules must be (B, P, 3) x2 and (B, P); got {tuple(cap_a.shape)}, "
                             f"{tuple(cap_b.shape)}, {tuple(radius.shape)}")


def capsule_screen_boxes(
    a: torch.Tensor, b: torch.Tensor, r: torch.Tensor, K: np.ndarray, width: int, height: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pixel boxes that hold each capsule's image: (N, 3) ends a, b and (N,) radii -> u0, v0, w, h (N,) int64.

    Capsules reaching behind the camera (z - r <= 1 mm) get an empty box (w = h = 0); boxes are clipped
    to the image.
    """
    fx, fy, cx, cy = float(K[0][0]), float(K[1][1]), float(K[0][2]), float(K[1][2])
    # x/z over the corners of each end sphere's box is exact for the sphere's extremes because x/z
    # is monotone in x and in z (for z > 0).
    ends = torch.stack([a, b], dim=1)  # (N, 2, 3)
    rr = r[:, None]
    zs = torch.stack([ends[..., 2] - rr, ends[..., 2] + rr], dim=-1).clamp_min(1e-3)  # (N, 2, 2)
    xs = torch.stack([ends[..., 0] - rr, ends[..., 0] + rr], dim=-1)
    ys = torch.stack([ends[..., 1] - rr, ends[..., 1] + rr], dim=-1)
    ux = (xs[..., :, None] / zs[..., None, :]).flatten(1)
    vy = (ys[..., :, None] / zs[..., None, :]).flatten(1)
    u0 = torch.floor(fx * ux.amin(1) + cx).clamp(0, width - 1).long()
    u1 = torch.ceil(fx * ux.amax(1) + cx).clamp(-1, width - 1).long()
    v0 = torch.floor(fy * vy.amin(1) + cy).clamp(0, height - 1).long()
    v1 = torch.ceil(fy * vy.amax(1) + cy).clamp(-1, height - 1).long()
    in_front = (ends[..., 2].amin(1) - r) > 1e-3
    w = torch.where(in_front, (u1 - u0 + 1).clamp_min(0), torch.zeros_like(u0))
    h = torch.where(in_front, (v1 - v0 + 1).clamp_min(0), torch.zeros_like(v0))
    return u0, v0, w, h


def render_capsules(
    cap_a: torch.Tensor,
    cap_b: torch.Tensor,
    radius: torch.Tensor,
    K: np.ndarray,
    width: int,
    height: int,
    *,
    part: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Ray-cast B scenes of P capsules (camera frame, metres) into depth images.

    Args:
        cap_a, cap_b: (B, P, 3) segment end points; radius: (B, P); all on one device, float32.
        K: (3, 3) pinhole camera matrix; width, height: image size in pixels.
        part: (P,) integer label of each capsule (>= 1) for a label image, or None.

    Returns:
        depth (B, H, W) float32, z in metres, NaN where no capsule is hit; labels (B, H, W) uint8
        (0 = background) or None.
    """
    check_capsules(cap_a, cap_b, radius)
    dev, B, P = cap_a.device, cap_a.shape[0], cap_a.shape[1]
    fx, fy, cx, cy = float(K[0][0]), float(K[1][1]), float(K[0][2]), float(K[1][2])
    a, b, r = cap_a.reshape(-1, 3), cap_b.reshape(-1, 3), radius.reshape(-1)

    u0, v0, w, h = capsule_screen_boxes(a, b, r, K, width, height)
    counts = w * h

    # One (capsule, pixel) pair per pixel of each box, built without a Python loop.
    prim = torch.repeat_interleave(torch.arange(B * P, device=dev), counts)
    # Background stays NaN: only hits are scattered (include_self=False), so no pass over whole frames.
    depth = torch.full((B * height * width,), float("nan"), device=dev, dtype=torch.float32)
    labels = None if part is None else torch.zeros(B * height * width, dtype=torch.uint8, device=dev)
    if prim.numel() > 0:
        start = torch.cumsum(counts, 0) - counts
        local = torch.arange(prim.numel(), device=dev) - start[prim]
        wp = w[prim]
        row = torch.div(local, wp, rounding_mode="floor")
        u = u0[prim] + (local - row * wp)
        v = v0[prim] + row
        rx = (u.to(torch.float32) - cx) / fx
        ry = (v.to(torch.float32) - cy) / fy

        # Ray o = 0, direction d = (rx, ry, 1): the hit parameter t is the depth z itself.
        # Per-capsule terms are gathered once per pair, as one (pairs, 13) table.
        ba = b - a
        oa = -a
        baba = (ba * ba).sum(1)
        baoa = (ba * oa).sum(1)
        r2 = r * r
        per_cap = torch.cat([ba, oa, -b, torch.stack([baba, baoa, (oa * oa).sum(1) - r2, r2], 1)], 1)
        ba0, ba1, ba2, oa0, oa1, oa2, nb0, nb1, nb2, baba_p, baoa_p, oaoa_r2, r2_p = per_cap[prim].unbind(1)
        dd = rx * rx + ry * ry + 1.0
        bard = ba0 * rx + ba1 * ry + ba2
        rdoa = oa0 * rx + oa1 * ry + oa2
        qa = baba_p * dd - bard * bard
        qb = baba_p * rdoa - baoa_p * bard
        qc = baba_p * oaoa_r2 - baoa_p * baoa_p  # (|oa|^2 - r^2) |ba|^2 - (ba.oa)^2
        disc = qb * qb - qa * qc
        t_cyl = (-qb - torch.sqrt(disc.clamp_min(0.0))) / qa.clamp_min(1e-12)
        y = baoa_p + t_cyl * bard
        hit_cyl = (disc >= 0.0) & (qa > 1e-12) & (y > 0.0) & (y < baba_p)
        # Otherwise the hit, if any, is on the end sphere on the side the cylinder hit lay.
        at_a = y <= 0.0
        oc0, oc1, oc2 = torch.where(at_a, oa0, nb0), torch.where(at_a, oa1, nb1), torch.where(at_a, oa2, nb2)
        sb = oc0 * rx + oc1 * ry + oc2
        sc = oc0 * oc0 + oc1 * oc1 + oc2 * oc2 - r2_p
        sdisc = sb * sb - dd * sc
        t_cap = (-sb - torch.sqrt(sdisc.clamp_min(0.0))) / dd
        t = torch.where(hit_cyl, t_cyl, t_cap)
        hit = hit_cyl | (sdisc >= 0.0)
        prim, t = prim[hit], t[hit]
        pix = torch.div(prim, P, rounding_mode="floor") * (height * width) + v[hit] * width + u[hit]
        depth.scatter_reduce_(0, pix, t, reduce="amin", include_self=False)
        if labels is not None:
            won = t == depth[pix]
            labels[pix[won]] = part.to(dev, torch.uint8)[prim[won] % P]
    depth = depth.reshape(B, height, width)
    return depth, (labels.reshape(B, height, width) if labels is not None else None)


@functools.cache
def pin_malloc_mmap_threshold(threshold: int = 128 * 1024) -> bool:
    """featmap_ros.heap.pin_mmap_threshold (kept here for callers of earlier versions)."""
    return pin_mmap_threshold(threshold)


RENDER_BACKENDS = ("auto", "gl", "torch")


class HandRenderer:
    """Render posed capsule hands to depth images for one camera: OpenGL (EGL) or torch (CPU or CUDA).

    Both backends cast the same analytic rays and agree to rounding (tested). backend "auto" takes
    torch on a CUDA device (batched on the GPU, no copies) and OpenGL otherwise when this process
    can open an EGL context (3-4x faster than torch on a CPU); a DataLoader worker forked from a
    process that already uses OpenGL cannot, and gets torch.
    """

    def __init__(
        self, intrinsics: Intrinsics = NYU_INTRINSICS, device: str | torch.device = "cpu", cpu_threads: int = 1,
        backend: str = "auto",
    ) -> None:
        if backend not in RENDER_BACKENDS:
            raise HandModelError(f"backend must be one of {RENDER_BACKENDS}, got {backend!r}")
        self.intrinsics = intrinsics
        self.device = torch.device(device)
        # The ray casts are many small element-wise ops: on a shared CPU, torch's thread pool waits
        # on busy cores and runs 10-100x slower than one thread, so the CPU path uses one by default.
        self.cpu_threads = int(cpu_threads)
        if backend == "gl" and self.device.type != "cpu":
            raise HandModelError(f"the OpenGL backend returns numpy frames; use backend='torch' on {self.device}")
        self.backend = backend
        self._gl: GLCapsuleRenderer | None = None
        self._gl_pid = -1

    def _gl_renderer(self) -> GLCapsuleRenderer | None:
        """The OpenGL caster, made on first use; None where backend 'auto' cannot use OpenGL here."""
        if self.backend == "torch" or self.device.type != "cpu":
            return None
        if self._gl is not None and self._gl_pid != os.getpid():
            self._gl = None  # inherited through fork: the parent's context must not be touched here
        if self._gl is None:
            from featmap_ros.render.capsules_gl import GLCapsuleRenderer
            from featmap_ros.render.gl import RenderError

            try:
                self._gl, self._gl_pid = GLCapsuleRenderer(), os.getpid()
            except RenderError as err:
                if self.backend == "gl":
                    raise
                log.info("hand rendering falls back to the torch caster: %s", err)
                self.backend = "torch"  # auto: no EGL in this process (or a forked GL parent)
                return None
        return self._gl

    def resolved_backend(self) -> str:
        """The backend this renderer draws with in this process: 'gl' or 'torch' (resolves 'auto')."""
        return "gl" if self._gl_renderer() is not None else "torch"

    def __getstate__(self) -> dict:
        # A GL context belongs to its process: a pickled renderer (a spawned worker) opens its own.
        return {**self.__dict__, "_gl": None}

    def render(
        self, shapes: HandShape | Sequence[HandShape], pose: HandPose, *, labels: bool = False
    ) -> HandRender:
        """Render B poses: depth (B, H, W) float32 metres with NaN background, optional part labels."""
        geo = forward_kinematics(shapes, pose)
        K, width, height = self.intrinsics.K, self.intrinsics.width, self.intrinsics.height
        gl = self._gl_renderer()
        if gl is not None:
            depth, lab = gl.render(geo.cap_a, geo.cap_b, geo.radius, K, width, height,
                                   part=geo.part if labels else None)
            return HandRender(depth=depth, labels=lab, geometry=geo)
        kw = {"device": self.device, "dtype": torch.float32}
        threads = torch.get_num_threads()
        if self.device.type == "cpu":
            torch.set_num_threads(self.cpu_threads)
        try:
            depth_t, lab_t = render_capsules(
                torch.as_tensor(geo.cap_a, **kw), torch.as_tensor(geo.cap_b, **kw),
                torch.as_tensor(geo.radius, **kw), K, width, height,
                part=torch.as_tensor(geo.part, device=self.device) if labels else None,
            )
        finally:
            torch.set_num_threads(threads)
        return HandRender(
            depth=depth_t.cpu().numpy(), labels=None if lab_t is None else lab_t.cpu().numpy(), geometry=geo
        )


def capsule_distance(points: np.ndarray, geometry: HandGeometry) -> np.ndarray:
    """(B, N) signed distance of (B, N, 3) camera-frame points to the hand surface, metres (< 0 inside)."""
    p = np.asarray(points, dtype=np.float64)[:, :, None, :]  # (B, N, 1, 3)
    a, b = geometry.cap_a[:, None], geometry.cap_b[:, None]  # (B, 1, P, 3)
    ab = b - a
    s = np.clip(((p - a) * ab).sum(-1) / np.maximum((ab * ab).sum(-1), 1e-12), 0.0, 1.0)
    d = np.linalg.norm(p - (a + s[..., None] * ab), axis=-1) - geometry.radius[:, None, :]
    return d.min(axis=-1)

