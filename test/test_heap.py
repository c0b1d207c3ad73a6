"""glibc heap settings: pinned for rendering kept samples, relaxed while a training loop runs."""

from __future__ import annotations

import pytest

from featmap_ros import heap


@pytest.fixture
def calls(monkeypatch):
    seen: list[tuple[int, int]] = []
    monkeypatch.setattr(heap, "_mallopt", lambda param, value: seen.append((param, value)) or True)
    monkeypatch.setattr(heap, "_state", {"pinned": False})
    return seen


def test_training_changes_nothing_where_nothing_pinned_the_threshold(calls) -> None:
    with heap.heap_for_training() as changed:
        assert changed is False
    assert calls == [] and not heap.is_pinned()


def test_training_relaxes_a_pinned_threshold_and_pins_it_again_after(calls) -> None:
    assert heap.pin_mmap_threshold() and heap.is_pinned()
    assert calls == [(heap.M_MMAP_THRESHOLD, heap.PINNED_MMAP_THRESHOLD), (heap.M_TOP_PAD, heap.RENDER_TOP_PAD)]
    with heap.heap_for_training(mmap_threshold=1 << 26, trim_threshold=1 << 29) as changed:
        assert changed and not heap.is_pinned()
        assert calls[2:] == [(heap.M_MMAP_THRESHOLD, 1 << 26), (heap.M_TRIM_THRESHOLD, 1 << 29)]
    assert heap.is_pinned()
    assert calls[-1] == (heap.M_MMAP_THRESHOLD, heap.PINNED_MMAP_THRESHOLD)


def test_an_error_inside_training_still_pins_the_threshold_again(calls) -> None:
    heap.pin_mmap_threshold()
    with pytest.raises(RuntimeError), heap.heap_for_training():
        raise RuntimeError("a non-finite loss")
    assert heap.is_pinned() and calls[-1] == (heap.M_MMAP_THRESHOLD, heap.PINNED_MMAP_THRESHOLD)


def test_the_real_mallopt_takes_the_settings_on_glibc() -> None:
    import platform

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("mallopt is glibc's")
    assert heap._mallopt(heap.M_TRIM_THRESHOLD, 128 * 1024) is True
    assert heap._mallopt(heap.M_TOP_PAD, heap.RENDER_TOP_PAD) is True
