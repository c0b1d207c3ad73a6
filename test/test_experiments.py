"""Experiments: data builders feed the trainer, every method lands in one table, NYU runs on a fixture."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
from conftest import NYU

from featmap_ros.datasets import nyu
from featmap_ros.experiments import data as xdata
from featmap_ros.train import StreamContext


def test_endless_indices_resume_where_they_stopped_and_differ_per_rank():
    ctx = StreamContext(batch_size=4, seed=3, rank=0, world_size=2, start_step=0)
    it = xdata.endless_indices(10, 0, ctx)
    first = [next(it) for _ in range(4 * 7)]
    assert sorted(first[:10]) == list(range(10)) and sorted(first[10:20]) == list(range(10))  # reshuffled epochs
    resumed = xdata.endless_indices(10, 0, StreamContext(4, 3, 0, 2, start_step=3))
    assert [next(resumed) for _ in range(16)] == first[12:]
    other = xdata.endless_indices(10, 0, StreamContext(4, 3, 1, 2, 0))
    assert [next(other) for _ in range(10)] != first[:10]


def test_objects_task_data_batches_and_estimator_meta(lmo_root):
    from featmap_ros.datasets.streams import ObjectStreamConfig, PairConfig

    data = xdata.objects_task_data(lmo_root, 2, [3, 8], (1, 5), ObjectStreamConfig(crop=32),
                                   PairConfig(crop=32, window_margin=1.3), num_workers=0)
    ctx = StreamContext(3, 0, 0, 1, 0)
    syn, pairs = next(data.synthetic(ctx)), next(data.pairs(ctx))
    assert set(syn) == {"image", "target", "obj_index"} and syn["image"].shape == (3, 3, 32, 32)
    assert set(pairs) == {"real", "syn", "target", "obj_index"} and pairs["target"].shape == (3, 16)
    assert [o["name"] for o in data.meta["objects"]] == ["ape", "can"]
    assert data.meta["crop"] == {"size": 32, "window_scale": 1.3}
    assert len(data.meta["objects"][0]["corners_m"]) == 8


def test_hand_test_set_is_another_person_and_sensor():
    from featmap_ros.render.sensor import SensorConfig

    test = xdata.hand_test_set(2)
    assert test.shape != xdata.hand_train_shape() and test.sensor_config == SensorConfig.test_time()
    data = xdata.hands_task_data(3, xdata.hand_train_shape(), synthetic_pool=4,
                                 stream_cfg=xdata.HandStreamConfig(crop_px=32))
    batch = next(data.pairs(StreamContext(2, 0, 0, 1, 0)))
    assert set(batch) == {"real", "syn", "target"} and batch["real"].shape == (2, 1, 32, 32)
    assert data.meta["hands"]["joint_names"] == list(nyu.JOINT_NAMES) and data.meta["crop"] == {"size": 32}


@pytest.mark.slow
def test_lmo_quick_run_writes_one_table_of_every_method(lmo_root, tmp_path):
    from featmap_ros.experiments.lmo import TRAINED_METHODS, run_lmo_experiment

    doc = run_lmo_experiment(lmo_root, 2, "0-300", "301-611", tmp_path, quick=True)
    # Every method with the default (dense) head; Feature Mapping again with the paper's BB8 head and PVNet's
    # keypoint head (the quick budget's compare_heads).
    methods = (*TRAINED_METHODS, "fm_bb8", "fm_keypoints")
    assert tuple(doc["methods"]) == methods
    saved = json.loads((tmp_path / "table.json").read_text())
    assert tuple(saved["methods"]) == methods
    for m in methods:
        t = saved["methods"][m]
        for split in ("all", "visib>=0.5"):
            assert set(t[split]["per_object"]) == {"ape", "can"}
            for k in ("proj_5px", "add_10", "cm5_deg5"):
                assert 0.0 <= t[split]["mean"][k] <= 100.0
        assert t["all"]["n_instances"] > 0
        assert t["head"] == {"fm_bb8": "bb8", "fm_keypoints": "keypoints"}.get(m, "dense")
        # How well each learnt the synthetic images themselves: 2 held-out crops of each of the 2 objects.
        assert t["synthetic_crops"]["n"] == 4 and 0.0 <= t["synthetic_crops"]["proj_5px"] <= 1.0
        # A median of None: most crops gave no pose (PnP refused a 7-step net's correspondences; seen for
        # fm_joint on one CPU), written as null rather than infinity.
        median = t["synthetic_crops"]["median_px"]
        assert median is None or median > 0
        metrics = json.loads((tmp_path / m / "eval" / "metrics.json").read_text())
        assert 0.0 <= metrics["all"]["mean_over_objects"]["proj_5px"] <= 1.0
        assert (tmp_path / m / "eval" / "results.csv").is_file()
    table = (tmp_path / "table.md").read_text()
    assert all(f"| {m} |" in table for m in methods) and "2D-proj@5px" in table and "visib>=0.5" in table
    assert "synthetic crops" in table
    for png in ("bars_proj_5px.png", "bars_add_10.png", "curves_proj2d.png", "curves_add.png", "learning_curves.png"):
        assert (tmp_path / png).stat().st_size > 0
    # Learning curves on the held-out last training frame (never trained on) at every curve_every steps.
    assert doc["header"]["validation_frames"] and doc["header"]["validation_frames"] not in doc["header"]["fit_frames"]
    assert [p["step"] for p in doc["curves"]["fm"]] == [4, 7] and [p["step"] for p in doc["curves"]["real"]] == [4, 7]
    # Every trained method spent the same number of steps.
    steps = {m: json.loads((tmp_path / m / "model.json").read_text())["step"] for m in TRAINED_METHODS}
    for head in ("bb8", "keypoints"):
        steps[f"fm_{head}"] = json.loads((tmp_path / head / "fm" / "model.json").read_text())["step"]
    assert len(set(steps.values())) == 1


def test_lmo_validation_only_run_never_reads_the_test_frames(lmo_root, tmp_path, monkeypatch):
    from featmap_ros.experiments import lmo

    scored: list[str] = []
    real_run_bop = lmo.run_bop

    def spy(est, root, scene_id, spec, **kw):
        scored.append(spec)
        return real_run_bop(est, root, scene_id, spec, **kw)

    monkeypatch.setattr(lmo, "run_bop", spy)
    doc = lmo.run_lmo_experiment(lmo_root, 2, "0-300", "301-611", tmp_path, quick=True, methods=("fm_joint",),
                                 validation_only=True)
    assert doc["validation_only"] and doc["methods"] == ["fm_joint"]
    assert [p["step"] for p in doc["curves"]["fm_joint"]] == [4, 7]
    # Only the held-out training frame was scored: no test frame, no table.
    assert scored and {int(i) for spec in scored for i in spec.split(",")} == set(doc["validation_frames"])
    assert max(doc["validation_frames"]) <= 300 and not (tmp_path / "table.md").exists()
    assert json.loads((tmp_path / "curves.json").read_text())["curves"]["fm_joint"] == doc["curves"]["fm_joint"]
    assert (tmp_path / "learning_curves.png").stat().st_size > 0


@pytest.mark.slow
def test_hands_quick_run_writes_one_table_of_every_method(tmp_path):
    from featmap_ros.experiments.hands import HAND_METHODS, run_hands_experiment

    doc = run_hands_experiment(tmp_path, quick=True, nyu_dir=NYU)
    assert tuple(doc["methods"]) == (*HAND_METHODS, "fm_fc")  # every method on the vote head, plus the FC fm row
    for m, t in doc["methods"].items():
        assert t["head"] == ("fc" if m == "fm_fc" else "vote")
        assert t["mean_error_mm"] > 0 and math.isfinite(t["mean_error_mm"])
        assert math.isfinite(t["validation_mm"]) and math.isfinite(t["runtime"]["centre_error_mm_median"])
        assert len(t["per_joint_mm"]) == 14
        assert all(0.0 <= v <= 1.0 for v in t["max_error_fraction"].values())
        assert (tmp_path / m / "eval" / "metrics.json").is_file()
    table = (tmp_path / "table.md").read_text()
    assert all(f"| {m} |" in table for m in doc["methods"]) and "Per-joint" in table
    assert "clean renders of the nominal hand" in table and doc["header"]["sampled_shapes"] is False
    assert (tmp_path / "curves_max_error.png").is_file() and (tmp_path / "bars_per_joint.png").is_file()
    # The checks (no refinement, the real NYU frame) run the budget's Feature Mapping model.
    assert doc["header"]["fm_method"] == "fm_joint" and doc["header"]["runtime_without_refinement"]["frames"] == 2
    frame = doc["header"]["nyu_frame"]
    assert frame["model"] == "fm_joint"
    if (NYU / "test" / "depth_1_0000001.png").is_file():
        assert frame["available"] and ("mean_error_mm" in frame or frame["found"] is False)


# --------------------------------------------------------------------------------------------
# NYU, on a fixture in the dataset's own format


def _write_nyu_split(folder: Path, n: int, seed: int) -> np.ndarray:
    """Render n hands into NYU depth PNGs and a joint_data.mat (mm, y up, 36 joints); return joints (n, 14, 3) m."""
    import scipy.io

    from featmap_ros.render.hand import HandRenderer, HandShape, sample_poses

    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    shape = HandShape.sample(rng)
    out = HandRenderer(nyu.NYU_INTRINSICS).render(shape, sample_poses(rng, n, shape, nyu.NYU_INTRINSICS))
    joints = out.geometry.nyu_joints
    xyz36 = np.zeros((1, n, 36, 3))
    uvd36 = np.zeros((1, n, 36, 3))
    K = nyu.NYU_INTRINSICS.K
    for i in range(n):
        depth = out.depth[i].copy()
        depth[~np.isfinite(depth)] = 2.001  # NYU's background value
        nyu.write_depth(folder / f"depth_1_{i + 1:07d}.png", depth)
        uv = (K @ joints[i].T).T
        uvd36[0, i, nyu.EVAL_JOINT_IDS] = np.c_[uv[:, :2] / uv[:, 2:], joints[i][:, 2] * 1000.0]
        xyz36[0, i, nyu.EVAL_JOINT_IDS] = joints[i] * 1000.0 * np.array([1.0, -1.0, 1.0])
    scipy.io.savemat(str(folder / "joint_data.mat"), {"joint_uvd": uvd36, "joint_xyz": xyz36})
    return joints


def test_fit_hand_pose_recovers_the_nominal_hands_own_joints():
    from featmap_ros.experiments.nyu import fit_hand_pose
    from featmap_ros.render.hand import HandShape, forward_kinematics, sample_poses

    pose = sample_poses(np.random.default_rng(5), 1, HandShape.nominal(), nyu.NYU_INTRINSICS)
    joints = forward_kinematics(HandShape.nominal(), pose).nyu_joints[0]
    fitted, rms = fit_hand_pose(joints)
    assert rms < 0.005
    assert np.abs(forward_kinematics(HandShape.nominal(), fitted).nyu_joints[0] - joints).max() < 0.015


@pytest.mark.slow
def test_nyu_experiment_runs_on_a_fixture_in_the_nyu_format(tmp_path):
    from featmap_ros.experiments.nyu import NYU_METHODS, run_nyu_experiment

    root = tmp_path / "nyu"
    joints = _write_nyu_split(root / "train", 4, seed=0)
    _write_nyu_split(root / "test", 3, seed=1)
    assert np.allclose(nyu.read_split(root / "train").joints_xyz, joints, atol=1e-6)
    doc = run_nyu_experiment(root, tmp_path / "out", quick=True, device="cpu")
    assert tuple(doc["methods"]) == NYU_METHODS and doc["n_train"] == 4 and doc["n_test"] == 3
    for t in doc["methods"].values():
        assert math.isfinite(t["mean_error_mm"]) and len(t["per_joint_mm"]) == 14
    assert (tmp_path / "out" / "table.md").is_file() and (tmp_path / "out" / "nyu_fits.npz").is_file()


def test_a_hands_run_without_the_checks_model_says_what_it_skips(tmp_path, caplog, monkeypatch):
    from featmap_ros.experiments import data as xdata
    from featmap_ros.experiments.hands import run_hands_experiment

    class Stop(Exception):
        pass

    def stop(*args, **kwargs):
        raise Stop

    monkeypatch.setattr(xdata, "hands_task_data", stop)  # the warning comes first; nothing is rendered or trained
    for methods, warned in [(("synthetic",), True), (("fm_joint",), False), (("fm",), True)]:
        caplog.clear()
        with caplog.at_level("WARNING", logger="featmap_ros.experiments.hands"), pytest.raises(Stop):
            run_hands_experiment(tmp_path, quick=True, methods=methods, nyu_dir=NYU)
        assert ("fm_joint (budget.fm_method) is not among the methods" in caplog.text) is warned, methods


@pytest.mark.parametrize("text,through_f", [("", True), ("feat_through_f: false\n", False)])
def test_lmo_budget_yaml_sets_which_parts_the_feature_loss_trains(tmp_path, text, through_f):
    """`experiment lmo --budget` with feat_through_f reaches every method's LossConfig (default: through f)."""
    from featmap_ros.experiments.lmo import LmoBudget, lmo_train_config
    from featmap_ros.train import load_dataclass_yaml

    path = tmp_path / "budget.yaml"
    path.write_text(text + "stage1_steps: 7\n")
    budget = load_dataclass_yaml(LmoBudget, str(path))
    cfg = lmo_train_config(budget, n_objects=8)
    assert (cfg.loss.feat_through_f, cfg.stage1_steps) == (through_f, 7)


