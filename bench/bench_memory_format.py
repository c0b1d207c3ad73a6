"""Training step time in NCHW against channels_last (NHWC) memory, in one run (TrainConfig.channels_last).

Usage: python3 bench/bench_memory_format.py [--steps 6] [--rounds 5] [--threads 1 2] [--amp]

Rows: the main job's object net (dense head, coordinates over 16 bins since session 21: session 20's
table had its regressed coordinates; batch 8) in its synthetic stage and its Feature Mapping stage,
the main job's hand net (vote head, fm_joint, batch 16), and the LM-O net
(16 coordinate bins, 8 objects, fm_joint, batch 32) in its two stages. Each step is what train.train
runs: stage_losses on a batch, backward, AdamW. The batches are random tensors of the streams' shapes
(the step's cost does not depend on their values; the data pipeline is the same in both formats).
The two formats take turns, --steps steps each per round, so a machine whose speed drifts slows
both alike; the table gives the median over rounds of ms per step. Run it alone.
--amp: the steps in bf16 autocast, as train.train runs them where the CPU computes bf16 natively (AMX or
AVX512-BF16; refused elsewhere), with a third format: channels_last with torch's own GroupNorm, as the nets had it
before session 25 (model.nets.GroupNorm normalises bf16 channels_last maps in NCHW memory).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from torch import nn

from featmap_ros.backends.torch_net import bf16_native
from featmap_ros.experiments.lmo import LmoBudget, lmo_train_config
from featmap_ros.experiments.main_job import MainJobSize, hand_train_config, object_train_config
from featmap_ros.model import nets
from featmap_ros.model.nets import FeatureMappingModel, NetConfig
from featmap_ros.train import LossConfig, _set_trainable, _to_device, method_net, stage_losses


def object_batches(batch: int, n_objects: int, size: int = 64) -> dict[str, dict[str, torch.Tensor]]:
    side = size // 2  # the dense head's stride 2
    g = torch.Generator().manual_seed(0)

    def dense(**images: torch.Tensor) -> dict[str, torch.Tensor]:
        return {**images, "coords": torch.rand(batch, 3, side, side, generator=g) * 2 - 1,
                "visibility": (torch.rand(batch, side, side, generator=g) > 0.5).float(),
                "obj_index": torch.randint(0, n_objects, (batch,), generator=g)}

    image = lambda: torch.rand(batch, 3, size, size, generator=g) * 2 - 1  # noqa: E731
    return {"synthetic": dense(image=image()), "pairs": dense(real=image(), syn=image())}


def hand_batches(batch: int, size: int = 64, joints: int = 14) -> dict[str, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    image = lambda: torch.rand(batch, 1, size, size, generator=g) * 2 - 1  # noqa: E731
    target = lambda: torch.rand(batch, 3 * joints, generator=g) * 2 - 1  # noqa: E731
    return {"synthetic": {"image": image(), "target": target()},
            "pairs": {"real": image(), "syn": image(), "target": target()}}


def _nets() -> dict[str, NetConfig]:
    """The nets the rows train, as the configs that train them (MainJobSize, LmoBudget) make them for each method
    (train.method_net), so they cannot drift."""
    size = MainJobSize()
    objects, hands = object_train_config(size), hand_train_config(size)
    return {"main_objects": method_net(objects.net, objects.method), "hands": method_net(hands.net, hands.method),
            "lmo": method_net(lmo_train_config(LmoBudget(), n_objects=8).net, "fm_joint")}


NETS = _nets()
CASES = {
    # name: (net, stage, batches, loss)
    "main job objects, syn stage, batch 8": (NETS["main_objects"], "syn", lambda: object_batches(8, 1), LossConfig()),
    "main job objects, fm stage, batch 8": (NETS["main_objects"], "fm", lambda: object_batches(8, 1), LossConfig()),
    "main job hands, fm_joint, batch 16": (NETS["hands"], "fm_joint", lambda: hand_batches(16),
                                           LossConfig(pose="smooth_l1")),
    "LM-O objects (16 bins, 8 objects), syn stage, batch 32": (NETS["lmo"], "syn", lambda: object_batches(32, 8),
                                                               LossConfig()),
    "LM-O objects (16 bins, 8 objects), fm_joint, batch 32": (NETS["lmo"], "fm_joint", lambda: object_batches(32, 8),
                                                              LossConfig()),
}


def stepper(net: NetConfig, stage: str, batches: dict, loss: LossConfig, channels_last: bool, amp: bool = False,
            torch_group_norm: bool = False):
    """A function that runs one training step of a fresh model in the given memory format (and bf16 autocast).

    torch_group_norm: the model's GroupNorm layers run torch's nn.GroupNorm.forward (the code before session 25).
    """
    torch.manual_seed(0)
    model = FeatureMappingModel(net)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if stage == "fm":
        model.init_real_from_syn()
    _set_trainable(model, stage)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3)
    on = {k: _to_device(b, torch.device("cpu"), channels_last) for k, b in batches.items()}

    def step() -> None:
        saved = nets.GroupNorm.forward
        if torch_group_norm:
            nets.GroupNorm.forward = nn.GroupNorm.forward
        try:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
                losses = stage_losses(model, stage, on, loss, False)
        finally:
            nets.GroupNorm.forward = saved
        total = sum(losses.values())
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6, help="steps per format per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--amp", action="store_true", help="bf16 autocast (a CPU with native bf16 only)")
    args = parser.parse_args()
    if args.amp and not bf16_native(torch.device("cpu")):
        parser.error("--amp: this CPU has no native bf16 (AMX or AVX512-BF16); train.train runs float32 here")
    formats = ("nchw", "nhwc", "nhwc-torch-gn") if args.amp else ("nchw", "nhwc")
    print(f"torch {torch.__version__}, {args.rounds} rounds of {args.steps} steps per format, formats in turns, "
          f"{'bf16 autocast' if args.amp else 'float32'}")
    if args.amp:
        print("| threads | case | NCHW ms/step | channels_last ms/step | speed-up | channels_last, torch's GroupNorm "
              "(before session 25) | channels_last against it |")
        print("|---|---|---|---|---|---|---|", flush=True)
    else:
        print("| threads | case | NCHW ms/step | channels_last ms/step | speed-up |")
        print("|---|---|---|---|---|", flush=True)
    for threads in args.threads:
        torch.set_num_threads(threads)
        for name, (net, stage, make, loss) in CASES.items():
            batches = make()
            steps = {fmt: stepper(net, stage, batches, loss, fmt != "nchw", args.amp, fmt == "nhwc-torch-gn")
                     for fmt in formats}
            times: dict[str, list[float]] = {fmt: [] for fmt in steps}
            for step in steps.values():  # warm-up
                for _ in range(2):
                    step()
            for _ in range(args.rounds):
                for fmt, step in steps.items():
                    t = time.perf_counter()
                    for _ in range(args.steps):
                        step()
                    times[fmt].append((time.perf_counter() - t) / args.steps * 1e3)
            a, b = (float(np.median(times[f])) for f in ("nchw", "nhwc"))
            row = f"| {threads} | {name} | {a:.1f} | {b:.1f} | {a / b:.2f}x |"
            if args.amp:
                c = float(np.median(times["nhwc-torch-gn"]))
                row += f" {c:.1f} | {c / b:.2f}x |"
            print(row, flush=True)


if __name__ == "__main__":
    main()
