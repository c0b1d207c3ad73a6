"""Cameras, projection, box corners, PnP, rotations, crop windows and metric depth cubes.

Conventions (stated once, used everywhere):
- Units are metres and radians. Millimetres exist only inside the BOP/NYU readers.
- Camera frame is OpenCV's (x right, y down, z forward), the same as a ROS optical frame.
- Poses are model-to-camera: x_cam = R @ x_model + t.
- Quaternions are (w, x, y, z) as in transforms3d; the ROS (x, y, z, w) order exists only in
  featmap_ros.ros.messages.
- Pixel coordinates are (u, v) with the centre of the top-left pixel at (0, 0).
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
import transforms3d.quaternions as tq

from featmap_ros.errors import FeatmapError


class GeometryError(FeatmapError, ValueError):
    """A geometric computation got input it cannot work with, or failed to converge."""


# --------------------------------------------------------------------------------------------
# Cameras and projection


@dataclass(frozen=True)
class Intrinsics:
    """Pinhole camera: focal lengths and principal point in pixels, image size in pixels."""

    fx: float
    fy: float
    cx: float
    cy: float
    width: int
    height: int

    @property
    def K(self) -> np.ndarray:
        """Return the 3x3 camera matrix (float64)."""
        return np.array([[self.fx, 0.0, self.cx], [0.0, self.fy, self.cy], [0.0, 0.0, 1.0]])

    @classmethod
    def from_K(cls, K: np.ndarray, width: int, height: int) -> Intrinsics:
        """Build from a 3x3 camera matrix (skew must be zero)."""
        K = np.asarray(K, dtype=np.float64).reshape(3, 3)
        if abs(K[0, 1]) > 1e-9 or not np.allclose(K[2], [0.0, 0.0, 1.0]):
            raise GeometryError(f"expected a pinhole K without skew, got {K.tolist()}")
        if K[0, 0] <= 0 or K[1, 1] <= 0:
            raise GeometryError(f"focal lengths must be positive, got fx={K[0, 0]} fy={K[1, 1]}")
        return cls(float(K[0, 0]), float(K[1, 1]), float(K[0, 2]), float(K[1, 2]), int(width), int(height))


def transform(points: np.ndarray, R: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Apply x' = R x + t to (N, 3) points."""
    return np.asarray(points) @ np.asarray(R).T + np.asarray(t).reshape(1, 3)


def project(points_cam: np.ndarray, K: np.ndarray) -> np.ndarray:
    """Project (N, 3) camera-frame points (metres, z > 0) to (N, 2) pixels."""
    p = np.asarray(points_cam, dtype=np.float64) @ np.asarray(K, dtype=np.float64).T
    return p[:, :2] / p[:, 2:3]


def project_model(points_model: np.ndarray, R: np.ndarray, t: np.ndarray, K: np.ndarray) -> np.ndarray:
    """Project (N, 3) model points under the pose (R, t) to (N, 2) pixels."""
    return project(transform(points_model, R, t), K)


def box_corners(min_xyz: np.ndarray, size_xyz: np.ndarray) -> np.ndarray:
    """Return the (8, 3) corners of an axis-aligned 3D box, in a fixed order.

    Corner i has x = max if bit 2 of i is set, y = max if bit 1, z = max if bit 0, so corners
    0-3 lie on the min-x face. BB8's 16 outputs are the projections of these in this order.
    """
    lo = np.asarray(min_xyz, dtype=np.float64)
    hi = lo + np.asarray(size_xyz, dtype=np.float64)
    bits = (np.arange(8)[:, None] >> np.array([2, 1, 0])[None, :]) & 1
    return np.where(bits == 1, hi, lo)


# The 12 edges of the box of box_corners(), as index pairs (for drawing and markers).
BOX_EDGES = np.array(
    [[0, 1], [2, 3], [4, 5], [6, 7], [0, 2], [1, 3], [4, 6], [5, 7], [0, 4], [1, 5], [2, 6], [3, 7]]
)


# --------------------------------------------------------------------------------------------
# PnP


