"""`featmap experiment hands`: every method on one budget on simulated sensor hands, then one table.

Domains: synthetic = clean depth renders of the nominal hand (what h(f_S(x)) learns from);
"real" training frames = another person's hand (HandShape.sample, seed 1) in cluttered scenes
seen by the structured-light sensor model (SensorConfig.nominal()), each paired with the clean
nominal render at its pose; test = a third person (seed 1001), other poses (seed 2002) and a
different sensor (SensorConfig.test_time()): neither the hand nor the sensor of the test frames
was seen in training.

Scoring (NYU protocol): crops at the located hand centre (the palm plus 1 cm noise when
localisation misses by more than 6 cm, as for the training pairs), mean 3D joint error (mm),
per-joint errors and the fraction of frames whose largest joint error is within 20/30/40/50/80 mm.
Also the run-time path (HandEstimator on the full frame: locate, crop, joints) on a subset, and
the real NYU frame in ../shared/data/nyu through the Feature Mapping model (budget.fm_method).

Budget (default full run: 42 minutes on session 12's otherwise idle 2-core Xeon with AMX-BF16, 73 on an
older one, training in bf16 autocast): the vote head (a small U-Net to S/4, per-location joint votes),
input 64, width 8, batch 32, smooth L1, lr 3e-3, lambda_feat 0.03 (fm_joint: the feature loss trains g
only), stage 1 3000 + stage 2 3000 = 6000 steps per method (fm_joint: 6000 joint steps), fm_fc (the
paper's FC head, staged fm) at twice the steps (the same CPU time); 2000 "real" frames (the last 200
are the validation split); synthetic crops from a pool of 12000 clean renders made once; pool and
pairs augmented on the fly (HANDS_AUGMENT); two centre refiners (clean renders only, and with the
training frames) attached to the checkpoints.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from featmap_ros import evaluation as ev
from featmap_ros import geometry as geo
from featmap_ros.datasets import nyu
from featmap_ros.datasets.hand_augment import HandAugmentConfig
from featmap_ros.datasets.hand_refine import SensorCropRecorder
from featmap_ros.datasets.hand_streams import HandStreamConfig, SensorHandSet
from featmap_ros.estimator import HandEstimator, load_estimator
from featmap_ros.experiments import data as xdata
from featmap_ros.model import checkpoint
from featmap_ros.model.nets import HAND_HEADS, NetConfig
from featmap_ros.render import sensor
from featmap_ros.report import markdown_table, plot_bars, plot_curves
from featmap_ros.train import METHODS, LossConfig, OptimConfig, TrainConfig

HAND_METHODS = ("synthetic", "real", "mixed", "finetune", "fm", "fm_mmd", "fm_joint")
THRESHOLDS = ("20mm", "30mm", "40mm", "50mm", "80mm")
DEFAULT_NYU = Path(__file__).resolve().parents[3] / "shared" / "data" / "nyu"


# The augmentation of the hand pool and pairs, chosen on the validation frames (docs/results.md).
HANDS_AUGMENT = HandAugmentConfig(rotation_deg=30.0, shift_sigma=0.05, depth_sigma=0.05, scale=0.1)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HandsBudget:
    """Sizes of one hands experiment: net, steps, batch, frames, augmentation."""

    head: str = "vote"  # every method's head; the paper's FC head keeps its row (fm_fc) when fc_row
    fc_row: bool = True
    # fm_fc trains this many times the steps: an FC step costs half a vote step (measured on the
    # validation runs of docs/results.md), so the two heads are compared at equal CPU time.
    fc_step_factor: float = 2.0
    input_size: int = 64
    width: int = 8
    feature_dim: int = 256  # the FC head's feature vector
    vote_feature_dim: int = 32  # the vote head's channels of its S/4 feature map
    dropout: float = 0.3  # FC head only (between f's two FC layers); the vote head has none
    batch_size: int = 32
    stage1_steps: int = 3000  # 2500 + 2500 until bf16 autocast made a step 1.4-1.65x cheaper (session 6)
    stage2_steps: int = 3000
    lr: float = 3e-3
    warmup_steps: int = 100
    pose_loss: str = "smooth_l1"  # with LossConfig's beta 0.05 (7.5 mm): chosen on the validation frames
    # The feature loss's weight (fm, fm_mmd, fm_joint), chosen on the validation frames: 0.1 since session 5;
    # 0.03 since session 12 (fm_joint over two seeds: 15.29 / 15.80 mm against 15.59 / 16.73 at 0.1, docs/results.md).
    lambda_feat: float = 0.03
    # fm_joint's feature loss trains g alone (LossConfig.feat_through_f False) since session 13: on the
    # validation frames over three seeds 14.93 mm against 15.35 (mixed) and 15.55 (through f, two seeds).
    feat_through_f: bool = False
    # g's residual blocks (NetConfig.mapping_blocks) in every method that has g (fm, fm_mmd, fm_joint, fm_fc).
    mapping_blocks: int = 2
    # The Feature Mapping model of the checks (the run-time path without refinement, the real NYU frame).
    fm_method: str = "fm_joint"
    n_real: int = 2000
    validation_frames: int = 200  # the last of the n_real frames: a validation split of the training person
    n_test: int = 500
    runtime_frames: int = 150  # test frames also run through the full run-time path (locate + crop)
    synthetic_pool: int = 12000  # 0: render online (the paper's way), slower on a CPU
    # The synthetic stream's hand (HandStreamConfig.sampled_shapes): the one nominal hand (the paper's one
    # hand model) or a new sampled person every render batch of 16 (bone lengths, radii, overall scale).
    sampled_shapes: bool = False
    # The centre refiner (model/refiner.py), trained once per data regime on crops rendered once: clean
    # renders for the synthetic method, clean renders + the training frames for every other method.
    refine_synthetic_frames: int = 1500
    refine_sensor_frames: int = 1000
    refine_steps: int = 3000
    # On-the-fly augmentation of the pool and the pairs (datasets.hand_augment), half-cube units.
    rotation_deg: float = HANDS_AUGMENT.rotation_deg
    shift_sigma: float = HANDS_AUGMENT.shift_sigma
    depth_sigma: float = HANDS_AUGMENT.depth_sigma
    scale: float = HANDS_AUGMENT.scale
    # Every method's TrainConfig.seed (initial weights, batch draws); the data, the test person and the
    # refiners keep theirs, so two seeds' runs differ only in how the networks train.
    seed: int = 0

    def __post_init__(self) -> None:
        if self.head not in HAND_HEADS:
            raise ValueError(f"head must be one of {HAND_HEADS}, got {self.head!r}")
        counts = {"batch_size": self.batch_size, "input_size": self.input_size, "width": self.width,
                  "n_real": self.n_real, "n_test": self.n_test, "refine_steps": self.refine_steps,
                  "mapping_blocks": self.mapping_blocks}
        if any(v < 1 for v in counts.values()):
            raise ValueError(f"these must be >= 1: {counts}")
        if self.stage1_steps < 0 or self.stage2_steps < 0 or self.stage1_steps + self.stage2_steps < 1:
            raise ValueError(f"steps must be >= 0 and train at all, got {self.stage1_steps} + {self.stage2_steps}")
        if not 0 <= self.validation_frames < self.n_real:
            raise ValueError(f"validation_frames must be in [0, n_real = {self.n_real}), got {self.validation_frames}")
        if not (self.lr > 0 and self.fc_step_factor > 0):
            raise ValueError(f"lr and fc_step_factor must be > 0, got {self.lr} and {self.fc_step_factor}")

    def augment(self) -> HandAugmentConfig:
        """The augmentation these settings describe."""
        return HandAugmentConfig(rotation_deg=self.rotation_deg, shift_sigma=self.shift_sigma,
                                 depth_sigma=self.depth_sigma, scale=self.scale)


QUICK = HandsBudget(input_size=32, width=4, feature_dim=32, vote_feature_dim=8, dropout=0.1, batch_size=4,
                    stage1_steps=4, stage2_steps=3, warmup_steps=2, n_real=10, validation_frames=2, n_test=6,
                    runtime_frames=2, synthetic_pool=16, refine_synthetic_frames=4, refine_sensor_frames=3,
                    refine_steps=5, rotation_deg=20.0, shift_sigma=0.03)


def hands_stream_config(budget: HandsBudget) -> HandStreamConfig:
    """The crops and the synthetic stream of an experiment (the pairs and test frames are cut the same way)."""
    return HandStreamConfig(crop_px=budget.input_size, sampled_shapes=budget.sampled_shapes)


def hands_train_config(budget: HandsBudget, device: str = "cpu", head: str | None = None) -> TrainConfig:
    """The TrainConfig every method of the experiment shares (method is set per run); head: budget.head."""
    head = head or budget.head
    vote = head == "vote"
    net = NetConfig(task="hands", input_size=budget.input_size, width=budget.width, head=head,
                    feature_dim=budget.vote_feature_dim if vote else budget.feature_dim,
                    dropout=0.0 if vote else budget.dropout, mapping_blocks=budget.mapping_blocks)
    factor = 1.0 if head == budget.head else budget.fc_step_factor
    return TrainConfig(method="fm", net=net, optim=OptimConfig(lr=budget.lr, warmup_steps=budget.warmup_steps),
                       loss=LossConfig(pose=budget.pose_loss, lambda_feat=budget.lambda_feat,
                                       feat_through_f=budget.feat_through_f),
                       batch_size=budget.batch_size,
                       stage1_steps=int(round(budget.stage1_steps * factor)),
                       stage2_steps=int(round(budget.stage2_steps * factor)), checkpoint_every=500, log_every=50,
                       device=device, tensorboard=False, seed=budget.seed)


# --------------------------------------------------------------------------------------------
# Scoring


@torch.inference_mode()
def predict_crops(model_json: Path, crops: torch.Tensor, centres: np.ndarray, cube_m: float,
                  device: str = "cpu") -> np.ndarray:
    """Joints (F, 14, 3) metres from crops (F, 1, S, S) around centres (F, 3): h(g(f_R(x))) per checkpoint."""
    model, _ = checkpoint.load(model_json, device=device)
    out = torch.cat([model.predict_real(crops[i:i + 256].to(device)).outputs.float().cpu()
                     for i in range(0, len(crops), 256)])
    return out.numpy().astype(np.float64).reshape(len(crops), -1, 3) * (cube_m / 2.0) + centres[:, None, :]


def runtime_path(estimators: dict[str, HandEstimator], test: SensorHandSet, n: int) -> dict[str, dict[str, Any]]:
    """Run each estimator on the first n full test frames (locate, refine, crop, joints, recentre); found
    fraction, joint errors and the last crop centre's distance to the palm (mm, median and 90th percentile:
    the refined centre where no recentre pass ran, else the palm found by the pass before the last one run)."""
    from tqdm import tqdm

    K = test.intrinsics
    errs: dict[str, list[float]] = {m: [] for m in estimators}
    centre_errs: dict[str, list[float]] = {m: [] for m in estimators}
    for i in tqdm(range(n), desc="run-time path", unit="frame", mininterval=5.0):
        depth, joints, _ = test.frame(i)
        for m, est in estimators.items():
            hands = est.estimate(depth, K)
            errs[m].append(float(np.linalg.norm(hands[0].joints_xyz - joints, axis=1).mean()) if hands else np.nan)
            centre_errs[m].append(float(np.linalg.norm(hands[0].centre - joints[nyu.PALM])) if hands else np.nan)
    out = {}
    for m, e in errs.items():
        a, c = np.asarray(e), np.asarray(centre_errs[m])
        found = np.isfinite(a)
        out[m] = {"frames": int(n), "found": float(found.mean()) if n else float("nan"),
                  "mean_error_mm_found": 1000.0 * float(a[found].mean()) if found.any() else float("nan"),
                  "centre_error_mm_median": 1000.0 * float(np.median(c[found])) if found.any() else float("nan"),
                  "centre_error_mm_p90": 1000.0 * float(np.percentile(c[found], 90)) if found.any() else float("nan")}
    return out


def nyu_frame_check(model_json: Path, nyu_dir: Path, device: str = "cpu") -> dict[str, Any]:
    """NYU test frame 1 through a model's HandEstimator: error, centre vs palm, whether the crop holds all joints."""
    depth_path = nyu_dir / "test" / "depth_1_0000001.png"
    joints_path = nyu_dir / "test" / "depth_1_0000001_joints_uvd.txt"
    if not (depth_path.is_file() and joints_path.is_file()):
        return {"available": False, "reason": f"{depth_path} or its joints file is missing"}
    depth = nyu.read_depth(depth_path)
    gt = nyu.joints_uvd_to_xyz(nyu.read_joints_uvd_txt(joints_path))
    est = load_estimator(model_json, device=device)
    hands = est.estimate(depth, nyu.NYU_INTRINSICS)
    if not hands:
        return {"available": True, "found": False}
    hand = hands[0]
    _, cube = geo.crop_depth_cube(depth, nyu.NYU_INTRINSICS.K, hand.centre, cube_m=est.cube_m, out=est.crop_size)
    centre_err = float(np.linalg.norm(hand.centre - gt[nyu.PALM]))
    per_joint = np.linalg.norm(hand.joints_xyz - gt, axis=1)
    return {"available": True, "found": True, "mean_error_mm": 1000.0 * float(per_joint.mean()),
            "max_error_mm": 1000.0 * float(per_joint.max()), "centre_to_palm_mm": 1000.0 * centre_err,
            "centre_within_40mm": bool(centre_err <= 0.04), "crop_holds_all_joints": bool(cube.contains(gt).all()),
            "out_of_domain": float(hand.out_of_domain)}


