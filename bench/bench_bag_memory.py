"""Peak memory of `featmap bag eval` against the bag's length: LM-O bags of 10 and 100 frames.

Each replay runs in a fresh process; what is reported is the peak of Python/numpy allocations
during eval_bag (tracemalloc, started after the imports) and the process's peak RSS (ru_maxrss).
Streaming keeps both flat: the 100-frame bag's peaks stay within 10% of the 10-frame bag's.

Usage: python3 bench/bench_bag_memory.py [--bop ../shared/data/lmo] [--frames 10 100] [--out /tmp/bagmem]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tracemalloc
from pathlib import Path

LMO = Path(__file__).resolve().parents[2] / "shared" / "data" / "lmo"
OBJ_IDS = (1, 5)


def tiny_object_model(path: Path, bop_root: Path) -> Path:
    """A random-weight objects checkpoint for two LM-O objects (the replay's cost, not its accuracy)."""
    import torch

    from featmap_ros.datasets import bop
    from featmap_ros.model import checkpoint
    from featmap_ros.model.nets import FeatureMappingModel, NetConfig

    infos = bop.load_models_info(bop_root / "models" / "models_info.json")
    torch.manual_seed(0)
    model = FeatureMappingModel(NetConfig(task="objects", input_size=64, width=4, feature_dim=32,
                                          n_outputs=16 * len(OBJ_IDS), mapping=True))
    objects = [{"obj_id": i, "name": f"o{i}", "corners_m": infos[i].corners.tolist(),
                "extent_m": infos[i].size_xyz.tolist(), "symmetric": infos[i].symmetric} for i in OBJ_IDS]
    checkpoint.save(path, model, {"method": "fm", "objects": objects, "crop": {"size": 64, "window_scale": 1.2}})
    return path


def child(bag: Path, model: Path, models_dir: Path, out: Path) -> dict:
    """Replay one bag here and return its peaks (run in a fresh process)."""
    import torch

    from featmap_ros.bag.replay import eval_bag

    torch.set_num_threads(1)
    tracemalloc.start()
    res = eval_bag(bag, model, out, models_dir=models_dir, device="cpu")
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return {"frames": res.metrics["frames"], "processed": res.processed, "tracemalloc_peak_mb": peak / 2**20,
            "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def measure(bop_root: Path, frame_counts: list[int], out: Path) -> list[dict]:
    """Make one bag per frame count and replay each in a fresh process; return their peaks."""
    from featmap_ros.bag.make import make_bop_bag
    from featmap_ros.datasets import bop

    out.mkdir(parents=True, exist_ok=True)
    model = tiny_object_model(out / "model", bop_root)
    ids = bop.BopScene(bop_root, 2).image_ids
    rows = []
    for n in frame_counts:
        bag = make_bop_bag(bop_root, 2, out / f"bag{n}", frames=",".join(map(str, ids[:n])))
        cmd = [sys.executable, __file__, "--child", str(bag), str(model), str(bop_root / "models"),
               str(out / f"eval{n}")]
        done = subprocess.run(cmd, capture_output=True, text=True, check=True)
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bop", type=Path, default=LMO)
    p.add_argument("--frames", type=int, nargs="+", default=[10, 100])
    p.add_argument("--out", type=Path, default=Path("/tmp/featmap_bag_memory"))
    p.add_argument("--child", nargs=4, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(*(Path(a) for a in args.child))))
        return
    rows = measure(args.bop, args.frames, args.out)
    for r in rows:
        print(json.dumps(r))
    base = rows[0]
    for r in rows[1:]:
        ratio = r["tracemalloc_peak_mb"] / base["tracemalloc_peak_mb"]
        print(f"{r['frames']} vs {base['frames']} frames: tracemalloc peak x{ratio:.3f}, "
              f"max RSS x{r['maxrss_mb'] / base['maxrss_mb']:.3f}")


if __name__ == "__main__":
    main()