def solve_pnp(
    points_model: np.ndarray,
    uv_px: np.ndarray,
    K: np.ndarray,
    *,
    method: str = "epnp",
    refine: bool = True,
    ransac: bool = False,
    ransac_threshold_px: float = 8.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Recover the model-to-camera pose from 2D-3D correspondences with OpenCV.

    Args:
        points_model: (N, 3) model points, metres, N >= 4.
        uv_px: (N, 2) their image projections, pixels.
        K: (3, 3) camera matrix.
        method: "epnp" or "sqpnp" for the closed-form start.
        refine: polish with Levenberg-Marquardt on the reprojection error.
        ransac: reject outlier correspondences first (threshold ransac_threshold_px).

    Returns:
        R (3, 3) and t (3,) in metres.

    Raises:
        GeometryError: too few or non-finite points, or OpenCV found no solution.
    """
    obj = np.ascontiguousarray(points_model, dtype=np.float64).reshape(-1, 3)
    img = np.ascontiguousarray(uv_px, dtype=np.float64).reshape(-1, 2)
    if len(obj) != len(img) or len(obj) < 4:
        raise GeometryError(f"PnP needs >= 4 matching points, got {len(obj)} 3D and {len(img)} 2D")
    if not (np.isfinite(obj).all() and np.isfinite(img).all()):
        raise GeometryError("PnP got non-finite coordinates")
    flags = {"epnp": cv2.SOLVEPNP_EPNP, "sqpnp": cv2.SOLVEPNP_SQPNP}
    if method not in flags:
        raise GeometryError(f"unknown PnP method {method!r}; expected one of {sorted(flags)}")
    K = np.asarray(K, dtype=np.float64)
    dist = np.zeros(4)
    if ransac:
        ok, rvec, tvec, inliers = cv2.solvePnPRansac(
            obj, img, K, dist, flags=flags[method], reprojectionError=ransac_threshold_px,
            iterationsCount=100,
        )
        if ok and inliers is not None and len(inliers) >= 4:
            obj, img = obj[inliers[:, 0]], img[inliers[:, 0]]
    else:
        ok, rvec, tvec = cv2.solvePnP(obj, img, K, dist, flags=flags[method])
    if not ok or not np.isfinite(rvec).all() or not np.isfinite(tvec).all():
        raise GeometryError("OpenCV PnP found no solution")
    if refine:
        rvec, tvec = cv2.solvePnPRefineLM(obj, img, K, dist, rvec, tvec)
    R, _ = cv2.Rodrigues(rvec)
    return R, tvec.reshape(3)


# --------------------------------------------------------------------------------------------
# Rotations (transforms3d underneath; quaternions are (w, x, y, z))


def quat_from_matrix(R: np.ndarray) -> np.ndarray:
    """Return the unit quaternion (w, x, y, z) of a rotation matrix, with w >= 0."""
    q = tq.mat2quat(np.asarray(R, dtype=np.float64))
    return q if q[0] >= 0 else -q


def matrix_from_quat(q_wxyz: np.ndarray) -> np.ndarray:
    """Return the rotation matrix of a quaternion (w, x, y, z); it need not be normalised."""
    q = np.asarray(q_wxyz, dtype=np.float64)
    n = np.linalg.norm(q)
    if not np.isfinite(n) or n < 1e-12:
        raise GeometryError(f"quaternion {q.tolist()} has no direction")
    return tq.quat2mat(q / n)


def nearest_rotation(M: np.ndarray) -> np.ndarray:
    """The rotation matrix closest to a 3x3 matrix in the Frobenius norm (SVD; det = +1)."""
    U, _, Vt = np.linalg.svd(np.asarray(M, dtype=np.float64))
    D = np.diag([1.0, 1.0, np.sign(np.linalg.det(U @ Vt))])
    return U @ D @ Vt


def rotation_angle(R_a: np.ndarray, R_b: np.ndarray) -> float:
    """Return the angle of the relative rotation R_a^T R_b, in radians in [0, pi]."""
    c = (np.trace(np.asarray(R_a).T @ np.asarray(R_b)) - 1.0) / 2.0
    return float(np.arccos(np.clip(c, -1.0, 1.0)))


# --------------------------------------------------------------------------------------------
# Square crop windows


@dataclass(frozen=True)
class CropWindow:
    """A square image window of side `size_px` centred at (cu, cv), resampled to out x out pixels.

    The window may extend past the image border; pixels outside the image are filled.
    """

    cu: float
    cv: float
    size_px: float
    out: int

    @classmethod
    def around_box(cls, box_xywh: np.ndarray, out: int, scale: float = 1.0) -> CropWindow:
        """Square window on a 2D box (x, y, w, h in pixels): side = scale * max(w, h)."""
        x, y, w, h = (float(v) for v in box_xywh)
        if not (w > 0 and h > 0 and np.isfinite([x, y, w, h]).all()):
            raise GeometryError(f"box must have positive finite size, got {[x, y, w, h]}")
        return cls(x + w / 2.0, y + h / 2.0, scale * max(w, h), int(out))

    @property
    def scale(self) -> float:
        """Crop pixels per image pixel."""
        return self.out / self.size_px

    @property
    def image_to_crop(self) -> np.ndarray:
        """2x3 affine map from image pixels to crop pixels (pixel centres map to pixel centres)."""
        s = self.scale
        u0 = self.cu - self.size_px / 2.0
        v0 = self.cv - self.size_px / 2.0
        # The window spans [u0, u0 + size] in pixel-centre coordinates; its edges go to the crop's
        # outer edges at -0.5 and out - 0.5.
        return np.array([[s, 0.0, -s * u0 - 0.5], [0.0, s, -s * v0 - 0.5]])

    @property
    def crop_to_image(self) -> np.ndarray:
        """2x3 affine map from crop pixels back to image pixels."""
        return cv2.invertAffineTransform(self.image_to_crop)

    def to_crop(self, uv_px: np.ndarray) -> np.ndarray:
        """Map (N, 2) image pixels to crop pixels."""
        A = self.image_to_crop
        return np.asarray(uv_px, dtype=np.float64) @ A[:, :2].T + A[:, 2]

    def to_image(self, uv_crop: np.ndarray) -> np.ndarray:
        """Map (N, 2) crop pixels to image pixels."""
        A = self.crop_to_image
        return np.asarray(uv_crop, dtype=np.float64) @ A[:, :2].T + A[:, 2]

    def intrinsics(self, K: np.ndarray) -> np.ndarray:
        """Camera matrix of the crop: rendering with it draws straight into the window."""
        A = self.image_to_crop
        Kc = np.asarray(K, dtype=np.float64).copy()
        Kc[0, 0] *= A[0, 0]
        Kc[1, 1] *= A[1, 1]
        Kc[0, 2] = A[0, 0] * Kc[0, 2] + A[0, 2]
        Kc[1, 2] = A[1, 1] * Kc[1, 2] + A[1, 2]
        return Kc

    def crop(self, image: np.ndarray, *, interpolation: int = cv2.INTER_LINEAR, fill: float = 0) -> np.ndarray:
        """Resample the window out of an HxW(xC) image; outside the image gets `fill`."""
        return cv2.warpAffine(
            image, self.image_to_crop, (self.out, self.out), flags=interpolation,
            borderMode=cv2.BORDER_CONSTANT, borderValue=fill,
        )


def normalise_uv(uv_crop: np.ndarray, out: int) -> np.ndarray:
    """Map crop pixels to [-1, 1] (BB8's crop-normalised targets): -1 and 1 are the crop edges."""
    return (np.asarray(uv_crop) + 0.5) / (out / 2.0) - 1.0


def denormalise_uv(uv_norm: np.ndarray, out: int) -> np.ndarray:
    """Inverse of normalise_uv."""
    return (np.asarray(uv_norm) + 1.0) * (out / 2.0) - 0.5


# --------------------------------------------------------------------------------------------
# Depth: uvd <-> xyz, hand localisation, metric cube crops (DeepPrior++)


def uvd_to_xyz(uvd: np.ndarray, K: np.ndarray) -> np.ndarray:
    """Back-project (N, 3) pixels with depth (u, v, z metres) to camera-frame (N, 3) metres."""
    uvd = np.asarray(uvd, dtype=np.float64)
    K = np.asarray(K, dtype=np.float64)
    z = uvd[:, 2]
    x = (uvd[:, 0] - K[0, 2]) * z / K[0, 0]
    y = (uvd[:, 1] - K[1, 2]) * z / K[1, 1]
    return np.stack([x, y, z], axis=1)


def xyz_to_uvd(xyz: np.ndarray, K: np.ndarray) -> np.ndarray:
    """Project (N, 3) camera-frame metres to (N, 3) pixels with depth (u, v, z metres)."""
    xyz = np.asarray(xyz, dtype=np.float64)
    return np.concatenate([project(xyz, K), xyz[:, 2:3]], axis=1)


def depth_to_points(depth_m: np.ndarray, K: np.ndarray, mask: np.ndarray | None = None,
                    origin: tuple[int, int] = (0, 0)) -> np.ndarray:
    """Back-project the valid (finite, > 0) pixels of an HxW depth image, optionally masked, in row-major order.

    origin: the image pixel (u, v) of depth_m[0, 0] when depth_m is a window of the image K belongs to.
    """
    valid = np.isfinite(depth_m) & (depth_m > 0)
    if mask is not None:
        valid &= mask
    v, u = np.nonzero(valid)
    return uvd_to_xyz(np.stack([u + origin[0], v + origin[1], depth_m[v, u]], axis=1), K)


def locate_hand(
    depth_m: np.ndarray,
    K: np.ndarray,
    *,
    cube_m: float = 0.3,
    min_pixels: int = 200,
    layer_m: float = 0.05,
    max_depth_m: float = 1.5,
    iterations: int = 10,
) -> np.ndarray:
    """Locate the closest object (the hand) and return its 3D centre of mass in metres.

    DeepPrior++: slice the depth into layers from the nearest valid depth, take the first
    connected blob of at least `min_pixels` pixels, then iterate the centre of mass of the
    points inside a cube of side `cube_m` around the current centre.

    Raises:
        GeometryError: no valid depth, or no blob large enough within max_depth_m.
    """
    depth = np.asarray(depth_m, dtype=np.float32)
    valid = np.isfinite(depth) & (depth > 0) & (depth < max_depth_m)
    if valid.sum() < min_pixels:
        raise GeometryError(f"only {int(valid.sum())} valid depth pixels under {max_depth_m} m; need {min_pixels}")
    z0 = float(depth[valid].min())
    blob, blob_box = None, (slice(None), slice(None))
    for near in np.arange(z0, max_depth_m, layer_m):
        layer = (valid & (depth >= near) & (depth < near + cube_m / 2.0)).astype(np.uint8)
        n, labels, stats, _ = cv2.connectedComponentsWithStats(layer, connectivity=8)
        if n > 1:
            best = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
            if stats[best, cv2.CC_STAT_AREA] >= min_pixels:
                # The blob's pixels within its bounding box: the same points in the same order as the
                # whole image's, without back-projecting (or scanning) the rest of the frame.
                left, top, width, height = (int(stats[best, k]) for k in (cv2.CC_STAT_LEFT, cv2.CC_STAT_TOP,
                                                                         cv2.CC_STAT_WIDTH, cv2.CC_STAT_HEIGHT))
                blob_box = (slice(top, top + height), slice(left, left + width))
                blob = labels[blob_box] == best
                break
    if blob is None:
        raise GeometryError(f"no blob of >= {min_pixels} pixels closer than {max_depth_m} m")
    centre = depth_to_points(depth[blob_box], K, blob, origin=(blob_box[1].start, blob_box[0].start)).mean(axis=0)
    # Only pixels that can fall inside the cube while the centre moves matter: a window of twice the
    # cube's projection and a depth band of one cube around the blob (not the whole image).
    reach = cube_m * max(K[0, 0], K[1, 1]) / max(float(centre[2]) - cube_m, 1e-3)
    cu, cv = project(centre[None], K)[0]
    h, w = depth.shape
    u0, u1 = int(max(0, cu - reach)), int(min(w, cu + reach + 1))
    v0, v1 = int(max(0, cv - reach)), int(min(h, cv + reach + 1))
    sub = depth[v0:v1, u0:u1]
    near_band = valid[v0:v1, u0:u1] & (np.abs(sub - centre[2]) <= cube_m)
    return cube_centre_of_mass(depth_to_points(sub, K, near_band, origin=(u0, v0)), centre, cube_m, iterations)


def cube_centre_of_mass(points: np.ndarray, centre: np.ndarray, cube_m: float, iterations: int) -> np.ndarray:
    """Move centre (3,) to the mean of the points (N, 3) inside the cube of side cube_m around it, up to
    `iterations` times or until it moves less than 0.1 mm (locate_hand's last step)."""
    for _ in range(iterations):
        inside = np.all(np.abs(points - centre) <= cube_m / 2.0, axis=1)
        if not inside.any():
            break
        new = points[inside].mean(axis=0)
        if np.linalg.norm(new - centre) < 1e-4:
            return new
        centre = new
    return centre


@dataclass(frozen=True)
class DepthCube:
    """A metric cube crop: centre (metres, camera frame), edge length, and its image window."""

    centre: np.ndarray
    cube_m: float
    image_to_crop: np.ndarray  # 2x3 affine, image pixels -> crop pixels
    out: int

    def normalise_joints(self, joints_xyz: np.ndarray) -> np.ndarray:
        """Camera-frame (J, 3) metres -> offsets from the centre divided by half the cube."""
        return (np.asarray(joints_xyz) - self.centre) / (self.cube_m / 2.0)

    def denormalise_joints(self, joints_norm: np.ndarray) -> np.ndarray:
        """Inverse of normalise_joints."""
        return np.asarray(joints_norm) * (self.cube_m / 2.0) + self.centre

    def contains(self, points_xyz: np.ndarray) -> np.ndarray:
        """(N,) bool: which camera-frame points lie inside the cube."""
        return np.all(np.abs(np.asarray(points_xyz) - self.centre) <= self.cube_m / 2.0, axis=1)


def crop_depth_cube(
    depth_m: np.ndarray, K: np.ndarray, centre_xyz: np.ndarray, *, cube_m: float = 0.3, out: int = 128
) -> tuple[np.ndarray, DepthCube]:
    """Crop a metric cube around a 3D centre and normalise its depth to [-1, 1] (DeepPrior++).

    The cube's front face (at the centre's depth) is projected to the image and resampled to
    out x out pixels with nearest-neighbour (depth must not blend across edges). Depth becomes
    (d - z_c) / (cube_m / 2), clipped to [-1, 1]; invalid pixels, pixels behind the cube and
    pixels outside the image are set to 1 (the back of the cube).

    Returns:
        The (out, out) float32 crop and the DepthCube that maps joints in and out of it.
    """
    c = np.asarray(centre_xyz, dtype=np.float64).reshape(3)
    if not np.isfinite(c).all() or c[2] <= cube_m / 2.0:
        raise GeometryError(f"cube centre {c.tolist()} must be finite and further than half the cube")
    K = np.asarray(K, dtype=np.float64)
    half = cube_m / 2.0
    u_lo, v_lo = project(np.array([[c[0] - half, c[1] - half, c[2]]]), K)[0]
    u_hi, v_hi = project(np.array([[c[0] + half, c[1] + half, c[2]]]), K)[0]
    sx, sy = out / (u_hi - u_lo), out / (v_hi - v_lo)
    A = np.array([[sx, 0.0, -sx * u_lo - 0.5], [0.0, sy, -sy * v_lo - 0.5]])
    # Only the window (and a margin for the sampler's rounding) is read, as float32, and invalid pixels
    # (NaN, <= 0) are cleaned in the crop afterwards: nearest-neighbour sampling copies source pixels,
    # so this is the crop of the whole cleaned frame without touching the frame's other pixels.
    h_img, w_img = depth_m.shape[:2]
    x0, x1 = max(int(np.floor(min(u_lo, u_hi))) - 2, 0), min(int(np.ceil(max(u_lo, u_hi))) + 3, w_img)
    y0, y1 = max(int(np.floor(min(v_lo, v_hi))) - 2, 0), min(int(np.ceil(max(v_lo, v_hi))) + 3, h_img)
    if x1 <= x0 or y1 <= y0:  # the window lies off the image: nothing in the cube
        crop = np.zeros((out, out), np.float32)
    else:
        A_roi = A.copy()
        A_roi[:, 2] += A[:, :2] @ np.array([x0, y0], dtype=np.float64)
        crop = cv2.warpAffine(np.ascontiguousarray(depth_m[y0:y1, x0:x1], dtype=np.float32), A_roi, (out, out),
                              flags=cv2.INTER_NEAREST, borderMode=cv2.BORDER_CONSTANT, borderValue=0.0)
        crop = np.where(np.isfinite(crop) & (crop > 0), crop, np.float32(0.0))
    norm = (crop - c[2]) / half
    norm[(crop <= 0) | (norm > 1.0)] = 1.0
    norm = np.clip(norm, -1.0, 1.0).astype(np.float32)
    return norm, DepthCube(centre=c, cube_m=float(cube_m), image_to_crop=A, out=int(out))
