"""ONNX export and the ONNX Runtime backend: the same outputs as torch on the same crops, the same
poses to half a pixel, every head, the export's own checks, backend choice, and a node path that
never imports torch."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnxruntime", reason="the ONNX Runtime backend needs onnxruntime (pip install onnxruntime)")
pytest.importorskip("onnxscript", reason="torch.onnx's exporter needs onnxscript (pip install onnxscript)")
torch = pytest.importorskip("torch", reason="exporting needs PyTorch")

from featmap_ros import geometry as geo  # noqa: E402
from featmap_ros.backends import BackendError, onnx_net, torch_net  # noqa: E402
from featmap_ros.datasets.nyu import JOINT_NAMES, NYU_INTRINSICS  # noqa: E402
from featmap_ros.estimator import HandEstimator, ObjectEstimator, choose_backend, load_estimator  # noqa: E402
from featmap_ros.export import export_onnx  # noqa: E402
from featmap_ros.model import checkpoint  # noqa: E402
from featmap_ros.model.nets import DENSE_CHANNELS, FeatureMappingModel, NetConfig  # noqa: E402
from featmap_ros.model.refiner import CentreRefiner, RefinerConfig  # noqa: E402
from featmap_ros.results import Detection2D  # noqa: E402
from featmap_ros.ros.config import NodeConfig, ProcessorError  # noqa: E402

INTR = geo.Intrinsics(572.4, 573.6, 325.3, 242.0, 640, 480)
CORNERS = geo.box_corners([-0.04, -0.05, -0.03], [0.08, 0.1, 0.06])
R_TRUE = geo.matrix_from_quat([0.9, 0.1, -0.3, 0.2])
SIZE = 32
# Atol of ONNX Runtime against torch on float32 outputs (normalised corners, dense maps, joints).
OUTPUT_ATOL = 1e-4


def true_box(t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Projected corners (8, 2) of the object at (R_TRUE, t) and a detector's box around them."""
    uv = geo.project_model(CORNERS, R_TRUE, t, INTR.K)
    return uv, np.r_[uv.min(0), uv.max(0) - uv.min(0)]


T_TRUE = np.array([0.0, 0.0, 0.7])
UV_TRUE, BOX_TRUE = true_box(T_TRUE)


def object_meta(n_objects: int, head: str) -> dict:
    return {"objects": [{"obj_id": i + 1, "name": f"obj{i + 1}", "corners_m": CORNERS.tolist(),
                         "extent_m": [0.08, 0.1, 0.06], "symmetric": False} for i in range(n_objects)],
            "crop": {"size": SIZE, "window_scale": 1.2}, "head": head, "method": "fm"}


