"""BOP reader and the geometry core against real LM-O ground truth (skips without ../shared/data)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from featmap_ros import geometry as g
from featmap_ros import metrics as m
from featmap_ros.datasets import bop

LMO_OBJECTS = (1, 5, 6, 8, 9, 10, 11, 12)


@pytest.fixture(scope="module")
def scene(lmo_root):
    return bop.BopScene(lmo_root, 2)


@pytest.fixture(scope="module")
def models(lmo_root):
    return {i: bop.load_ply(bop.model_path(lmo_root, i)) for i in LMO_OBJECTS}


@pytest.fixture(scope="module")
def eval_models(lmo_root):
    return {i: bop.load_ply(bop.model_path(lmo_root, i, eval_models=True)) for i in LMO_OBJECTS}


@pytest.fixture(scope="module")
def infos(lmo_root):
    return bop.load_models_info(lmo_root / "models" / "models_info.json")


def visible_instances(scene, min_visib=0.1):
    for frame in scene.frames():
        for inst in frame.instances:
            if inst.visib_fract >= min_visib:
                yield frame, inst


def test_reader_converts_millimetres_to_metres(scene, infos, models, lmo_root):
    raw = json.loads((lmo_root / "test" / "000002" / "scene_gt.json").read_text())
    first = scene.frame(3).instances[0]
    assert np.allclose(first.t * 1000.0, raw["3"][0]["cam_t_m2c"])
    assert np.isclose(infos[1].diameter, 0.102099)
    assert infos[10].symmetric and infos[11].symmetric and not infos[1].symmetric
    assert np.isclose(np.linalg.det(infos[10].symmetries[0][:3, :3]), 1.0, atol=1e-4)
    m1 = models[1]
    assert m1.colors is not None and m1.colors.dtype == np.uint8 and m1.normals is not None
    # the model fits its models_info box (metres)
    assert np.allclose(m1.vertices.min(axis=0), infos[1].min_xyz, atol=1e-4)
    assert len(scene.image_ids) == 100 and scene.image_ids[0] == 3


def test_ground_truth_projection_reproduces_bbox_obj(scene, models):
    """Projecting each model with its GT pose gives its annotated box within 2 px on every side."""
    n = 0
    for frame, inst in visible_instances(scene):
        uv = g.project_model(models[inst.obj_id].vertices, inst.R, inst.t, frame.intrinsics.K)
        x, y, w, h = inst.bbox_obj
        ours = np.r_[uv.min(axis=0), uv.max(axis=0)]
        assert np.abs(ours - [x, y, x + w, y + h]).max() <= 2.0, (frame.im_id, inst.obj_id)
        n += 1
    assert n > 600


def test_pnp_round_trip_on_ground_truth_poses(scene, infos, eval_models):
    """GT corners + 1 px Gaussian noise -> PnP: 2D projection error < 2 px for >= 99% of instances."""
    rng = np.random.default_rng(0)
    errors = []
    for frame, inst in visible_instances(scene):
        K = frame.intrinsics.K
        corners = infos[inst.obj_id].corners
        uv = g.project_model(corners, inst.R, inst.t, K) + rng.normal(0.0, 1.0, (8, 2))
        R, t = g.solve_pnp(corners, uv, K)
        errors.append(m.proj_2d(R, t, inst.R, inst.t, K, eval_models[inst.obj_id].vertices))
    assert m.accuracy(errors, 2.0) >= 0.99


def test_rgb_frames_load(scene):
    frame = scene.frame(scene.image_ids[0])
    rgb = bop.read_rgb(frame.rgb_path)
    assert rgb.shape == (frame.intrinsics.height, frame.intrinsics.width, 3) and rgb.dtype == np.uint8


def test_select_ids(scene):
    ids = scene.image_ids
    assert bop.select_ids("0-100", ids) == [i for i in ids if i <= 100]
    assert bop.select_ids("3,8", ids) == [3, 8]
    assert bop.select_ids(None, ids) == ids
    with pytest.raises(bop.BopError, match="not annotated"):
        bop.select_ids("4", ids)
    with pytest.raises(bop.BopError, match="frame range"):
        bop.select_ids("a-b", ids)


def test_reader_errors_are_clear(tmp_path):
    with pytest.raises(bop.BopError, match="no scene folder"):
        bop.BopScene(tmp_path, 1)
    (tmp_path / "models_info.json").write_text("{not json")
    with pytest.raises(bop.BopError, match="not valid JSON"):
        bop.load_models_info(tmp_path / "models_info.json")
    (tmp_path / "bad.ply").write_text("this is not a ply file\n")
    with pytest.raises(bop.BopError, match="PLY"):
        bop.load_ply(tmp_path / "bad.ply")
