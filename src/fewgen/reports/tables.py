"""Text tables of metrics rows: the run's results and the best row with and without generated images."""

from __future__ import annotations


def format_table(rows: list[dict], columns: list[str] | None = None) -> str:
    """A plain-text table of metrics rows (accuracy +- ci95 merged)."""
    if not rows:
        return "(no results)"
    columns = columns or [c for c in ("method", "classifier", "domain", "n_way", "n_shot") if any(c in r for r in rows)]
    generated = any(r.get("uses_synthetic") for r in rows)
    header = [*columns, *(["generated"] if generated else []), "accuracy", "episodes"]
    lines = []
    for r in rows:
        if r.get("accuracy") is None:  # rows without an accuracy (e.g. generative metrics rows)
            acc = "-"
        else:
            acc = f"{r['accuracy']:.2f} +- {r['ci95']:.2f}" if r.get("ci95") == r.get("ci95") else f"{r['accuracy']:.2f}"
        cells = [str(r.get(c, "")) for c in columns]
        if r.get("all_way") and "n_way" in columns:
            cells[columns.index("n_way")] = f"all ({r['n_way']})"
        if generated:
            cells.append("yes" if r.get("uses_synthetic") else "no")
        lines.append(cells + [acc, str(r.get("episodes", ""))])
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    out = [fmt.format(*header), fmt.format(*["-" * w for w in widths])]
    out += [fmt.format(*line) for line in lines]
    return "\n".join(out)


def row_name(r: dict) -> str:
    return f"{r['method']} [{r['classifier']}]" if r.get("classifier") else str(r["method"])


def setting_name(r: dict) -> str:
    return f"{'all (' + str(r['n_way']) + ')' if r.get('all_way') else str(r['n_way'])}-way {r['n_shot']}-shot"


def paired_difference(row: dict, reference: dict) -> tuple[float, float, int] | None:
    """Mean and 95% t-interval half-width of ``row`` minus ``reference`` over the episodes (or all-way
    queries) they share, from their in-memory per-episode accuracies; None when either lacks them
    or they were not evaluated on the same number of episodes."""
    import numpy as np

    from fewgen.evaluation.protocol import mean_ci95

    a, b = row.get("_values"), reference.get("_values")
    if a is None or b is None or len(a) != len(b) or row.get("seeds") != reference.get("seeds"):
        return None
    mean, half = mean_ci95(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64))
    return mean, half, len(a)


def seed_differences(row: dict, reference: dict) -> list[float] | None:
    """The mean difference ``row`` minus ``reference`` on each few-shot seed's episodes (percent
    points), or None when either lacks per-seed values or they differ in shape. Each seed draws its
    own shots, so these vary with what the per-episode CI does not see: which shots were drawn."""
    import numpy as np

    sizes = row.get("_seed_sizes")
    if sizes is None or sizes != reference.get("_seed_sizes") or paired_difference(row, reference) is None:
        return None
    d = np.asarray(row["_values"], dtype=np.float64) - np.asarray(reference["_values"], dtype=np.float64)
    return [float(part.mean()) for part in np.split(d, np.cumsum(sizes)[:-1])]


def _settings(rows: list[dict]) -> dict[tuple, list[dict]]:
    """Rows that share their episodes, per setting (sweep, domain and accuracy-less rows left out)."""
    out: dict[tuple, list[dict]] = {}
    for r in rows:
        if r.get("accuracy") is None or r.get("sweep") or "domain" in r or "uses_synthetic" not in r:
            continue
        out.setdefault((bool(r.get("all_way")), r["n_way"], r["n_shot"]), []).append(r)
    return out


def best_of_each_kind(rows: list[dict]) -> list[dict]:
    """Per setting (N-way K-shot, all-way K-shot), the best row that uses no generated images and the
    best that does (sweep rows left out), and the gain: the mean of the per-episode difference on
    the episodes both were evaluated on, with its 95% CI (``gain_ci95``; None for rows read back
    from a file, which hold no per-episode values) and, with several seeds, the 95% CI over the
    seeds' differences (``gain_ci95_seeds``, :func:`comparisons`)."""
    out = []
    for _, group in sorted(_settings(rows).items()):
        kinds: dict[bool, dict] = {}
        for r in group:
            gen = bool(r["uses_synthetic"])
            if gen not in kinds or r["accuracy"] > kinds[gen]["accuracy"]:
                kinds[gen] = r
        real, gen = kinds.get(False), kinds.get(True)
        row = {"setting": setting_name(group[0]), "real": real, "generated": gen}
        if real and gen:
            paired = paired_difference(gen, real)
            row["gain"] = round(paired[0] if paired else gen["accuracy"] - real["accuracy"], 3)
            row["gain_ci95"] = None if paired is None else round(paired[1], 3)
            per_seed = seed_differences(gen, real)
            if per_seed is not None and len(per_seed) > 1:
                from fewgen.evaluation.protocol import mean_ci95

                row["gain_ci95_seeds"] = round(mean_ci95(per_seed)[1], 3)
        out.append(row)
    return out


