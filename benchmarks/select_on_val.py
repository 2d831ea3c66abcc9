"""Choose settings on the validation classes: a grid of overrides, each run with
``data.eval_split=val`` (episodes from the validation classes; the novel classes are never loaded
into an evaluation), through one cache, so a point that changes only evaluation settings reuses the
backbone, the generator and the synthetic sets.

    python benchmarks/select_on_val.py --preset demo --set 'eval.n_ways=[2]' num_threads=1 \\
        --grid 'generator.exemplar.cond=both|features' 'synthesis.sdedit_strengths=[0.25,0.5,0.75]|[0.5]|[1.0]' \\
               'eval.synthetic_weight=1.0|0.5|0.25' --out benchmarks/results/select_demo_val.json

Values of one key are separated by ``|``. The table gives, per grid point, the best row with
generated images per setting beside the best without (the same for every point when only
generation settings vary); the JSON holds every row.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import tempfile
from pathlib import Path

from fewgen.app.config import load_config
from fewgen.app.runner import run
from fewgen.reports.tables import best_of_each_kind


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", required=True)
    p.add_argument("--set", nargs="*", default=[], help="key=value overrides of every point")
    p.add_argument("--grid", nargs="+", required=True, help="key=v1|v2|... per key")
    p.add_argument("--out", default=None, help="JSON file of every point's rows")
    args = p.parse_args(argv)
    axes = []
    for item in args.grid:
        key, values = item.split("=", 1)
        axes.append([f"{key}={v}" for v in values.split("|")])
    points, root = [], Path(tempfile.mkdtemp(prefix="select-on-val-"))
    for i, combo in enumerate(itertools.product(*axes)):
        cfg = load_config(args.preset, [*args.set, *combo, "data.eval_split=val"])
        r = run(cfg, root / f"point{i}", progress=False, quiet=True)
        summary = best_of_each_kind(r.rows)
        rows = [{k: v for k, v in row.items() if not k.startswith("_")} for row in r.rows]  # in-memory values out
        points.append({"overrides": list(combo), "timings_s": r.timings, "rows": rows,
                       "best": [{"setting": s["setting"],
                                 "real": s["real"] and [s["real"]["method"], s["real"].get("classifier"),
                                                        s["real"]["accuracy"], s["real"]["ci95"]],
                                 "generated": s["generated"] and [s["generated"]["method"],
                                                                  s["generated"].get("classifier"),
                                                                  s["generated"]["accuracy"],
                                                                  s["generated"]["ci95"]],
                                 "gain": s.get("gain"), "gain_ci95": s.get("gain_ci95"),
                                 "gain_ci95_seeds": s.get("gain_ci95_seeds")}
                                for s in summary]})
        line = "  ".join(f"{s['setting']}: {s['generated'][2]:.2f} (real {s['real'][2]:.2f}; paired "
                         f"{s['gain']:+.2f} +- {s['gain_ci95']:.2f}"
                         + ("" if s["gain_ci95_seeds"] is None else f", +- {s['gain_ci95_seeds']:.2f} over seeds") + ")"
                         for s in points[-1]["best"] if s["real"] and s["generated"] and s["gain_ci95"] is not None)
        print(f"{' '.join(combo)}\n    {line}", flush=True)
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps({"preset": args.preset, "set": args.set, "points": points},
                                                 indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
