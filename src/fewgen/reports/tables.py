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


def best_of_each_kind(rows: list[dict]) -> list[dict]:
    """Per setting (N-way K-shot, all-way K-shot), the best row that uses no generated images and the
    best that does (sweep rows left out), the gain and whether their 95% CIs are apart."""
    best: dict[tuple, dict[bool, dict]] = {}
    for r in rows:
        if r.get("accuracy") is None or r.get("sweep") or "domain" in r or "uses_synthetic" not in r:
            continue
        key = (bool(r.get("all_way")), r["n_way"], r["n_shot"])
        kinds = best.setdefault(key, {})
        gen = bool(r["uses_synthetic"])
        if gen not in kinds or r["accuracy"] > kinds[gen]["accuracy"]:
            kinds[gen] = r
    out = []
    for (all_way, n_way, n_shot), kinds in sorted(best.items()):
        real, gen = kinds.get(False), kinds.get(True)
        row = {"setting": f"{'all (' + str(n_way) + ')' if all_way else str(n_way)}-way {n_shot}-shot",
               "real": real, "generated": gen}
        if real and gen:
            row["gain"] = round(gen["accuracy"] - real["accuracy"], 3)
            lo_gen, hi_real = gen["accuracy"] - gen["ci95"], real["accuracy"] + real["ci95"]
            lo_real, hi_gen = real["accuracy"] - real["ci95"], gen["accuracy"] + gen["ci95"]
            row["cis_apart"] = bool(lo_gen > hi_real or lo_real > hi_gen)
        out.append(row)
    return out


def format_best(summary: list[dict]) -> str:
    """The :func:`best_of_each_kind` table as text."""
    if not any(s["real"] and s["generated"] for s in summary):
        return ""

    def cell(r: dict | None) -> str:
        if r is None:
            return "-"
        name = f"{r['method']} [{r['classifier']}]" if r.get("classifier") else r["method"]
        return f"{r['accuracy']:.2f} +- {r['ci95']:.2f} {name}"

    lines = [(s["setting"], cell(s["real"]), cell(s["generated"]),
              "" if "gain" not in s else f"{s['gain']:+.2f}{' (CIs apart)' if s['cis_apart'] else ''}")
             for s in summary]
    header = ("setting", "best without generated images", "best with generated images", "gain")
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
