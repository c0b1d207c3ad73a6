"""The one scoring implementation: objects (LINEMOD protocol, BOP CSV) and hands (NYU protocol)."""

from __future__ import annotations

import csv

import numpy as np
import transforms3d.axangles as ta

from featmap_ros import evaluation as ev
from featmap_ros.datasets.bop import Mesh, ObjectInfo
from featmap_ros.results import ObjectPose

K = np.array([[570.0, 0, 320], [0, 570.0, 240], [0, 0, 1]])
CUBE_PTS = np.array([[x, y, z] for x in (-0.05, 0.05) for y in (-0.05, 0.05) for z in (-0.05, 0.05)])
SYM = (np.diag([-1.0, -1.0, 1.0, 1.0]),)
INFOS = {1: ObjectInfo(1, 0.17, -0.05 * np.ones(3), 0.1 * np.ones(3)),
         2: ObjectInfo(2, 0.17, -0.05 * np.ones(3), 0.1 * np.ones(3), symmetries=SYM)}
MESHES = {i: Mesh(CUBE_PTS, np.zeros((0, 3), int)) for i in INFOS}


def pose(obj_id, R, t, score=1.0):
    return ObjectPose(obj_id, f"o{obj_id}", R, np.asarray(t, float), np.zeros((8, 2)), CUBE_PTS, np.ones(3) * 0.1,
                      score)


def record(obj_id, est, visib=1.0, im_id=0):
    return ev.ObjectRecord(2, im_id, obj_id, np.eye(3), np.array([0, 0, 0.8]), visib, K, est)


def test_object_scores_by_hand(tmp_path):
    t = [0, 0, 0.8]
    flip = ta.axangle2mat([0, 0, 1], np.pi)
    records = [
        record(1, pose(1, np.eye(3), t)),  # perfect
        record(1, pose(1, np.eye(3), [0.03, 0, 0.8]), visib=0.3),  # 3 cm off: fails 5 px and 10% ADD, passes 5cm5deg
        record(1, None),  # not found: fails all
        record(2, pose(2, flip, t)),  # symmetric twin: passes ADD-S, but 180 deg fails 5cm5deg
    ]
    metrics, rows = ev.score_objects(records, INFOS, MESHES, {1: "ape", 2: "eggbox"})
    assert rows[0]["proj_px"] == 0 and np.isinf(rows[2]["proj_px"])
    obj1 = metrics["all"]["per_object"]["1"]
    assert obj1["name"] == "ape" and obj1["n"] == 3
    assert np.isclose(obj1["proj_5px"], 1 / 3) and np.isclose(obj1["add_10"], 1 / 3)
    assert np.isclose(obj1["cm5_deg5"], 2 / 3)  # 3 cm and 0 deg is within 5 cm 5 deg
    obj2 = metrics["all"]["per_object"]["2"]
    assert obj2["add_10"] == 1.0 and obj2["cm5_deg5"] == 0.0
    assert np.isclose(metrics["all"]["mean_over_objects"]["add_10"], (1 / 3 + 1) / 2)
    visible = metrics["visib>=0.5"]["per_object"]["1"]
    assert visible["n"] == 2 and visible["proj_5px"] == 0.5
    assert metrics["symmetric_objects_scored_with_add_s"] == [2]
    curves = ev.object_curves(rows, INFOS)
    assert np.all(np.diff(curves["proj_acc"]) >= 0) and np.all(np.diff(curves["add_acc"]) >= 0)

    ev.write_bop_csv(tmp_path / "r.csv", records)
    rows_csv = list(csv.DictReader(open(tmp_path / "r.csv")))
    assert len(rows_csv) == 3  # the missing estimate has no row
    assert rows_csv[1]["t"].split()[0].startswith("30.0")  # millimetres
    assert len(rows_csv[0]["R"].split()) == 9
    ev.write_json(tmp_path / "m.json", metrics)
    assert "Infinity" not in (tmp_path / "m.json").read_text()


def test_hand_scores_by_hand():
    gt = np.zeros((4, 14, 3))
    est = gt.copy()
    est[1, :, 0] = 0.01  # 10 mm everywhere
    est[2, 0, 2] = 0.035  # one joint 35 mm off
    est[3, 5, 1] = 0.1  # one joint 100 mm off
    s = ev.score_hands(est, gt, tuple(f"j{i}" for i in range(14)))
    assert np.isclose(s["mean_error_mm"], (14 * 10 + 35 + 100) / 56)
    assert s["max_error_fraction"] == {"20mm": 0.5, "30mm": 0.5, "40mm": 0.75, "50mm": 0.75, "80mm": 0.75}
    assert np.isclose(s["per_joint_mm"]["j5"], (10 + 100) / 4)
    curve = ev.hand_curve(est, gt)
    assert np.all(np.diff(curve["fraction"]) >= 0) and curve["fraction"][-1] == 0.75