@pytest.mark.parametrize("text,seed", [("", 0), ("seed: 3\n", 3)])
def test_hands_budget_yaml_sets_every_methods_training_seed(tmp_path, text, seed):
    """`experiment hands --budget` with seed reaches every method's TrainConfig, the FC row's too."""
    from featmap_ros.experiments.hands import HandsBudget, hands_train_config
    from featmap_ros.train import load_dataclass_yaml

    path = tmp_path / "budget.yaml"
    path.write_text(text + "stage1_steps: 7\n")
    budget = load_dataclass_yaml(HandsBudget, str(path))
    for head in ("vote", "fc"):
        cfg = hands_train_config(budget, head=head)
        assert (cfg.seed, cfg.net.head) == (seed, head)


def test_hands_budget_mapping_blocks_reach_g_and_are_checked(tmp_path):
    """mapping_blocks sets g's depth in the trained model; zero blocks (no g at all) is refused."""
    from featmap_ros.experiments.hands import QUICK, HandsBudget, hands_train_config
    from featmap_ros.model.nets import FeatureMappingModel

    cfg = hands_train_config(dataclasses.replace(QUICK, mapping_blocks=3))
    model = FeatureMappingModel(dataclasses.replace(cfg.net, mapping=True))
    assert len(model.g) == 3
    with pytest.raises(ValueError, match="mapping_blocks"):
        HandsBudget(mapping_blocks=0)


