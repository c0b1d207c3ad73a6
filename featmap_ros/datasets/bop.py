"""Readers for the BOP format (scene_gt, scene_camera, scene_gt_info, models_info, PLY models).

BOP stores millimetres; everything leaving this module is in metres (the only conversion point).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import transforms3d.axangles as ta
from plyfile import PlyData, PlyElementParseError, PlyHeaderParseError

from featmap_ros.errors import FeatmapError
from featmap_ros.geometry import Intrinsics, box_corners, nearest_rotation

MM = 1e-3


class BopError(FeatmapError, ValueError):
    """A BOP directory or file is missing, malformed or inconsistent."""


@dataclass(frozen=True)
class ObjectInfo:
    """One entry of models_info.json, in metres."""

    obj_id: int
    diameter: float
    min_xyz: np.ndarray
    size_xyz: np.ndarray
    symmetries: tuple[np.ndarray, ...] = ()  # discrete 4x4 model-frame transforms, translation in metres

    @property
    def symmetric(self) -> bool:
        """True when the object has discrete or continuous symmetries (score with ADD-S)."""
        return len(self.symmetries) > 0

    @property
    def corners(self) -> np.ndarray:
        """(8, 3) corners of the 3D bounding box, metres (order of geometry.box_corners)."""
        return box_corners(self.min_xyz, self.size_xyz)


@dataclass(frozen=True)
class Mesh:
    """A triangle mesh in metres: vertices (V, 3), faces (F, 3) int, optional normals and colours."""

    vertices: np.ndarray
    faces: np.ndarray
    normals: np.ndarray | None = None
    colors: np.ndarray | None = None  # (V, 3) uint8 RGB
    uv: np.ndarray | None = None  # (V, 2) texture coordinates
    texture_path: Path | None = None


@dataclass(frozen=True)
class Instance:
    """One annotated object instance of a frame. Pose is model-to-camera, t in metres.

    R is the annotation snapped to the nearest rotation (for training targets, renders and
    quaternions); R_annot is the matrix as annotated (stored to 8 digits, off orthonormal by up to
    2e-3), the one the BOP toolkit scores against: every scoring path uses R_annot.
    """

    obj_id: int
    R: np.ndarray
    t: np.ndarray
    bbox_obj: np.ndarray  # x, y, w, h pixels (the whole object, occlusion ignored)
    bbox_visib: np.ndarray  # x, y, w, h pixels of the visible part
    visib_fract: float
    R_annot: np.ndarray


@dataclass(frozen=True)
class Frame:
    """One BOP image with its camera and annotated instances."""

    scene_id: int
    im_id: int
    rgb_path: Path
    intrinsics: Intrinsics
    instances: list[Instance] = field(default_factory=list)


def _read_json(path: Path) -> dict | list:
    try:
        with open(path) as fh:
            return json.load(fh)
    except FileNotFoundError as err:
        raise BopError(f"missing BOP file {path}") from err
    except json.JSONDecodeError as err:
        raise BopError(f"{path} is not valid JSON: {err}") from err


def load_models_info(path: str | Path) -> dict[int, ObjectInfo]:
    """Read models_info.json (millimetres) into ObjectInfo records in metres."""
    raw = _read_json(Path(path))
    out: dict[int, ObjectInfo] = {}
    for key, v in raw.items():
        try:
            syms = []
            for s in v.get("symmetries_discrete", []):
                T = np.asarray(s, dtype=np.float64).reshape(4, 4).copy()
                T[:3, 3] *= MM
                syms.append(T)
            if v.get("symmetries_continuous"):
                # A continuous symmetry is represented by its 36 rotations of 10 degrees.
                for c in v["symmetries_continuous"]:
                    axis = np.asarray(c["axis"], dtype=np.float64)
                    offset = np.asarray(c["offset"], dtype=np.float64) * MM
                    for a in np.radians(np.arange(10, 360, 10)):
                        R = ta.axangle2mat(axis, a)
                        T = np.eye(4)
                        T[:3, :3] = R
                        T[:3, 3] = offset - R @ offset
                        syms.append(T)
            out[int(key)] = ObjectInfo(
                obj_id=int(key),
                diameter=float(v["diameter"]) * MM,
                min_xyz=np.array([v["min_x"], v["min_y"], v["min_z"]], dtype=np.float64) * MM,
                size_xyz=np.array([v["size_x"], v["size_y"], v["size_z"]], dtype=np.float64) * MM,
                symmetries=tuple(syms),
            )
        except (KeyError, TypeError, ValueError) as err:
            raise BopError(f"models_info entry {key!r} in {path} is malformed: {err}") from err
    return out


def load_ply(path: str | Path) -> Mesh:
    """Read a PLY mesh in millimetres (BOP models) into a Mesh in metres."""
    path = Path(path)
    try:
        ply = PlyData.read(str(path))
    except FileNotFoundError as err:
        raise BopError(f"missing model {path}") from err
    except (PlyHeaderParseError, PlyElementParseError, ValueError) as err:
        raise BopError(f"{path} is not a readable PLY file: {err}") from err
    v = ply["vertex"].data
    names = v.dtype.names
    vertices = np.stack([v["x"], v["y"], v["z"]], axis=1).astype(np.float64) * MM
    normals = np.stack([v["nx"], v["ny"], v["nz"]], axis=1).astype(np.float32) if "nx" in names else None
    colors = np.stack([v["red"], v["green"], v["blue"]], axis=1).astype(np.uint8) if "red" in names else None
    uv = None
    if "texture_u" in names:
        uv = np.stack([v["texture_u"], v["texture_v"]], axis=1).astype(np.float32)
    faces_raw = ply["face"].data["vertex_indices"]
    faces = np.asarray(np.vstack(faces_raw), dtype=np.int64)
    if faces.shape[1] != 3:
        raise BopError(f"{path} has faces with {faces.shape[1]} vertices; expected triangles")
    texture = None
    for c in ply.comments:
        if c.startswith("TextureFile"):
            texture = path.parent / c.split(maxsplit=1)[1]
    return Mesh(vertices, faces, normals, colors, uv, texture)


class BopScene:
    """One scene of a BOP split directory, e.g. lmo/test/000002.

    Args:
        root: the dataset root (holding models/ and the split folders).
        scene_id: the scene number.
        split: the split folder name, "test" by default.
    """

    def __init__(self, root: str | Path, scene_id: int, split: str = "test") -> None:
        self.root = Path(root)
        self.scene_id = int(scene_id)
        self.dir = self.root / split / f"{self.scene_id:06d}"
        if not self.dir.is_dir():
            raise BopError(f"no scene folder {self.dir}")
        self._gt = _read_json(self.dir / "scene_gt.json")
        self._cam = _read_json(self.dir / "scene_camera.json")
        info_path = self.dir / "scene_gt_info.json"
        self._info = _read_json(info_path) if info_path.exists() else {}
        cam_json = self.root / "camera.json"
        cam = _read_json(cam_json) if cam_json.exists() else {"width": 640, "height": 480}
        self.width, self.height = int(cam["width"]), int(cam["height"])

    @property
    def image_ids(self) -> list[int]:
        """Annotated image ids, ascending."""
        return sorted(int(k) for k in self._gt)

    def frame(self, im_id: int) -> Frame:
        """Read the camera and the annotated instances of one image."""
        key = str(int(im_id))
        if key not in self._gt or key not in self._cam:
            raise BopError(f"image {im_id} has no annotation in {self.dir}")
        K = np.asarray(self._cam[key]["cam_K"], dtype=np.float64).reshape(3, 3)
        infos = self._info.get(key, [])
        instances = []
        for i, g in enumerate(self._gt[key]):
            info = infos[i] if i < len(infos) else {}
            R_annot = np.asarray(g["cam_R_m2c"], dtype=np.float64).reshape(3, 3)
            instances.append(
                Instance(
                    obj_id=int(g["obj_id"]),
                    # Training targets and quaternions need a true rotation; scores use R_annot as annotated.
                    R=nearest_rotation(R_annot),
                    R_annot=R_annot,
                    t=np.asarray(g["cam_t_m2c"], dtype=np.float64).reshape(3) * MM,
                    bbox_obj=np.asarray(info.get("bbox_obj", [-1, -1, -1, -1]), dtype=np.float64),
                    bbox_visib=np.asarray(info.get("bbox_visib", [-1, -1, -1, -1]), dtype=np.float64),
                    visib_fract=float(info.get("visib_fract", 1.0)),
                )
            )
        rgb = self.dir / "rgb" / f"{int(im_id):06d}.png"
        if not rgb.exists():
            jpg = rgb.with_suffix(".jpg")
            rgb = jpg if jpg.exists() else rgb
        return Frame(self.scene_id, int(im_id), rgb, Intrinsics.from_K(K, self.width, self.height), instances)

    def frames(self, im_ids: list[int] | None = None) -> list[Frame]:
        """Frames of the given image ids (all annotated ones by default)."""
        return [self.frame(i) for i in (self.image_ids if im_ids is None else im_ids)]


def read_rgb(path: str | Path) -> np.ndarray:
    """Read an image file as HxWx3 uint8 RGB."""
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if bgr is None:
        raise BopError(f"cannot read image {path}")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def load_targets(path: str | Path) -> dict[tuple[int, int, int], int]:
    """Read a BOP targets file (e.g. test_targets_bop19.json): (scene_id, im_id, obj_id) -> inst_count."""
    raw = _read_json(Path(path))
    try:
        return {(int(t["scene_id"]), int(t["im_id"]), int(t["obj_id"])): int(t["inst_count"]) for t in raw}
    except (KeyError, TypeError, ValueError) as err:
        raise BopError(f"{path} is not a BOP targets list of {{scene_id, im_id, obj_id, inst_count}}: {err}") from err


def find_targets(root: str | Path, scene_dir: str | Path | None = None, name: str = "test_targets_bop19.json") -> Path:
    """The targets file of a dataset: in the scene folder's parent (the split) or the dataset root."""
    places = ([Path(scene_dir).parent] if scene_dir is not None else []) + [Path(root)]
    for folder in places:
        if (folder / name).is_file():
            return folder / name
    raise BopError(f"no {name} in {' or '.join(str(f) for f in places)}")


def model_path(root: str | Path, obj_id: int, eval_models: bool = False) -> Path:
    """Path of models/obj_NNNNNN.ply (or models_eval/ for metric computation)."""
    return Path(root) / ("models_eval" if eval_models else "models") / f"obj_{int(obj_id):06d}.ply"


def select_ids(spec: str | None, available: list[int]) -> list[int]:
    """Pick image ids by "lo-hi" (inclusive) or "3,8,17"; None or "all" keeps every available id."""
    if spec is None or spec.strip() in ("", "all"):
        return list(available)
    spec = spec.strip()
    try:
        if "-" in spec and "," not in spec:
            lo, hi = (int(x) for x in spec.split("-", 1))
            return [i for i in available if lo <= i <= hi]
        wanted = {int(x) for x in spec.split(",") if x}
    except ValueError as err:
        raise BopError(f"frame range {spec!r} must look like '0-300' or '3,8,17'") from err
    missing = wanted - set(available)
    if missing:
        raise BopError(f"image ids {sorted(missing)} are not annotated in this scene")
    return [i for i in available if i in wanted]
