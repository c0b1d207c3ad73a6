"""Print hand frames/s at 640x480: clean render (OpenGL and torch), + scene + sensor, stream sample with crop.

Each row runs for `--seconds` in one process, then in `--workers` processes at once (summed);
workers are started by forkserver, so each opens its own OpenGL context.
Usage: python3 bench/bench_hands.py [--seconds 3] [--workers 2] [--batch 16]
"""

from __future__ import annotations

import argparse
import itertools
import multiprocessing as mp
import time
from collections.abc import Callable

import numpy as np
import torch

from featmap_ros.datasets.hand_streams import HandStreamConfig, SyntheticHandStream
from featmap_ros.datasets.nyu import NYU_INTRINSICS
from featmap_ros.render import sensor
from featmap_ros.render.hand import HandRenderer, HandShape, sample_poses

K = NYU_INTRINSICS.K


def clean(batch: int, backend: str = "auto") -> Callable[[], int]:
    rng, shape, renderer = np.random.default_rng(0), HandShape.nominal(), HandRenderer(backend=backend)
    return lambda: (renderer.render(shape, sample_poses(rng, batch, shape)), batch)[1]


def with_sensor(batch: int) -> Callable[[], int]:
    rng, shape, renderer = np.random.default_rng(0), HandShape.nominal(), HandRenderer()

    def step() -> int:
        out = renderer.render(shape, sample_poses(rng, batch, shape))
        for i in range(batch):
            palm = out.geometry.nyu_joints[i, -1]
            sensor.apply(sensor.compose_scene(out.depth[i], K, rng, hand_centre_xyz=palm), K, rng)
        return batch

    return step


def stream(batch: int) -> Callable[[], int]:
    it = iter(SyntheticHandStream(0, HandStreamConfig(render_batch=batch)))
    return lambda: (list(itertools.islice(it, batch)), batch)[1]


CASES = {"clean render (OpenGL)": lambda batch: clean(batch, "gl"),
         "clean render (torch)": lambda batch: clean(batch, "torch"),
         "render + scene + sensor": with_sensor, "stream sample (render + crop)": stream}


def run(case: str, batch: int, seconds: float) -> float:
    """Frames per second of one case in this process."""
    torch.set_num_threads(1)
    step = CASES[case](batch)
    step()  # warm up
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        n += step()
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=16)
    args = ap.parse_args()
    print(f"{'case':32s} {'1 process':>12s} {f'{args.workers} processes':>14s}   (frames/s, 640x480)")
    for case in CASES:
        one = run(case, args.batch, args.seconds)
        with mp.get_context("forkserver").Pool(args.workers) as pool:
            many = sum(pool.starmap(run, [(case, args.batch, args.seconds)] * args.workers))
        print(f"{case:32s} {one:12.1f} {many:14.1f}")


if __name__ == "__main__":
    main()
