"""The hand-centre refiner: its shapes, its pool's targets, its place in the hand checkpoint, that a short
training moves located centres towards the palm, and the estimator's refinement steps."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from featmap_ros import geometry as geo
from featmap_ros.datasets.hand_refine import STARTS, RefinePoolConfig, RefinePoolError, SensorCropRecorder, refine_pool
from featmap_ros.datasets.hand_streams import SensorHandSet
from featmap_ros.datasets.nyu import JOINT_NAMES, NYU_INTRINSICS
from featmap_ros.estimator import EstimatorError, HandEstimator, load_estimator
from featmap_ros.model import checkpoint
from featmap_ros.model.nets import FeatureMappingModel, NetConfig
from featmap_ros.model.refiner import (
    REFINER_PREFIX,
    CentreRefiner,
    RefinerConfig,
    RefinerError,
    centre_errors_m,
    flip_batch,
    predict_offsets,
    train_refiner,
)
from featmap_ros.render.hand import HandShape

K = NYU_INTRINSICS.K
SMALL = RefinerConfig(input_size=32, width=4, iterations=2)


@pytest.fixture(autouse=True)
def one_thread() -> None:
    torch.set_num_threads(1)


def hand_checkpoint(folder: Path, seed: int = 0) -> Path:
    """A tiny random hand checkpoint (input 32, width 4) with the estimator's metadata; its JSON."""
    torch.manual_seed(seed)
    cfg = NetConfig(task="hands", input_size=32, width=4, feature_dim=16, mapping=True, dropout=0.0)
    meta = {"hands": {"joint_names": list(JOINT_NAMES), "cube_m": 0.3}, "crop": {"size": 32}, "method": "fm"}
    return checkpoint.save(folder / "model", FeatureMappingModel(cfg), meta)


def constant_refiner(offset: tuple[float, float, float], config: RefinerConfig = SMALL) -> CentreRefiner:
    """A refiner that predicts `offset` for every crop (its last layer's bias)."""
    refiner = CentreRefiner(config)
    with torch.no_grad():
        refiner.head[-1].weight.zero_()
        refiner.head[-1].bias.copy_(torch.tensor(offset))
    return refiner.eval()


def blob_depth() -> np.ndarray:
    """A hand-sized blob at 0.6 m in front of a wall at 1.2 m, 640x480 metres."""
    depth = np.full((480, 640), 1.2, np.float32)
    v, u = np.mgrid[0:480, 0:640]
    depth[(u - 320) ** 2 / 60**2 + (v - 240) ** 2 / 90**2 < 1] = 0.6
    return depth


# ---- the network


def test_the_refiner_maps_a_batch_of_crops_to_one_offset_each() -> None:
    for config in (RefinerConfig(), SMALL):
        s = config.input_size
        out = CentreRefiner(config)(torch.rand(5, 1, s, s) * 2 - 1)
        assert out.shape == (5, 3) and out.dtype == torch.float32 and torch.isfinite(out).all()
    assert RefinerConfig.from_dict(SMALL.to_dict()) == SMALL
    with pytest.raises(ValueError, match="multiple of 16"):
        RefinerConfig(input_size=40)
    with pytest.raises(ValueError, match="iterations"):
        RefinerConfig(iterations=0)
    with pytest.raises(ValueError, match="missing"):
        RefinerConfig.from_dict({"input_size": 64})


def test_flipping_a_crop_moves_its_target_where_the_mirrored_scene_puts_the_palm() -> None:
    # A small fronto-parallel disc at the "palm" P, cropped around a centre c off the optical axis.
    c = np.array([0.12, -0.08, 0.6])
    P = np.array([0.15, -0.05, 0.63])

    def disc_at(p: np.ndarray) -> np.ndarray:
        depth = np.full((480, 640), np.nan, np.float32)
        u, v = geo.project(p[None], K)[0]
        vv, uu = np.mgrid[0:480, 0:640]
        depth[(uu - u) ** 2 + (vv - v) ** 2 < 12**2] = p[2]
        return depth

    def disc_centre(crop: np.ndarray) -> np.ndarray:
        v, u = np.nonzero(crop < 1)
        return np.array([u.mean(), v.mean()])

    half = 0.15
    crop, _ = geo.crop_depth_cube(disc_at(P), K, c, cube_m=0.3, out=64)
    offset = torch.tensor(((P - c) / half)[None], dtype=torch.float32)
    centre = torch.tensor(c[None], dtype=torch.float32)
    for fu, fv in ((True, False), (False, True), (True, True)):
        image, target = flip_batch(torch.from_numpy(crop[None, None]), offset, centre, torch.tensor([fu]),
                                   torch.tensor([fv]))
        mirrored_palm = c + target[0].double().numpy() * half
        want, _ = geo.crop_depth_cube(disc_at(mirrored_palm), K, c, cube_m=0.3, out=64)
        assert np.abs(disc_centre(image[0, 0].numpy()) - disc_centre(want)).max() < 0.5
        assert target[0, 2] == offset[0, 2]


