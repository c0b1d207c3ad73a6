"""Rendering sensor-domain hand frames into a cached set (what every hands training does first), fresh process.

Prints ms per frame for each block of frames and the peak RSS, with the heap settings rendering
runs under (featmap_ros.heap.pin_mmap_threshold, which SensorHandSet applies), or with glibc's
M_TOP_PAD set back to 0 (--top-pad 0: the settings before session 11) to compare. Run each
setting in its own process, alone on the CPU.

Usage: python3 bench/bench_hand_pairs.py [--frames 1000] [--block 200] [--top-pad BYTES]
"""

import argparse
import resource
import time

import numpy as np

from featmap_ros import heap
from featmap_ros.datasets.hand_streams import HandStreamConfig, SensorHandSet
from featmap_ros.render.hand import HandShape
from featmap_ros.render.sensor import SensorConfig

ap = argparse.ArgumentParser()
ap.add_argument("--frames", type=int, default=1000)
ap.add_argument("--block", type=int, default=200)
ap.add_argument("--top-pad", type=int, default=None, help="glibc M_TOP_PAD in bytes (default: featmap_ros.heap's)")
a = ap.parse_args()

frames = SensorHandSet(a.frames, HandShape.sample(np.random.default_rng(1)), SensorConfig.nominal(), 1,
                       HandStreamConfig(crop_px=64))  # pins the heap settings for kept samples
if a.top_pad is not None:
    heap._mallopt(heap.M_TOP_PAD, a.top_pad)
pad = heap.RENDER_TOP_PAD if a.top_pad is None else a.top_pad
rows, t = [], time.perf_counter()
for i in range(a.frames):
    frames[i]
    if (i + 1) % a.block == 0 or i + 1 == a.frames:
        n = (i % a.block) + 1
        rows.append((i + 1, (time.perf_counter() - t) / n * 1000))
        t = time.perf_counter()
print(f"M_TOP_PAD {pad} bytes, peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")
print("| frames cached | ms per frame |\n|---|---|")
for n, ms in rows:
    print(f"| {n} | {ms:.1f} |")
