"""Bad input and scoring as the BOP toolkit does, for bag replay and BOP-scene scoring (issue 14:
items 13, 15, 16, 17, 18): each case asserts its exact outcome."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from test_bag import object_model

from featmap_ros import bop_scoring
from featmap_ros import evaluation as ev
from featmap_ros import metrics as m
from featmap_ros.bag import io as bagio
from featmap_ros.bag.make import make_bop_bag
from featmap_ros.bag.replay import eval_bag
from featmap_ros.cli import main
from featmap_ros.datasets import bop
from featmap_ros.errors import FeatmapError
from featmap_ros.estimator import load_estimator

FRAMES = "3-62"  # 12 annotated frames of LM-O scene 2


@pytest.fixture(scope="module")
def made(lmo_root, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bad_bag")
    return make_bop_bag(lmo_root, 2, tmp / "bag", frames=FRAMES), object_model(tmp / "model", lmo_root), tmp


# ---- item 15: what is not a bag says so


@pytest.mark.parametrize("layout", ["file", "folder"])
def test_a_text_file_named_mcap_is_named_as_not_mcap(tmp_path, layout):
    path = tmp_path / "fake.mcap"
    if layout == "folder":
        path = tmp_path / "bag"
        path.mkdir()
        (path / "metadata.yaml").write_text("rosbag2_bagfile_information: {}\n")
        (path / "bag_0.mcap").write_text("hello, I am text\n")
    else:
        path.write_text("hello, I am text\n")
    expected = r"is not an MCAP file: it starts with b'hello, I', expected the MCAP magic"
    with pytest.raises(bagio.BagError, match=expected):
        bagio.open_bag(path, bagio.TOPICS["objects"])


@pytest.mark.parametrize(("make", "message"), [
    (lambda p: p, r"bag .*nothing does not exist"),
    (lambda p: (p.mkdir(), p)[1], r"cannot open bag .*nothing"),
    (lambda p: (p.write_text("x"), p)[1], r"cannot open bag .*nothing"),
])
def test_what_is_no_bag_fails_with_a_bag_error(tmp_path, make, message):
    path = make(tmp_path / "nothing")
    with pytest.raises(bagio.BagError, match=message) as err:
        bagio.open_bag(path, bagio.TOPICS["objects"])
    assert isinstance(err.value, FeatmapError)


def test_an_mcap_cut_before_its_first_channel_is_named(made, tmp_path):
    bag_path, _, _ = made
    (mcap,) = Path(bag_path).glob("*.mcap")
    cut = tmp_path / "cut.mcap"
    cut.write_bytes(mcap.read_bytes()[:len(bagio.MCAP_MAGIC) + 4])
    with pytest.raises(bagio.BagError, match="holds no readable MCAP channel"):
        bagio.open_bag(cut, bagio.TOPICS["objects"])


# ---- item 13: streamed, memory flat in the bag's length


def test_frames_stream_before_the_bag_is_read_to_its_end(made):
    bag_path, _, _ = made
    read: list[str] = []
    with bagio.open_bag(bag_path, bagio.TOPICS["objects"]) as source:
        frames = bagio.stream_frames(source, bagio.TOPICS["objects"], on_raw=lambda raw: read.append(raw[0]))
        first = next(frames)
        read_at_first = len(read)
        rest = list(frames)
    assert read_at_first < len(read) / 6  # the first frame came after its own messages and the next image's
    assert [first.stamp_ns, *[f.stamp_ns for f in rest]] == [bagio.START_NS + k * 100_000_000 for k in range(12)]
    assert all(f.camera_info is not None and f.detections is not None and f.ground_truth is not None
               and f.image_id is not None for f in [first, *rest])


@pytest.mark.slow
def test_peak_memory_of_bag_eval_is_flat_in_the_bag_length(lmo_root, tmp_path):
    from bench_bag_memory import measure  # on sys.path through test_bag

    small, large = measure(lmo_root, [10, 100], tmp_path)
    assert (small["frames"], large["frames"]) == (10, 100)
    assert large["processed"] == 100
    assert large["tracemalloc_peak_mb"] <= 1.10 * small["tracemalloc_peak_mb"]
    assert large["maxrss_mb"] <= 1.10 * small["maxrss_mb"]


# ---- item 16: rotation error as the BOP toolkit scores it


def test_instances_keep_the_annotated_rotation_beside_the_snapped_one(lmo_root):
    raw = json.loads((lmo_root / "test" / "000002" / "scene_gt.json").read_text())["3"][0]["cam_R_m2c"]
    inst = bop.BopScene(lmo_root, 2).frame(3).instances[0]
    assert np.array_equal(inst.R_annot, np.reshape(raw, (3, 3)))
    assert np.allclose(inst.R @ inst.R.T, np.eye(3), atol=1e-12)  # training targets get a true rotation
    assert 1e-9 < np.abs(inst.R - inst.R_annot).max() < 3e-3


def test_re_is_the_toolkits_formula_with_the_inverse():
    R_gt = np.diag([1.002, 1.0, 1.0])  # off orthonormal by 2e-3, like BOP's stored rotations
    c = np.cos(np.radians(4.99))
    s = np.sin(np.radians(4.99))
    R_est = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1.0]])
    toolkit = np.degrees(np.arccos(np.clip((np.trace(R_est @ np.linalg.inv(R_gt)) - 1) / 2, -1, 1)))
    transpose = np.degrees(np.arccos(np.clip((np.trace(R_est @ R_gt.T) - 1) / 2, -1, 1)))
    assert m.re(R_est, R_gt) == pytest.approx(toolkit, abs=1e-12)
    assert abs(toolkit - transpose) > 1e-3  # the two formulas part on an annotated matrix


def test_featmap_evaluate_scores_against_the_annotated_rotation(made, lmo_root):
    _, model, _ = made
    records, ctx = bop_scoring.run_bop(load_estimator(model, device="cpu"), lmo_root, 2, "3,8")
    scene = bop.BopScene(lmo_root, 2)
    annotated = [i.R_annot for im in (3, 8) for i in scene.frame(im).instances if i.obj_id in (1, 5)]
    assert len(records) == len(annotated) == 4
    assert all(np.array_equal(r.R_gt, a) for r, a in zip(records, annotated))
    assert ctx == {"image_ids": [3, 8], "targets": "all", "dataset": "lmo", "split": "test"}


# ---- item 17: BOP19 targets, and every report says which set was scored


def _expected(lmo_root: Path, ids: list[int], targets: bool) -> int:
    if targets:
        t = json.loads((lmo_root / "test_targets_bop19.json").read_text())
        return sum(x["inst_count"] for x in t if x["im_id"] in ids and x["obj_id"] in (1, 5))
    gt = json.loads((lmo_root / "test" / "000002" / "scene_gt.json").read_text())
    return sum(1 for i in ids for g in gt[str(i)] if g["obj_id"] in (1, 5))


def test_bop19_targets_are_found_and_read(lmo_root):
    targets = bop.load_targets(bop.find_targets(lmo_root, lmo_root / "test" / "000002"))
    assert len(targets) == 737 and set(targets.values()) == {1}
    assert bop.find_targets(lmo_root) == lmo_root / "test_targets_bop19.json"


def test_missing_or_unknown_target_sets_are_named(lmo_root, tmp_path):
    with pytest.raises(bop.BopError, match=r"no test_targets_bop19.json in .*other"):
        bop.find_targets(tmp_path / "other")
    (tmp_path / "t.json").write_text('[{"scene_id": 2}]')
    with pytest.raises(bop.BopError, match=r"not a BOP targets list .*'im_id'"):
        bop.load_targets(tmp_path / "t.json")
    with pytest.raises(bop.BopError, match=r"target set 'bop20' is unknown; expected one of \['all', 'bop19'\]"):
        bop_scoring.load_target_set("bop20", lmo_root, bop.BopScene(lmo_root, 2))


def test_featmap_evaluate_targets_bop19_scores_the_targets_and_says_so(made, lmo_root, tmp_path, capsys):
    _, model, _ = made
    ids = bop.select_ids(FRAMES, bop.BopScene(lmo_root, 2).image_ids)
    n_all, n_bop19 = _expected(lmo_root, ids, False), _expected(lmo_root, ids, True)
    assert n_bop19 < n_all  # these frames hold instances that are no BOP19 target
    for targets, n in (("all", n_all), ("bop19", n_bop19)):
        out = tmp_path / targets
        assert main(["evaluate", "objects", "--model", str(model), "--bop", str(lmo_root), "--scene", "2", "--frames",
                     FRAMES, "--out", str(out), "--overlays", "0", "--device", "cpu", "--targets", targets]) == 0
        metrics = json.loads((out / "metrics.json").read_text())
        assert metrics["targets"] == {"set": targets, "scored": bop_scoring.TARGET_SETS[targets], "n_instances": n}
        assert metrics["all"]["n_instances"] == n
        assert f"scored: {bop_scoring.TARGET_SETS[targets]}" in capsys.readouterr().out


def test_bag_eval_scores_the_bop19_targets_like_featmap_evaluate(made, lmo_root):
    bag_path, model, tmp = made
    ids = bop.select_ids(FRAMES, bop.BopScene(lmo_root, 2).image_ids)
    res = eval_bag(bag_path, model, tmp / "eval_bop19", models_dir=lmo_root / "models", device="cpu",
                   write_output_bag=False, targets="bop19")
    records, _ = bop_scoring.run_bop(load_estimator(model, device="cpu"), lmo_root, 2, FRAMES, targets="bop19")
    infos, meshes = bop_scoring.load_object_models(lmo_root / "models")
    direct, _ = ev.score_objects(records, infos, meshes)
    assert res.metrics["targets"]["n_instances"] == len(records) == _expected(lmo_root, ids, True)
    for k, v in direct["all"]["mean_over_objects"].items():
        assert res.metrics["all"]["mean_over_objects"][k] == pytest.approx(v, abs=1e-9)
    report_md = (tmp / "eval_bop19" / "report.md").read_text()
    assert "- scored: the BOP19 test targets (test_targets_bop19.json)" in report_md


# ---- item 18: the BOP toolkit's file name and the true ids


@pytest.mark.parametrize(("method", "dataset", "split", "name"), [
    ("fm", "lmo", "test", "fm_lmo-test.csv"),
    ("fm_mmd", "lmo", "test", "fm-mmd_lmo-test.csv"),
    ("", "ycbv", "test", "featmap_ycbv-test.csv"),
])
def test_bop_csv_names_parse_as_the_toolkit_splits_them(method, dataset, split, name):
    got = ev.bop_csv_name(method, dataset, split)
    assert got == name
    stem = got.split(".")[0].split("_")
    assert len(stem) == 2 and stem[1].split("-") == [dataset, split]


@pytest.mark.parametrize("dataset", ["", "my_set", "v1.2"])
def test_a_dataset_name_the_toolkit_cannot_parse_is_refused(dataset):
    with pytest.raises(ValueError, match=f"BOP dataset name {dataset!r} must be non-empty without"):
        ev.bop_csv_name("fm", dataset)


def test_a_bag_without_bop_ids_scores_with_scene_0_and_says_so(lmo_root, tmp_path):
    from dataclasses import replace

    topics = replace(bagio.TOPICS["objects"], image_id=None)
    path = make_bop_bag(lmo_root, 2, tmp_path / "bag", frames="3,8", topics=topics)
    model = object_model(tmp_path / "model", lmo_root)
    res = eval_bag(path, model, tmp_path / "eval", models_dir=lmo_root / "models", device="cpu",
                   write_output_bag=False)
    assert "the bag carries no BOP image ids: the CSV holds scene 0 and the frame index" in res.warnings
    assert res.metrics["bop_csv"] == "results.csv"  # no dataset name: the toolkit's name cannot be made
    rows = [r.split(",") for r in (tmp_path / "eval" / "results.csv").read_text().splitlines()[1:]]
    assert {(int(r[0]), int(r[1])) for r in rows} <= {(0, 0), (0, 1)}
    assert res.metrics["gt_rotation"] == [bagio_report().GT_ROTATION["bag"]]


def bagio_report():
    from featmap_ros.bag import report

    return report


# ---- item 10: a message type other than the configuration's fails before the first frame


def test_bag_eval_refuses_a_raw_image_topic_when_compressed_is_configured(made, lmo_root, tmp_path):
    from featmap_ros.bag.io import BagError
    from featmap_ros.bag.replay import default_node_config
    from featmap_ros.model.checkpoint import read_meta

    bag, model, _ = made
    cfg = default_node_config("objects", str(model), read_meta(model))
    import dataclasses

    with pytest.raises(BagError, match=r"image topic /camera/color/image_raw carries sensor_msgs/msg/Image.*"
                                       r"set compressed to false"):
        eval_bag(bag, model, tmp_path / "eval", models_dir=lmo_root / "models",
                 config=dataclasses.replace(cfg, compressed=True), device="cpu")
    assert not (tmp_path / "eval" / "report.md").exists()