# ---- the pool


@pytest.fixture(scope="module")
def pool() -> dict[str, np.ndarray]:
    """~460 crops at 64 px: 40 clean renders and 36 sensor-domain frames, 6 crops each."""
    torch.set_num_threads(1)
    sensor = SensorHandSet(36, HandShape.sample(np.random.default_rng(3)), seed=5)
    return refine_pool(40, sensor, config=RefinerConfig(), seed=0, progress=False)


def test_every_pool_crop_plus_its_target_is_the_palm(pool) -> None:
    n = len(pool["image"])
    assert pool["image"].shape == (n, 1, 64, 64) and pool["image"].dtype == np.float32
    assert pool["offset"].shape == (n, 3) and pool["offset"].dtype == np.float32
    assert np.abs(pool["image"]).max() <= 1.0
    recovered = pool["centre"] + pool["offset"].astype(np.float64) * 0.15
    assert np.abs(recovered - pool["palm"]).max() < 1e-6  # float32 targets: a micrometre
    assert set(np.unique(pool["source"])) == {0, 1} and n >= 0.9 * 76 * 6
    # Both starts of the run-time loop are there: the located centre (jittered) and near the palm.
    starts = np.bincount(pool["start"], minlength=len(STARTS))
    assert starts[STARTS.index("located")] > 0.5 * n and starts[STARTS.index("near_palm")] > 0.25 * n
    located = np.linalg.norm(pool["centre"] - pool["palm"], axis=1)[pool["start"] == 0]
    near = np.linalg.norm(pool["centre"] - pool["palm"], axis=1)[pool["start"] == 1]
    assert np.median(near) < np.median(located)


def test_the_first_crop_of_a_frame_is_at_the_located_centre() -> None:
    sensor = SensorHandSet(2, HandShape.sample(np.random.default_rng(3)), seed=5)
    small = refine_pool(0, sensor, config=SMALL, pool=RefinePoolConfig(located_crops=2, near_palm_crops=1),
                        seed=1, progress=False)
    depth, joints, _ = sensor.frame(1)
    first = np.flatnonzero(small["frame"] == 1)[0]
    if small["start"][first] == STARTS.index("located"):
        assert np.allclose(small["centre"][first], geo.locate_hand(depth, K, cube_m=0.3))
    want, _ = geo.crop_depth_cube(depth, K, small["centre"][first], cube_m=0.3, out=32)
    assert np.array_equal(small["image"][first, 0], want)
    again = refine_pool(0, sensor, config=SMALL, pool=RefinePoolConfig(located_crops=2, near_palm_crops=1),
                        seed=1, progress=False)
    assert all(np.array_equal(small[k], again[k]) for k in small)  # deterministic for a seed


def test_crops_recorded_while_the_pairs_render_are_the_pools_own_without_a_second_render(monkeypatch) -> None:
    settings = {"config": SMALL, "pool": RefinePoolConfig(located_crops=2, near_palm_crops=1), "seed": 2}
    reference = refine_pool(3, SensorHandSet(4, HandShape.sample(np.random.default_rng(3)), seed=5),
                            progress=False, **settings)
    sensor = SensorHandSet(4, HandShape.sample(np.random.default_rng(3)), seed=5)
    recorder = SensorCropRecorder(3, **settings)
    sensor.on_render.append(recorder)
    for i in (2, 0, 3, 1, 0):  # the pairs, in any order; frame 3 is not asked for, a repeat is cached
        sensor[i]
    assert sorted(recorder.frames) == [0, 1, 2]
    renders = []
    frame = SensorHandSet.frame
    monkeypatch.setattr(SensorHandSet, "frame", lambda self, i: renders.append(i) or frame(self, i))
    pooled = refine_pool(3, sensor, progress=False, recorded=recorder, **settings)
    assert renders == [3]  # only the frame the recorder did not see
    assert pooled.keys() == reference.keys() and all(np.array_equal(pooled[k], reference[k]) for k in pooled)
    with pytest.raises(RefinePoolError, match="recorded crops were made with"):
        refine_pool(0, sensor, progress=False, recorded=recorder, **{**settings, "seed": 3})


