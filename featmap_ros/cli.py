"""The `featmap` command: parses arguments and calls the modules that do the work.

    featmap main                      the main job on built-in defaults (bags, training, replay, reports)
    featmap render objects|hands|bench
    featmap train objects|hands       one method, one config, one checkpoint
    featmap evaluate objects          score a model on a BOP scene
    featmap export                    a checkpoint as ONNX (+ JSON) for the onnxruntime backend
    featmap experiment lmo|hands|nyu  every method, then one table
    featmap bag make objects|hands|nyu / featmap bag eval
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from featmap_ros.backends import BACKENDS, MAX_RECROP, PRECISIONS

LMO_NAMES = {1: "ape", 5: "can", 6: "cat", 8: "driller", 9: "duck", 10: "eggbox", 11: "glue", 12: "holepuncher"}


def _print_json(data: dict) -> None:
    print(json.dumps(data, indent=2, default=str))


# --------------------------------------------------------------------------------------------
# main


def cmd_main(args: argparse.Namespace) -> int:
    from featmap_ros.experiments.main_job import run_main_job

    run_main_job(Path(args.out), tiny=args.tiny, device=args.device, retrain=args.retrain)
    return 0


# --------------------------------------------------------------------------------------------
# render


def cmd_render_objects(args: argparse.Namespace) -> int:
    from featmap_ros.datasets import bop
    from featmap_ros.datasets.streams import (
        ObjectStreamConfig,
        PairConfig,
        RealSyntheticPairs,
        SyntheticObjectStream,
        write_contact_sheet,
        write_gt_overlay,
    )

    root = Path(args.bop)
    infos = bop.load_models_info(root / "models" / "models_info.json")
    obj_ids = tuple(args.objects or sorted(infos))
    stream = SyntheticObjectStream.from_bop(root, ObjectStreamConfig(obj_ids=obj_ids, seed=args.seed))
    scene = bop.BopScene(root, args.scene)
    ids = bop.select_ids(args.frames, scene.image_ids)
    pairs = RealSyntheticPairs.from_bop(root, args.scene, ids, obj_ids, PairConfig(composite=args.composite))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sheet = write_contact_sheet(out / "objects_sheet.png", stream, pairs, n=args.n, seed=args.seed)
    overlay = write_gt_overlay(out / f"gt_overlay_{ids[0]:06d}.png", scene, ids[0], pairs.renderer, infos)
    print(f"contact sheet: {sheet}\nground-truth overlay: {overlay}")
    return 0


def cmd_render_hands(args: argparse.Namespace) -> int:
    from featmap_ros.datasets.hand_streams import write_hand_sheet

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"contact sheet: {write_hand_sheet(out / 'hands_sheet.png', n=args.n, seed=args.seed)}")
    return 0


def cmd_render_bench(args: argparse.Namespace) -> int:
    from featmap_ros.render.throughput import render_throughput

    render_throughput(args.seconds, lmo_root=Path(args.bop) if args.bop else None)
    return 0


# --------------------------------------------------------------------------------------------
# train, evaluate, experiment


def cmd_train(args: argparse.Namespace) -> int:
    from featmap_ros.experiments.data import train_from_cli

    path = train_from_cli(args.task, config=args.config, method=args.method, out=Path(args.out),
                          bop_root=args.bop, scene_id=args.scene, train_frames=args.train_frames)
    print(f"checkpoint: {path}")
    return 0


def cmd_evaluate_objects(args: argparse.Namespace) -> int:
    from featmap_ros.bop_scoring import load_object_models, run_bop, write_object_report, write_overlays
    from featmap_ros.estimator import load_estimator

    root, out = Path(args.bop), Path(args.out)
    est = load_estimator(args.model, device=args.device, backend=args.backend, precision=args.precision,
                         recrop=args.recrop)
    records, ctx = run_bop(est, root, args.scene, args.frames, args.detections, targets=args.targets)
    infos, meshes = load_object_models(root / "models")
    names = {o.obj_id: o.name for o in est.objects}
    metrics = write_object_report(out, records, infos, meshes, names,
                                  extra={"model": str(args.model), "bop": str(root), "scene": args.scene,
                                         "frames": args.frames, "detections": args.detections,
                                         "method": est.net.meta.get("method", "featmap"),
                                         "precision": args.precision, "recrop": args.recrop},
                                  targets=args.targets, dataset=ctx["dataset"], split=ctx["split"])
    print(f"scored: {metrics['targets']['scored']}")
    write_overlays(out, root, args.scene, records, infos, names, n=args.overlays)
    for split in ("all", "visib>=0.5"):
        mean = metrics[split]["mean_over_objects"]
        print(f"{split:>10}: {metrics[split]['n_instances']} instances, 2D proj@5px {100 * mean['proj_5px']:.1f}%, "
              f"ADD(-S)@10% {100 * mean['add_10']:.1f}%, 5cm5deg {100 * mean['cm5_deg5']:.1f}%")
    print(f"metrics: {out / 'metrics.json'}  BOP results: {out / metrics['bop_csv']}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from featmap_ros.export import export_onnx

    path = export_onnx(args.model, args.out, opset=args.opset)
    doc = json.loads(path.read_text())
    print(f"onnx: {path.parent / doc['onnx']['file']}\nmetadata: {path}\ncheck: {doc['check']}")
    return 0


def cmd_experiment(args: argparse.Namespace) -> int:
    if args.which != "lmo" and args.validation_only:
        raise SystemExit(f"--validation-only is for `featmap experiment lmo`, not {args.which}")
    if args.which == "nyu" and args.methods:
        raise SystemExit("--methods is for `featmap experiment lmo` and `featmap experiment hands`, not nyu")
    if args.which == "nyu" and args.budget:
        raise SystemExit("--budget is for `featmap experiment lmo` and `featmap experiment hands`, not nyu")
    if args.quick and args.budget:
        raise SystemExit("--budget changes the full budget and --quick is a tiny one of its own: give one of them")
    if args.which == "lmo":
        from featmap_ros.experiments.lmo import LmoBudget, run_lmo_experiment
        from featmap_ros.train import load_dataclass_yaml

        budget = load_dataclass_yaml(LmoBudget, args.budget) if args.budget else None
        result = run_lmo_experiment(Path(args.bop), args.scene, args.train_frames, args.test_frames, Path(args.out),
                                    quick=args.quick, budget=budget, device=args.device,
                                    methods=args.methods.split(",") if args.methods else None,
                                    validation_only=args.validation_only)
    elif args.which == "hands":
        from featmap_ros.experiments.hands import HandsBudget, run_hands_experiment
        from featmap_ros.train import load_dataclass_yaml

        budget = load_dataclass_yaml(HandsBudget, args.budget) if args.budget else None
        result = run_hands_experiment(Path(args.out), quick=args.quick, budget=budget,
                                      methods=args.methods.split(",") if args.methods else None)
    else:
        from featmap_ros.experiments.nyu import run_nyu_experiment

        if not args.nyu:
            raise SystemExit("featmap experiment nyu needs --nyu DIR (the NYU dataset with train/ and test/)")
        result = run_nyu_experiment(Path(args.nyu), Path(args.out), quick=args.quick)
    if args.validation_only:
        print(f"learning curves: {Path(args.out) / 'curves.json'} {Path(args.out) / 'learning_curves.png'}")
        return 0
    print(f"table: {Path(args.out) / 'table.md'}")
    table = Path(args.out) / "table.md"
    if table.is_file():
        print(table.read_text())
    return 0 if result is not None else 1


# --------------------------------------------------------------------------------------------
# bags


def cmd_bag_make(args: argparse.Namespace) -> int:
    from featmap_ros.bag import make as bag

    out = Path(args.out)
    if args.source == "objects":
        bag.make_bop_bag(Path(args.bop), args.scene, out, frames=args.frames, storage=args.storage,
                         distro=args.distro, detections=args.detections, miss_rate=args.miss_rate,
                         false_rate=args.false_rate, seed=args.seed, names=LMO_NAMES)
    elif args.source == "hands":
        from featmap_ros.datasets.nyu import NYU_INTRINSICS

        bag.write_hand_frames(out, bag.hand_sequence(args.n_frames, seed=args.seed), NYU_INTRINSICS,
                              storage=args.storage, distro=args.distro, total=args.n_frames)
    else:
        from featmap_ros.datasets.nyu import NYU_INTRINSICS

        frames, n = bag.nyu_frames(Path(args.nyu), args.split, args.max_frames)
        bag.write_hand_frames(out, frames, NYU_INTRINSICS, storage=args.storage, distro=args.distro, total=n)
    print(f"bag: {out}")
    return 0


def cmd_bag_eval(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from featmap_ros.bag.io import TOPICS
    from featmap_ros.bag.replay import eval_bag
    from featmap_ros.estimator import model_meta
    from featmap_ros.ros.config import load_node_config

    meta = model_meta(args.model)
    config = load_node_config(args.config) if args.config else None
    if config is not None:
        config = replace(config, max_age_s=0.0)  # eval_bag puts the model path in
    topics = TOPICS[meta["task"]]
    topics = replace(topics, **{k: v for k, v in (("image", args.image_topic), ("camera_info", args.camera_info_topic),
                                                  ("detections", args.detections_topic),
                                                  ("ground_truth", args.ground_truth_topic)) if v})
    res = eval_bag(Path(args.bag), Path(args.model), Path(args.out), models_dir=args.models, config=config,
                   topics=topics, device=args.device, backend=args.backend, precision=args.precision,
                   write_output_bag=not args.no_output_bag, storage=args.storage, targets=args.targets)
    print((Path(args.out) / "report.md").read_text())
    print(f"report: {Path(args.out) / 'report.md'}  metrics: {Path(args.out) / 'metrics.json'}")
    if res.output_bag:
        print(f"annotated bag: {res.output_bag}")
    return 0


# --------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="featmap", description="Feature Mapping for 3D pose from synthetic images.")
    p.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error instead of one line")
    sub = p.add_subparsers(dest="command", required=True)

    m = sub.add_parser("main", help="the main job on built-in defaults")
    m.add_argument("--out", default="out/main", help="output folder (reused: trained models are kept)")
    m.add_argument("--tiny", action="store_true", help="tiny sizes (a CI check of the whole path, not of accuracy)")
    m.add_argument("--retrain", action="store_true", help="train again even if models exist in --out")
    m.add_argument("--device", default="auto")
    m.set_defaults(func=cmd_main)

    r = sub.add_parser("render", help="contact sheets and throughput of the synthetic data").add_subparsers(
        dest="what", required=True)
    ro = r.add_parser("objects", help="contact sheet of synthetic object crops and real/synthetic pairs")
    ro.add_argument("--bop", required=True, help="BOP dataset root (e.g. ../shared/data/lmo)")
    ro.add_argument("--scene", type=int, default=2)
    ro.add_argument("--frames", default=None, help="image ids for the pairs, e.g. 0-300 or 3,8")
    ro.add_argument("--objects", type=int, nargs="*", help="object ids (default: all)")
    ro.add_argument("--composite", action="store_true", help="render the pairs over the real image (paper Fig. 3)")
    ro.add_argument("--n", type=int, default=16)
    ro.add_argument("--seed", type=int, default=0)
    ro.add_argument("--out", default="out/render")
    ro.set_defaults(func=cmd_render_objects)
    rh = r.add_parser("hands", help="contact sheet of clean and sensor-domain hand crops")
    rh.add_argument("--n", type=int, default=8)
    rh.add_argument("--seed", type=int, default=0)
    rh.add_argument("--out", default="out/render")
    rh.set_defaults(func=cmd_render_hands)
    rb = r.add_parser("bench", help="print rendering throughput")
    rb.add_argument("--seconds", type=float, default=3.0)
    rb.add_argument("--bop", default=None, help="BOP root with the LM-O models (default: the built-in object)")
    rb.set_defaults(func=cmd_render_bench)

    t = sub.add_parser("train", help="train one method")
    t.add_argument("task", choices=["objects", "hands"])
    t.add_argument("--config", default=None, help="YAML with differences from the defaults")
    t.add_argument("--method", default=None,
                   choices=["fm", "fm_mmd", "fm_joint", "synthetic", "real", "mixed", "finetune"])
    t.add_argument("--out", required=True)
    t.add_argument("--bop", default=None, help="objects: BOP root of the real training frames")
    t.add_argument("--scene", type=int, default=2)
    t.add_argument("--train-frames", default=None, help="objects: real training image ids, e.g. 0-300")
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("evaluate", help="score a model").add_subparsers(dest="what", required=True)
    eo = e.add_parser("objects", help="score every annotated instance of a BOP scene")
    eo.add_argument("--model", required=True)
    eo.add_argument("--bop", required=True)
    eo.add_argument("--scene", type=int, required=True)
    eo.add_argument("--frames", default=None)
    eo.add_argument("--detections", default="gt", help="gt, gt-jitter, or a JSON file of 2D detections")
    eo.add_argument("--targets", default="all", choices=["all", "bop19"],
                    help="instances to score: every annotated one, or the BOP19 test targets (test_targets_bop19.json)")
    eo.add_argument("--out", required=True)
    eo.add_argument("--overlays", type=int, default=6)
    eo.add_argument("--device", default="auto")
    eo.add_argument("--backend", default="auto", choices=list(BACKENDS),
                    help="where the network runs (auto: onnxruntime when installed and the model has an export)")
    eo.add_argument("--precision", default="auto", choices=list(PRECISIONS),
                    help="the torch backend's (auto: half on CUDA, float32 on a CPU; bf16: where native)")
    eo.add_argument("--recrop", type=int, default=0, choices=range(MAX_RECROP + 1),
                    help=f"passes that crop each object again around its first pose (the node's recrop, "
                         f"0-{MAX_RECROP})")
    eo.set_defaults(func=cmd_evaluate_objects)

    xp = sub.add_parser("export", help="write a checkpoint's run-time graph as ONNX for the onnxruntime backend")
    xp.add_argument("--model", required=True, help="the checkpoint (.json, stem or folder)")
    xp.add_argument("--out", required=True,
                    help="folder for <stem>.onnx and <stem>.onnx.json (the checkpoint's own: its default export)")
    xp.add_argument("--opset", type=int, default=None, help="ONNX opset (default: the exporter's)")
    xp.set_defaults(func=cmd_export)

    x = sub.add_parser("experiment", help="train every method and write one table")
    x.add_argument("which", choices=["lmo", "hands", "nyu"])
    x.add_argument("--bop", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "lmo"))
    x.add_argument("--scene", type=int, default=2)
    x.add_argument("--train-frames", default="0-300")
    x.add_argument("--test-frames", default="301-611")
    x.add_argument("--nyu", default=None)
    x.add_argument("--out", required=True)
    x.add_argument("--quick", action="store_true")
    x.add_argument("--budget", default=None,
                   help="lmo, hands: YAML of the LmoBudget or HandsBudget fields to change (net size, steps, batch)")
    x.add_argument("--device", default="auto", help="lmo: cpu, cuda or auto")
    x.add_argument("--methods", default=None,
                   help="lmo, hands: comma-separated methods to train (default: every one)")
    x.add_argument("--validation-only", action="store_true",
                   help="lmo: a tuning run: learning curves on the held-out training frames; the test frames unread")
    x.set_defaults(func=cmd_experiment)

    b = sub.add_parser("bag", help="make replay bags, replay and score them").add_subparsers(dest="what", required=True)
    bm = b.add_parser("make", help="write a rosbag2 replay bag")
    bm.add_argument("source", choices=["objects", "hands", "nyu"])
    bm.add_argument("--out", required=True)
    bm.add_argument("--storage", default="mcap", choices=["mcap", "sqlite3"])
    bm.add_argument("--distro", default="humble", choices=["humble", "jazzy"])
    bm.add_argument("--seed", type=int, default=0)
    bm.add_argument("--bop", default=None, help="objects: BOP root")
    bm.add_argument("--scene", type=int, default=2)
    bm.add_argument("--frames", default=None)
    bm.add_argument("--detections", default="gt", choices=["gt", "gt-jitter"])
    bm.add_argument("--miss-rate", type=float, default=0.0)
    bm.add_argument("--false-rate", type=float, default=0.0)
    bm.add_argument("--n-frames", type=int, default=60, help="hands: length of the synthetic sequence")
    bm.add_argument("--nyu", default=None, help="nyu: dataset folder")
    bm.add_argument("--split", default="test")
    bm.add_argument("--max-frames", type=int, default=None)
    bm.set_defaults(func=cmd_bag_make)
    be = b.add_parser("eval", help="replay a bag through the node's processing path and score it")
    be.add_argument("--bag", required=True)
    be.add_argument("--model", required=True)
    be.add_argument("--out", required=True)
    be.add_argument("--models", default=None, help="objects: BOP models/ folder for the metrics")
    be.add_argument("--config", default=None, help="node params file (config/*.yaml)")
    be.add_argument("--image-topic", default=None)
    be.add_argument("--camera-info-topic", default=None)
    be.add_argument("--detections-topic", default=None)
    be.add_argument("--ground-truth-topic", default=None)
    be.add_argument("--storage", default="mcap", choices=["mcap", "sqlite3"])
    be.add_argument("--no-output-bag", action="store_true")
    be.add_argument("--targets", default="all", choices=["all", "bop19"],
                    help="objects: score every instance in the bag, or the BOP19 test targets (needs the BOP ids)")
    be.add_argument("--device", default="auto")
    be.add_argument("--backend", default=None, choices=list(BACKENDS),
                    help="where the network runs (default: --config's backend, else auto)")
    be.add_argument("--precision", default=None, choices=list(PRECISIONS),
                    help="the torch backend's (default: --config's precision, else auto)")
    be.set_defaults(func=cmd_bag_eval)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `featmap` console command: 0 done, 1 failed, 2 bad input (one line on stderr)."""
    from featmap_ros.errors import FeatmapError

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except FeatmapError as err:
        if args.debug:
            raise
        # The project's own errors say what was expected and what came: a traceback adds nothing.
        print(f"featmap: error: {' '.join(str(err).splitlines()) or type(err).__name__}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
