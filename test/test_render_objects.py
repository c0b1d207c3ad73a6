"""ObjectRenderer: ground-truth renders match LM-O boxes, depth is metric, crop windows equal crops."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from featmap_ros.datasets.bop import BopScene, Mesh, load_ply, model_path
from featmap_ros.geometry import CropWindow
from featmap_ros.render.gl import RenderError, projection_from_K
from featmap_ros.render.objects import Lighting, ObjectRenderer

LMO_IDS = (1, 5, 6, 8, 9, 10, 11, 12)



@pytest.fixture(scope="module")
def lmo_renderer(lmo_root: Path) -> ObjectRenderer:
    root = lmo_root
    return ObjectRenderer({i: load_ply(model_path(root, i)) for i in LMO_IDS})


def quad(z: float = 0.0, half: float = 0.1) -> Mesh:
    """A square in the model's z = `z` plane, two triangles, facing -z (towards an identity camera)."""
    v = np.array([[-half, -half, z], [half, -half, z], [half, half, z], [-half, half, z]])
    return Mesh(v, np.array([[0, 2, 1], [0, 3, 2]]), colors=np.full((4, 3), 200, np.uint8))


def test_projection_maps_pixel_centres_to_ndc() -> None:
    K = np.array([[500.0, 0, 319.5], [0, 500.0, 239.5], [0, 0, 1]])
    P = projection_from_K(K, 640, 480, 0.1, 10.0)
    clip = P @ np.array([0.0, 0.0, 2.0, 1.0])
    assert np.allclose(clip[:2] / clip[3], 0.0, atol=1e-6)  # principal point at the image centre
    left_edge = P @ np.array([(-0.5 - 319.5) / 500.0 * 2.0, 0.0, 2.0, 1.0])
    assert left_edge[0] / left_edge[3] == pytest.approx(-1.0, abs=1e-6)
    near, far = P @ [0, 0, 0.1, 1], P @ [0, 0, 10.0, 1]
    assert near[2] / near[3] == pytest.approx(-1.0, abs=1e-5) and far[2] / far[3] == pytest.approx(1.0, abs=1e-5)


def test_depth_of_a_tilted_plane_is_analytic_within_a_millimetre() -> None:
    renderer = ObjectRenderer({0: quad(half=0.3)})
    K = np.array([[300.0, 0, 63.5], [0, 300.0, 63.5], [0, 0, 1]])
    a = np.radians(30.0)
    R = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    t = np.array([0.0, 0.0, 0.8])
    rgb, depth, mask = renderer.render(0, R, t, K, 128, 128)
    assert mask.mean() > 0.5 and np.isnan(depth[~mask]).all()
    v, u = np.nonzero(mask)
    ray = np.stack([(u - 63.5) / 300.0, (v - 63.5) / 300.0, np.ones_like(u, float)], 1)
    n = R[:, 2]  # plane normal in the camera frame; the plane passes through t
    z = (n @ t) / (ray @ n)
    assert np.abs(depth[v, u] - z).max() < 1e-3
    assert rgb[mask].min() > 0 and (rgb[~mask] == 0).all()


def test_render_batch_equals_single_renders_and_checks_lengths() -> None:
    renderer = ObjectRenderer({0: quad(), 1: quad(half=0.05)})
    K = np.array([[200.0, 0, 31.5], [0, 200.0, 31.5], [0, 0, 1]])
    ts = [np.array([0.0, 0.0, 0.5]), np.array([0.05, 0.0, 0.7])]
    rgb, depth, mask = renderer.render_batch([0, 1], [np.eye(3)] * 2, ts, [K] * 2, 64, 64, [None, Lighting()])
    for i in range(2):
        r1, d1, m1 = renderer.render(i, np.eye(3), ts[i], K, 64, 64)
        assert (m1 == mask[i]).all() and np.array_equal(r1, rgb[i])
    with pytest.raises(RenderError):
        renderer.render_batch([0], [np.eye(3)] * 2, ts, [K] * 2, 64, 64)
    with pytest.raises(RenderError):
        renderer.render(7, np.eye(3), ts[0], K, 64, 64)


def test_lighting_sample_is_reproducible_and_lights_the_front() -> None:
    a, b = Lighting.sample(np.random.default_rng(3)), Lighting.sample(np.random.default_rng(3))
    assert a == b and a.light_dir[2] < 0


def test_gt_renders_reproduce_lmo_boxes(lmo_root: Path, lmo_renderer: ObjectRenderer) -> None:
    scene = BopScene(lmo_root, 2)
    seen = set()
    checked = 0
    for frame in scene.frames(scene.image_ids[::5]):
        insts = [i for i in frame.instances if i.visib_fract >= 0.1]
        # bbox_obj ignores the image border: render a canvas padded by 120 px on every side.
        pad = 120
        K = frame.intrinsics.K.copy()
        K[:2, 2] += pad
        _, _, masks = lmo_renderer.render_batch([i.obj_id for i in insts], [i.R for i in insts],
                                                [i.t for i in insts], [K] * len(insts), 640 + 2 * pad, 480 + 2 * pad)
        for inst, mask in zip(insts, masks, strict=True):
            v, u = np.nonzero(mask)
            x, y, w, h = inst.bbox_obj
            got = np.array([u.min(), v.min(), u.max(), v.max()]) - pad
            want = np.array([x, y, x + w, y + h])
            assert np.abs(got - want).max() <= 2, f"obj {inst.obj_id} im {frame.im_id}: {got} vs {want}"
            seen.add(inst.obj_id)
            checked += 1
    assert seen == set(LMO_IDS) and checked > 50


