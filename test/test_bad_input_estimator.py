"""Hostile input at the estimator (issue 14, items 3, 5, 11): bad boxes, non-finite output, detection floods."""

from __future__ import annotations

import numpy as np
import pytest
from test_estimator import INTR, hand_meta, object_meta, sphere_depth, tiny_model

from featmap_ros import geometry as geo
from featmap_ros.backends import own_object_outputs
from featmap_ros.estimator import EstimatorError, HandEstimator, ObjectEstimator
from featmap_ros.results import Detection2D


class CountingNetwork:
    """Stands in for the network: constant outputs, records every batch size it was given."""

    def __init__(self, width: int, value: float = 0.0) -> None:
        self.width, self.value, self.batches = width, value, []

    def run(self, batch, objects=None):
        self.batches.append(len(batch))
        rows = np.full((len(batch), self.width), self.value)
        # Corner-like outputs that PnP accepts: a square of 8 distinct points per object slice.
        if np.isfinite(self.value):
            uv = geo.normalise_uv(np.array([[10, 10], [50, 10], [50, 50], [10, 50], [20, 20], [40, 20], [40, 40],
                                            [20, 40]], float), 64).ravel()
            rows[:] = np.tile(uv, self.width // 16)
        return rows if objects is None else own_object_outputs(rows, objects, self.width // 16), np.zeros(len(batch))


def objects(n_objects: int = 2) -> ObjectEstimator:
    return ObjectEstimator(tiny_model("objects", 16 * n_objects), object_meta(n_objects), device="cpu")


GOOD = Detection2D(np.array([300.0, 200, 60, 70]), score=0.9, obj_id=1)
IMAGE = np.zeros((480, 640, 3), np.uint8)


@pytest.mark.parametrize("box", [[np.nan, 1, 50, 50], [1, 1, np.inf, 50], [1, 1, -5, 50], [1, 1, 0.5, 0.5],
                                 [-500, -500, 10, 10], [700, 10, 50, 50]])
def test_a_bad_object_box_is_skipped_and_counted_and_the_good_one_still_estimated(box) -> None:
    est = objects()
    est.net = CountingNetwork(32)
    poses = est.estimate(IMAGE, INTR, [Detection2D(box, obj_id=1), GOOD])
    assert len(poses) == 1 and poses[0].obj_id == 1
    assert est.skipped["bad_box"] == 1


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_non_finite_network_output_is_dropped_and_counted_never_returned(value) -> None:
    est = objects()
    est.net = CountingNetwork(32, value)
    assert est.estimate(IMAGE, INTR, [GOOD]) == []
    assert est.skipped["non_finite_output"] == 1


def test_a_flood_of_detections_keeps_the_highest_scores_in_bounded_batches() -> None:
    est = objects()
    est.net = CountingNetwork(32)
    rng = np.random.default_rng(0)
    dets = [Detection2D(np.array([rng.uniform(0, 500), rng.uniform(0, 400), 60, 60]), score=float(rng.uniform(0, 0.5)),
                        obj_id=1) for _ in range(2000)]
    dets[1234] = Detection2D(np.array([300.0, 200, 60, 60]), score=0.99, obj_id=1)
    poses = est.estimate(IMAGE, INTR, dets)
    assert len(poses) <= est.max_detections == 32
    assert est.skipped["max_detections"] == 2000 - 32
    assert max(est.net.batches) <= 16 and sum(est.net.batches) == 32
    assert any(p.score == pytest.approx(0.99) for p in poses)


@pytest.mark.parametrize("bad", [0, -1, 2.5, True])
def test_max_detections_must_be_a_positive_integer(bad) -> None:
    with pytest.raises(EstimatorError, match="max_detections"):
        ObjectEstimator(tiny_model("objects", 32), object_meta(2), device="cpu", max_detections=bad)


def hands(**kwargs) -> HandEstimator:
    return HandEstimator(tiny_model("hands", 42), hand_meta(), device="cpu", **kwargs)


def test_one_nan_hand_box_does_not_drop_the_good_hand() -> None:
    est = hands(recentre=0)  # the crop stays at the located centre, which this test checks
    centre = np.array([0.02, 0.01, 0.6])
    depth = sphere_depth(centre)
    uv = geo.project(centre[None], INTR.K)[0]
    good = Detection2D(np.array([uv[0] - 60, uv[1] - 60, 120, 120]))
    found = est.estimate(depth, INTR, [Detection2D([np.nan, 0, 50, 50]), Detection2D([0, 0, np.inf, 9]), good])
    assert len(found) == 1 and np.linalg.norm(found[0].centre[:2] - centre[:2]) < 0.01
    assert est.skipped["bad_box"] == 2


def test_non_finite_hand_output_is_dropped_and_counted() -> None:
    est = hands()

    class NanNet:
        def run(self, batch):
            return np.full((len(batch), 42), np.nan), np.zeros(len(batch))

    est.net = NanNet()
    assert est.estimate(sphere_depth(np.array([0.0, 0.0, 0.6])), INTR) == []
    assert est.skipped["non_finite_output"] == 1


def test_non_finite_output_makes_the_diagnostics_an_error_and_is_counted() -> None:
    from collections import Counter

    from test_processor import FakeEstimator, make_processor, object_frame

    from featmap_ros.ros.messages import MessageFactory
    from featmap_ros.ros.typestore import typestore

    factory = MessageFactory.for_rosbags(typestore("humble"))

    est = FakeEstimator("objects")
    est.skipped = Counter()
    proc, lines = make_processor(factory, estimator=est)
    proc.safe_process(*object_frame(factory))
    assert proc.diagnostics()[0] == "ok"
    est.skipped["non_finite_output"] += 2
    level, message, values = proc.diagnostics()
    assert level == "error" and "non-finite output for 2 detections" in message
    assert values["detections dropped: non_finite_output"] == "2"
    assert any("non-finite" in line for line in lines)
    assert proc.diagnostics()[0] == "ok"  # nothing new since: back to ok, the count stays


def test_hand_drops_are_named_hands_in_the_diagnostics() -> None:
    from collections import Counter

    from test_processor import FakeEstimator, make_processor

    from featmap_ros.ros.messages import MessageFactory
    from featmap_ros.ros.typestore import typestore

    est = FakeEstimator("hands")
    est.skipped = Counter(non_finite_refine=3, non_finite_output=1)
    proc, _ = make_processor(MessageFactory.for_rosbags(typestore("jazzy")), task="hands", estimator=est)
    level, message, values = proc.diagnostics()
    assert level == "error" and "non-finite output for 1 hands" in message
    assert values["hands dropped: non_finite_refine"] == "3" and values["hands dropped: non_finite_output"] == "1"
    assert not any(key.startswith("detections dropped") for key in values)


def test_a_non_finite_recentre_pass_makes_the_diagnostics_an_error_too() -> None:
    from collections import Counter

    from test_processor import FakeEstimator, make_processor

    from featmap_ros.ros.messages import MessageFactory
    from featmap_ros.ros.typestore import typestore

    est = FakeEstimator("hands")
    est.skipped = Counter(recentre_out_of_range=4)
    proc, _ = make_processor(MessageFactory.for_rosbags(typestore("jazzy")), task="hands", estimator=est)
    assert proc.diagnostics()[0] != "error"  # a palm out of range is no fault of the network
    est.skipped["non_finite_recentre"] += 1
    level, message, values = proc.diagnostics()
    assert level == "error" and "non-finite output for 1 hands" in message
    assert values["hands dropped: non_finite_recentre"] == "1" and values["hands dropped: recentre_out_of_range"] == "4"
