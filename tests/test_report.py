"""The run report: figures and HTML from a run directory, and a render in headless chromium."""

from __future__ import annotations

import json
import shutil
import subprocess

import numpy as np
import pytest
import torch

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def fake_run_dir(tmp_path):
    """A run directory with every kind of row and curve the report draws."""
    run = tmp_path / "run"
    run.mkdir()
    rows = []
    for k in (1, 5):
        for i, m in enumerate(["ce", "real-only", "datadream", "diffalign", "diffalign-no-mmd"]):
            rows.append({"method": m, "classifier": "logreg", "n_way": 20, "n_shot": k, "accuracy": 60.0 + 5 * i + k,
                         "ci95": 0.8, "episodes": 600, "seeds": [0, 1, 2], "synthetic_per_class": 50})
    for m_syn, acc in [(0, 60.0), (10, 63.0), (50, 65.5)]:
        rows.append({"method": f"datadream@{m_syn}", "classifier": "head", "n_way": 20, "n_shot": 1, "accuracy": acc,
                     "ci95": 0.9, "episodes": 600, "seeds": [0], "synthetic_per_class": m_syn, "sweep": True})
    (run / "metrics.json").write_text(json.dumps({"rows": rows, "timings_s": {"learn": 12.5, "total": 20.0}}))
    (run / "config.yaml").write_text("name: fake\nseeds: [0, 1, 2]\n")
    (run / "pretrain_history.json").write_text(json.dumps(
        {"history": [{"epoch": e, "loss/ce": 3.0 / e, "val_acc": 80 + e} for e in range(1, 5)]}))
    (run / "learn_history.json").write_text(json.dumps(
        {f"{m}/seed0/1shot": {"method": m, "seed": 0, "n_shot": 1,
                              "history": [{"step": s, "loss": 2.0 / s} for s in range(10, 60, 10)]}
         for m in ("real-only", "datadream")}))
    return run


def test_report_writes_html_and_figures(tmp_path):
    from fewgen.reports.figures import examples_figure
    from fewgen.reports.html import write_report

    run = fake_run_dir(tmp_path)
    (run / "report").mkdir()
    g = torch.Generator().manual_seed(0)
    real = torch.randint(0, 255, (6, 1, 28, 28), dtype=torch.uint8, generator=g)
    syn = torch.randint(0, 255, (12, 1, 28, 28), dtype=torch.uint8, generator=g)
    ex = examples_figure(real, torch.arange(3).repeat_interleave(2), syn, torch.arange(3).repeat_interleave(4),
                         ["a", "b", "c"], run / "report" / "examples.png")
    page = write_report(run, ex, notes=["synthetic images: test"])
    text = page.read_text()
    for name in ("results.png", "sweep.png", "examples.png", "curves.png"):
        assert (run / "report" / name).stat().st_size > 1000
        assert name in text
    assert "diffalign-no-mmd" in text and "&plusmn; 0.80" in text and "synthetic images: test" in text
    assert "20-way 1-shot" in text


@pytest.mark.parametrize("field", ["method", "domain", "classifier"])
def test_every_cell_is_escaped(tmp_path, field):
    """Names come from folder names (a domain folder, a class): markup in them is shown, never run."""
    from fewgen.reports.html import write_report

    run = fake_run_dir(tmp_path)
    evil = "&<img src=x onerror=alert(1)>"
    rows = json.loads((run / "metrics.json").read_text())["rows"]
    rows[0][field] = evil
    (run / "metrics.json").write_text(json.dumps({"rows": rows}))
    (run / "synthetic_diagnostics.json").write_text(json.dumps({"seed0_1shot": {"label_fidelity": evil}}))
    text = write_report(run).read_text()
    assert "<img src=x" not in text and "onerror=alert(1)>" not in text
    assert "&amp;&lt;img src=x onerror=alert(1)&gt;" in text


def test_report_of_a_foundation_only_run(tmp_path):
    """A run with frozen-feature rows only (e.g. demo) still gets a page: table, results, curves."""
    from fewgen.reports.html import write_report

    run = tmp_path / "run"
    run.mkdir()
    rows = [{"method": "ce", "classifier": "proto", "n_way": 5, "n_shot": 1, "accuracy": 70.0, "ci95": 1.0,
             "episodes": 600, "seeds": [0]}]
    (run / "metrics.json").write_text(json.dumps({"rows": rows}))
    page = write_report(run)
    text = page.read_text()
    assert "No sweep in this run" in text and (run / "report" / "results.png").exists()
    assert not (run / "report" / "curves.png").exists()


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (apt-get install chromium) - cannot render HTML")
def test_report_renders_in_headless_chromium(tmp_path):
    from PIL import Image

    from fewgen.reports.html import write_report

    run = fake_run_dir(tmp_path)
    page = write_report(run)
    shot = tmp_path / "page.png"
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
           "--window-size=1200,2000", f"--screenshot={shot}", page.resolve().as_uri()]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert shot.exists(), f"chromium wrote no screenshot (rc {proc.returncode}): {proc.stderr[-500:]}"
    img = Image.open(shot).convert("L")
    assert img.size == (1200, 2000)
    # the page is not blank: text, table lines and figures give many dark pixels and many grey levels
    hist = img.histogram()
    dark = sum(hist[:128]) / (img.size[0] * img.size[1])
    assert dark > 0.005 and sum(1 for h in hist if h) > 50
    # the figures loaded: the results PNG's blue bars (#4c72b0) appear in the render
    rgb = Image.open(shot).convert("RGB").resize((300, 500))
    px = np.asarray(rgb).reshape(-1, 3).astype(int)
    assert (np.abs(px - [0x4C, 0x72, 0xB0]).max(1) < 25).any()


