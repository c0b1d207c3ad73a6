"""Trained hand crops per second, before and after the pool and augmentation, in one run (stage-1 steps).

Usage: python3 bench/bench_hand_training.py [--steps 40] [--threads 0] [--pool 600]

Rows, each a stage-1 training step (forward, backward, AdamW) at batch 32, input 64, width 8, smooth
L1 loss, measured over --steps steps after 5 warm-up steps, with the data time and the step time apart:
  online/fc       clean renders made online by one DataLoader worker (the paper's way, the old default)
  pool/fc         the same net fed from a pool of clean renders made once
  pool+aug/fc     the pool with datasets.hand_augment's rotation, offset and scale per sample
  pool+aug/vote   the vote head (the new default) from the augmented pool
  ..., bf16       the extractor in bf16 autocast (train.TrainConfig.amp; only where the CPU has bf16)
Pool rendering is timed once, apart (it is paid once per experiment, shared by every method).
Run it alone: on 2 cores a second torch process slows both many times.
"""

from __future__ import annotations

import argparse
import time

import torch
from timing import time_steps

from featmap_ros.backends.torch_net import bf16_native
from featmap_ros.datasets.hand_augment import augmented
from featmap_ros.datasets.hand_streams import HandStreamConfig, SyntheticHandStream
from featmap_ros.experiments.data import render_synthetic_pool
from featmap_ros.experiments.hands import HANDS_AUGMENT, HandsBudget, hands_train_config
from featmap_ros.model.losses import pose_loss
from featmap_ros.model.nets import FeatureMappingModel


def net(head: str) -> FeatureMappingModel:
    """The experiment's net for a head (HandsBudget's sizes)."""
    return FeatureMappingModel(hands_train_config(HandsBudget(), head=head).net).train()


def measure(model: FeatureMappingModel, batches, steps: int, bf16: bool = False) -> tuple[float, float, float]:
    """(crops/s, data ms per batch, step ms per batch)."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def step(b) -> int:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = model.predict_syn(b["image"]).outputs
        loss = pose_loss(out.float(), b["target"].float(), "smooth_l1")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return len(b["image"])

    return time_steps(batches, step, steps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--pool", type=int, default=600, help="clean crops rendered once")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = HandStreamConfig(crop_px=64)
    print(f"torch {torch.__version__}, CPU threads {torch.get_num_threads()}, batch 32, input 64, width 8")
    t0 = time.perf_counter()
    pool = render_synthetic_pool(args.pool, 0, cfg)
    render_s = time.perf_counter() - t0
    print(f"pool: {args.pool} crops rendered in {render_s:.1f} s ({args.pool / render_s:.0f} crops/s), once per "
          "experiment")
    g = torch.Generator().manual_seed(0)

    def pool_batches():
        while True:
            pick = torch.randint(args.pool, (32,), generator=g)
            yield {k: v[pick] for k, v in pool.items()}

    def augmented_batches():
        return augmented(pool_batches(), HANDS_AUGMENT, (0,), 0, ("image",), ("target",))

    def online_batches():
        loader = torch.utils.data.DataLoader(SyntheticHandStream(1, cfg), batch_size=32, num_workers=1)
        return iter(loader)

    print("| pipeline | head | crops/s | data ms/batch | step ms/batch |\n|---|---|---|---|---|")
    rows = [("online (1 render worker)", "fc", online_batches, False), ("pool", "fc", pool_batches, False),
            ("pool + augmentation", "fc", augmented_batches, False),
            ("pool + augmentation", "vote", augmented_batches, False)]
    if bf16_native(torch.device("cpu")):
        rows += [("pool + augmentation, bf16 autocast", "fc", augmented_batches, True),
                 ("pool + augmentation, bf16 autocast", "vote", augmented_batches, True)]
    else:
        print("(no bf16 rows: this CPU has neither AMX-BF16 nor AVX512-BF16)")
    for name, head, source, bf16 in rows:
        torch.manual_seed(0)
        ips, data_ms, step_ms = measure(net(head), source(), args.steps, bf16)
        print(f"| {name} | {head} | {ips:.0f} | {data_ms:.1f} | {step_ms:.1f} |", flush=True)


if __name__ == "__main__":
    main()
