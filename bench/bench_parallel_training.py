"""The main job's two trainings one after the other at 2 threads, or side by side at 1 thread each.

Usage: python3 bench/bench_parallel_training.py [--object-steps 400] [--hand-steps 300 100] [--refine-steps 300]

Short versions of the main job's trainings (experiments.main_job: the object model with its pool,
the hand model with its sensor pairs, pool and centre refiner), each in a fresh process:
  2 threads, alone            each training by itself with torch's 2 threads (the job until session 14)
  1 thread, alone             each by itself with one thread
  1 thread each, side by side both at once (MainJobSize.parallel_training, the job's default now)
and the time for both: the sum of the first two rows, the larger of the last row's. The built-in
assets are written once into --work first. Run it alone on the CPU: it is a measurement of how
the two trainings share it.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

CHILD = r"""
import dataclasses, json, sys, time
from pathlib import Path
import torch
task, threads, work, obj_steps, hand_s1, hand_s2, refine = sys.argv[1:8]
torch.set_num_threads(int(threads))
from featmap_ros.experiments.main_job import MainJobSize, _train_hands, train_objects
size = dataclasses.replace(MainJobSize(), object_steps=(int(obj_steps), 0), hand_steps=(int(hand_s1), int(hand_s2)),
                           refine_steps=int(refine))
out = Path(work) / f"{task}_{threads}_{time.time_ns()}"
t0 = time.perf_counter()
if task == "objects":
    train_objects(Path(work) / "assets", out, size, "cpu")
else:
    _train_hands(out, size, "cpu")
print(json.dumps({"wall_s": time.perf_counter() - t0}))
"""


def launch(task: str, threads: int, args: argparse.Namespace) -> subprocess.Popen:
    cmd = [sys.executable, "-c", CHILD, task, str(threads), str(args.work), str(args.object_steps),
           *map(str, args.hand_steps), str(args.refine_steps)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)


def seconds(proc: subprocess.Popen) -> float:
    out, _ = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"a training process failed (exit {proc.returncode}): {proc.args[3:5]}")
    return float(json.loads(out.strip().splitlines()[-1])["wall_s"])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--object-steps", type=int, default=400)
    ap.add_argument("--hand-steps", type=int, nargs=2, default=[300, 100])
    ap.add_argument("--refine-steps", type=int, default=300)
    ap.add_argument("--work", type=Path, default=Path("/tmp/bench_parallel_training"))
    args = ap.parse_args()
    from featmap_ros import assets
    from featmap_ros.experiments.main_job import MainJobSize

    if not (args.work / "assets" / "test" / "000001" / "scene_gt.json").is_file():
        assets.write_object_models(args.work / "assets")
        assets.write_real_scene(args.work / "assets", MainJobSize().real_frames, seed=0)
    rows = []
    for name, threads in (("2 threads, alone", 2), ("1 thread, alone", 1)):
        obj = seconds(launch("objects", threads, args))
        hand = seconds(launch("hands", threads, args))
        rows.append((name, obj, hand, obj + hand))
    t0 = time.perf_counter()
    procs = [launch("objects", 1, args), launch("hands", 1, args)]
    obj, hand = (seconds(p) for p in procs)
    rows.append(("1 thread each, side by side", obj, hand, time.perf_counter() - t0))
    print(f"objects {args.object_steps} steps, hands {args.hand_steps[0]} + {args.hand_steps[1]} steps and a "
          f"{args.refine_steps}-step refiner (seconds, process start and imports included)\n")
    print("| run | objects (s) | hands (s) | both (s) |\n|---|---|---|---|")
    for name, o, h, both in rows:
        print(f"| {name} | {o:.1f} | {h:.1f} | {both:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