def test_best_of_each_kind_compares_rows_with_and_without_generated_images():
    import numpy as np

    from fewgen.reports.tables import best_of_each_kind, comparisons, format_best

    rng = np.random.default_rng(0)
    base = rng.uniform(80, 100, 600)  # the episodes every row of the setting shares

    def row(method, acc, ci, gen, values=None, **kw):
        r = {"method": method, "classifier": "proto", "n_way": 20, "n_shot": 1, "accuracy": acc, "ci95": ci,
             "uses_synthetic": gen, "seeds": [0], **kw}
        if values is not None:
            r["_values"] = values
        return r

    rows = [row("ce", 95.0, 0.2, False, base), row("frozen+augmented-copies", 95.3, 0.2, False, base + 0.3),
            row("frozen+synthetic", 96.5, 0.2, True, base + 1.5 + rng.normal(0, 1, 600)),
            row("datadream", 90.0, 0.3, True, base - 5),
            row("frozen+synthetic@50", 99.0, 0.1, True, sweep=True),
            row("ce", 78.0, 0.5, False, all_way=True, n_way=200), row("frozen+synthetic", 78.4, 0.5, True,
                                                                      all_way=True, n_way=200)]
    (episodes, all_way) = best_of_each_kind(rows)
    assert episodes["real"]["method"] == "frozen+augmented-copies" and episodes["generated"]["accuracy"] == 96.5
    # the gain is the mean per-episode difference on the shared episodes, with its paired CI
    d = rows[2]["_values"] - rows[1]["_values"]
    assert episodes["gain"] == pytest.approx(d.mean(), abs=1e-3)
    assert episodes["gain_ci95"] == pytest.approx(1.96 * d.std(ddof=1) / np.sqrt(600), rel=0.01)
    assert all_way["setting"] == "all (200)-way 1-shot" and all_way["gain"] == 0.4 and all_way["gain_ci95"] is None
    text = format_best([episodes, all_way])
    assert f"{episodes['gain']:+.2f} +- {episodes['gain_ci95']:.2f} (paired)" in text
    assert text.splitlines()[-1].rstrip().endswith("+0.40")  # rows without per-episode values: the bare difference
    table = comparisons(rows)  # every generated row against the best real-only row, paired
    assert [(c["row"], c["reference"]) for c in table] == [("frozen+synthetic [proto]", "frozen+augmented-copies [proto]"),
                                                         ("datadream [proto]", "frozen+augmented-copies [proto]")]
    assert table[1]["difference"] == pytest.approx(-5.3) and table[1]["ci95"] == pytest.approx(0.0, abs=1e-9)
    assert table[0]["n"] == 600


def test_comparisons_give_the_spread_over_seeds_beside_the_per_episode_ci():
    """Each seed draws its own shots: a gain that flips sign between seeds has a narrow per-episode
    CI but a wide CI over the seeds, and the comparison says both."""
    import numpy as np
    from scipy import stats

    from fewgen.evaluation.protocol import summary_row
    from fewgen.reports.tables import best_of_each_kind, comparisons, format_best

    rng = np.random.default_rng(1)
    ref = [torch.tensor(rng.uniform(0.8, 1.0, 200)) for _ in range(3)]
    shift = [0.02, -0.01, 0.03]  # per seed, in accuracy
    gen = [r + s + torch.tensor(rng.normal(0, 0.001, 200)) for r, s in zip(ref, shift, strict=True)]
    rows = [summary_row("ce", 5, 1, ref, [0, 1, 2], classifier="proto", uses_synthetic=False),
            summary_row("frozen+synthetic", 5, 1, gen, [0, 1, 2], classifier="proto", uses_synthetic=True)]
    (c,) = comparisons(rows)
    per_seed = [float((g - r).mean() * 100) for g, r in zip(gen, ref, strict=True)]
    assert c["seed_differences"] == pytest.approx(per_seed, abs=1e-3)
    assert c["difference"] == pytest.approx(np.mean(per_seed), abs=1e-3)
    assert c["ci95_seeds"] == pytest.approx(stats.t.ppf(0.975, 2) * np.std(per_seed, ddof=1) / np.sqrt(3), rel=1e-3)
    assert 10 * c["ci95"] < c["ci95_seeds"]
    (best,) = best_of_each_kind(rows)
    assert best["gain_ci95_seeds"] == c["ci95_seeds"]
    assert f"+- {c['ci95_seeds']:.2f} over the seeds" in format_best([best])
    one = [summary_row(r["method"], 5, 1, [torch.tensor(r["_values"][:200] / 100)], [0], classifier="proto",
                       uses_synthetic=r["uses_synthetic"]) for r in rows]
    assert comparisons(one)[0]["ci95_seeds"] is None
