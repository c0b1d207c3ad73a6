"""`featmap experiment lmo`: every method on one budget on Linemod-Occluded, then one table.

Split (the frames are a video, so contiguous blocks, never interleaved): real training frames are
image ids 0-300 (51 frames, 47-51 instances per object), test frames 301-611 (49 frames, 42-49
instances per object). Nothing is tuned on the test frames: all settings below were fixed before
the first test evaluation.

Budget (default full run, about 70 minutes on an otherwise idle 2-core CPU): one multi-object net
for the 8 objects, input 64x64, VGG width 16 (stages 16/32/64/128/128), feature 256, batch 32,
stage 1 3000 + stage 2 2000 = 5000 steps for every method (half of that measured 35 min, and its
models had not yet learnt even the synthetic crops: 8% within 5 px). Stage 1 (synthetic) is trained once and shared by
synthetic, finetune, fm (and fm_mmd) via data.train_all. Test crops come from the ground-truth
boxes (detections "gt"), as in BB8's evaluation with known 2D locations.

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

from featmap_ros.bop_scoring import run_bop, write_object_report, write_overlays
from featmap_ros.datasets import bop
from featmap_ros.datasets.streams import LMO_OBJ_IDS, ObjectStreamConfig, PairConfig
from featmap_ros.estimator import ObjectEstimator, load_estimator
from featmap_ros.experiments import data as xdata
from featmap_ros.model.nets import ExemplarBank, FeatureMappingModel, NetConfig
from featmap_ros.report import markdown_table, plot_bars, plot_curves
from featmap_ros.train import METHODS, OptimConfig, TrainConfig, build_exemplar_bank

DEFAULT_TRAIN_FRAMES = "0-300"
DEFAULT_TEST_FRAMES = "301-611"
TRAINED_METHODS = ("synthetic", "real", "mixed", "finetune", "fm")
EXEMPLAR_METHODS = ("exemplar", "exemplar_fm")
QUICK_OBJECTS = (1, 5)
METRICS = (("proj_5px", "2D-proj@5px"), ("add_10", "ADD(-S)@10%"), ("cm5_deg5", "5cm5deg"))
SPLITS = ("all", "visib>=0.5")


@dataclass(frozen=True)
class LmoBudget:
    """Sizes and settings of one LM-O experiment: net, steps, batch, synthetic images, exemplars, loading."""

    input_size: int = 64
    width: int = 16
    feature_dim: int = 256
    dropout: float = 0.3
    batch_size: int = 32
    stage1_steps: int = 3000
    stage2_steps: int = 2000
    lr: float = 1e-3
    warmup_steps: int = 100
    exemplars_per_object: int = 2000
    # Synthetic images: backgrounds cut from the real *training* frames (this share; the rest are
    # random colours, noise and textures), camera noise and blur like the real crops'.
    train_frame_backgrounds: float = 0.5
    noise_std: float = 3.0
    blur_prob: float = 0.3
    # Synthetic viewpoints drawn around the training frames' annotated poses (turned by up to this
    # many degrees); 0 draws from ObjectStreamConfig's full LM-O ranges instead.
    anchor_spread_deg: float = 25.0
    num_workers: int = 1  # rendering worker per stream, overlapping the training step
    overlays: int = 3


QUICK = LmoBudget(input_size=32, width=4, feature_dim=32, dropout=0.1, batch_size=4, stage1_steps=4, stage2_steps=3,
                  warmup_steps=2, exemplars_per_object=16, num_workers=0, overlays=1)


def lmo_train_config(budget: LmoBudget, n_objects: int, device: str = "cpu") -> TrainConfig:
    """The TrainConfig every method of the experiment shares (method is set per run)."""
    net = NetConfig(task="objects", input_size=budget.input_size, width=budget.width,
                    feature_dim=budget.feature_dim, n_outputs=16 * n_objects, dropout=budget.dropout)
    return TrainConfig(method="fm", net=net, optim=OptimConfig(lr=budget.lr, warmup_steps=budget.warmup_steps),
                       batch_size=budget.batch_size, stage1_steps=budget.stage1_steps,
                       stage2_steps=budget.stage2_steps, checkpoint_every=500, log_every=50, device=device,
                       tensorboard=False)


def lmo_stream_config(budget: LmoBudget, scene: bop.BopScene, train_ids: Sequence[int],
                      obj_ids: Sequence[int]) -> ObjectStreamConfig:
    """The synthetic stream of the experiment: viewpoints and backgrounds from the training frames only."""
    cfg = ObjectStreamConfig(obj_ids=tuple(obj_ids), crop=budget.input_size, noise_std=budget.noise_std,
                             blur_prob=budget.blur_prob)
    frames = scene.frames(list(train_ids))
    if budget.anchor_spread_deg > 0:
        anchors = tuple((float(i.obj_id), *i.R.ravel().tolist(), *i.t.ravel().tolist())
                        for f in frames for i in f.instances if i.obj_id in obj_ids)
        cfg = dataclasses.replace(cfg, pose_anchors=anchors, anchor_spread_deg=budget.anchor_spread_deg)
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
    def run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(B, C, S, S) crops -> outputs (B, 16 * n_objects) and NaN out-of-domain scores (B,)."""
        feats = self.model.features_real(torch.from_numpy(batch).to(self.device))
        # Every object's bank answers; the estimator reads the slice of the detection's object.
        out = torch.cat([bank.predict(feats) for bank in self.banks], dim=1)
        return out.cpu().numpy().astype(np.float64), np.full(len(batch), np.nan)


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