def tiny_checkpoint(folder: Path, kind: str, seed: int = 0, stats: bool = True) -> Path:
    """A tiny random checkpoint (input 32, width 4) of kind bb8, dense, hands or hands_refined; return its JSON.

    Both object nets are made to give sensible poses, which a pose-parity check needs (PnP-RANSAC on
    random correspondences picks between near-equal hypotheses, so 1e-6 apart may give another):
    the bb8 head predicts nearly the true corners of BOX_TRUE's object (bias = the true normalised
    corners, weights scaled down); the dense net is wired to map an image of colour ramps
    (ramp_image) to a consistent correspondence field (planar_dense).
    """
    torch.manual_seed(seed)
    if kind == "hands_refined":  # the hand net with a centre refiner attached, in its own folder
        ckpt = tiny_checkpoint(folder / "refined", "hands", seed, stats)
        refiner = CentreRefiner(RefinerConfig(input_size=32, width=4, iterations=2))
        torch.nn.init.normal_(refiner.head[-1].weight, std=0.05)  # an offset that depends on the crop
        return checkpoint.attach_refiner(ckpt, refiner)
    if kind == "hands":
        cfg = NetConfig(task="hands", input_size=SIZE, width=4, feature_dim=16, mapping=True, dropout=0.0)
        meta = {"hands": {"joint_names": list(JOINT_NAMES), "cube_m": 0.3}, "crop": {"size": SIZE}, "method": "fm"}
    elif kind == "hands_joint":  # fm_joint's model: the vote head, one f for both domains, g away from the identity
        cfg = NetConfig(task="hands", input_size=SIZE, width=4, feature_dim=8, mapping=True, shared_extractor=True,
                        head="vote", dropout=0.0)
        meta = {"hands": {"joint_names": list(JOINT_NAMES), "cube_m": 0.3}, "crop": {"size": SIZE},
                "method": "fm_joint"}
    elif kind == "dense":
        cfg = NetConfig(task="objects", input_size=SIZE, width=4, feature_dim=8, n_outputs=DENSE_CHANNELS * 2,
                        mapping=True, head="dense", norm="none", blocks=(1, 1, 1, 1, 1))
        meta = object_meta(2, "dense")
    elif kind == "keypoints5":  # PVNet's head with 5 keypoints (not the experiments' 9): 11 channels per object
        cfg = NetConfig(task="objects", input_size=SIZE, width=4, feature_dim=8, n_outputs=11 * 2, mapping=True,
                        head="keypoints")
        meta = object_meta(2, "keypoints")
        for o in meta["objects"]:
            o["keypoints_m"] = CORNERS[:5].tolist()
    elif kind == "dense_bins":  # model coordinates as distributions over bins, read out in the graph
        cfg = NetConfig(task="objects", input_size=SIZE, width=4, feature_dim=8, n_outputs=DENSE_CHANNELS * 2,
                        mapping=True, head="dense", coord_bins=8)
        meta = object_meta(2, "dense")
    else:
        cfg = NetConfig(task="objects", input_size=SIZE, width=4, feature_dim=16, n_outputs=32, mapping=True,
                        dropout=0.0)
        meta = object_meta(2, "bb8")
    model = FeatureMappingModel(cfg)
    if kind == "hands_joint":
        with torch.no_grad():
            for p in model.g.parameters():
                p.normal_(0.0, 0.1)
    if kind == "dense":
        planar_dense(model)
    if kind == "bb8":
        win = geo.CropWindow.around_box(BOX_TRUE, SIZE, 1.2)
        with torch.no_grad():
            model.h.fc.weight.mul_(0.02)
            model.h.fc.bias.copy_(torch.tensor(np.tile(geo.normalise_uv(win.to_crop(UV_TRUE), SIZE).ravel(), 2)))
    if stats:
        rng = np.random.default_rng(seed)
        meta["feature_stats"] = {"mean": rng.uniform(0, 0.2, cfg.feature_dim).tolist(),
                                 "std": rng.uniform(0.5, 1.5, cfg.feature_dim).tolist()}
    return checkpoint.save(folder / f"{kind}_model", model, meta)


