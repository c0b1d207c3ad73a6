"""`featmap render bench`: how fast the synthetic data comes, on this machine, in this process."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np


def _rate(step, seconds: float) -> float:
    """Items per second of a callable returning its item count, after one warm-up call."""
    step()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        n += step()
    return n / (time.perf_counter() - t0)


def render_throughput(seconds: float = 3.0, lmo_root: Path | None = None, batch: int = 16) -> dict[str, float]:
    """Print and return object crops/s (128x128, RGB + depth + mask) and hand frames/s (640x480 depth)."""
    from featmap_ros.datasets.bop import load_models_info
    from featmap_ros.datasets.nyu import NYU_INTRINSICS
    from featmap_ros.datasets.streams import ObjectStreamConfig, SyntheticObjectStream, sample_pose
    from featmap_ros.geometry import CropWindow
    from featmap_ros.render import sensor
    from featmap_ros.render.hand import HandRenderer, HandShape, sample_poses

    with tempfile.TemporaryDirectory() as tmp:
        root = lmo_root
        if root is None:
            from featmap_ros.assets import write_object_models

            root = write_object_models(Path(tmp))
        infos = load_models_info(Path(root) / "models" / "models_info.json")
        ids = tuple(sorted(infos))
        cfg = ObjectStreamConfig(obj_ids=ids)
        stream = SyntheticObjectStream.from_bop(root, cfg)
        rng = np.random.default_rng(0)
        renderer = stream.renderer

        def crops() -> int:
            objs = [int(rng.choice(ids)) for _ in range(batch)]
            poses = [sample_pose(rng, cfg, infos[o]) for o in objs]
            Ks = [CropWindow(320.0, 240.0, 200.0, 128).intrinsics(np.asarray(cfg.camera_K)) for _ in objs]
            renderer.render_batch(objs, [p[0] for p in poses], [p[1] for p in poses], Ks, 128, 128)
            return batch

        results = {"object crops/s (renderer)": _rate(crops, seconds),
                   "object crops/s (full stream)": _rate(lambda: len(stream.sample_chunk(rng, batch)), seconds)}
    hands = HandRenderer(NYU_INTRINSICS)
    hands_torch = HandRenderer(NYU_INTRINSICS, backend="torch")
    shape = HandShape.nominal()
    K = NYU_INTRINSICS.K

    def hand_frames(renderer: HandRenderer = hands) -> int:
        renderer.render(shape, sample_poses(rng, batch, shape, NYU_INTRINSICS))
        return batch

    def hand_sensor() -> int:
        out = hands.render(shape, sample_poses(rng, 1, shape, NYU_INTRINSICS))
        sensor.apply(sensor.compose_scene(out.depth[0], K, rng), K, rng)
        return 1

    results[f"hand frames/s (clean, 640x480, {hands.resolved_backend()})"] = _rate(
        hand_frames, seconds)
    results["hand frames/s (clean, 640x480, torch)"] = _rate(lambda: hand_frames(hands_torch), seconds)
    results["hand frames/s (scene + sensor)"] = _rate(hand_sensor, seconds)
    print("| what | per second |\n|---|---|")
    for k, v in results.items():
        print(f"| {k} | {v:.0f} |")
    return results