def comparisons(rows: list[dict]) -> list[dict]:
    """Every row that uses generated images against the best real-only row of its setting, paired
    on the episodes both were evaluated on: ``difference`` (mean, percent points) and ``ci95`` (the
    95% t-interval half-width of the per-episode difference), ``n`` episodes (all-way: queries);
    ``seed_differences`` (the mean difference on each seed's episodes) and ``ci95_seeds`` (their
    95% t-interval; None with one seed). The per-episode CI holds the shots fixed; with a few
    shots per class the seeds' differences spread far wider (docs/results/synthetic.md §6), so a
    gain is believed when ``ci95_seeds`` excludes zero too."""
    from fewgen.evaluation.protocol import mean_ci95

    out = []
    for _, group in sorted(_settings(rows).items()):
        real = [r for r in group if not r["uses_synthetic"]]
        if not real:
            continue
        ref = max(real, key=lambda r: r["accuracy"])
        for r in group:
            if not r["uses_synthetic"]:
                continue
            paired = paired_difference(r, ref)
            if paired is None:
                continue
            per_seed = seed_differences(r, ref)
            seeds_ci = mean_ci95(per_seed)[1] if per_seed is not None and len(per_seed) > 1 else None
            out.append({"setting": setting_name(r), "row": row_name(r), "reference": row_name(ref),
                        "difference": round(paired[0], 3), "ci95": round(paired[1], 3), "n": paired[2],
                        "seed_differences": None if per_seed is None else [round(v, 3) for v in per_seed],
                        "ci95_seeds": None if seeds_ci is None else round(seeds_ci, 3)})
    return out


def format_gain(s: dict) -> str:
    """``+0.42 +- 0.10`` (the paired 95% CI), or the bare difference where no per-episode values exist."""
    if "gain" not in s:
        return ""
    ci, seeds = s.get("gain_ci95"), s.get("gain_ci95_seeds")
    text = f"{s['gain']:+.2f}" + ("" if ci is None or ci != ci else f" +- {ci:.2f} (paired)")
    return text + ("" if seeds is None else f", +- {seeds:.2f} over the seeds")


def format_best(summary: list[dict]) -> str:
    """The :func:`best_of_each_kind` table as text."""
    if not any(s["real"] and s["generated"] for s in summary):
        return ""

    def cell(r: dict | None) -> str:
        if r is None:
            return "-"
        return f"{r['accuracy']:.2f} +- {r['ci95']:.2f} {row_name(r)}"

    lines = [(s["setting"], cell(s["real"]), cell(s["generated"]), format_gain(s)) for s in summary]
    header = ("setting", "best without generated images", "best with generated images", "gain (paired 95% CI)")
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*header), fmt.format(*["-" * w for w in widths]), *(fmt.format(*x) for x in lines)])


def format_generation_table(rows: list[dict]) -> str:
    """Mean +- std over seeds of each metric, one line per method."""
    cols = ["method", "fid", "kid", "intra_diversity", "realism", "precision", "recall", "nearest_shot_distance"]
    head = ["method", "FID", "KID", "intra-div", "realism", "prec", "recall", "near-shot"]
    lines = [head]
    for r in rows:
        cells = [r["method"]]
        for c in cols[1:]:
            v, sd = r.get(c), r.get(f"{c}_std")
            digits = 2 if c in ("fid", "kid") else 3
            cell = "-" if v is None else f"{v:.{digits}f}"
            if v is not None and sd is not None and len(r.get("seeds", [])) > 1:
                cell += f"+-{sd:.{digits}f}"
            cells.append(cell)
        lines.append(cells)
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)) for line in lines)
