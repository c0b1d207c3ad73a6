"""Shared test fixtures: where the real data lives, and skipping when it is absent."""

from __future__ import annotations

from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
LMO = SHARED_DATA / "lmo"
NYU = SHARED_DATA / "nyu"


def pytest_configure(config: pytest.Config) -> None:
    for marker in ("linter", "flake8", "pep257", "launch_test", "slow"):
        config.addinivalue_line("markers", f"{marker}: ament / featmap test category")
    config.addinivalue_line("markers", "gpu: needs an NVIDIA GPU, skips with the reason without (bench/gpu_suite.sh)")


@pytest.fixture(scope="session")
def lmo_root() -> Path:
    """The Linemod-Occluded BOP directory in ../shared/data (skips when absent)."""
    if not (LMO / "test" / "000002" / "scene_gt.json").is_file():
        pytest.skip(f"real LM-O data not found at {LMO} (it lives in ../shared/data beside the project)")
    return LMO


@pytest.fixture(scope="session")
def nyu_root() -> Path:
    """The NYU hand frame in ../shared/data (skips when absent)."""
    if not (NYU / "test" / "depth_1_0000001.png").is_file():
        pytest.skip(f"real NYU frame not found at {NYU} (it lives in ../shared/data beside the project)")
    return NYU


@pytest.fixture
def die_at_rename(monkeypatch: pytest.MonkeyPatch):
    """die_at_rename(n, exc): the n-th os.replace from now raises exc instead (a kill between renames).

    Returns a function that puts the real os.replace back (monkeypatch also does at the test's end).
    """
    import os

    real = os.replace

    def arm(kill_at: int, exc: type[BaseException] = KeyboardInterrupt):
        calls = 0

        def dying_replace(src: object, dst: object) -> None:
            nonlocal calls
            calls += 1
            if calls == kill_at:
                raise exc
            real(src, dst)  # type: ignore[arg-type]

        monkeypatch.setattr(os, "replace", dying_replace)
        return lambda: monkeypatch.setattr(os, "replace", real)

    return arm


@pytest.fixture(scope="session")
def small_pool_models(lmo_root: Path):
    """Models of three LM-O objects (ape small, driller large, eggbox symmetric) and a 64-px stream config.

    Returns (infos, meshes, cfg): what the head round-trip tests render their 12-per-object pools from.
    """
    from featmap_ros.datasets.bop import load_models_info, load_ply, model_path
    from featmap_ros.datasets.streams import ObjectStreamConfig

    ids = (1, 8, 10)
    infos = load_models_info(lmo_root / "models" / "models_info.json")
    meshes = {i: load_ply(model_path(lmo_root, i)) for i in ids}
    return infos, meshes, ObjectStreamConfig(obj_ids=ids, crop=64)
