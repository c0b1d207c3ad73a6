"""End-to-end latency of one frame through the node's processing path, median and p95.

decode (Image + CameraInfo + Detection2DArray messages) -> crops -> network -> PnP / joints ->
TF, markers, Detection3DArray / HandJointsArray (overlay off, as a robot would run it).

Usage: python3 bench/bench_latency.py [--frames 50] [--presets deploy paper] [--devices cpu cuda]
                                     [--heads dense16 dense keypoints bb8] [--hand-heads vote fc]
                                     [--backends torch onnxruntime]
                                     [--threads 0] [--decode-threads 1 2] [--recrop 0 1] [--recentre 0 2]
       python3 bench/bench_latency.py --model MODEL_JSON [--bop DIR] [--scene 2] [--real-frames 249-283]
'deploy' is the CPU-feasible net the experiments train (input 64, width 16, feature 256);
'paper' is the paper-like net (input 128, VGG-16 widths / ResNet width 32, feature 1024).
Weights are random: the network's time does not depend on them, the decode's and the published
messages' do (below). Backends run side by side on the same frames, taking turns frame by frame:
torch on the checkpoint (float32 on a CPU; torch-bf16 in bf16 autocast, a default column where the
CPU has native bf16), onnxruntime on its `featmap export` (providers by availability:
TensorRT, CUDA, CPU); ort-cuda and ort-tensorrt pin one GPU provider each. Hand models with the
vote head (the default) carry a centre refiner, so their frames include its crop-and-move steps
(RefinerConfig.iterations).
--decode-threads: the object rows once per count of threads solving the detections' PnP (the
node's decode_threads).
Random weights decode unrelated correspondences, so most crops find no pose (6 of 8 in the dense16 row)
and the frame publishes fewer messages than a trained model's would. --model MODEL_JSON --bop DIR times
a trained object checkpoint on real frames instead (a BOP scene's --real-frames, ground-truth boxes as
the detections, every backend of --backends on the same frames in turns), and prints only those rows:

    python3 bench/bench_latency.py --model out/lmo/fm_joint/model.json --bop ../shared/data/lmo
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Iterator
from pathlib import Path
from tempfile import TemporaryDirectory

import numpy as np
import torch

from featmap_ros.backends import HAND_RECENTRE, MAX_RECENTRE
from featmap_ros.backends.onnx_net import OnnxNetwork, onnxruntime_available
from featmap_ros.backends.torch_net import bf16_native
from featmap_ros.datasets.nyu import JOINT_NAMES, NYU_INTRINSICS
from featmap_ros.estimator import NETWORK_CHUNK, HandEstimator, ObjectEstimator, load_estimator, model_meta
from featmap_ros.export import export_onnx
from featmap_ros.geometry import Intrinsics, box_corners
from featmap_ros.heads.keypoints import KEYPOINT_FPS
from featmap_ros.model import checkpoint
from featmap_ros.model.nets import SPATIAL_OBJECT_HEADS, FeatureMappingModel, NetConfig, object_head_channels
from featmap_ros.model.refiner import CentreRefiner, RefinerConfig
from featmap_ros.results import Detection2D
from featmap_ros.ros.config import NodeConfig
from featmap_ros.ros.messages import MessageFactory
from featmap_ros.ros.processor import FrameProcessor
from featmap_ros.ros.typestore import typestore

PRESETS = {"deploy": {"input_size": 64, "width": 16, "feature_dim": 256}, "paper": {"input_size": 128}}
# torch: precision "auto" (float32 on a CPU, half on CUDA); torch-bf16: precision "bf16" (bf16 autocast,
# where the device has native bf16).
BACKENDS = ("torch", "torch-bf16", "onnxruntime", "ort-cuda", "ort-tensorrt")
_PINNED = {"ort-cuda": ["CUDAExecutionProvider"], "ort-tensorrt": ["TensorrtExecutionProvider"]}
LMO = Intrinsics(572.4114, 573.57043, 325.2611, 242.04899, 640, 480)


def make_checkpoint(folder: Path, task: str, preset: str, n_objects: int = 8, head: str = "bb8",
                    refiner: bool = False) -> Path:
    """A random-weight checkpoint of the given size and head.

    The network's time does not depend on the weights. The spatial heads' decoding does: random
    weights give unrelated correspondences (dense) or votes (keypoints), which most crops fail to turn
    into a pose, so such a frame decodes and publishes less than a trained model's (`--model`).
    """
    kw = dict(PRESETS[preset])
    if task == "objects":
        if head.startswith("dense") and head != "dense":  # "dense16": model coordinates over 16 bins
            kw["coord_bins"], head = int(head[5:]), "dense"
        if head in SPATIAL_OBJECT_HEADS:
            kw["feature_dim"] = 32 if preset == "deploy" else 64
        cfg = NetConfig(task="objects", n_outputs=object_head_channels(head) * n_objects, mapping=True, head=head,
                        **kw)
        corners = box_corners([-0.05] * 3, [0.1] * 3).tolist()
        # The box corners stand in for the silhouette points the recrop projects (estimator.ObjectEstimator).
        objects = [{"obj_id": i + 1, "name": f"obj{i + 1}", "corners_m": corners, "extent_m": [0.1] * 3,
                    "symmetric": False, "silhouette_m": corners} for i in range(n_objects)]
        if head == "keypoints":  # the box centre and 8 surface points (here the box corners) per object
            for o in objects:
                o["keypoints_m"] = [[0.0, 0.0, 0.0], *corners][: 1 + KEYPOINT_FPS]
        meta = {"objects": objects, "crop": {"size": cfg.input_size, "window_scale": 1.2}}
    else:
        if head == "vote":  # the experiments' vote net: width 8, a 32-channel S/4 map (64 at paper size)
            kw.update(width=8, feature_dim=32) if preset == "deploy" else kw.update(feature_dim=64)
        cfg = NetConfig(task="hands", mapping=True, head=head, **kw)
        meta = {"hands": {"joint_names": list(JOINT_NAMES), "cube_m": 0.3}, "crop": {"size": cfg.input_size}}
    name = f"{task}_{preset}_{head}"
    checkpoint.save(folder / name, FeatureMappingModel(cfg), {"method": "fm", **meta})
    if refiner:
        checkpoint.attach_refiner(folder / name, CentreRefiner(RefinerConfig(input_size=cfg.input_size)))
    return folder / name


def estimator_on(backend: str, ckpt: Path, device: str, threads: int, exports: dict[Path, Path],
                 decode_threads: int = 1, spinning: bool = False, recrop: int = 0, recentre: int = HAND_RECENTRE,
                 export_to: Path | None = None):
    """The estimator of a checkpoint on one backend (the export is made once per checkpoint, into export_to;
    None: beside the checkpoint)."""
    if backend in ("torch", "torch-bf16"):
        return load_estimator(ckpt, device=device, cpu_threads=threads, backend="torch", decode_threads=decode_threads,
                              precision="bf16" if backend == "torch-bf16" else "auto", recrop=recrop,
                              recentre=recentre)
    if ckpt not in exports:
        exports[ckpt] = export_onnx(ckpt, export_to or ckpt.parent / "onnx")
    providers = _PINNED.get(backend)
    if providers is not None:
        providers = [*providers, "CPUExecutionProvider"]
    net = OnnxNetwork(exports[ckpt], device, cpu_threads=threads, max_batch=NETWORK_CHUNK, providers=providers,
                      allow_spinning=spinning)
    if providers is not None and net.provider != providers[0]:
        raise RuntimeError(f"{backend}: onnxruntime fell back to {net.provider}")
    if net.meta["task"] == "objects":
        return ObjectEstimator(net, net.meta, decode_threads=decode_threads, recrop=recrop)
    return HandEstimator(net, net.meta, recentre=recentre)


def object_frame(f: MessageFactory, n: int, rng: np.random.Generator) -> tuple:
    """Image, CameraInfo and n detections of a 640x480 frame."""
    rgb = rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)
    dets = [Detection2D([40 + 70 * i, 100 + 20 * (i % 3), 60, 70], obj_id=i + 1) for i in range(n)]
    return f.image_rgb(rgb, 0, "cam"), f.camera_info(LMO, 0, "cam"), f.detection2d_array(dets, 0, "cam")


def hand_frame(f: MessageFactory) -> tuple:
    """A 16UC1 depth frame with a hand-sized blob at 0.6 m in front of a wall at 1.2 m."""
    depth = np.full((480, 640), 1.2, np.float32)
    v, u = np.mgrid[0:480, 0:640]
    blob = (u - 320) ** 2 / 60**2 + (v - 240) ** 2 / 90**2 < 1
    depth[blob] = 0.6
    return f.image_depth(depth, 0, "cam", "16UC1"), f.camera_info(NYU_INTRINSICS, 0, "cam"), None


def real_object_frames(f: MessageFactory, bop_root: Path, scene_id: int, ids: str) -> list[tuple]:
    """Image, CameraInfo and ground-truth-box detections of a BOP scene's frames `ids` (e.g. '249-283')."""
    from featmap_ros.bop_scoring import detections_for_frame
    from featmap_ros.datasets import bop

    scene = bop.BopScene(bop_root, scene_id)
    out = []
    for im_id in bop.select_ids(ids, scene.image_ids):
        frame = scene.frame(im_id)
        dets = detections_for_frame(frame, "gt", np.random.default_rng(0))
        out.append((f.image_rgb(bop.read_rgb(frame.rgb_path), 0, "cam"), f.camera_info(frame.intrinsics, 0, "cam"),
                    f.detection2d_array(dets, 0, "cam")))
    if not out:
        raise SystemExit(f"no frames {ids!r} in scene {scene_id} of {bop_root}")
    return out


