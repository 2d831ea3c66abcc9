"""The run report: one self-contained folder with ``index.html`` and its PNG figures.

:func:`write_report` needs only a run directory (``metrics.json``, ``config.yaml``,
``pretrain_history.json``, ``learn_history.json``); images of real and synthetic examples
are drawn by the ``report`` step, which still has them in memory.
"""

from __future__ import annotations

import html
import json
import shutil
import time
from pathlib import Path

from fewgen.reports import figures
from fewgen.reports.tables import best_of_each_kind, format_gain
from fewgen.utils import atomic_path


def _read(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _fmt(value) -> str:
    if isinstance(value, float):
        return "" if value != value else f"{value:.2f}"
    if isinstance(value, list):
        return ", ".join(str(v) for v in value) if len(value) <= 6 else f"{value[0]}, ... ({len(value)})"
    return "" if value is None else str(value)


class Markup(str):
    """HTML this module wrote itself; every other cell value is escaped."""


def _cell(value) -> str:
    return value if isinstance(value, Markup) else html.escape(_fmt(value))


def results_table(rows: list[dict]) -> str:
    """An HTML table of metrics rows: accuracy +- 95% CI and the counts behind each number."""
    if not rows:
        return "<p>No results in this run.</p>"
    optional = [c for c in ("classifier", "domain", "synthetic_per_class", "n_synthetic", "train_seconds")
                if any(c in r for r in rows)]
    head = ["method", *[c for c in optional if c in ("classifier", "domain")], "setting", "accuracy (%)",
            "95% CI", "episodes", "seeds", *[c for c in optional if c not in ("classifier", "domain")]]
    best: dict[str, float] = {}
    for r in rows:
        best[figures.setting_label(r)] = max(best.get(figures.setting_label(r), -1.0), r.get("accuracy", -1.0))
    out = ["<table>", "<thead><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr></thead><tbody>"]
    for r in rows:
        setting = figures.setting_label(r)
        acc = r.get("accuracy", float("nan"))
        cls = ' class="best"' if acc == best[setting] else ""
        cells = [r.get("method", "")]
        cells += [r.get(c, "") for c in optional if c in ("classifier", "domain")]
        cells += [setting, f"{acc:.2f}", Markup(f"&plusmn; {html.escape(_fmt(r.get('ci95')))}"), r.get("episodes", ""),
                  r.get("seeds", "")]
        cells += [r.get(c, "") for c in optional if c not in ("classifier", "domain")]
        out.append(f"<tr{cls}>" + "".join(f"<td>{_cell(c)}</td>" for c in cells) + "</tr>")
    out.append("</tbody></table>")
    return "\n".join(out)


def best_table(summary: list[dict]) -> str:
    """Per setting, the best row without and with generated images (``fewgen.app.rundir.best_of_each_kind``)."""
    def cell(r: dict) -> str:
        name = f"{r['method']} [{r['classifier']}]" if r.get("classifier") else str(r["method"])
        return f"{r['accuracy']:.2f} &plusmn; {r['ci95']:.2f} <span class='meta'>{html.escape(name)}</span>"

    out = ["<table>", "<thead><tr><th>setting</th><th>best without generated images</th>"
           "<th>best with generated images</th><th>gain (paired 95% CI)</th></tr></thead><tbody>"]
    for s in summary:
        gain = html.escape(format_gain(s)).replace("+- ", "&plusmn; ")
        out.append(f"<tr><td>{html.escape(s['setting'])}</td><td>{cell(s['real'])}</td><td>{cell(s['generated'])}</td>"
                   f"<td>{gain}</td></tr>")
    out.append("</tbody></table><p class='meta'>Each cell is the best row of its kind in this run (sweep rows "
               "left out); every row says in <code>uses_synthetic</code> whether generated images went into it. The gain is "
               "the mean per-episode difference on the episodes both rows share, with the 95% CI of that "
               "difference (<code>comparisons</code> in metrics.json).</p>")
    return "\n".join(out)


GAN_METRICS = [("fid", "FID"), ("kid", "KID x 1000"), ("intra_diversity", "intra-diversity"), ("realism", "realism"),
               ("precision", "precision"), ("recall", "recall"), ("nearest_shot_distance", "nearest-shot distance")]


def gan_table(rows: list[dict]) -> str:
    """Few-shot image generation rows (the ``gan-adapt`` step): each metric's mean +- std over seeds."""
    head = ["method", "iterations", *[label for _, label in GAN_METRICS], "seeds"]
    out = ["<table>", "<thead><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr></thead><tbody>"]
    for r in rows:
        cells = [html.escape(str(r.get("method", ""))), html.escape(_fmt(r.get("iters")))]
        for key, _ in GAN_METRICS:
            mean, std = r.get(key), r.get(f"{key}_std")
            cells.append("" if mean is None else f"{mean:.3f}" + ("" if std is None else f" &plusmn; {std:.3f}"))
        cells.append(html.escape(_fmt(r.get("seeds"))))
        out.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    out.append("</tbody></table>")
    return "\n".join(out)


def _gan_section(run_dir: Path, out: Path, rows: list[dict]) -> list[str]:
    """Table, tracked curves and sample grids of a GAN adaptation run (copied into the report folder)."""
    parts = ["<h2>Few-shot image generation</h2>", gan_table(rows),
             "<p class='meta'>Mean &plusmn; standard deviation over seeds (few-shot draws), at the end of "
             "adaptation; every method adapts the same source GAN for the same iterations. FID / KID against "
             "held-out real target images; intra-diversity: mean pairwise perceptual distance within the "
             "clusters of samples around each training shot; realism: probability of the target class from a "
             "classifier of real target vs real source images; nearest-shot distance: memorisation check.</p>"]
    gan_dir = run_dir / "gan"
    figs = [("curves.png", "Realism, intra-diversity and FID tracked during adaptation, per method (the paper's "
                           "analysis).")]
    figs.append(("shots_seed0.png", "The 10 training shots (seed 0)."))
    figs.append(("source_samples.png", "Samples of the source GAN."))
    methods = [r["method"] for r in rows if r.get("method") != "source"]
    figs += [(f"{m}_samples_seed0.png", f"{m}: samples after adaptation (seed 0).") for m in methods]
    for name, caption in figs:
        if (gan_dir / name).exists():
            shutil.copyfile(gan_dir / name, out / f"gan_{name}")
            parts.append(f"<figure><img src='gan_{html.escape(name)}' alt='{html.escape(name)}'>"
                         f"<figcaption>{html.escape(caption)}</figcaption></figure>")
    return parts


STYLE = """
body { font-family: sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }
table { border-collapse: collapse; font-size: 13px; margin: 1em 0; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: left; }
th { background: #eef; }
tr.best td { font-weight: bold; }
img { max-width: 100%; border: 1px solid #ddd; margin: 0.5em 0; }
.meta { color: #555; font-size: 13px; }
pre { background: #f6f6f6; padding: 0.6em; font-size: 12px; overflow-x: auto; }
"""


def attach_per_episode(rows: list[dict], path: Path) -> list[dict]:
    """Rows read back from metrics.json with their per-episode accuracies (``per_episode.npz``,
    ``row<i>``) under ``_values`` again, so gains are compared pairwise."""
    if not path.is_file():
        return rows
    import numpy as np

    try:
        with np.load(path, allow_pickle=False) as z:
            values = {k: z[k] for k in z.files}
    except (OSError, ValueError):
        return rows
    return [{**r, "_values": values[f"row{i}"]} if f"row{i}" in values else r for i, r in enumerate(rows)]


def write_report(run_dir: str | Path, examples: Path | None = None, notes: list[str] | None = None,
                 name: str | None = None) -> Path:
    """Write ``<run_dir>/report/index.html`` and its figures; returns the HTML path.

    Args:
        run_dir: a run directory (at least ``metrics.json``).
        examples: an already drawn examples PNG inside the report folder (the step draws it).
        notes: extra lines shown at the top (e.g. where the synthetic images came from).
        name: the run's name in the title (default the folder's name; a run being built passes the
            name it will be published under).
    """
    run_dir = Path(run_dir)
    out = run_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    metrics = _read(run_dir / "metrics.json") or {}
    rows = attach_per_episode(metrics.get("rows", []), run_dir / "per_episode.npz")
    pretrain = (_read(run_dir / "pretrain_history.json") or {}).get("history")
    learn = _read(run_dir / "learn_history.json")
    gan_rows = [r for r in rows if "fid" in r and "accuracy" not in r]
    rows = [r for r in rows if r not in gan_rows]
    made = {
        "results": figures.results_figure(rows, out / "results.png"),
        "sweep": figures.sweep_figure(rows, out / "sweep.png"),
        "examples": examples if examples is not None and Path(examples).exists() else None,
        "curves": figures.curves_figure(pretrain, learn, out / "curves.png"),
    }
    config_text = (run_dir / "config.yaml").read_text() if (run_dir / "config.yaml").exists() else ""
    timings = metrics.get("timings_s", {})
    main_rows = [r for r in rows if not r.get("sweep")]
    sweep_rows = [r for r in rows if r.get("sweep")]
    captions = {
        "results": "Accuracy with 95% confidence intervals (t-interval over all episodes of all seeds).",
        "sweep": "Accuracy against the number of synthetic images per class.",
        "examples": "Real few-shot images (green frame) beside synthetic images of the same class (seed 0).",
        "curves": "Training curves: base pretraining per epoch; fine-tuning loss per step.",
    }
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'>",
        f"<title>fewgen report: {html.escape(name or run_dir.name)}</title><style>{STYLE}</style></head><body>",
        f"<h1>fewgen run <code>{html.escape(name or run_dir.name)}</code></h1>",
        f"<p class='meta'>report written {time.strftime('%Y-%m-%d %H:%M:%S')}; "
        + ", ".join(f"{html.escape(k)} {v:.0f}s" for k, v in timings.items() if isinstance(v, int | float))
        + "</p>",
    ]
    for line in notes or []:
        parts.append(f"<p class='meta'>{html.escape(line)}</p>")
    if gan_rows:
        parts += _gan_section(run_dir, out, gan_rows)
    summary = [s for s in best_of_each_kind(main_rows) if s["real"] and s["generated"]]
    if summary:
        parts.append("<h2>Real images only against real + generated</h2>")
        parts.append(best_table(summary))
    parts += ["<h2>Results</h2>", results_table(main_rows)]
    if made["results"]:
        parts.append(f"<figure><img src='results.png' alt='results'><figcaption>{captions['results']}</figcaption></figure>")
    parts.append("<h2>Synthetic images per class</h2>")
    if made["sweep"]:
        parts.append(f"<figure><img src='sweep.png' alt='sweep'><figcaption>{captions['sweep']}</figcaption></figure>")
        parts.append(results_table(sweep_rows))
    else:
        parts.append("<p>No sweep in this run (set <code>learner.sweep</code>, e.g. [0, 10, 50, 200]).</p>")
    parts.append("<h2>Real and synthetic images</h2>")
    diagnostics = _read(run_dir / "synthetic_diagnostics.json")
    if diagnostics:
        keys = list(next(iter(diagnostics.values())))
        parts.append("<table><thead><tr><th>few-shot set</th>" + "".join(f"<th>{html.escape(k)}</th>" for k in keys)
                     + "</tr></thead><tbody>")
        for name, d in diagnostics.items():
            parts.append(f"<tr><td>{html.escape(name)}</td>" + "".join(f"<td>{_cell(d.get(k))}</td>" for k in keys)
                         + "</tr>")
        parts.append("</tbody></table><p class='meta'>Synthetic-set diagnostics in the pretrained feature space, "
                     "computed from the few shots only (see fewgen.app.steps.learn.synthetic_diagnostics).</p>")
    if made["examples"]:
        parts.append(f"<figure><img src='{html.escape(Path(made['examples']).name)}' alt='examples'>"
                     f"<figcaption>{captions['examples']}</figcaption></figure>")
    else:
        parts.append("<p>No images recorded for this run.</p>")
    parts.append("<h2>Training curves</h2>")
    if made["curves"]:
        parts.append(f"<figure><img src='curves.png' alt='curves'><figcaption>{captions['curves']}</figcaption></figure>")
    else:
        parts.append("<p>No training curves in this run.</p>")
    parts += ["<h2>Configuration</h2>", f"<pre>{html.escape(config_text)}</pre>", "</body></html>"]
    page = out / "index.html"
    with atomic_path(page) as tmp:
        tmp.write_text("\n".join(parts))
    return page