def synthetic_validation_crops(bop_root: Path, stream_cfg: ObjectStreamConfig, n: int = 512,
                               seed: int = 90_001) -> list[dict[str, Any]]:
    """n fresh crops of the training stream drawn with another seed: the same held-out set for every method."""
    from featmap_ros.datasets.streams import SyntheticObjectStream

    stream = SyntheticObjectStream.from_bop(bop_root, dataclasses.replace(stream_cfg, seed=seed))
    rng = np.random.default_rng(seed)
    crops: list[dict[str, Any]] = []
    while len(crops) < n:
        crops += stream.sample_chunk(rng, min(32, n - len(crops)))
    return crops


@torch.inference_mode()
def synthetic_crop_accuracy(model_json: Path, crops: Sequence[dict[str, Any]], infos: dict[int, bop.ObjectInfo],
                            meshes: dict[int, bop.Mesh]) -> dict[str, float]:
    """2D projection error of h(f_S(x)) on synthetic crops (synthetic_validation_crops), in image pixels.

    The crops' own camera (K_crop) gives the pose by PnP; errors are scaled back to image pixels
    (window side / crop side), so they compare with the real test frames' 2D-proj@5px. Separates
    "did not learn the synthetic images" from "learnt them but does not transfer to real ones".
    Symmetric objects are scored against the canonical pose the net is trained on (the real test
    frames compare with the raw ground truth, which is stricter for eggbox and glue).
    Returns proj_5px (fraction), median_px, n.
    """
    from featmap_ros import geometry as geo
    from featmap_ros.metrics import proj_2d
    from featmap_ros.model import checkpoint
    from featmap_ros.preprocess import rgb_to_input

    model, _ = checkpoint.load(model_json)
    errors: list[float] = []
    for first in range(0, len(crops), 32):
        chunk = crops[first:first + 32]
        out = model.predict_syn(torch.from_numpy(np.stack([rgb_to_input(c["rgb"]) for c in chunk]))).outputs.numpy()
        for row, c in zip(out, chunk, strict=True):
            k, info, side = c["obj_index"], infos[c["obj_id"]], c["rgb"].shape[0]
            uv = geo.denormalise_uv(row[16 * k: 16 * (k + 1)].reshape(8, 2).astype(np.float64), side)
            try:
                R, t = geo.solve_pnp(info.corners, uv, c["K_crop"])
            except geo.GeometryError:
                errors.append(float("inf"))
                continue
            err = proj_2d(R, t, c["R"], c["t"], c["K_crop"], meshes[c["obj_id"]].vertices)
            errors.append(err * c["window"].size_px / side)
    e = np.asarray(errors)
    return {"proj_5px": float((e < 5.0).mean()), "median_px": float(np.median(e)), "n": len(e)}


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
        table[method]["eval_s"] = res["eval_s"]
    return table