def split(pool: dict[str, np.ndarray], held_out: np.ndarray) -> dict[str, np.ndarray]:
    return {k: v[held_out] if v.ndim else v for k, v in pool.items()}


def test_a_short_training_brings_held_out_centres_closer_to_the_palm(pool) -> None:
    held = pool["frame"] % 4 == 0  # whole frames held out
    train, test = split(pool, ~held), split(pool, held)
    refiner = train_refiner(train, RefinerConfig(), steps=120, batch=32, lr=2e-3, seed=0)
    before, after = centre_errors_m(refiner, test)
    print(f"held-out crops {len(before)}: median centre-to-palm {1e3 * np.median(before):.1f} mm before, "
          f"{1e3 * np.median(after):.1f} mm after one refinement step")
    assert np.median(after) < 0.6 * np.median(before)
    located = test["start"] == 0
    assert np.median(after[located]) < 0.6 * np.median(before[located])
    # Deterministic for a seed.
    again = train_refiner(train, RefinerConfig(), steps=120, batch=32, lr=2e-3, seed=0)
    assert np.array_equal(predict_offsets(refiner, test["image"][:8]), predict_offsets(again, test["image"][:8]))
    # The memory format of training is not in the result: returned in the default format, as accurate as
    # an NCHW training (not the same weights: float rounding differs, and Adam turns that into other steps).
    assert all(p.is_contiguous() for p in refiner.parameters())
    nchw = train_refiner(train, RefinerConfig(), steps=120, batch=32, lr=2e-3, seed=0, channels_last=False)
    after_nchw = centre_errors_m(nchw, test)[1]
    print(f"after, trained in NCHW: {1e3 * np.median(after_nchw):.1f} mm")
    assert np.median(after_nchw) == pytest.approx(np.median(after), rel=0.15)


def test_the_training_calls_on_step_before_each_step_in_its_own_thread(pool, monkeypatch) -> None:
    # The main job's hand-over (take_freed_cores) changes the calling thread's torch threads between steps.
    import threading

    from featmap_ros.model import refiner as refiner_mod

    events: list[tuple[str, int, int]] = []  # (what, step or -1, torch threads)
    forward = refiner_mod.CentreRefiner.forward

    def watched(self, x):
        events.append(("forward", -1, torch.get_num_threads()))
        return forward(self, x)

    monkeypatch.setattr(refiner_mod.CentreRefiner, "forward", watched)
    callers = set()
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)

        def on_step(step: int) -> None:
            callers.add(threading.get_ident())
            events.append(("on_step", step, torch.get_num_threads()))
            if step == 2:
                torch.set_num_threads(2)

        train_refiner(pool, RefinerConfig(), steps=4, batch=8, seed=0, on_step=on_step)
    finally:
        torch.set_num_threads(before)
    assert callers == {threading.get_ident()}
    assert events == [("on_step", 0, 1), ("forward", -1, 1), ("on_step", 1, 1), ("forward", -1, 1),
                      ("on_step", 2, 1), ("forward", -1, 2), ("on_step", 3, 2), ("forward", -1, 2)]


def test_training_refuses_a_pool_that_does_not_fit(pool) -> None:
    with pytest.raises(RefinerError, match=r"\(N, 1, 32, 32\)"):
        train_refiner(pool, SMALL, steps=1)
    bad = {**pool, "offset": np.full_like(pool["offset"], np.nan)}
    with pytest.raises(RefinerError, match="non-finite"):
        train_refiner(bad, RefinerConfig(), steps=1)


# ---- the checkpoint


