"""`featmap bag make`: replay bags from datasets: a BOP scene (rgb8 images, camera_info, 2D detections,
ground truth and the BOP image ids), a synthetic hand sequence or NYU frames (16UC1 depth + joints)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from scipy.spatial.transform import Rotation, Slerp
from tqdm import tqdm

from featmap_ros.bag.io import GT_TYPES, START_NS, TOPICS, BagError, BagTopics, BagWriter
from featmap_ros.bop_scoring import JitterConfig, detections_for_frame, gt_pose
from featmap_ros.datasets import bop, nyu
from featmap_ros.geometry import Intrinsics
from featmap_ros.render import sensor
from featmap_ros.render.hand import HandPose as HandPoseParams
from featmap_ros.render.hand import HandRenderer, HandShape, sample_poses
from featmap_ros.results import Detection2D, FrameResult, HandPose


def object_name_map(infos: dict[int, bop.ObjectInfo], names: dict[int, str] | None) -> dict[int, str]:
    """Object id -> name (the id as text where no name is known)."""
    return {i: (names or {}).get(i, str(i)) for i in infos}


def _disturb(dets: list[Detection2D], intr: Intrinsics, rng: np.random.Generator, miss_rate: float,
             false_rate: float, ids: list[int]) -> list[Detection2D]:
    """Drop some detections and add false ones (random boxes labelled with a random object)."""
    kept = [d for d in dets if rng.random() >= miss_rate]
    if rng.random() < false_rate:
        w, h = rng.uniform(30, 120, 2)
        x, y = rng.uniform(0, intr.width - w), rng.uniform(0, intr.height - h)
        kept.append(Detection2D([x, y, w, h], score=float(rng.uniform(0.3, 0.9)), obj_id=int(rng.choice(ids))))
    return kept


def make_bop_bag(root: Path, scene_id: int, out: Path, frames: str | None = None, storage: str = "mcap",
                 distro: str = "humble", detections: str = "gt", miss_rate: float = 0.0, false_rate: float = 0.0,
                 seed: int = 0, period_s: float = 0.1, names: dict[int, str] | None = None,
                 topics: BagTopics = TOPICS["objects"], split: str = "test") -> Path:
    """Write a replay bag of a BOP scene: rgb8 images, camera_info, 2D detections, ground truth, BOP ids."""
    scene = bop.BopScene(root, scene_id, split)
    infos = bop.load_models_info(Path(root) / "models" / "models_info.json")
    names = object_name_map(infos, names)
    ids = bop.select_ids(frames, scene.image_ids)
    dataset = Path(root).resolve().name
    rng = np.random.default_rng(seed)
    with BagWriter(out, storage, distro) as bw:
        f = bw.factory
        for k, im_id in enumerate(tqdm(ids, desc="bag make", unit="frame")):
            frame = scene.frame(im_id)
            t = START_NS + int(round(k * period_s * 1e9))
            rgb = bop.read_rgb(frame.rgb_path)
            dets = detections_for_frame(frame, detections, rng, JitterConfig(seed=seed))
            dets = _disturb(dets, frame.intrinsics, rng, miss_rate, false_rate, sorted(infos))
            gts = [replace(gt_pose(i, infos[i.obj_id], names[i.obj_id]), score=i.visib_fract)
                   for i in frame.instances]
            gt = FrameResult(stamp_ns=t, frame_id=topics.camera_frame, objects=gts)
            bw.write(topics.image, "sensor_msgs/msg/Image", t, f.image_rgb(rgb, t, topics.camera_frame))
            bw.write(topics.camera_info, "sensor_msgs/msg/CameraInfo", t,
                     f.camera_info(frame.intrinsics, t, topics.camera_frame))
            if topics.detections:
                bw.write(topics.detections, "vision_msgs/msg/Detection2DArray", t,
                         f.detection2d_array(dets, t, topics.camera_frame))
            bw.write(topics.ground_truth, GT_TYPES["objects"], t, f.detection3d_array(gt))
            if topics.image_id:
                bw.write_bop_image_id(topics.image_id, t, dataset, split, scene.scene_id, im_id)
            bw.write("/tf", "tf2_msgs/msg/TFMessage", t, f.tf_message(f.transforms(gt, prefix="gt/")))
    return Path(out)


def write_hand_frames(out: Path, frames: Iterator[tuple[np.ndarray, np.ndarray]], intr: Intrinsics,
                      storage: str = "mcap", distro: str = "humble", period_s: float = 1 / 30,
                      cube_m: float = 0.3, topics: BagTopics = TOPICS["hands"], total: int | None = None) -> Path:
    """Write (depth metres, joints (14, 3) metres) frames as 16UC1 images + camera_info + ground truth."""
    with BagWriter(out, storage, distro) as bw:
        f = bw.factory
        for k, (depth, joints) in enumerate(tqdm(frames, desc="bag make", unit="frame", total=total)):
            t = START_NS + int(round(k * period_s * 1e9))
            gt = HandPose(joints_xyz=joints, confidences=np.ones(len(joints)), centre=joints[nyu.PALM], cube_m=cube_m,
                          joint_names=nyu.JOINT_NAMES)
            bw.write(topics.image, "sensor_msgs/msg/Image", t, f.image_depth(depth, t, topics.camera_frame, "16UC1"))
            bw.write(topics.camera_info, "sensor_msgs/msg/CameraInfo", t, f.camera_info(intr, t, topics.camera_frame))
            bw.write(topics.ground_truth, GT_TYPES["hands"], t,
                     f.hand_joints_array(FrameResult(stamp_ns=t, frame_id=topics.camera_frame, hands=[gt])))
    return Path(out)


def hand_sequence(n_frames: int, seed: int = 0, shape: Any = None, sensor_config: Any = None,
                  keyframe_every: int = 15) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """A smoothly moving synthetic hand in the depth-sensor domain: (noisy depth, joints) per frame.

    Poses are drawn every `keyframe_every` frames and interpolated (articulation linearly, rotation
    by slerp, position linearly); the background scene stays fixed, the sensor noise does not.
    """
    rng = np.random.default_rng(seed)
    shape = shape if shape is not None else HandShape.nominal()
    sensor_config = sensor_config if sensor_config is not None else sensor.SensorConfig.test_time()
    K = nyu.NYU_INTRINSICS.K
    n_keys = max(2, int(np.ceil(n_frames / keyframe_every)) + 1)
    keys = sample_poses(rng, n_keys, shape, nyu.NYU_INTRINSICS)
    key_t = np.arange(n_keys) * keyframe_every
    slerp = Slerp(key_t, Rotation.from_matrix(keys.R_h2c))
    renderer = HandRenderer(nyu.NYU_INTRINSICS)
    scene_seed = int(rng.integers(2**31))
    for k in range(n_frames):
        i = min(k // keyframe_every, n_keys - 2)
        a = (k - key_t[i]) / keyframe_every
        pose = HandPoseParams(
            articulation=((1 - a) * keys.articulation[i] + a * keys.articulation[i + 1])[None],
            R_h2c=slerp([k]).as_matrix(),
            t_h2c=((1 - a) * keys.t_h2c[i] + a * keys.t_h2c[i + 1])[None],
        )
        out = renderer.render(shape, pose)
        joints = out.geometry.nyu_joints[0]
        scene = sensor.compose_scene(out.depth[0], K, np.random.default_rng(scene_seed),
                                     hand_centre_xyz=joints[nyu.PALM])
        yield sensor.apply(scene, K, rng, sensor_config), joints


def nyu_frames(nyu_dir: Path, split: str = "test", max_frames: int | None = None
               ) -> tuple[Iterator[tuple[np.ndarray, np.ndarray]], int]:
    """(depth, joints) of NYU-format frames: a split with joint_data.mat, or depth PNGs with *_joints_uvd.txt."""
    folder = Path(nyu_dir) / split if (Path(nyu_dir) / split).is_dir() else Path(nyu_dir)
    if (folder / "joint_data.mat").is_file():
        s = nyu.read_split(folder)
        pairs = list(zip(s.depth_paths, s.joints_xyz))
    else:
        pairs = [(p, nyu.joints_uvd_to_xyz(nyu.read_joints_uvd_txt(p.with_name(p.stem + "_joints_uvd.txt"))))
                 for p in sorted(folder.glob("depth_*.png")) if p.with_name(p.stem + "_joints_uvd.txt").is_file()]
    if not pairs:
        raise BagError(f"no NYU frames in {folder}: expected joint_data.mat or depth_*.png with *_joints_uvd.txt")
    pairs = pairs[:max_frames] if max_frames else pairs
    return ((nyu.read_depth(p), j) for p, j in pairs), len(pairs)