def refiner_config(budget: HandsBudget) -> Any:
    """The experiment's centre refiner: the budget's crop size, the stream's cube."""
    from featmap_ros.model.refiner import RefinerConfig

    return RefinerConfig(input_size=budget.input_size, cube_m=HandStreamConfig().cube_m)


def train_refiners(budget: HandsBudget, real_set: SensorHandSet | None, n_fit: int, seed: int = 0,
                   recorded: Any = None) -> dict[str, Any]:
    """The centre refiners of the experiment: 'synthetic' (clean renders only) and 'real' (+ up to
    refine_sensor_frames of the first n_fit frames of real_set: the training frames, never the validation ones).

    Each is trained once and attached to every checkpoint of its data regime; returns the refiners
    and their held-out centre errors (the last tenth of the pool's frames, one refinement step).
    recorded: a hand_refine.SensorCropRecorder that saw real_set's frames rendered for the pairs.
    """
    from featmap_ros.datasets.hand_refine import refine_pool
    from featmap_ros.model.refiner import centre_errors_m, train_refiner

    cfg = refiner_config(budget)
    out: dict[str, Any] = {}
    # The clean renders' crops are made once and shared; the sensor frames' are added for 'real'.
    synthetic = refine_pool(budget.refine_synthetic_frames, config=cfg, seed=seed)
    n_sensor = min(budget.refine_sensor_frames, n_fit) if real_set is not None else 0
    sensor_part = refine_pool(0, real_set, n_sensor, config=cfg, seed=seed, recorded=recorded) if n_sensor else None
    pools = {"synthetic": synthetic, "real": synthetic if sensor_part is None else {
        k: (np.concatenate([v, sensor_part[k]]) if np.ndim(v) else v) for k, v in synthetic.items()}}
    for name, pool in pools.items():
        if name == "real" and sensor_part is None:  # no training frames: the same refiner
            out[name] = out["synthetic"]
            continue
        # Held out: the last tenth of the frames of each source (frame ids: synthetic first, then sensor).
        frame = pool["frame"]
        held = np.zeros(len(frame), bool)
        for src in np.unique(pool["source"]):
            ids = np.unique(frame[pool["source"] == src])
            held |= (pool["source"] == src) & (frame >= ids[int(0.9 * len(ids))])
        fit = {k: (v[~held] if np.ndim(v) and len(v) == len(frame) else v) for k, v in pool.items()}
        val = {k: (v[held] if np.ndim(v) and len(v) == len(frame) else v) for k, v in pool.items()}
        refiner = train_refiner(fit, cfg, steps=budget.refine_steps, seed=seed)
        before, after = centre_errors_m(refiner, val) if held.any() else (np.full(1, np.nan), np.full(1, np.nan))
        out[name] = {"refiner": refiner, "crops": int(len(frame)),
                     "held_out_mm": {"before_median": 1000 * float(np.median(before)),
                                     "after_median": 1000 * float(np.median(after)),
                                     "after_p90": 1000 * float(np.percentile(after, 90))}}
    return out