@pytest.mark.parametrize("sampled", [False, True])
def test_hands_budget_sampled_shapes_render_the_pool_with_other_hands(monkeypatch, sampled):
    """sampled_shapes reaches the synthetic pool: a new sampled hand every render batch, else the nominal one."""
    from featmap_ros.experiments import data as xdata
    from featmap_ros.experiments.hands import QUICK, hands_stream_config
    from featmap_ros.render.hand import HandRenderer, HandShape

    shapes = []
    render = HandRenderer.render

    def spy(self, shape, pose, **kwargs):
        shapes.append(shape)
        return render(self, shape, pose, **kwargs)

    monkeypatch.setattr(HandRenderer, "render", spy)
    cfg = dataclasses.replace(hands_stream_config(dataclasses.replace(QUICK, sampled_shapes=sampled)), render_batch=4)
    pool = xdata.render_synthetic_pool(12, 0, cfg)
    assert pool["image"].shape[0] == 12 and bool(pool["target"].isfinite().all())
    assert len(shapes) == 3
    if sampled:
        assert all(s != HandShape.nominal() for s in shapes) and len({repr(s) for s in shapes}) == 3
    else:
        assert all(s == HandShape.nominal() for s in shapes)


def test_train_all_refuses_no_stage2_for_methods_seeded_from_stage1(tmp_path: Path) -> None:
    """stage2_steps 0 would deploy a seeded copy of stage 1 (no task metadata): a clear error before any training."""
    from featmap_ros.train import TrainConfig

    cfg = TrainConfig(method="synthetic", stage1_steps=5, stage2_steps=0)
    with pytest.raises(xdata.DataError, match="stage2_steps is 0: synthetic"):
        xdata.train_all(cfg, data=None, out=tmp_path, methods=["real", "synthetic"])  # type: ignore[arg-type]
    assert not any(tmp_path.iterdir())