def test_rendering_into_a_crop_window_equals_cropping_the_full_render(
    lmo_root: Path, lmo_renderer: ObjectRenderer
) -> None:
    scene = BopScene(lmo_root, 2)
    frame = scene.frame(scene.image_ids[0])
    K = frame.intrinsics.K
    for inst in frame.instances[:4]:
        win = CropWindow.around_box(inst.bbox_obj, 128, 1.3)
        _, _, full = lmo_renderer.render(inst.obj_id, inst.R, inst.t, K, 640, 480)
        _, _, direct = lmo_renderer.render(inst.obj_id, inst.R, inst.t, win.intrinsics(K), 128, 128)
        soft = win.crop(full.astype(np.float32))
        cropped = soft > 0.5
        iou = (cropped & direct).sum() / (cropped | direct).sum()
        assert iou > 0.95, f"obj {inst.obj_id}: IoU {iou:.3f}"
        # Centroids catch what IoU hides: a half-pixel convention slip moves them by 0.5 crop px.
        yy, xx = np.mgrid[0:128, 0:128]
        want = np.array([(soft * xx).sum(), (soft * yy).sum()]) / soft.sum()
        got = np.array([xx[direct].mean(), yy[direct].mean()])
        assert np.abs(got - want).max() < 0.3, f"obj {inst.obj_id}: centroid {got} vs {want}"


def test_simplified_meshes_keep_the_silhouette(lmo_renderer: ObjectRenderer) -> None:
    small = ObjectRenderer({5: lmo_renderer.meshes[5]}, max_faces=12000)
    assert len(small.meshes[5].faces) <= 12000
    R, t = np.eye(3), np.array([0.0, 0.0, 0.6])
    K = np.array([[250.0, 0, 63.5], [0, 250.0, 63.5], [0, 0, 1]])
    _, _, a = lmo_renderer.render(5, R, t, K, 128, 128)
    _, _, b = small.render(5, R, t, K, 128, 128)
    assert (a & b).sum() / (a | b).sum() > 0.97


def write_textured_quad(folder: Path, half: float = 0.1) -> tuple[Path, np.ndarray]:
    """A BOP-style ASCII PLY (mm) square with texture_u/v and a TextureFile comment; its 4-colour PNG texture."""
    import cv2

    colours = np.array([[[220, 30, 30], [30, 200, 40]], [[30, 40, 210], [230, 220, 30]]], np.uint8)  # RGB
    texture = np.repeat(np.repeat(colours, 32, axis=0), 32, axis=1)  # (64, 64, 3): 2x2 quadrants
    cv2.imwrite(str(folder / "quad_tex.png"), cv2.cvtColor(texture, cv2.COLOR_RGB2BGR))
    h = half * 1000.0
    corners = [(-h, -h, 0, 0), (h, -h, 1, 0), (h, h, 1, 1), (-h, h, 0, 1)]  # x, y (mm), u, v
    lines = ["ply", "format ascii 1.0", "comment TextureFile quad_tex.png", "element vertex 4",
             "property float x", "property float y", "property float z",
             "property float texture_u", "property float texture_v", "element face 2",
             "property list uchar int vertex_indices", "end_header"]
    lines += [f"{x} {y} 0 {u} {v}" for x, y, u, v in corners] + ["3 0 2 1", "3 0 3 2"]
    path = folder / "quad.ply"
    path.write_text("\n".join(lines) + "\n")
    return path, texture


def test_uv_textured_mesh_renders_its_texture_the_right_way_up(tmp_path: Path) -> None:
    path, texture = write_textured_quad(tmp_path, half=0.05)
    mesh = load_ply(path)
    assert mesh.uv is not None and mesh.texture_path == tmp_path / "quad_tex.png"
    renderer = ObjectRenderer({0: mesh})
    K = np.array([[400.0, 0, 63.5], [0, 400.0, 63.5], [0, 0, 1]])
    flat = Lighting(ambient=1.0, diffuse=0.0, specular=0.0)
    rgb, depth, mask = renderer.render(0, np.eye(3), np.array([0.0, 0.0, 0.5]), K, 128, 128, flat)
    assert mask[32:96, 32:96].all() and not mask[:10].any()  # the square spans pixels 24..103
    assert np.nanmax(np.abs(depth[mask] - 0.5)) < 1e-4
    # Model y points down the image (OpenCV camera); PLY texture v runs bottom-up, so the image's
    # top-left quarter (model -x, -y: uv near (0, 0)) shows the texture's bottom-left quadrant.
    quarters = {(40, 40): texture[63, 0], (40, 88): texture[63, 63], (88, 40): texture[0, 0], (88, 88): texture[0, 63]}
    for (v, u), expected in quarters.items():
        assert np.abs(rgb[v, u].astype(int) - expected.astype(int)).max() <= 3, ((v, u), rgb[v, u], expected)
    # Vertex-cluster simplification leaves textured meshes alone (UVs do not average).
    assert ObjectRenderer({0: mesh}, max_faces=1).render(0, np.eye(3), np.array([0.0, 0.0, 0.5]), K, 128, 128,
                                                         flat)[2].sum() == mask.sum()
