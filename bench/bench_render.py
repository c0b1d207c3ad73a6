"""Benchmark object crops/s at 128x128 (RGB + depth + mask): renderer alone and the full stream, 1 and 2 processes.

Usage: python3 bench/bench_render.py [--root ../shared/data/lmo] [--seconds 5]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from featmap_ros.datasets.streams import ObjectStreamConfig, SyntheticObjectStream, object_loader, sample_pose
from featmap_ros.geometry import CropWindow, project_model

DEFAULT_ROOT = Path(__file__).resolve().parents[2] / "shared" / "data" / "lmo"


class RendererOnly:
    """Picklable job: render batches of random LM-O poses into their 128x128 windows, count crops."""

    def __init__(self, stream: SyntheticObjectStream, batch: int = 32) -> None:
        self.stream, self.batch = stream, batch

    def batch_args(self, rng: np.random.Generator) -> tuple:
        cfg = self.stream.cfg
        K = np.asarray(cfg.camera_K)
        ids, Rs, ts, Ks = [], [], [], []
        for _ in range(self.batch):
            obj_id = cfg.obj_ids[int(rng.integers(len(cfg.obj_ids)))]
            R, t = sample_pose(rng, cfg, self.stream.infos[obj_id])
            uv = project_model(self.stream.hull[obj_id], R, t, K)
            win = CropWindow.around_box(np.r_[uv.min(0), uv.max(0) - uv.min(0)], cfg.crop, cfg.window_margin)
            ids.append(obj_id), Rs.append(R), ts.append(t), Ks.append(win.intrinsics(K))
        return ids, Rs, ts, Ks

    def run(self, seconds: float, seed: int = 0) -> float:
        rng = np.random.default_rng(seed)
        jobs = [self.batch_args(rng) for _ in range(8)]
        r, S = self.stream.renderer, self.stream.cfg.crop
        r.render_batch(*jobs[0], S, S)  # warm up: context, shaders, mesh upload
        n, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            r.render_batch(*jobs[n // self.batch % len(jobs)], S, S)
            n += self.batch
        return n / (time.perf_counter() - start)


def _renderer_worker(args: tuple) -> float:
    job, seconds, seed = args
    return job.run(seconds, seed)


def stream_rate(stream: SyntheticObjectStream, seconds: float, workers: int) -> float:
    """Crops/s drawn through a DataLoader (batch 32) over the stream, after start-up."""
    loader = object_loader(stream, batch_size=32, num_workers=workers)
    it = iter(loader)
    for _ in range(2 * max(1, workers)):
        next(it)
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        n += len(next(it)["image"])
    return n / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=DEFAULT_ROOT)
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()
    import multiprocessing as mp

    stream = SyntheticObjectStream.from_bop(args.root, ObjectStreamConfig())
    job = RendererOnly(stream)
    rows = [("renderer only", 1, job.run(args.seconds))]
    with mp.get_context("forkserver").Pool(2) as pool:
        rows.append(("renderer only", 2, sum(pool.map(_renderer_worker, [(job, args.seconds, s) for s in (1, 2)]))))
    rows.append(("full stream", 1, stream_rate(stream, args.seconds, 0)))
    rows.append(("full stream", 2, stream_rate(stream, args.seconds, 2)))
    print(f"{'what (LM-O, 8 objects, 128x128, max_faces 12000)':52s} {'processes':>9s} {'crops/s':>9s}")
    for what, procs, rate in rows:
        print(f"{what:52s} {procs:9d} {rate:9.0f}")


if __name__ == "__main__":
    main()