def test_lmo_budget_coordinate_settings_reach_the_net_and_the_loss() -> None:
    """coord_bins reaches the dense net (never a compared BB8 net), dense_coord_weight the loss; bad weights refused."""
    from featmap_ros.experiments.lmo import LmoBudget, lmo_train_config
    from featmap_ros.train import TrainError, _check_ranges

    budget = LmoBudget(coord_bins=12, dense_coord_weight=3.0)
    cfg = lmo_train_config(budget, n_objects=2)
    assert cfg.net.coord_bins == 12 and cfg.loss.dense_coord_weight == 3.0 and cfg.net.head == "dense"
    assert lmo_train_config(budget, n_objects=2, head="bb8").net.coord_bins == 0
    assert LmoBudget().coord_bins == 16  # the default chosen on the training frames (docs/results.md, session 17)
    with pytest.raises(TrainError, match="dense_coord_weight"):
        _check_ranges(dataclasses.replace(cfg, loss=dataclasses.replace(cfg.loss, dense_coord_weight=-1.0)))


def test_lmo_budget_blocks_reach_every_head_and_come_from_a_budget_file(tmp_path: Path) -> None:
    from featmap_ros.experiments.lmo import LmoBudget, lmo_train_config
    from featmap_ros.train import TrainError, load_dataclass_yaml

    assert lmo_train_config(LmoBudget(), n_objects=2).net.blocks == (2, 2, 3, 3, 3)  # NetConfig's default
    path = tmp_path / "budget.yaml"
    path.write_text("blocks: [1, 2, 2, 2, 3]\n")
    budget = load_dataclass_yaml(LmoBudget, path)
    for head in ("dense", "bb8", "keypoints"):
        assert lmo_train_config(budget, n_objects=2, head=head).net.blocks == (1, 2, 2, 2, 3)
    with pytest.raises(ValueError, match="stages"):
        lmo_train_config(LmoBudget(blocks=(1, 2)), n_objects=2)
    path.write_text("blocks: 3\n")
    with pytest.raises(TrainError, match="blocks"):
        load_dataclass_yaml(LmoBudget, path)