def test_a_refiner_attached_to_a_hand_checkpoint_loads_back_with_the_same_outputs(tmp_path) -> None:
    ckpt = hand_checkpoint(tmp_path)
    model, before_meta = checkpoint.load(ckpt)
    x = torch.rand(3, 1, 32, 32) * 2 - 1
    with torch.no_grad():
        joints_before = model.predict_real(x).outputs
    torch.manual_seed(1)
    refiner = CentreRefiner(SMALL).eval()
    torch.nn.init.normal_(refiner.head[-1].weight, std=0.1)
    assert checkpoint.load_refiner(ckpt) is None  # an old checkpoint: no refiner, loads as before
    assert checkpoint.attach_refiner(ckpt, refiner, SMALL) == ckpt
    doc = json.loads(ckpt.read_text())
    assert doc["hands"]["refiner"] == SMALL.to_dict() and doc["hands"]["joint_names"] == list(JOINT_NAMES)
    assert doc["weights"]["sha256"] != before_meta["weights"]["sha256"]
    assert not list(tmp_path.glob("model.prev.*")) and not list(tmp_path.glob(".*.tmp"))
    loaded, config = checkpoint.load_refiner(ckpt)
    assert config == SMALL
    with torch.no_grad():
        assert torch.equal(loaded(x), refiner(x))
    model2, meta = checkpoint.load(ckpt, require_estimator_meta=True)
    with torch.no_grad():
        assert torch.equal(model2.predict_real(x).outputs, joints_before)  # the joints network is untouched
    checkpoint.verify(ckpt)
    # Attaching again replaces the refiner; keep_previous leaves the checkpoint before it whole.
    checkpoint.attach_refiner(ckpt, constant_refiner((0.1, 0.0, 0.0)), keep_previous=True)
    with torch.no_grad():
        assert torch.allclose(checkpoint.load_refiner(ckpt)[0](x), torch.tensor([0.1, 0.0, 0.0]).expand(3, 3))
        assert torch.equal(checkpoint.load_refiner(checkpoint.previous_stem(ckpt))[0](x), refiner(x))


@pytest.mark.parametrize("kill_at", range(1, 5))  # links of the weights and the previous JSON, weights, JSON
def test_a_kill_inside_attach_refiner_leaves_a_complete_checkpoint(tmp_path, die_at_rename, kill_at) -> None:
    ckpt = hand_checkpoint(tmp_path)
    restore = die_at_rename(kill_at, KeyboardInterrupt)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.attach_refiner(ckpt, constant_refiner((0.1, 0.0, 0.0)))
    restore()
    assert checkpoint.recover(ckpt) == ckpt
    checkpoint.load(ckpt, require_estimator_meta=True)
    assert checkpoint.load_refiner(ckpt) is None  # the checkpoint as it was before the attach
    checkpoint.attach_refiner(ckpt, constant_refiner((0.1, 0.0, 0.0)))
    assert checkpoint.load_refiner(ckpt) is not None


def rewrite(ckpt: Path, change) -> None:
    doc = json.loads(ckpt.read_text())
    change(doc)
    ckpt.write_text(json.dumps(doc))


@pytest.mark.parametrize("section, message", [
    ("not a mapping", "hands.refiner is not a usable RefinerConfig"),
    ({"input_size": 32, "width": 4, "iterations": 2}, "missing \\['cube_m'\\]"),
    ({**SMALL.to_dict(), "input_size": 40}, "multiple of 16"),
    ({**SMALL.to_dict(), "iterations": 1.5}, "iterations must be an integer"),
    ({**SMALL.to_dict(), "width": 8}, "refiner weights shape mismatches"),
])
def test_a_malformed_refiner_section_is_refused_naming_it(tmp_path, section, message) -> None:
    ckpt = checkpoint.attach_refiner(hand_checkpoint(tmp_path), constant_refiner((0.0, 0.0, 0.0)))
    rewrite(ckpt, lambda doc: doc["hands"].update(refiner=section))
    for load in (lambda: checkpoint.load(ckpt), lambda: checkpoint.load_refiner(ckpt),
                 lambda: load_estimator(ckpt, device="cpu")):
        with pytest.raises(checkpoint.CheckpointError, match=message):
            load()


def test_refiner_tensors_and_their_description_come_together(tmp_path) -> None:
    old = hand_checkpoint(tmp_path / "old")
    rewrite(old, lambda doc: doc["hands"].update(refiner=SMALL.to_dict()))
    with pytest.raises(checkpoint.CheckpointError, match=f"no {REFINER_PREFIX}"):
        checkpoint.load(old)
    new = checkpoint.attach_refiner(hand_checkpoint(tmp_path / "new"), constant_refiner((0.0, 0.0, 0.0)))
    rewrite(new, lambda doc: doc["hands"].pop("refiner"))
    with pytest.raises(checkpoint.CheckpointError, match="no hands.refiner to describe them"):
        checkpoint.load(new)
    with pytest.raises(checkpoint.CheckpointError, match="does not describe the refiner"):
        checkpoint.attach_refiner(old, constant_refiner((0.0, 0.0, 0.0)), RefinerConfig())