def write_lmo_table(out: Path, table: dict[str, Any], names: list[str], header: dict[str, Any]) -> str:
    """table.md: methods side by side (means, both splits), then one per-object table per metric."""
    cols = (["method"] + [f"{label} {split}" for split in SPLITS for _, label in METRICS]
            + ["2D-proj@5px synthetic crops", "train s"])
    rows = [[m] + [t[split]["mean"][k] for split in SPLITS for k, _ in METRICS]
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
) -> dict[str, Any]:
    """Train every method with the same budget, evaluate each on the test frames, write table.md/json and plots.

    quick: objects 1 and 5, two training and two test frames, a tiny net and a few steps (a check
    of the pipeline and the table's shape, not of accuracy). Returns the table dict (also table.json).
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

    stream_cfg = lmo_stream_config(budget, scene, train_ids, obj_ids)
    pair_cfg = PairConfig(crop=budget.input_size, window_margin=stream_cfg.window_margin, jitter=True)
    data = xdata.objects_task_data(bop_root, scene_id, train_ids, obj_ids, stream_cfg, pair_cfg,
                                   num_workers=budget.num_workers, names=names)
    cfg = lmo_train_config(budget, len(obj_ids), device)
    paths, wall = xdata.train_all(cfg, data, out, methods)

    infos, meshes = _eval_models(bop_root)
    results: dict[str, dict] = {}

    def evaluate(name: str, est: ObjectEstimator, train_s: float) -> None:
        t0 = time.perf_counter()
        records, _ = run_bop(est, bop_root, scene_id, test_spec, detections="gt")
        folder = out / name / "eval"
        metrics = write_object_report(folder, records, infos, meshes, names,
                                      extra={"method": name, "test_frames": test_spec, "scene": scene_id})
        write_overlays(folder, bop_root, scene_id, records, infos, names, n=budget.overlays)
        results[name] = {"metrics": metrics, "train_s": train_s, "eval_s": time.perf_counter() - t0}

    held_out = synthetic_validation_crops(bop_root, stream_cfg, 16 if quick else 512)
    for method in methods:
        evaluate(method, load_estimator(paths[method], device=device), wall.get(method, 0.0))
        results[method]["synthetic_crops"] = synthetic_crop_accuracy(paths[method], held_out, infos, meshes)
    if exemplars:
        for name, source in (("exemplar", "synthetic"), ("exemplar_fm", "fm")):
            if source not in paths:
                continue
            t0 = time.perf_counter()
            banks = build_object_banks(paths[source], bop_root, obj_ids, stream_cfg, budget.exemplars_per_object)
            evaluate(name, exemplar_estimator(paths[source], banks, device), time.perf_counter() - t0)

    object_names = [names[o] for o in obj_ids]
    table = _table_rows(results, names, obj_ids)
    n_test = results[next(iter(results))]["metrics"]["all"]["n_instances"] if results else 0
    header = {"scene_id": scene_id, "train_frames": train_frames if not quick else ",".join(map(str, train_ids)),
              "test_frames": test_frames if not quick else test_spec, "n_train_frames": len(train_ids),
              "n_test_frames": len(test_ids), "n_test_instances": n_test,
              "budget": ", ".join(f"{k}={v}" for k, v in dataclasses.asdict(budget).items()),
              "objects": dict(zip(obj_ids, object_names)), "stage1_s": wall.get("stage1", 0.0)}
    write_lmo_table(out, table, object_names, header)
    write_lmo_plots(out, results, table, object_names)
    doc = {"header": header, "methods": table, "quick": quick, "budget": dataclasses.asdict(budget),
           "train_config": json.loads(json.dumps(dataclasses.asdict(cfg), default=list)),
           "wall_s": time.perf_counter() - t_start}
    from featmap_ros.evaluation import write_json

    write_json(out / "table.json", doc)
    return doc


def _eval_models(bop_root: Path) -> tuple[dict[int, bop.ObjectInfo], dict[int, bop.Mesh]]:
    """models_info and the meshes the metrics use (models_eval/ when present)."""
    from featmap_ros.bop_scoring import load_object_models

    return load_object_models(bop_root / "models")
