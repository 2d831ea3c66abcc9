"""PNG figures of a run, drawn with matplotlib's Agg backend (no display needed).

Each function takes plain data (metrics rows, training curves, uint8 images) and a path,
writes one PNG and returns the path, or None when there is nothing to draw.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np
import torch


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def row_label(row: dict) -> str:
    clf = row.get("classifier")
    return f"{row['method']} [{clf}]" if clf else str(row["method"])


def setting_label(row: dict) -> str:
    if "domain" in row:
        return f"domain {row['domain']}"
    way = f"all ({row['n_way']})" if row.get("all_way") else row.get("n_way")
    return f"{way}-way {row.get('n_shot')}-shot"


def results_figure(rows: list[dict], path: Path) -> Path | None:
    """Accuracy with 95% CI error bars, one panel per (N, K) setting; sweep rows left out."""
    rows = [r for r in rows if not r.get("sweep") and "accuracy" in r]
    if not rows:
        return None
    plt = _plt()
    groups: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        groups[setting_label(r)].append(r)
    n = len(groups)
    height = max(2.5, 0.32 * max(len(g) for g in groups.values()) + 1.2)
    fig, axes = plt.subplots(1, n, figsize=(5.2 * n, height), squeeze=False)
    for ax, (title, g) in zip(axes[0], groups.items()):
        labels = [row_label(r) for r in g]
        acc = [r["accuracy"] for r in g]
        ci = [r["ci95"] if r.get("ci95") == r.get("ci95") else 0.0 for r in g]
        y = range(len(g))
        ax.barh(list(y), acc, xerr=ci, color="#4c72b0", ecolor="black", capsize=3)
        ax.set_yticks(list(y), labels, fontsize=8)
        ax.invert_yaxis()
        lo = max(0.0, min(a - c for a, c in zip(acc, ci)) - 5)
        ax.set_xlim(lo, min(100.0, max(a + c for a, c in zip(acc, ci)) + 3))
        ax.set_xlabel("accuracy (%) with 95% CI")
        ax.set_title(title, fontsize=10)
        ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def sweep_figure(rows: list[dict], path: Path) -> Path | None:
    """Accuracy against synthetic images per class (rows marked ``sweep``), one line per method."""
    rows = [r for r in rows if r.get("sweep") and r.get("synthetic_per_class") is not None]
    if not rows:
        return None
    plt = _plt()
    settings: dict[str, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        base = str(r["method"]).split("@")[0]
        settings[setting_label(r)][f"{base} [{r.get('classifier')}]"].append(r)
    n = len(settings)
    fig, axes = plt.subplots(1, n, figsize=(5.2 * n, 3.6), squeeze=False)
    for ax, (title, lines) in zip(axes[0], settings.items()):
        for label, pts in sorted(lines.items()):
            pts = sorted(pts, key=lambda r: r["synthetic_per_class"])
            x = [r["synthetic_per_class"] for r in pts]
            ax.errorbar(x, [r["accuracy"] for r in pts], yerr=[r["ci95"] for r in pts], marker="o", capsize=3,
                        label=label)
        xs = sorted({r["synthetic_per_class"] for ls in lines.values() for r in ls})
        if len(xs) > 2 and xs[-1] > 20 * max(1, xs[1]):
            ax.set_xscale("symlog", linthresh=max(1, xs[1]))
        ax.set_xticks(xs, [str(v) for v in xs])
        ax.set_xlabel("synthetic images per class")
        ax.set_ylabel("accuracy (%)")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _tile(img: torch.Tensor):
    """uint8 (C, H, W) -> array for imshow."""
    x = img.numpy()
    return x[0] if x.shape[0] == 1 else x.transpose(1, 2, 0)


def examples_figure(real_images: torch.Tensor, real_labels: torch.Tensor, syn_images: torch.Tensor | None,
                    syn_labels: torch.Tensor | None, class_names: list[str], path: Path, n_classes: int = 8,
                    n_real: int = 5, n_syn: int = 8) -> Path | None:
    """One row per class: its real shots (left, framed green) beside synthetic images (right)."""
    if len(real_images) == 0:
        return None
    plt = _plt()
    classes = sorted(set(real_labels.tolist()))[:n_classes]
    k = min(n_real, max(int((real_labels == c).sum()) for c in classes))
    m = 0
    if syn_images is not None and len(syn_images):
        m = min(n_syn, max(int((syn_labels == c).sum()) for c in classes))
    cols = k + m + (1 if m else 0)
    fig, axes = plt.subplots(len(classes), cols, figsize=(0.9 * cols + 1.2, 0.95 * len(classes) + 0.4), squeeze=False)
    cmap = "gray" if real_images.shape[1] == 1 else None
    for i, c in enumerate(classes):
        reals = real_images[real_labels == c][:k]
        syns = syn_images[syn_labels == c][:m] if m else []
        for j in range(cols):
            ax = axes[i][j]
            ax.set_xticks([])
            ax.set_yticks([])
            for side in ax.spines.values():
                side.set_visible(False)
            if j < len(reals):
                ax.imshow(_tile(reals[j]), cmap=cmap, vmin=0, vmax=255)
                for side in ax.spines.values():
                    side.set_visible(True)
                    side.set_edgecolor("green")
                    side.set_linewidth(2)
            elif m and j > k and j - k - 1 < len(syns):
                ax.imshow(_tile(syns[j - k - 1]), cmap=cmap, vmin=0, vmax=255)
        axes[i][0].set_ylabel(str(class_names[c])[:18], rotation=0, ha="right", va="center", fontsize=7)
    axes[0][0].set_title("real shots", fontsize=8, loc="left")
    if m:
        axes[0][k + 1].set_title("synthetic", fontsize=8, loc="left")
    fig.tight_layout(pad=0.3)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def curves_figure(pretrain_history: list[dict] | None, learn_histories: dict | None, path: Path) -> Path | None:
    """Training curves: pretraining loss and validation accuracy per epoch; fine-tuning loss
    per step for every method (first seed, each K)."""
    panels = []
    if pretrain_history:
        panels.append("pretrain")
    learn = {}
    for v in (learn_histories or {}).values():
        key = (v["method"], v["n_shot"])
        if v.get("history") and (key not in learn or v["seed"] < learn[key]["seed"]):
            learn[key] = v
    shots = sorted({k for _, k in learn})
    panels += [f"learn{k}" for k in shots]
    if not panels:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, len(panels), figsize=(5.0 * len(panels), 3.5), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        if panel == "pretrain":
            ep = [h["epoch"] for h in pretrain_history]
            for key in sorted({k for h in pretrain_history for k in h if k.startswith("loss/")}):
                ax.plot(ep, [h.get(key, float("nan")) for h in pretrain_history], label=key)
            ax.set_xlabel("epoch")
            ax.set_ylabel("training loss")
            ax.set_title("base pretraining", fontsize=10)
            val = [h.get("val_acc", float("nan")) for h in pretrain_history]
            if any(v == v for v in val):
                ax2 = ax.twinx()
                ax2.plot(ep, val, "k--", marker=".", label="val accuracy")
                ax2.set_ylabel("val few-shot accuracy (%)")
                ax2.legend(fontsize=7, loc="center right")
            ax.legend(fontsize=7, loc="upper right")
        else:
            k = int(panel[5:])
            for (method, shot), v in sorted(learn.items()):
                if shot != k:
                    continue
                h = v["history"]
                ax.plot([r["step"] for r in h], [r["loss"] for r in h], label=method)
            ax.set_xlabel("fine-tuning step")
            ax.set_ylabel("total loss")
            ax.set_title(f"fine-tuning, {k}-shot (seed {min(v['seed'] for v in learn.values())})", fontsize=10)
            ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_gan_curves(tracking: dict[str, dict[int, list[dict]]], path: Path, title: str = "") -> None:
    """Realism, intra-diversity and FID against adaptation iterations: per method the mean over
    seeds (line) and the range (band)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fewgen.utils import atomic_path

    keys = [("realism", "realism (P(target))"), ("intra_diversity", "intra-cluster diversity"), ("fid", "FID")]
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.4))
    for ax, (k, label) in zip(axes, keys):
        for method, by_seed in tracking.items():
            runs = [pts for pts in by_seed.values() if pts]
            if not runs:
                continue
            xs = [p["iter"] for p in runs[0]]
            vals = np.array([[p[k] for p in pts] for pts in runs if len(pts) == len(xs)])
            line, = ax.plot(xs, vals.mean(0), marker="o", ms=3, label=method)
            if len(vals) > 1:
                ax.fill_between(xs, vals.min(0), vals.max(0), color=line.get_color(), alpha=0.15)
        ax.set_xlabel("adaptation iteration")
        ax.set_title(label, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
