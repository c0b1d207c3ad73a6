"""Plot LM-O validation curves (curves.jsonl of `featmap experiment lmo`) of several runs against training images.

Usage: python3 tools/plot_curves.py OUT.png LABEL=RUN_DIR:BATCH[:RUN] ... [--series LABEL:BATCH:STEP=PCT,STEP=PCT,...]
RUN_DIR holds curves.jsonl (every method's probes, tagged "run"); RUN picks one method's (needed when
the file holds several); a probe written twice (a resumed run) counts once. --series adds a curve
from recorded numbers (e.g. a table in docs/results.md).
"""

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

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
    points = {r["step"]: 100 * r[a.key] for r in rows if a.key in r}  # the last probe of a step wins
    if not points:
        raise SystemExit(f"no {a.key} in {run_dir}/curves.jsonl for {run or 'its run'}")
    curves.append((label, int(batch), sorted(points.items())))
for spec in a.series:
    label, batch, points = spec.split(":", 2)
    curves.append((label, int(batch), [(int(s), float(v)) for s, v in (p.split("=") for p in points.split(","))]))

fig, ax = plt.subplots(figsize=(7, 4))
for label, batch, pts in curves:
    ax.plot([s * batch / 1000 for s, _ in pts], [v for _, v in pts], marker="o", label=label)
ax.set_xlabel("training images (thousands)")
ax.set_ylabel(f"{a.key} (%)")
ax.grid(alpha=0.3)
ax.legend()
fig.tight_layout()
fig.savefig(a.out, dpi=100)
print(f"wrote {a.out}")