# ---- the estimator


def test_the_estimator_moves_the_located_centre_by_each_refinement_step(tmp_path) -> None:
    ckpt = checkpoint.attach_refiner(hand_checkpoint(tmp_path), constant_refiner((0.1, -0.05, 0.02)))
    est = load_estimator(ckpt, device="cpu", recentre=0)  # the refiner alone: no recentre passes
    plain = load_estimator(ckpt, device="cpu", refine=False, recentre=0)
    assert est.refine and not plain.refine and est.refine_iterations == 2
    (hand,), (located,) = est.estimate(blob_depth(), NYU_INTRINSICS), plain.estimate(blob_depth(), NYU_INTRINSICS)
    # Two steps of the constant offset, each over half the refiner's 0.3 m cube.
    assert np.allclose(hand.centre - located.centre, 2 * 0.15 * np.array([0.1, -0.05, 0.02]), atol=1e-6)
    assert np.allclose(located.centre, geo.locate_hand(blob_depth(), K, cube_m=0.3))
    assert np.isfinite(hand.joints_xyz).all() and not est.skipped
    # The joints are cropped at the refined centre: the same net on a cube there.
    crop, cube = geo.crop_depth_cube(blob_depth(), K, hand.centre, cube_m=0.3, out=32)
    outputs, _ = est.net.run(crop[None, None])
    assert np.allclose(hand.joints_xyz, cube.denormalise_joints(outputs[0].reshape(-1, 3)), atol=1e-9)


def test_a_non_finite_refiner_offset_is_counted_and_the_last_finite_centre_kept(tmp_path) -> None:
    ckpt = checkpoint.attach_refiner(hand_checkpoint(tmp_path), constant_refiner((np.nan, 0.0, 0.0)))
    est = load_estimator(ckpt, device="cpu", recentre=0)
    (hand,) = est.estimate(blob_depth(), NYU_INTRINSICS)
    assert est.skipped["non_finite_refine"] == 1  # once per hand: it is not moved again
    assert np.allclose(hand.centre, geo.locate_hand(blob_depth(), K, cube_m=0.3))
    assert np.isfinite(hand.joints_xyz).all() and np.isfinite(hand.centre).all()
    # A step that would put the centre closer than half a cube is refused the same way.
    far = checkpoint.attach_refiner(ckpt, constant_refiner((0.0, 0.0, -5.0)))
    est = load_estimator(far, device="cpu", recentre=0)
    (hand,) = est.estimate(blob_depth(), NYU_INTRINSICS)
    assert est.skipped["refine_out_of_range"] == 1 and hand.centre[2] > 0.5


def test_a_bare_torch_model_cannot_run_the_checkpoints_refiner(tmp_path) -> None:
    ckpt = checkpoint.attach_refiner(hand_checkpoint(tmp_path), constant_refiner((0.0, 0.0, 0.0)))
    model, meta = checkpoint.load(ckpt)
    with pytest.raises(EstimatorError, match="cannot run it"):
        HandEstimator(model, meta, device="cpu")
    assert not HandEstimator(model, meta, device="cpu", refine=False).refine


def test_the_node_parameter_refine_centre_reaches_the_estimator(tmp_path) -> None:
    from featmap_ros.ros.config import NodeConfig
    from featmap_ros.ros.processor import load_estimator_for

    ckpt = checkpoint.attach_refiner(hand_checkpoint(tmp_path), constant_refiner((0.1, 0.0, 0.0)))
    on = load_estimator_for(NodeConfig(task="hands", model_path=str(ckpt), backend="torch", device="cpu", recentre=0))
    off = load_estimator_for(NodeConfig(task="hands", model_path=str(ckpt), backend="torch", device="cpu",
                                        refine_centre=False, recentre=0))
    assert on.refine and not off.refine
    (moved,), (located,) = on.estimate(blob_depth(), NYU_INTRINSICS), off.estimate(blob_depth(), NYU_INTRINSICS)
    assert moved.centre[0] - located.centre[0] == pytest.approx(2 * 0.15 * 0.1, abs=1e-6)