def measure(procs: list[FrameProcessor | None], msgs: tuple | list[tuple], frames: int) -> list[tuple[float, float]]:
    """Median and p95 of process() wall time in ms per processor (None: NaN), after 3 warm-up frames each.

    msgs: one frame's messages, or a list of frames' taken in turn.

    The processors take turns frame by frame, so a machine whose speed drifts (this project's 2-core
    CPU: up to 1.5x between runs minutes apart) slows them alike instead of favouring whichever ran
    first. msgs = ("network", batch, objects) times the network alone (est.net.run) on a batch of crops
    instead, each crop read out for its object as the estimator does.
    """
    times: list[list[float]] = [[] for _ in procs]
    every = msgs if isinstance(msgs, list) else [msgs]
    for i in range(frames + 3):
        msgs = every[(i - 3) % len(every)]  # the timed frames start at the first of the list
        for k, proc in enumerate(procs):
            if proc is None:
                continue
            t0 = time.perf_counter()
            out = proc.estimator.net.run(msgs[1], msgs[2]) if msgs[0] == "network" else proc.process(*msgs)
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            assert out is not None
            if i >= 3:
                times[k].append(time.perf_counter() - t0)
    return [(float(np.median(t) * 1e3), float(np.percentile(t, 95) * 1e3)) if t else (float("nan"), float("nan"))
            for t in times]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=50)
    parser.add_argument("--presets", nargs="+", default=["deploy", "paper"], choices=sorted(PRESETS))
    parser.add_argument("--devices", nargs="+", default=["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
    parser.add_argument("--heads", nargs="+", default=["dense16", "dense", "bb8"],
                        choices=["dense16", "dense", "keypoints", "bb8"],
                        help="object heads: dense16 (the default of LM-O and the main job: coordinates over 16 bins), "
                             "dense (regressed coordinates), keypoints (PVNet's) and bb8 (the paper's)")
    parser.add_argument("--hand-heads", nargs="+", default=["vote", "fc"], choices=["vote", "fc"],
                        help="hand heads: vote (the default model, with its centre refiner) and fc (the paper's)")
    parser.add_argument("--backends", nargs="+", choices=BACKENDS,
                        default=["torch"] + (["torch-bf16"] if bf16_native(torch.device("cpu")) else [])
                        + (["onnxruntime"] if onnxruntime_available() else []),
                        help="what runs the network, side by side on the same frames (onnxruntime exports first)")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads of every backend (0: its default)")
    parser.add_argument("--ort-spinning", action="store_true",
                        help="let onnxruntime's threads busy-wait after each run (its default; ours is off)")
    parser.add_argument("--decode-threads", type=int, nargs="+", default=[1],
                        help="object rows once per number of PnP threads (the node's decode_threads)")
    parser.add_argument("--recrop", type=int, nargs="+", default=[0],
                        help="object rows once per number of recrop passes (the node's recrop)")
    parser.add_argument("--recentre", type=int, nargs="+", default=[HAND_RECENTRE], choices=range(MAX_RECENTRE + 1),
                        help=f"hand rows once per number of recentre passes (the node's recentre, {HAND_RECENTRE} "
                             "by default)")
    parser.add_argument("--model", type=Path, default=None,
                        help="a trained object checkpoint: time it on real frames (--bop, --real-frames) instead")
    parser.add_argument("--bop", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data" / "lmo",
                        help="with --model: the BOP dataset whose frames it runs on (default: the shared LM-O data)")
    parser.add_argument("--scene", type=int, default=2, help="with --model: the BOP scene")
    parser.add_argument("--real-frames", default="249-283", help="with --model: the real frames' ids (default: LM-O's "
                                                                  "validation frames, so no test frame is read)")
    args = parser.parse_args()
    f = MessageFactory.for_rosbags(typestore("humble"))
    rng = np.random.default_rng(0)
    versions = f"torch {torch.__version__}, threads {torch.get_num_threads() if not args.threads else args.threads}"
    versions += f", onnxruntime spinning {'on' if args.ort_spinning else 'off'}"
    if set(args.backends) - {"torch", "torch-bf16"}:
        import onnxruntime

        versions += f", onnxruntime {onnxruntime.__version__} {onnxruntime.get_available_providers()}"
    print(f"{versions}, {'GPU ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU'}")
    cols = " | ".join(f"{b} median | {b} p95" for b in args.backends)
    ratio = len(args.backends) > 1 and args.backends[0] == "torch"
    ratios = "".join(f" {b} speed-up vs torch |" for b in args.backends[1:]) if ratio else ""
    print(f"| device | preset | case | {cols} |{ratios}")
    print("|---|---|---|" + "---|---|" * len(args.backends) + ("---|" * (len(args.backends) - 1) if ratio else ""),
          flush=True)
    exports: dict[Path, Path] = {}

    def row(device: str, preset: str, case: str, procs: list, msgs: tuple | list[tuple]) -> None:
        meds, cells = [], []
        for proc, (med, p95) in zip(procs, measure(procs, msgs, args.frames), strict=True):
            meds.append(med)
            cells.append("n/a | n/a" if proc is None else f"{med:.1f} | {p95:.1f}")
        speed = " | ".join(f"{meds[0] / m:.2f}x" for m in meds[1:]) if ratio else ""
        print(f"| {device} | {preset} | {case} | {' | '.join(cells)} |" + (f" {speed} |" if ratio else ""), flush=True)

    def processors(ckpt: Path, device: str, cfg: NodeConfig, export_to: Path | None = None) -> list:
        """A FrameProcessor per backend (None where it is unavailable), its estimator set up as cfg says."""
        out = []
        for backend in args.backends:
            try:
                est = estimator_on(backend, ckpt, device, args.threads, exports, cfg.decode_threads, args.ort_spinning,
                                   cfg.recrop, cfg.recentre, export_to)
                out.append(FrameProcessor(est, f, cfg))
            except Exception as err:  # a provider this machine lacks: say so, keep the other columns
                print(f"note: {backend} on {device} unavailable: {type(err).__name__}: {err}", flush=True)
                out.append(None)
        return out

    def object_settings() -> Iterator[tuple[NodeConfig, str]]:
        """The node config of each --decode-threads x --recrop object row, and its case-name suffix."""
        for dt, rc in ((dt, rc) for dt in args.decode_threads for rc in args.recrop):
            suffix = (f", {dt} PnP threads" if dt > 1 else "") + (f", recrop {rc}" if rc else "")
            yield NodeConfig(task="objects", publish_overlay=False, decode_threads=dt, recrop=rc), suffix

    if args.model is not None:
        real = real_object_frames(f, args.bop, args.scene, args.real_frames)
        name = checkpoint.stem_of(args.model).parent.name
        with TemporaryDirectory() as tmp:  # an export goes to a temporary folder, not beside the model
            for device in args.devices:
                for cfg, suffix in object_settings():
                    procs = processors(args.model, device, cfg, export_to=Path(tmp) / "onnx")
                    running = [p for p in procs if p is not None]
                    if not running:
                        raise SystemExit(f"no backend of {args.backends} could run {args.model} on {device}")
                    # Poses a frame, from every backend (which also warms each up on every frame).
                    poses = [np.mean([len(p.process(*m).result.objects) for m in real]) for p in running]
                    boxes = np.mean([len(m[2].detections) for m in real])
                    case = (f"objects, {name} (trained), real frames {args.real_frames}: {boxes:.1f} boxes, "
                            f"{'/'.join(f'{n:.1f}' for n in poses)} poses a frame{suffix}")
                    row(device, "model", case, procs, real)
        return

    with TemporaryDirectory() as tmp:
        for device in args.devices:
            for preset in args.presets:
                for head in args.heads:
                    ckpt = make_checkpoint(Path(tmp), "objects", preset, head=head)
                    for cfg, suffix in object_settings():
                        procs = processors(ckpt, device, cfg)
                        for n in (1, 8):
                            row(device, preset, f"objects x{n}, {head} head{suffix}", procs, object_frame(f, n, rng))
                    size = PRESETS[preset]["input_size"]
                    crops = rng.uniform(-1, 1, (8, 3, size, size)).astype(np.float32)
                    objects = np.arange(8) % len(model_meta(ckpt)["objects"])
                    row(device, preset, f"network only, 8 crops, {head} head", procs, ("network", crops, objects))
                for head in args.hand_heads:
                    refine = head == "vote"
                    ckpt = make_checkpoint(Path(tmp), "hands", preset, head=head, refiner=refine)
                    for rc in args.recentre:
                        cfg = NodeConfig(task="hands", use_detections=False, publish_overlay=False, recentre=rc)
                        procs = processors(ckpt, device, cfg)
                        case = f"hand, {head} head" + (" + centre refiner" if refine else "") + f", recentre {rc}"
                        row(device, preset, case, procs, hand_frame(f))

if __name__ == "__main__":
    main()