def _refinement_lines(header: dict[str, Any]) -> list[str]:
    """The centre refiners' held-out errors and the fm model's run-time path without refinement."""
    lines = []
    for name, r in (header.get("refiners") or {}).items():
        h = r["held_out_mm"]
        lines.append(f"- Centre refiner '{name}' ({r['crops']} crops): held-out centre to palm "
                     f"{h['before_median']:.1f} mm -> {h['after_median']:.1f} mm median after one step "
                     f"(p90 {h['after_p90']:.1f} mm).")
    without = header.get("runtime_without_refinement")
    if without:
        lines.append(f"- {header.get('fm_method', 'fm')} on the run-time path without refinement or recentre (the "
                     f"located centre of mass): mean "
                     f"{without['mean_error_mm_found']:.1f} mm, centre to palm {without['centre_error_mm_median']:.1f} "
                     f"/ {without['centre_error_mm_p90']:.1f} mm (median / p90).")
    return ["\n## Hand centre\n", *lines] if lines else []


def write_hands_table(out: Path, table: dict[str, Any], header: dict[str, Any]) -> str:
    """table.md: methods side by side (mean error, success fractions, run-time path), then per-joint errors."""
    cols = ["method", "head", "validation (mm)", "mean error (mm)"] + [
        f"max err <= {t} (%)" for t in THRESHOLDS] + [
        "run-time path: found (%)", "run-time path: mean (mm)", "centre to palm: median / p90 (mm)", "train s"]
    rows = [[m, t.get("head", ""), t.get("validation_mm", float("nan")), t["mean_error_mm"]]
            + [100.0 * t["max_error_fraction"][k] for k in THRESHOLDS]
            + [100.0 * t["runtime"]["found"], t["runtime"]["mean_error_mm_found"],
               f"{t['runtime']['centre_error_mm_median']:.1f} / {t['runtime']['centre_error_mm_p90']:.1f}",
               f"{t['train_s']:.0f}"]
            for m, t in table.items()]
    joints = list(nyu.JOINT_NAMES)
    per = [[j] + [table[m]["per_joint_mm"][j] for m in table] for j in joints]
    text = ["# Hands: every method on one budget (simulated sensor frames)\n",
            f"Training: {header['n_real'] - header['validation_frames']} sensor frames of person A (nominal sensor) + "
            f"clean renders of {'sampled hands' if header.get('sampled_shapes') else 'the nominal hand'}; "
            f"validation: the last {header['validation_frames']} frames of person A."
            f" Test: {header['n_test']} frames of person B, other poses, test-time sensor. Crops at the located "
            f"centre ({header['test_fallbacks']} of {header['n_test']} test frames fell back to the palm + 1 cm "
            f"noise). Run-time path: HandEstimator on {header['runtime_frames']} full frames (the refiner's steps, "
            f"then {header.get('recentre', 0)} recentre passes; centre to palm: the last crop's centre).\n",
            f"Budget: {header['budget']}\n", markdown_table(cols, rows),
            *_refinement_lines(header),
            "\n## Per-joint mean error (mm)\n", markdown_table(["joint", *table], per)]
    frame = header.get("nyu_frame", {})
    if frame.get("found"):
        text += [f"\n## Real NYU test frame 1 through the {frame.get('model', 'fm')} model\n",
                 markdown_table(["mean error (mm)", "max error (mm)", "centre to palm (mm)", "centre within 40 mm",
                                 "crop holds all 14 joints"],
                                [[frame["mean_error_mm"], frame["max_error_mm"], frame["centre_to_palm_mm"],
                                  frame["centre_within_40mm"], frame["crop_holds_all_joints"]]])]
    elif frame:
        text += [f"\nReal NYU frame: {frame}\n"]
    md = "\n".join(text)
    (out / "table.md").write_text(md)
    return md


