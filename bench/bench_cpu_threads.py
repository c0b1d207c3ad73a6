"""Processing latency of the node's path with cpu_threads 1 and 2, with and without a competing CPU load.

Each setting runs in a fresh process (torch fixes its thread pool once); the load is N processes
spinning in pure Python for the duration. The 'deploy' nets of bench_latency.py (random weights),
objects with 4 detections and one hand, overlay off. What is measured is FrameProcessor.process
(decode, crops, network, PnP/joints, messages), not ROS transport.

Usage: python3 bench/bench_cpu_threads.py [--threads 1 2] [--loads 0 2] [--frames 15]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def spin(stop_at: float) -> None:
    """Burn one CPU until stop_at (time.time())."""
    x = 0
    while time.time() < stop_at:
        x += 1


def run_one(threads: int, frames: int) -> dict:
    """Child: load the deploy nets with cpu_threads=threads and time process() per case."""
    import numpy as np

    sys.path.insert(0, str(HERE))
    from tempfile import TemporaryDirectory

    from bench_latency import hand_frame, make_checkpoint, object_frame

    from featmap_ros.ros.config import NodeConfig
    from featmap_ros.ros.messages import MessageFactory
    from featmap_ros.ros.processor import FrameProcessor, load_estimator_for
    from featmap_ros.ros.typestore import typestore

    f = MessageFactory.for_rosbags(typestore("humble"))
    rng = np.random.default_rng(0)
    out = {}
    with TemporaryDirectory() as tmp:
        for task in ("objects", "hands"):
            ckpt = make_checkpoint(Path(tmp), task, "deploy")
            cfg = NodeConfig(task=task, model_path=str(ckpt), device="cpu", cpu_threads=threads,
                             use_detections=task == "objects", publish_overlay=False)
            proc = FrameProcessor(load_estimator_for(cfg), f, cfg)
            msgs = object_frame(f, 4, rng) if task == "objects" else hand_frame(f)
            times = []
            for i in range(frames + 3):
                t0 = time.perf_counter()
                proc.process(*msgs)
                if i >= 3:
                    times.append(time.perf_counter() - t0)
            out[task] = (float(np.median(times) * 1e3), float(np.percentile(times, 95) * 1e3))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--loads", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--frames", type=int, default=15)
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(run_one(args.child, args.frames)))
        return
    print(f"{os.cpu_count()} CPUs, load average before: {os.getloadavg()[0]:.2f}")
    print("| cpu_threads | competing busy processes | objects x4 median / p95 (ms) | hand median / p95 (ms) |")
    print("|---|---|---|---|")
    env = {**os.environ, "OMP_NUM_THREADS": "", "MKL_NUM_THREADS": ""}
    env = {k: v for k, v in env.items() if v != ""}
    for load in args.loads:
        for threads in args.threads:
            stop_at = time.time() + 120
            spinners = [mp.Process(target=spin, args=(stop_at,), daemon=True) for _ in range(load)]
            for p in spinners:
                p.start()
            try:
                res = subprocess.run([sys.executable, __file__, "--child", str(threads), "--frames", str(args.frames)],
                                     capture_output=True, text=True, check=True, env=env, timeout=300)
            finally:
                for p in spinners:
                    p.terminate()
            r = json.loads(res.stdout.strip().splitlines()[-1])
            print(f"| {threads} | {load} | {r['objects'][0]:.0f} / {r['objects'][1]:.0f} | "
                  f"{r['hands'][0]:.0f} / {r['hands'][1]:.0f} |", flush=True)


if __name__ == "__main__":
    main()