def planar_dense(model: FeatureMappingModel) -> None:
    """Wire a dense net (norm none, one convolution per stage) to turn ramp_image into a plane.

    f passes the input's first three channels (+1, to survive the ReLUs) through enc[0], enc[1]
    and the S/2 skip to the feature map, the deeper stages are silenced, g is the identity (as
    initialised), and h maps the red and green ramps affinely to model x and y (z constant),
    visible everywhere: the correspondences of a fronto-parallel plane, which PnP-RANSAC fits
    with every location an inlier.
    """

    def identity3(conv: torch.nn.Conv2d, offset: int = 0, bias: float = 0.0) -> None:
        conv.weight.zero_()
        conv.bias.zero_()
        for i in range(3):
            conv.weight[i, offset + i, 1, 1] = 1.0
            conv.bias[i] = bias

    with torch.no_grad():
        for f in (model.f_S, model.f_R):
            identity3(f.enc[0][0][0], bias=1.0)
            identity3(f.enc[1][0][0])
            for conv in (f.enc[2][0][0], f.enc[3][0][0], f.up3[0]):
                conv.weight.zero_()
                conv.bias.zero_()
            identity3(f.up2[0], offset=f.up2[0].in_channels - f.enc[1][0][0].out_channels)
            identity3(f.out[0])
        h = model.h.conv
        h.weight.zero_()
        h.bias.zero_()
        size = CORNERS.max(0) - CORNERS.min(0)
        for k in range(h.out_channels // DENSE_CHANNELS):
            c = DENSE_CHANNELS * k
            h.bias[c] = 5.0  # visible everywhere
            # Equal metres per pixel in x and y: a plane at about 0.43 m.
            h.weight[c + 1, 0, 0, 0] = 6.0
            h.weight[c + 2, 1, 0, 0] = 6.0 * size[0] / size[1]
            h.bias[c + 1], h.bias[c + 2] = -6.0, -4.0


def ramp_image() -> np.ndarray:
    """640x480 RGB: red and green ramps of one slope (255 over 640 px) in u and v, blue flat."""
    v, u = np.mgrid[0:480, 0:640]
    return np.stack([u * 255 / 640, v * 255 / 640, np.full(u.shape, 128)], -1).astype(np.uint8)


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """kind -> (checkpoint JSON, export JSON written beside it)."""
    folder = tmp_path_factory.mktemp("onnx")
    out = {}
    for kind in ("bb8", "dense", "dense_bins", "keypoints5", "hands", "hands_refined", "hands_joint"):
        ckpt = tiny_checkpoint(folder, kind)
        out[kind] = (ckpt, export_onnx(ckpt, ckpt.parent))
    return out


def crops_for(kind: str, n: int = 5) -> np.ndarray:
    channels = 1 if kind.startswith("hands") else 3
    return np.random.default_rng(1).uniform(-1, 1, (n, channels, SIZE, SIZE)).astype(np.float32)


# ---- the export


def test_export_writes_the_graph_and_the_checkpoint_metadata_beside_it(exported) -> None:
    import onnx

    ckpt, export = exported["dense"]
    doc = json.loads(export.read_text())
    source = json.loads(ckpt.read_text())
    assert export.name == "dense_model.onnx.json" and (export.parent / "dense_model.onnx").is_file()
    assert doc["format"] == onnx_net.EXPORT_FORMAT and doc["task"] == "objects" and doc["net"] == source["net"]
    assert doc["objects"] == source["objects"] and doc["feature_stats"] == source["feature_stats"]
    assert doc["source"]["weights_sha256"] == source["weights"]["sha256"]
    assert "weights" not in doc and "optimizer" not in doc
    graph = onnx.load(str(export.parent / doc["onnx"]["file"])).graph
    assert [i.name for i in graph.input] == [onnx_net.INPUT_NAME]
    assert [o.name for o in graph.output] == list(onnx_net.OUTPUT_NAMES)
    batch = graph.input[0].type.tensor_type.shape.dim[0]
    assert batch.dim_param and not batch.dim_value  # a symbolic, dynamic batch axis
    # The export checked itself against torch at a batch other than the traced one.
    assert doc["check"]["batch"] == 3 and max(doc["check"]["max_abs_diff"].values()) < OUTPUT_ATOL


@pytest.mark.parametrize("kind", ["bb8", "dense", "dense_bins", "hands", "hands_joint"])
def test_onnxruntime_gives_torchs_outputs_and_out_of_domain_scores_on_the_same_crops(exported, kind) -> None:
    ckpt, export = exported[kind]
    t_net = torch_net.load(ckpt, "cpu")
    o_net = onnx_net.OnnxNetwork(export, "cpu")
    assert o_net.device == "onnxruntime:cpu" and o_net.head == t_net.head and o_net.n_outputs == t_net.n_outputs
    for n in (1, 5, 16):  # the batch axis is dynamic
        x = crops_for(kind, n)
        (out_t, ood_t), (out_o, ood_o) = t_net.run(x), o_net.run(x)
        assert out_o.shape == out_t.shape and out_o.dtype == np.float64 and ood_o.shape == (n,)
        diff, ood_diff = float(np.abs(out_o - out_t).max()), float(np.abs(ood_o - ood_t).max())
        print(f"{kind} batch {n}: max |onnxruntime - torch| outputs {diff:.2e}, out-of-domain {ood_diff:.2e}")
        assert diff < OUTPUT_ATOL and ood_diff < OUTPUT_ATOL
        assert np.isfinite(ood_o).all() and (ood_o > 0).all()  # computed in the graph from feature_stats


@pytest.mark.parametrize("kind", ["bb8", "dense_bins", "keypoints5"])
def test_each_crops_own_object_is_the_slice_of_every_objects_outputs_on_both_backends(exported, kind) -> None:
    ckpt, export = exported[kind]
    t_net, o_net = torch_net.load(ckpt, "cpu"), onnx_net.OnnxNetwork(export, "cpu")
    x = crops_for(kind, 5)
    objects = np.array([1, 0, 1, 1, 0])
    every, ood_every = t_net.run(x)
    per = every.shape[1] // 2
    want = np.stack([every[b, per * k: per * (k + 1)] for b, k in enumerate(objects)])
    other = np.stack([every[b, per * (1 - k): per * (2 - k)] for b, k in enumerate(objects)])
    assert float(np.abs(other - want).max()) > 10 * OUTPUT_ATOL  # the two objects' outputs tell apart
    for net in (t_net, o_net):
        own, ood = net.run(x, objects)  # torch computes only these channels (the dense head's gathered readout)
        assert own.shape == want.shape and float(np.abs(own - want).max()) < OUTPUT_ATOL
        assert float(np.abs(ood - ood_every).max()) < OUTPUT_ATOL
        for bad in (np.array([0, 2, 0, 0, 0]), np.array([0, -1, 0, 0, 0]), np.array([0, 1]), objects + 0.5):
            with pytest.raises(ValueError, match="one index in"):
                net.run(x, bad)
    assert o_net.objects_session is not None  # computed by the export's objects graph, not cut from all
    doc = json.loads(export.read_text())
    import onnx

    graph = onnx.load(str(export.parent / doc[onnx_net.OBJECTS_KEY]["file"])).graph
    assert [i.name for i in graph.input] == [onnx_net.INPUT_NAME, onnx_net.OBJECTS_INPUT]
    assert max(doc[onnx_net.OBJECTS_KEY]["check"]["max_abs_diff"].values()) < OUTPUT_ATOL


def test_an_export_without_the_objects_graph_cuts_each_crops_object_from_all(exported, tmp_path) -> None:
    ckpt, export = exported["dense_bins"]
    doc = json.loads(export.read_text())
    del doc[onnx_net.OBJECTS_KEY]  # as written before the objects graph existed
    old = tmp_path / export.name
    old.write_text(json.dumps(doc))
    (tmp_path / doc["onnx"]["file"]).write_bytes((export.parent / doc["onnx"]["file"]).read_bytes())
    net, new = onnx_net.OnnxNetwork(old, "cpu"), onnx_net.OnnxNetwork(export, "cpu")
    assert net.objects_session is None
    x, objects = crops_for("dense_bins", 4), np.array([1, 1, 0, 1])
    assert float(np.abs(net.run(x, objects)[0] - new.run(x, objects)[0]).max()) < OUTPUT_ATOL


def test_an_objects_section_naming_a_graph_without_the_objects_input_is_refused(exported, tmp_path) -> None:
    _, export = exported["dense_bins"]
    doc = json.loads(export.read_text())
    doc[onnx_net.OBJECTS_KEY] = {**doc[onnx_net.OBJECTS_KEY], "file": doc["onnx"]["file"],
                                 "sha256": doc["onnx"]["sha256"]}  # the plain graph, its hash right
    (tmp_path / export.name).write_text(json.dumps(doc))
    (tmp_path / doc["onnx"]["file"]).write_bytes((export.parent / doc["onnx"]["file"]).read_bytes())
    with pytest.raises(BackendError, match="an objects graph takes"):
        onnx_net.OnnxNetwork(tmp_path / export.name, "cpu")


def test_a_hand_network_refuses_object_indices_on_both_backends(exported) -> None:
    ckpt, export = exported["hands"]
    x = crops_for("hands", 2)
    for net in (torch_net.load(ckpt, "cpu"), onnx_net.OnnxNetwork(export, "cpu")):
        with pytest.raises(ValueError, match="object model's crop labels"):
            net.run(x, np.zeros(2, np.int64))


def test_without_feature_stats_the_out_of_domain_score_is_nan_on_both_backends(tmp_path) -> None:
    ckpt = tiny_checkpoint(tmp_path, "hands", stats=False)
    export = export_onnx(ckpt, tmp_path / "onnx")
    x = crops_for("hands", 2)
    assert np.isnan(onnx_net.OnnxNetwork(export, "cpu").run(x)[1]).all()
    assert np.isnan(torch_net.load(ckpt, "cpu").run(x)[1]).all()


def object_frame() -> tuple[np.ndarray, list[Detection2D]]:
    rgb = np.random.default_rng(2).integers(0, 256, (480, 640, 3), dtype=np.uint8)
    dets = [Detection2D(BOX_TRUE + [3, -2, 5, 4], score=0.9, obj_id=1),
            Detection2D(BOX_TRUE + [-120, 60, 0, 0], score=0.8, class_id="obj2")]
    return rgb, dets


@pytest.mark.parametrize("kind", ["bb8", "dense"])
def test_object_poses_agree_within_half_a_pixel(exported, kind) -> None:
    ckpt, export = exported[kind]
    est_t = load_estimator(ckpt, device="cpu", backend="torch")
    est_o = load_estimator(export, device="cpu", backend="onnxruntime")
    assert isinstance(est_o, ObjectEstimator) and est_o.head == kind and est_o.device == "onnxruntime:cpu"
    rgb, dets = object_frame()
    if kind == "dense":
        rgb = ramp_image()
    poses_t, poses_o = est_t.estimate(rgb, INTR, dets), est_o.estimate(rgb, INTR, dets)
    assert len(poses_t) == 2 and [p.obj_id for p in poses_o] == [p.obj_id for p in poses_t]
    if kind == "bb8":  # sensible poses
        assert np.abs(poses_t[0].corners_uv - UV_TRUE).max() < 10
    else:
        assert all(p.score > 0.8 * 0.9 * 0.9 and 0.2 < p.t[2] < 1.0 for p in poses_t), [(p.score, p.t) for p in poses_t]
    for pt, po in zip(poses_t, poses_o, strict=True):
        proj = float(np.abs(geo.project_model(CORNERS, po.R, po.t, INTR.K)
                            - geo.project_model(CORNERS, pt.R, pt.t, INTR.K)).max())
        print(f"{kind} object {pt.obj_id}: max 2D projection difference {proj:.2e} px, "
              f"scores {pt.score:.4f} / {po.score:.4f}")
        assert proj < 0.5
        assert po.score == pytest.approx(pt.score, abs=1e-3)
        assert po.out_of_domain == pytest.approx(pt.out_of_domain, abs=1e-4)


def hand_depth() -> np.ndarray:
    """A hand-sized blob at 0.6 m in front of a wall at 1.2 m, 640x480 metres."""
    depth = np.full((480, 640), 1.2, np.float32)
    v, u = np.mgrid[0:480, 0:640]
    depth[(u - 320) ** 2 / 60**2 + (v - 240) ** 2 / 90**2 < 1] = 0.6
    return depth


def test_hand_joints_agree_across_backends(exported) -> None:
    ckpt, export = exported["hands"]
    est_t = load_estimator(ckpt, device="cpu", backend="torch")
    est_o = load_estimator(export, device="cpu", backend="onnxruntime")
    assert isinstance(est_o, HandEstimator)
    (ht,), (ho,) = est_t.estimate(hand_depth(), NYU_INTRINSICS), est_o.estimate(hand_depth(), NYU_INTRINSICS)
    diff = float(np.abs(ho.joints_xyz - ht.joints_xyz).max())
    uv_diff = float(np.abs(geo.project(ho.joints_xyz, NYU_INTRINSICS.K) - geo.project(ht.joints_xyz,
                                                                                       NYU_INTRINSICS.K)).max())
    print(f"hand: max joint difference {diff * 1e3:.2e} mm, {uv_diff:.2e} px projected")
    assert diff < 1e-5 and uv_diff < 0.5
    assert np.allclose(ho.confidences, ht.confidences) and ho.out_of_domain == pytest.approx(ht.out_of_domain, 1e-4)


# ---- the hand-centre refiner's graph


def test_a_hand_checkpoints_refiner_is_exported_as_a_second_graph_named_with_its_hash(exported) -> None:
    import onnx

    ckpt, export = exported["hands_refined"]
    doc = json.loads(export.read_text())
    section = doc[onnx_net.REFINER_KEY]
    refiner_file = export.parent / section["file"]
    assert section["file"] == "hands_model.refiner.onnx" and refiner_file.is_file()
    assert section["sha256"] == hashlib.sha256(refiner_file.read_bytes()).hexdigest()
    assert doc["hands"]["refiner"] == json.loads(ckpt.read_text())["hands"]["refiner"]
    assert section["check"]["batch"] == 3 and section["check"]["max_abs_diff"]["offsets"] < OUTPUT_ATOL
    graph = onnx.load(str(refiner_file)).graph
    assert [i.name for i in graph.input] == [onnx_net.INPUT_NAME] and [o.name for o in graph.output] == ["offsets"]
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_param  # a dynamic batch axis
    assert onnx_net.REFINER_KEY not in json.loads(exported["hands"][1].read_text())  # none without a refiner


def test_onnxruntime_refines_like_torch_and_both_estimators_move_the_centre_alike(exported) -> None:
    ckpt, export = exported["hands_refined"]
    t_net, o_net = torch_net.load(ckpt, "cpu"), onnx_net.OnnxNetwork(export, "cpu")
    assert t_net.has_refiner and o_net.has_refiner and not onnx_net.OnnxNetwork(exported["hands"][1], "cpu").has_refiner
    for n in (1, 5, 16):
        x = crops_for("hands", n)
        got, want = o_net.refine(x), t_net.refine(x)
        assert got.shape == want.shape == (n, 3) and got.dtype == np.float64
        assert float(np.abs(got - want).max()) < OUTPUT_ATOL and (n == 1 or np.ptp(want, axis=0).max() > 1e-3)
    est_t = load_estimator(ckpt, device="cpu", backend="torch", recentre=0)  # the refiner's move alone
    est_o = load_estimator(export, device="cpu", backend="onnxruntime", recentre=0)
    plain = load_estimator(export, device="cpu", backend="onnxruntime", refine=False, recentre=0)
    (ht,), (ho,), (hp,) = (e.estimate(hand_depth(), NYU_INTRINSICS) for e in (est_t, est_o, plain))
    moved = float(np.linalg.norm(ho.centre - hp.centre))
    print(f"refined hand: centre moved {moved * 1e3:.2f} mm; backends differ by "
          f"{np.abs(ho.centre - ht.centre).max() * 1e3:.2e} mm (centre), "
          f"{np.abs(ho.joints_xyz - ht.joints_xyz).max() * 1e3:.2e} mm (joints)")
    assert moved > 1e-3 and np.abs(ho.centre - ht.centre).max() < 1e-5
    assert np.abs(ho.joints_xyz - ht.joints_xyz).max() < 1e-5
    # With the default recentre passes too: the crops follow each backend's palm, still the same to 1e-5 m.
    (ht2,), (ho2,) = (load_estimator(p, device="cpu", backend=b).estimate(hand_depth(), NYU_INTRINSICS)
                      for p, b in ((ckpt, "torch"), (export, "onnxruntime")))
    assert np.abs(ho2.centre - ho.centre).max() > 1e-4 and np.abs(ho2.joints_xyz - ht2.joints_xyz).max() < 1e-5


def test_an_export_without_the_refiners_graph_or_with_a_replaced_one_is_refused(exported, tmp_path) -> None:
    ckpt, export = exported["hands_refined"]
    doc = json.loads(export.read_text())
    for name in (doc["onnx"]["file"], doc[onnx_net.REFINER_KEY]["file"]):
        (tmp_path / name).write_bytes((export.parent / name).read_bytes())
    (tmp_path / export.name).write_text(json.dumps({k: v for k, v in doc.items() if k != onnx_net.REFINER_KEY}))
    with pytest.raises(BackendError, match="does not name its graph"):
        onnx_net.read_export(tmp_path / export.name)
    (tmp_path / export.name).write_text(json.dumps(doc))
    onnx_net.read_export(tmp_path / export.name)
    refiner_file = tmp_path / doc[onnx_net.REFINER_KEY]["file"]
    refiner_file.write_bytes(refiner_file.read_bytes()[:-1] + b"\0")
    with pytest.raises(BackendError, match="corrupted or replaced"):
        onnx_net.read_export(tmp_path / export.name)
    (tmp_path / export.name).write_text(json.dumps({**doc, "hands": {**doc["hands"], "refiner": {"input_size": 0}}}))
    with pytest.raises(BackendError, match="hands.refiner needs positive integers"):
        onnx_net.read_export(tmp_path / export.name)


def test_attaching_a_refiner_makes_the_export_beside_the_checkpoint_stale(tmp_path) -> None:
    ckpt = tiny_checkpoint(tmp_path, "hands")
    export_onnx(ckpt, tmp_path)
    assert choose_backend(ckpt) == "onnxruntime"
    checkpoint.attach_refiner(ckpt, CentreRefiner(RefinerConfig(input_size=32, width=4)))
    assert choose_backend(ckpt) == "torch"  # exported from other weights: export again
    export_onnx(ckpt, tmp_path)
    assert choose_backend(ckpt) == "onnxruntime" and load_estimator(ckpt, device="cpu", backend="auto").refine


# ---- choosing the backend


def test_auto_takes_the_export_beside_the_checkpoint_and_ignores_it_once_the_weights_change(tmp_path) -> None:
    ckpt = tiny_checkpoint(tmp_path, "hands")
    assert choose_backend(ckpt) == "torch"  # no export yet
    export_onnx(ckpt, tmp_path)
    assert choose_backend(ckpt) == choose_backend(tmp_path / "hands_model") == "onnxruntime"
    assert load_estimator(ckpt, device="cpu", backend="auto").device == "onnxruntime:cpu"
    assert load_estimator(ckpt, device="cpu").device == "cpu"  # a library caller's checkpoint stays on torch
    assert load_estimator(tmp_path / "hands_model.onnx.json", device="cpu").device == "onnxruntime:cpu"
    tiny_checkpoint(tmp_path, "hands", seed=1)  # retrained: the export is stale now
    assert choose_backend(ckpt) == "torch"
    with pytest.raises(BackendError, match="needs an ONNX export"):
        load_estimator(ckpt, device="cpu", backend="onnxruntime")


def test_backend_errors_name_what_is_wrong(exported, tmp_path) -> None:
    ckpt, export = exported["hands"]
    with pytest.raises(BackendError, match="backend 'tensorrt' is unknown"):
        load_estimator(ckpt, backend="tensorrt")
    with pytest.raises(BackendError, match="is an ONNX export; backend torch needs the checkpoint"):
        load_estimator(export, backend="torch")
    if "CUDAExecutionProvider" not in __import__("onnxruntime").get_available_providers():
        with pytest.raises(BackendError, match="onnxruntime-gpu"):
            load_estimator(export, device="cuda", backend="onnxruntime")
    # A replaced ONNX file fails its hash.
    copy = tmp_path / "copy"
    copy.mkdir()
    doc = json.loads(export.read_text())
    (copy / export.name).write_text(export.read_text())
    (copy / doc["onnx"]["file"]).write_bytes((export.parent / doc["onnx"]["file"]).read_bytes()[:-1] + b"\0")
    with pytest.raises(BackendError, match="corrupted or replaced"):
        load_estimator(copy / export.name, backend="onnxruntime")
    (copy / export.name).write_text(json.dumps({**doc, "format": "something else"}))
    with pytest.raises(BackendError, match="not a featmap_ros ONNX export"):
        load_estimator(copy / export.name, backend="onnxruntime")


def test_providers_come_in_the_order_tensorrt_cuda_cpu_by_availability() -> None:
    every = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    assert onnx_net.choose_providers("auto", every[::-1]) == every
    assert onnx_net.choose_providers("cuda:1", ["CUDAExecutionProvider", "CPUExecutionProvider"]) == every[1:]
    assert onnx_net.choose_providers("cpu", every) == ["CPUExecutionProvider"]
    assert onnx_net.choose_providers("auto", ["AzureExecutionProvider", "CPUExecutionProvider"]) == every[2:]
    with pytest.raises(BackendError, match="'cuda' asked for"):
        onnx_net.choose_providers("cuda", ["CPUExecutionProvider"])


def test_the_node_parameter_backend_is_checked() -> None:
    assert NodeConfig().backend == "auto" and NodeConfig(backend="onnxruntime").backend == "onnxruntime"
    with pytest.raises(ProcessorError, match="backend 'tflite' is unknown"):
        NodeConfig(backend="tflite")


def test_featmap_export_writes_both_files(exported, tmp_path, capsys) -> None:
    from featmap_ros.cli import main

    ckpt, _ = exported["bb8"]
    assert main(["export", "--model", str(ckpt), "--out", str(tmp_path)]) == 0
    assert (tmp_path / "bb8_model.onnx").is_file() and (tmp_path / "bb8_model.onnx.json").is_file()
    assert "max_abs_diff" in capsys.readouterr().out


# ---- the node's path without torch

NO_TORCH = textwrap.dedent("""
    import json, sys
    sys.modules["torch"] = None  # import blocker: any `import torch` now raises ImportError
    import numpy as np
    from featmap_ros.datasets.nyu import NYU_INTRINSICS
    from featmap_ros.geometry import Intrinsics
    from featmap_ros.results import Detection2D
    from featmap_ros.ros.config import NodeConfig
    from featmap_ros.ros.messages import MessageFactory
    from featmap_ros.ros.processor import FrameProcessor, load_estimator_for
    from featmap_ros.ros.typestore import typestore

    task, model, box = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    f = MessageFactory.for_rosbags(typestore("humble"))
    cfg = NodeConfig(task=task, model_path=model, backend="onnxruntime", device="auto",
                     use_detections=task == "objects", object_names=["1:ape", "2:can"])
    proc = FrameProcessor(load_estimator_for(cfg), f, cfg)
    if task == "objects":
        intr = Intrinsics(572.4, 573.6, 325.3, 242.0, 640, 480)
        v, u = np.mgrid[0:480, 0:640]  # ramp_image: the wired dense net finds a plane in it
        rgb = np.stack([u * 255 / 640, v * 255 / 640, np.full(u.shape, 128)], -1).astype(np.uint8)
        msgs = (f.image_rgb(rgb, 7, "cam"), f.camera_info(intr, 7, "cam"),
                f.detection2d_array([Detection2D(np.array(box), score=0.9, obj_id=1)], 7, "cam"))
    else:
        depth = np.full((480, 640), 1.2, np.float32)
        depth[200:280, 280:360] = 0.6
        msgs = (f.image_depth(depth, 7, "cam"), f.camera_info(NYU_INTRINSICS, 7, "cam"), None)
    out = proc.process(*msgs)
    torch_modules = sorted(m for m, v in sys.modules.items() if m.split(".")[0] == "torch" and v is not None)
    print(json.dumps({"device": proc.estimator.device, "objects": len(out.result.objects),
                      "hands": len(out.result.hands), "transforms": len(out.transforms),
                      "torch_modules": torch_modules,
                      "diagnostics_device": dict(proc.diagnostics()[2]).get("device")}))
""")


def run_without_torch(task: str, model: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", NO_TORCH, task, str(model), json.dumps(BOX_TRUE.tolist())],
                          capture_output=True, text=True, timeout=120, env=env)


@pytest.mark.parametrize("kind", ["bb8", "dense", "hands", "hands_refined"])
def test_the_node_path_runs_on_onnxruntime_and_never_imports_torch(exported, kind) -> None:
    _, export = exported[kind]
    proc = run_without_torch("hands" if kind.startswith("hands") else "objects", export)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["torch_modules"] == [] and got["device"] == "onnxruntime:cpu"
    assert got["diagnostics_device"] == "onnxruntime:cpu"
    assert (got["hands"] == 1 and got["transforms"] == 14) if kind.startswith("hands") else got["objects"] == 1


def test_bag_replay_scores_the_same_on_both_backends(exported, tmp_path) -> None:
    from featmap_ros.bag.make import hand_sequence, write_hand_frames
    from featmap_ros.bag.replay import eval_bag

    ckpt, export = exported["hands"]
    bag = write_hand_frames(tmp_path / "hand", hand_sequence(4, seed=1, keyframe_every=15), NYU_INTRINSICS)
    on_torch = eval_bag(bag, ckpt, tmp_path / "torch", device="cpu", backend="torch", write_output_bag=False)
    on_ort = eval_bag(bag, export, tmp_path / "ort", device="cpu", write_output_bag=False)  # the config's auto
    assert on_ort.metrics["device"] == "onnxruntime:cpu" and on_torch.metrics["device"] == "cpu"
    assert on_ort.metrics["frames_scored"] == on_torch.metrics["frames_scored"] >= 3
    assert on_ort.metrics["mean_error_mm"] == pytest.approx(on_torch.metrics["mean_error_mm"], abs=1e-3)


def test_onnxruntime_threads_do_not_spin_after_a_run_unless_asked(exported) -> None:
    _, export = exported["hands"]
    for allow, want in ((False, "0"), (True, "1")):
        net = onnx_net.OnnxNetwork(export, "cpu", allow_spinning=allow)
        assert net.session.get_session_options().get_session_config_entry("session.intra_op.allow_spinning") == want



def test_precisions_other_than_auto_are_the_torch_backends(exported) -> None:
    _, export = exported["dense"]
    for precision in ("bf16", "float32"):
        with pytest.raises(BackendError, match="torch backend"):
            load_estimator(export, device="cpu", backend="onnxruntime", precision=precision)
    with pytest.raises(BackendError, match="precision"):
        load_estimator(export, device="cpu", backend="onnxruntime", precision="fp16")