# --------------------------------------------------------------------------------------------
# The experiment


def run_hands_experiment(
    out: Path = Path("out/hands"),
    quick: bool = False,
    n_real: int | None = None,
    methods: Sequence[str] | None = None,
    budget: HandsBudget | None = None,
    nyu_dir: Path | None = None,
    device: str = "cpu",
) -> dict[str, Any]:
    """Train every method with the same budget, score each on the test person, write table.md/json and plots.

    quick: a tiny net, a few frames and steps (a check of the pipeline and the table's shape, not of
    accuracy). Returns the table dict (also written as table.json).
    """
    t_start = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    budget = budget or (QUICK if quick else HandsBudget())
    if n_real is not None:
        budget = dataclasses.replace(budget, n_real=n_real)
    methods = tuple(methods or HAND_METHODS)
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise ValueError(f"unknown methods {unknown}; choose from {METHODS}")
    fc_row = budget.fc_row and budget.head != "fc" and "fm" in methods
    if budget.fm_method not in (*methods, *(("fm_fc",) if fc_row else ())):
        log.warning("the checks' Feature Mapping model %s (budget.fm_method) is not among the methods %s: "
                    "no run-time row without refinement and no real NYU frame check", budget.fm_method, methods)
    stream_cfg = hands_stream_config(budget)
    shape, sensor_cfg = xdata.hand_train_shape(), sensor.SensorConfig.nominal()
    # The refiner's crops of the training frames are made as the pairs render them (one render per frame).
    n_fit = budget.n_real - budget.validation_frames
    recorder = SensorCropRecorder(min(budget.refine_sensor_frames, n_fit), refiner_config(budget))
    data = xdata.hands_task_data(budget.n_real, shape, sensor_cfg, stream_cfg=stream_cfg,
                                 synthetic_pool=budget.synthetic_pool, augment=budget.augment(),
                                 holdout=budget.validation_frames, on_render=(recorder,))
    runs = [(budget.head, methods, out)]
    if fc_row:
        runs.append(("fc", ("fm",), out / "fc"))
    paths: dict[str, Path] = {}
    wall: dict[str, float] = {}
    for head, run_methods, folder in runs:
        p, w = xdata.train_all(hands_train_config(budget, device, head), data, folder, run_methods)
        suffix = "" if head == budget.head else f"_{head}"
        paths.update({f"{m}{suffix}": v for m, v in p.items() if m != "stage1"})
        wall.update({f"{m}{suffix}": v for m, v in w.items()})

    # The centre refiners, trained once per data regime and attached to each checkpoint.
    t_ref = time.perf_counter()
    train_set = SensorHandSet(budget.n_real, shape, sensor_cfg, xdata.HAND_TRAIN_SEED, stream_cfg)
    refiners = train_refiners(budget, train_set, n_fit, recorded=recorder)
    refine_s = time.perf_counter() - t_ref
    for m, p in paths.items():
        checkpoint.attach_refiner(p, refiners["synthetic" if m == "synthetic" else "real"]["refiner"])

    # Settings are chosen on these: held-out frames of the training person (crops at the located centre).
    validation = {}
    if budget.validation_frames:
        val_set = xdata.hand_validation_set(budget.n_real, budget.validation_frames, shape, sensor_cfg,
                                            stream_cfg=stream_cfg)
        val = xdata.stack_items(val_set, ("real", "centre", "joints"), "validation frames")
        vc, vgt = val["centre"].numpy().astype(np.float64), val["joints"].numpy().astype(np.float64)
        for m, p in paths.items():
            est = predict_crops(p, val["real"], vc, stream_cfg.cube_m, device)
            validation[m] = ev.score_hands(est, vgt, nyu.JOINT_NAMES)["mean_error_mm"]

    test = xdata.hand_test_set(budget.n_test, stream_cfg=stream_cfg)
    items = xdata.stack_items(test, ("real", "centre", "joints"), "test frames")
    centres, gt = items["centre"].numpy().astype(np.float64), items["joints"].numpy().astype(np.float64)
    estimators = {m: load_estimator(p, device=device) for m, p in paths.items()}
    fm = budget.fm_method
    if fm in paths:  # the same fm model on the located centre alone: the share of the refiner and recentre
        estimators[f"{fm} (no refinement)"] = load_estimator(paths[fm], device=device, refine=False, recentre=0)
    runtime = runtime_path(estimators, test, min(budget.runtime_frames, budget.n_test))  # type: ignore[arg-type]

    table: dict[str, Any] = {}
    curves = {}
    for m, p in paths.items():
        t0 = time.perf_counter()
        est = predict_crops(p, items["real"], centres, stream_cfg.cube_m, device)
        scores = ev.score_hands(est, gt, nyu.JOINT_NAMES)
        curve = ev.hand_curve(est, gt)
        curves[m] = (curve["threshold_mm"], curve["fraction"])
        folder = out / m / "eval"
        folder.mkdir(parents=True, exist_ok=True)
        ev.write_json(folder / "metrics.json", {**scores, "curve": curve, "runtime_path": runtime[m]})
        table[m] = {**scores, "runtime": runtime[m], "train_s": wall.get(m, 0.0), "eval_s": time.perf_counter() - t0,
                    "validation_mm": validation.get(m, float("nan")),
                    "head": json.loads(Path(p).read_text())["net"]["head"]}

    nyu_dir = Path(nyu_dir) if nyu_dir is not None else DEFAULT_NYU
    nyu_check = {"model": fm, **nyu_frame_check(paths[fm], nyu_dir, device)} if fm in paths else {}
    header = {"n_real": budget.n_real, "validation_frames": budget.validation_frames, "n_test": budget.n_test,
              "test_fallbacks": test.fallbacks, "sampled_shapes": budget.sampled_shapes,
              "train_fallbacks": data.meta["data"].get("pair_fallbacks"),
              "runtime_frames": min(budget.runtime_frames, budget.n_test),
              "budget": ", ".join(f"{k}={v}" for k, v in dataclasses.asdict(budget).items()),
              "stage1_s": wall.get("stage1", 0.0), "nyu_frame": nyu_check,
              "augment": dataclasses.asdict(budget.augment()), "refine_s": refine_s,
              "refiners": {k: {kk: vv for kk, vv in v.items() if kk != "refiner"} for k, v in refiners.items()},
              "fm_method": fm, "runtime_without_refinement": runtime.get(f"{fm} (no refinement)"),
              "recentre": next(iter(estimators.values())).recentre}  # every method's (the node default)
    write_hands_table(out, table, header)
    plot_curves(out / "curves_max_error.png", curves, "max joint error threshold (mm)", "fraction of frames",
                title="Hands: frames within a max joint error")
    plot_bars(out / "bars_per_joint.png", list(nyu.JOINT_NAMES),
              {m: [t["per_joint_mm"][j] for j in nyu.JOINT_NAMES] for m, t in table.items()}, "mean error (mm)",
              title="Hands: per-joint error")
    doc = {"header": header, "methods": table, "quick": quick, "budget": dataclasses.asdict(budget),
           "train_config": json.loads(json.dumps(dataclasses.asdict(hands_train_config(budget, device)), default=list)),
           "wall_s": time.perf_counter() - t_start}
    ev.write_json(out / "table.json", doc)
    return doc
