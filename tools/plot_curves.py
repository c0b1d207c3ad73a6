"""Plot LM-O validation curves (curves.jsonl of `featmap experiment lmo`) of several runs against training images.

Usage: python3 tools/plot_curves.py OUT.png LABEL=RUN_DIR:BATCH[:RUN] ... [--series LABEL:BATCH:STEP=PCT,STEP=PCT,...]
RUN_DIR holds curves.jsonl (every method's probes, tagged "run"); RUN picks one method's (needed when
the file holds several); a probe written twice (a resumed run) counts once. --series adds a curve
from recorded numbers (e.g. a table in docs/results.md).
"""

import argparse
import json
from pathlib import Path

from featmap_ros.report import plot_curves

ap = argparse.ArgumentParser()
ap.add_argument("out")
ap.add_argument("runs", nargs="*", help="LABEL=RUN_DIR:BATCH")
ap.add_argument("--series", action="append", default=[], help="LABEL:BATCH:STEP=PCT,...")
ap.add_argument("--key", default="val_proj_5px")
a = ap.parse_args()

curves = []
for spec in a.runs:
    label, rest = spec.split("=", 1)
    run_dir, batch, *run = rest.split(":")
    rows = [json.loads(line) for line in (Path(run_dir) / "curves.jsonl").read_text().splitlines() if line.strip()]
    runs = {r.get("run") for r in rows}
    if run:
        rows = [r for r in rows if r.get("run") == run[0]]
    elif len(runs) > 1:
        raise SystemExit(f"{run_dir}/curves.jsonl holds the runs {sorted(map(str, runs))}: "
                         "name one (LABEL=DIR:BATCH:RUN)")
    points = {r["step"]: r[a.key] for r in rows if a.key in r}  # the last probe of a step wins
    if not points:
        raise SystemExit(f"no {a.key} in {run_dir}/curves.jsonl for {run or 'its run'}")
    curves.append((label, int(batch), sorted(points.items())))
for spec in a.series:
    label, batch, points = spec.split(":", 2)
    curves.append((label, int(batch),
                   [(int(s), float(v) / 100) for s, v in (p.split("=") for p in points.split(","))]))

named = {label: ([s * batch / 1000 for s, _ in pts], [v for _, v in pts]) for label, batch, pts in curves}
plot_curves(Path(a.out), named, "training images (thousands)", a.key)
print(f"wrote {a.out}")