def test_lmo_stream_draws_views_and_backgrounds_from_the_training_frames_only(lmo_root) -> None:
    """The synthetic stream's anchors (and their azimuth turn) and photo backgrounds come from the frames given."""
    from featmap_ros.datasets.bop import BopScene
    from featmap_ros.experiments.lmo import LmoBudget, lmo_stream_config

    scene = BopScene(lmo_root, 2)
    ids = [3, 8]
    cfg = lmo_stream_config(LmoBudget(anchor_azimuth_deg=90.0), scene, ids, (1, 5))
    frames = scene.frames(ids)
    expected = [(float(i.obj_id), *i.R.ravel(), *i.t.ravel())
                for f in frames for i in f.instances if i.obj_id in (1, 5)]
    assert len(cfg.pose_anchors) == len(expected) > 0
    np.testing.assert_allclose(np.array(cfg.pose_anchors), np.array(expected))
    assert cfg.anchor_azimuth_deg == 90.0 and cfg.anchor_spread_deg == LmoBudget().anchor_spread_deg
    assert set(cfg.photo_paths) == {str(f.rgb_path) for f in frames}
    assert lmo_stream_config(LmoBudget(), scene, ids, (1, 5)).anchor_azimuth_deg == 0.0  # the anchors' own sides
    free = lmo_stream_config(LmoBudget(anchor_spread_deg=0.0, train_frame_backgrounds=0.0), scene, ids, (1, 5))
    assert not free.pose_anchors and not free.photo_paths  # the stream's own LM-O ranges, no photo


