"""glibc heap settings for the two kinds of work a process does here: rendering samples, and training.

Rendering many samples and keeping them (a cached set of hand frames) fragments the heap unless
large blocks come from mmap: pin_mmap_threshold keeps glibc's mmap threshold at 128 KB. Training
wants the opposite: every step allocates and frees the same activations of a few MB, and fresh
mmaps of them fault in zeroed pages every step (measured: a vote-head hand step 2.1x slower,
237 -> 499 ms). heap_for_training serves them from the heap while a training loop runs and puts
the pinned setting back after. Both are no-ops off glibc, and heap_for_training is one where
nothing pinned the threshold (glibc's own dynamic threshold already serves training well).
"""

from __future__ import annotations

import ctypes
from collections.abc import Iterator
from contextlib import contextmanager

M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_THRESHOLD = -3
PINNED_MMAP_THRESHOLD = 128 * 1024
# Extra heap kept at the top when it grows or is trimmed: the renderer's many medium temporaries
# (below the pinned threshold) then reuse pages instead of growing and trimming the heap, and
# faulting zeroed pages in, on every frame.
RENDER_TOP_PAD = 64 * 1024 * 1024
_DEFAULT_TRIM_THRESHOLD = 128 * 1024
_state = {"pinned": False}


def _mallopt(param: int, value: int) -> bool:
    try:
        return bool(ctypes.CDLL("libc.so.6").mallopt(param, int(value)))
    except (OSError, AttributeError):
        return False


def pin_mmap_threshold(threshold: int = PINNED_MMAP_THRESHOLD) -> bool:
    """Keep glibc serving large blocks (our frames) by mmap, so they never fragment the heap.

    glibc raises its mmap threshold after the first large block is freed; from then on every
    19 MB frame batch comes from the heap, and small crops *kept* between them (a cached set of
    samples) pin it: the process grew by ~0.8 MB per kept crop (13 GB for 16,000). Fixing the
    threshold stops that, at a price: fresh mmaps make rendering ~2.7x slower (99 -> 36 frames/s
    here) and training ~2x slower (heap_for_training undoes it there). So only code that keeps
    many rendered samples calls it. It also keeps RENDER_TOP_PAD of heap at the top: without it,
    a sensor-domain hand frame took 68 ms in a fresh process, with it 26 ms, and 400 cached frames
    peaked at the same RSS (session 11, docs/results.md). A no-op off glibc.
    """
    ok = _mallopt(M_MMAP_THRESHOLD, threshold)
    _state["pinned"] = _state["pinned"] or ok
    _mallopt(M_TOP_PAD, RENDER_TOP_PAD)
    return ok


def is_pinned() -> bool:
    """True once pin_mmap_threshold took effect in this process (outside heap_for_training)."""
    return _state["pinned"]


@contextmanager
def heap_for_training(mmap_threshold: int = 64 * 1024 * 1024, trim_threshold: int = 512 * 1024 * 1024
                      ) -> Iterator[bool]:
    """Inside: blocks below mmap_threshold come from the heap, and up to trim_threshold of free heap is kept.

    Yields whether the settings were changed (only where pin_mmap_threshold had pinned them); on
    exit the pinned settings are back, so rendering after training cannot fragment the heap.
    """
    if not _state["pinned"]:
        yield False
        return
    changed = _mallopt(M_MMAP_THRESHOLD, mmap_threshold) and _mallopt(M_TRIM_THRESHOLD, trim_threshold)
    _state["pinned"] = not changed
    try:
        yield changed
    finally:
        if changed:
            _mallopt(M_TRIM_THRESHOLD, _DEFAULT_TRIM_THRESHOLD)
            _state["pinned"] = _mallopt(M_MMAP_THRESHOLD, PINNED_MMAP_THRESHOLD)
