"""`featmap bag eval`: replay a bag through the node's processing path (FrameProcessor), frame by
frame, writing the annotated output bag and the overlays as it goes, then score it (bag/report.py).

Nothing grows with the bag's length but the per-instance scores: each image is read, processed,
written and dropped before the next is read (memory flat in the bag's length).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from featmap_ros.bag.io import TOPICS, BagError, BagTopics, BagWriter, open_bag, stream_frames
from featmap_ros.bag.report import HandReplayScore, ObjectReplayScore, write_report_md
from featmap_ros.bop_scoring import load_object_models
from featmap_ros.estimator import model_meta
from featmap_ros.ros.config import NodeConfig, ProcessorError
from featmap_ros.ros.messages import MessageFactory
from featmap_ros.ros.processor import FrameProcessor, check_input_types, load_estimator_for
from featmap_ros.ros.typestore import typestore

log = logging.getLogger(__name__)


@dataclass
class EvalResult:
    """What `featmap bag eval` produced: metrics, where the files are, and the frames' fate."""

    metrics: dict
    out_dir: Path
    output_bag: Path | None
    processed: int
    skipped: dict[str, int]
    warnings: list[str]


def default_node_config(task: str, model_path: str, meta: dict) -> NodeConfig:
    """The node's defaults for a checkpoint: object names from the checkpoint, no score cut (score everything)."""
    names = [f"{o['obj_id']}:{o['name']}" for o in meta.get("objects", [])]
    return NodeConfig(task=task, model_path=str(model_path), object_names=names, use_detections=task == "objects",
                      max_age_s=0.0)


def _overlay_picks(n_images: int | None, n: int) -> set[int]:
    """Frame indices whose overlay is saved: n spread over the bag, or the first n when its length is unknown."""
    if not n_images:
        return set(range(n))
    return {int(i) for i in np.linspace(0, n_images - 1, min(n, n_images)).astype(int)}


def eval_bag(bag_path: Path, model_path: Path, out: Path, *, models_dir: Path | None = None,
             config: NodeConfig | None = None, topics: BagTopics | None = None, device: str | None = None,
             backend: str | None = None, precision: str | None = None, write_output_bag: bool = True,
             storage: str = "mcap",
             distro: str = "humble", n_overlays: int = 4, targets: str = "all") -> EvalResult:
    """Replay a bag through the node's processing path and score it against its ground truth.

    Args:
        bag_path: the input rosbag2 folder.
        model_path: the checkpoint or its ONNX export (its JSON says the task).
        out: output folder: report.md, metrics.json, the BOP CSV, plots, overlays, and output_bag/.
        models_dir: objects only: a BOP models folder (models_info.json + obj_*.ply) for the metrics;
            models_eval/ beside models/ is used when it exists, like `featmap evaluate`, and the
            scene annotations under its parent give the annotated ground-truth rotations.
        config: the node's parameters (defaults from the checkpoint when None).
        topics: topic names (the task's defaults when None).
        device: where the network runs (None: the config's device).
        backend: torch, onnxruntime or auto (None: the config's backend, as the node would run).
        precision: the torch backend's (None: the config's; estimator.load_estimator).
        targets: objects: "all" annotated instances or the "bop19" test targets.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    meta = model_meta(model_path)
    task = meta["task"]
    cfg = config or default_node_config(task, str(model_path), meta)
    topics = topics or TOPICS[task]
    if task == "objects":
        infos, meshes = load_object_models(models_dir)
    # The node's own loading (ros.processor.load_estimator_for): cpu_threads, decode_threads,
    # max_detections and refine_centre of the config apply here as they do on the robot.
    cfg = dataclasses.replace(cfg, model_path=str(model_path), device=device or cfg.device,
                              backend=backend or cfg.backend, precision=precision or cfg.precision)
    estimator = load_estimator_for(cfg)
    messages: list[str] = []
    proc = FrameProcessor(estimator, MessageFactory.for_rosbags(typestore(distro)), cfg, log=messages.append)
    score = (ObjectReplayScore(Path(models_dir).parent, {o.obj_id for o in estimator.objects}, targets)
             if task == "objects" else HandReplayScore())
    out_bag = out / "output_bag" if write_output_bag else None
    n_frames = 0
    with ExitStack() as stack:
        source = stack.enter_context(open_bag(bag_path, topics))
        # A bag whose image topic holds another type than configured (raw Image while compressed is
        # true, a String) fails here with the types named, not as a skip on every frame.
        try:
            check_input_types(cfg, {"image": topics.image, "camera_info": topics.camera_info,
                                    "detections": topics.detections or ""}, source.topics)
        except ProcessorError as err:
            raise BagError(f"{bag_path}: {err}") from err
        bw = stack.enter_context(BagWriter(out_bag, storage, distro)) if out_bag else None
        n_images = source.image_counts.get(topics.image)
        picks = _overlay_picks(n_images, n_overlays)
        t0 = time.perf_counter()
        first_stamp = None
        frames = stream_frames(source, topics, cfg.sync_slop_s, (lambda raw: bw.write_raw(*raw)) if bw else None)
        for k, fr in enumerate(tqdm(frames, desc="bag eval", unit="frame", total=n_images)):
            first_stamp = fr.stamp_ns if first_stamp is None else first_stamp
            o = proc.safe_process(fr.image, fr.camera_info, fr.detections)
            score.add(k, fr, o, (fr.stamp_ns - first_stamp) / 1e9)
            if o is not None and bw is not None:
                for topic, msgtype, msg in proc.topic_messages(o):
                    bw.write(topic, msgtype, fr.stamp_ns, msg)
            if o is not None and o.overlay is not None and k in picks:
                img = np.frombuffer(bytes(o.overlay.data), np.uint8).reshape(o.overlay.height, o.overlay.width, 3)
                cv2.imwrite(str(out / f"overlay_{fr.stamp_ns}.png"), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
            n_frames = k + 1
        wall = time.perf_counter() - t0
    for w in source.warnings:
        log.warning(w)
    snap = proc.stats.snapshot()
    summary = {"bag": str(bag_path), "model": str(model_path), "task": task, "frames": n_frames,
               "processed": snap.processed, "skipped": dict(snap.skipped), "warnings": list(source.warnings),
               # what the estimator dropped within processed frames (detections or hands), by reason
               "dropped": dict(getattr(estimator, "skipped", {}) or {}),
               "latency_median_ms": snap.latency_median_s * 1e3, "latency_p95_ms": snap.latency_p95_s * 1e3,
               "wall_s": wall, "device": estimator.device, "log": messages}
    if isinstance(score, ObjectReplayScore):
        names = {o.obj_id: o.name for o in estimator.objects}
        metrics = score.write(out, infos, meshes, names, {**summary, "method": meta.get("method", "featmap")})
    else:
        metrics = score.write(out, estimator.joint_names, summary)
    write_report_md(out, metrics, task, out_bag)
    return EvalResult(metrics, out, out_bag, snap.processed, dict(snap.skipped), metrics["warnings"])