def test_lmo_budget_seed_reaches_the_training_and_nothing_else() -> None:
    from featmap_ros.experiments.lmo import LmoBudget, lmo_pool_config, lmo_train_config

    one, two = LmoBudget(), LmoBudget(seed=7)
    assert lmo_train_config(one, 8).seed == 0 and lmo_train_config(two, 8).seed == 7
    assert dataclasses.replace(lmo_train_config(two, 8), seed=0) == lmo_train_config(one, 8)
    assert lmo_pool_config(one) == lmo_pool_config(two)  # the pools (and their augmentation) are the same


def test_lmo_pool_config_takes_the_budgets_pool_size_real_occluders_rotation_and_tone_changes() -> None:
    from featmap_ros.experiments.lmo import LmoBudget, lmo_pool_config

    cfg = lmo_pool_config(LmoBudget(pool_per_object=7, real_occluder_prob=0.5, colour_contrast=[0.8, 2.0],
                                    colour_saturation=(0.7, 2.5), colour_gamma=(0.8, 1.25), rotation_deg=20))
    assert cfg.n_per_object == 7 and cfg.augment.real_occluder_prob == 0.5 and cfg.augment.rotation_deg == 20
    assert lmo_pool_config(LmoBudget()).augment.rotation_deg == 0.0
    for bad in (-1.0, 200.0, float("nan")):
        with pytest.raises(ValueError, match="rotation_deg"):
            LmoBudget(rotation_deg=bad)
    assert (cfg.augment.contrast, cfg.augment.saturation, cfg.augment.gamma) == ((0.8, 2.0), (0.7, 2.5), (0.8, 1.25))
    default = lmo_pool_config(LmoBudget()).augment
    assert default.real_occluder_prob == 0.0 and default.contrast == default.saturation == default.gamma == (1.0, 1.0)
    for bad in ((2.0, 1.0), 1.5, "12"):  # refused with the budget, named as the budget names it
        with pytest.raises(ValueError, match="colour_contrast"):
            LmoBudget(colour_contrast=bad)
    assert LmoBudget(colour_gamma=[1, 2]).colour_gamma == (1.0, 2.0)  # stored as floats, as the augmentation's


def test_main_job_object_coord_bins_reach_its_net(tmp_path: Path, monkeypatch) -> None:
    from featmap_ros.experiments import main_job

    seen = {}

    def fake_train(cfg, data, out, method=None, on_step=None):
        seen["net"] = cfg.net
        raise RuntimeError("stop here")

    monkeypatch.setattr("featmap_ros.train.train", fake_train)
    size = dataclasses.replace(main_job.MainJobSize(), object_coord_bins=8)
    from featmap_ros import assets

    assets.write_object_models(tmp_path)
    assets.write_real_scene(tmp_path, 4, seed=0)
    with pytest.raises(RuntimeError, match="stop here"):
        main_job.train_objects(tmp_path, tmp_path / "run", size, "cpu", [0, 1])
    assert seen["net"].coord_bins == 8
