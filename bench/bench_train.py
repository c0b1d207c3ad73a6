"""Training throughput (images/s, forward + backward + AdamW step of f and h) for both nets.

Usage: python3 bench/bench_train.py [--batches 32 64] [--steps 3] [--presets cpu paper] [--size 128]
Prints one Markdown table row per (device, task, preset, batch). 'cpu' is a CPU-feasible width
(16, feature 256); 'paper' is the task default (VGG-16 widths for objects, 32 for hands, feature 1024).
"""

from __future__ import annotations

import argparse
import time

import torch

from featmap_ros.model.losses import pose_loss
from featmap_ros.model.nets import FeatureMappingModel, NetConfig

PRESETS = {"cpu": {"width": 16, "feature_dim": 256}, "paper": {}}


def images_per_second(cfg: NetConfig, batch: int, steps: int, device: torch.device, amp: bool) -> float:
    """Time `steps` training steps after one warm-up step; return images per second."""
    model = FeatureMappingModel(cfg).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.rand(batch, cfg.in_channels, cfg.input_size, cfg.input_size, device=device) * 2 - 1
    target = torch.zeros(batch, cfg.n_outputs, device=device)

    def step() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            out = model.predict_syn(x).outputs
        loss = pose_loss(out.float(), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return batch * steps / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[32, 64])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--presets", nargs="+", default=list(PRESETS), choices=list(PRESETS))
    parser.add_argument("--tasks", nargs="+", default=["objects", "hands"], choices=["objects", "hands"])
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    parser.add_argument("--no-amp", action="store_true", help="fp32 on CUDA instead of bf16 autocast")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    print(f"torch {torch.__version__}, CPU threads {torch.get_num_threads()}, input {args.size}x{args.size}")
    print("| device | task | preset | width | feature | params (M) | batch | images/s |")
    print("|---|---|---|---|---|---|---|---|")
    for device in devices:
        for task in args.tasks:
            for preset in args.presets:
                cfg = NetConfig(task=task, input_size=args.size, **PRESETS[preset])
                n_params = sum(p.numel() for p in FeatureMappingModel(cfg).parameters()) / 1e6
                for batch in args.batches:
                    ips = images_per_second(cfg, batch, args.steps, device, device.type == "cuda" and not args.no_amp)
                    print(
                        f"| {device.type} | {task} | {preset} | {cfg.width} | {cfg.feature_dim} | {n_params:.1f} "
                        f"| {batch} | {ips:.1f} |",
                        flush=True,
                    )


if __name__ == "__main__":
    main()
