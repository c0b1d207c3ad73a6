"""Bag tools: made bags replay through the node's path; scores match `featmap evaluate`; damage is survived."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from mcap.reader import make_reader
from mcap_ros2.decoder import DecoderFactory
from rosbags.highlevel import AnyReader

from featmap_ros import bop_scoring
from featmap_ros import evaluation as ev
from featmap_ros.bag import io as bag
from featmap_ros.bag import report
from featmap_ros.bag.make import hand_sequence, make_bop_bag, nyu_frames, write_hand_frames
from featmap_ros.bag.replay import eval_bag
from featmap_ros.datasets import bop
from featmap_ros.estimator import load_estimator
from featmap_ros.model import checkpoint
from featmap_ros.model.nets import FeatureMappingModel, NetConfig
from featmap_ros.ros.config import ProcessorError

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from bench_bag_memory import tiny_object_model  # noqa: E402 - the bench folder is no package


def object_model(path: Path, lmo_root: Path) -> Path:
    """A tiny random-weight objects checkpoint for LM-O objects 1 and 5 (the memory bench's)."""
    return tiny_object_model(path, lmo_root)


def hand_model(path: Path) -> Path:
    from featmap_ros.datasets.nyu import JOINT_NAMES

    torch.manual_seed(0)
    model = FeatureMappingModel(NetConfig(task="hands", input_size=64, width=4, feature_dim=32, mapping=True))
    checkpoint.save(path, model, {"method": "fm", "hands": {"joint_names": list(JOINT_NAMES), "cube_m": 0.3},
                                  "crop": {"size": 64}})
    return path


@pytest.fixture(scope="module")
def lmo_bag(lmo_root, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lmo")
    return make_bop_bag(lmo_root, 2, tmp / "bag", frames="3-62"), object_model(tmp / "model", lmo_root), tmp


def test_bag_eval_scores_exactly_like_featmap_evaluate(lmo_bag, lmo_root):
    bag_path, model, tmp = lmo_bag
    res = eval_bag(bag_path, model, tmp / "eval", models_dir=lmo_root / "models", device="cpu")
    assert res.processed == 12 and res.skipped == {} and res.warnings == []
    records, _ = bop_scoring.run_bop(load_estimator(model, device="cpu"), lmo_root, 2, "3-62")
    infos, meshes = bop_scoring.load_object_models(lmo_root / "models")
    direct, direct_rows = ev.score_objects(records, infos, meshes)
    replay_rows = [r for r in (tmp / "eval" / "instances.csv").read_text().splitlines()[1:]]
    assert len(replay_rows) == len(direct_rows) > 15
    # the same estimates, instance by instance: every error agrees to 1e-6
    replay = {(int(r.split(",")[2]), i): r for i, r in enumerate(replay_rows)}
    for i, row in enumerate(direct_rows):
        fields = replay[(row["obj_id"], i)].split(",")
        assert abs(float(fields[5]) - row["proj_px"]) < 1e-6 and abs(float(fields[6]) - row["add_m"]) < 1e-6
    for split in ("all", "visib>=0.5"):
        for k, v in direct[split]["mean_over_objects"].items():
            assert abs(res.metrics[split]["mean_over_objects"][k] - v) < 1e-6
    for name in ("report.md", "metrics.json", "fm_lmo-test.csv", "proj2d_curve.png", "error_over_time.png"):
        assert (tmp / "eval" / name).is_file()
    # the BOP CSV carries the scene's true ids (scene 2, image ids 3..62), not scene 0 and the frame index
    csv_rows = [r.split(",") for r in (tmp / "eval" / "fm_lmo-test.csv").read_text().splitlines()[1:]]
    assert {int(r[0]) for r in csv_rows} == {2}
    assert sorted({int(r[1]) for r in csv_rows}) == bop.select_ids("3-62", bop.BopScene(lmo_root, 2).image_ids)
    # scored against the annotated rotations, as the BOP toolkit and `featmap evaluate` do
    assert res.metrics["gt_rotation"] == [report.GT_ROTATION["annotated"]]
    assert res.metrics["targets"]["set"] == "all"
    assert "scored: every annotated instance" in (tmp / "eval" / "report.md").read_text()


def test_output_bag_decodes_with_rosbags_and_mcap(lmo_bag, lmo_root):
    bag_path, model, tmp = lmo_bag
    res = eval_bag(bag_path, model, tmp / "eval2", models_dir=lmo_root / "models", device="cpu")
    with AnyReader([res.output_bag]) as reader:
        topics = {c.topic for c in reader.connections}
        assert {"/camera/color/image_raw", "/tf", "/featmap/markers", "/featmap/objects", "/featmap/overlay"} <= topics
        image_stamps = set()
        tf_msgs = []
        for conn, _, data in reader.messages():
            msg = reader.deserialize(data, conn.msgtype)
            if conn.topic == "/camera/color/image_raw":
                image_stamps.add((msg.header.stamp.sec, msg.header.stamp.nanosec))
            if conn.topic == "/tf":
                tf_msgs.extend(tr for tr in msg.transforms if tr.child_frame_id.startswith("featmap/"))
    assert tf_msgs, "the replay published no predicted TF frames"
    for tr in tf_msgs:
        assert (tr.header.stamp.sec, tr.header.stamp.nanosec) in image_stamps
        assert tr.header.frame_id == "camera_color_optical_frame"
    mcap_file = next(Path(res.output_bag).glob("*.mcap"))
    with open(mcap_file, "rb") as fh:
        reader = make_reader(fh, decoder_factories=[DecoderFactory()])
        decoded = {ch.topic for _, ch, _, _ in reader.iter_decoded_messages()}
    assert {"/featmap/objects", "/featmap/markers", "/ground_truth/objects", "/camera/color/detections"} <= decoded


def test_sqlite3_bags_read_the_same(lmo_root, tmp_path):
    a = bag.read_bag(make_bop_bag(lmo_root, 2, tmp_path / "m", frames="3-20"), bag.TOPICS["objects"])
    b = bag.read_bag(make_bop_bag(lmo_root, 2, tmp_path / "s", frames="3-20", storage="sqlite3"),
                     bag.TOPICS["objects"])
    assert len(a.frames) == len(b.frames) == 3
    assert bytes(a.frames[1].image.data) == bytes(b.frames[1].image.data)
    assert all(f.camera_info is not None and f.detections is not None and f.ground_truth is not None
               for f in a.frames)


def test_missing_topic_is_named_and_extra_topics_are_ignored(lmo_root, tmp_path):
    path = make_bop_bag(lmo_root, 2, tmp_path / "bag", frames="3-20")
    renamed = bag.BagTopics("/other/image", "/camera/color/camera_info", None, "/ground_truth/objects", "cam")
    with pytest.raises(bag.BagError, match=r"no topic \['/other/image'\].*topics found.*/camera/color/image_raw"):
        bag.read_bag(path, renamed)
    # a bag with an unrelated topic (std_msgs/String) reads as before
    with bag.BagWriter(tmp_path / "extra") as bw:
        src = bag.read_bag(path, bag.TOPICS["objects"], keep_raw=True)
        for topic, msgtype, t, data, msgdef, digest in src.raw:
            bw.write_raw(topic, msgtype, t, data, msgdef, digest)
        bw.write("/chatter", "std_msgs/msg/String", bag.START_NS, bw.ts.types["std_msgs/msg/String"](data="hi"))
    extra = bag.read_bag(tmp_path / "extra", bag.TOPICS["objects"])
    assert len(extra.frames) == 3 and "/chatter" in extra.topics and extra.warnings == []


def test_a_truncated_bag_is_scored_up_to_the_damage(lmo_bag, lmo_root, tmp_path):
    bag_path, model, _ = lmo_bag
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    for f in Path(bag_path).iterdir():
        data = f.read_bytes()
        (damaged / f.name).write_bytes(data[: len(data) // 2] if f.suffix == ".mcap" else data)
    res = eval_bag(damaged, model, tmp_path / "eval", models_dir=lmo_root / "models", device="cpu",
                       write_output_bag=False)
    assert any("damaged" in w for w in res.warnings)
    assert 0 < res.processed < 12


def test_hand_bag_round_trip(tmp_path):
    frames = hand_sequence(6, seed=1, keyframe_every=15)
    from featmap_ros.datasets.nyu import NYU_INTRINSICS

    path = write_hand_frames(tmp_path / "hand", frames, NYU_INTRINSICS, storage="sqlite3")
    contents = bag.read_bag(path, bag.TOPICS["hands"])
    assert len(contents.frames) == 6
    joints = [bag.gt_hand(f.ground_truth) for f in contents.frames]
    # a smooth sequence: consecutive palms move by less than 5 cm
    assert max(np.linalg.norm(a[13] - b[13]) for a, b in zip(joints, joints[1:])) < 0.05
    res = eval_bag(path, hand_model(tmp_path / "model"), tmp_path / "eval", device="cpu")
    assert res.metrics["frames_scored"] + sum(res.skipped.values()) <= 6
    assert res.metrics["frames_scored"] >= 4 and res.metrics["mean_error_mm"] > 0
    assert (tmp_path / "eval" / "report.md").read_text().startswith("# Bag replay: hands")


def test_nyu_frames_become_a_bag_with_their_ground_truth(nyu_root, tmp_path):
    from featmap_ros.datasets import nyu

    frames, n = nyu_frames(nyu_root, "test")
    assert n == 1
    path = write_hand_frames(tmp_path / "nyu", frames, nyu.NYU_INTRINSICS, total=n)
    (frame,) = bag.read_bag(path, bag.TOPICS["hands"]).frames
    joints = nyu.joints_uvd_to_xyz(nyu.read_joints_uvd_txt(nyu_root / "test" / "depth_1_0000001_joints_uvd.txt"))
    assert abs(bag.gt_hand(frame.ground_truth) - joints).max() < 1e-9
    from featmap_ros.ros.messages import image_to_depth

    depth = image_to_depth(frame.image)
    original = nyu.read_depth(nyu_root / "test" / "depth_1_0000001.png")
    assert np.array_equal(np.isnan(depth), np.isnan(original))
    assert np.nanmax(np.abs(depth - original)) < 1e-6  # 16UC1 millimetres carry NYU's millimetres exactly


def test_bag_eval_loads_the_model_as_the_node_would(lmo_bag, lmo_root):
    # The config's estimator settings (here max_detections) apply in the replay as on the robot.
    from dataclasses import replace

    from featmap_ros.bag.replay import default_node_config
    from featmap_ros.estimator import model_meta

    bag_path, model, tmp = lmo_bag
    cfg = replace(default_node_config("objects", str(model), model_meta(model)), max_detections=1)
    res = eval_bag(bag_path, model, tmp / "eval_max1", models_dir=lmo_root / "models", device="cpu", config=cfg,
                   write_output_bag=False)
    # nearly every frame shows both of the model's objects: the second detection is dropped, and counted
    # (detections of the scene's other objects are counted too, as unknown to the model)
    dropped = res.metrics["dropped"]
    assert res.processed == 12 and 10 <= dropped["max_detections"] <= 12 and dropped["unknown_object"] > 0
    assert f"'max_detections': {dropped['max_detections']}" in (tmp / "eval_max1" / "report.md").read_text()
    # without the limit nothing is dropped for it
    assert "max_detections" not in eval_bag(bag_path, model, tmp / "eval_all", models_dir=lmo_root / "models",
                                            device="cpu", write_output_bag=False).metrics["dropped"]
    hands = replace(cfg, task="hands")  # a config for the other task fails with both named, before any frame
    with pytest.raises(ProcessorError, match="'objects' model but task is 'hands'"):
        eval_bag(bag_path, model, tmp / "eval_wrong", models_dir=lmo_root / "models", device="cpu", config=hands)
