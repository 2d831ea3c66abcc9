"""The ``report`` pipeline step: ``<run>/report/index.html`` with PNG figures.

Works for any run: it renders whatever rows and curves the run has (a foundation-only run
gets its table, results figure and pretraining curves), plus real shots beside synthetic
images when a synthetic set exists.
"""

from __future__ import annotations

from fewgen.app.rundir import write_metrics
from fewgen.app.runner import Run, step
from fewgen.data.fewshot import few_shot_set
from fewgen.reports.figures import examples_figure
from fewgen.reports.html import write_report


@step("report")
def step_report(run: Run) -> None:
    if run.dir is None:
        return
    write_metrics(run.dir, run.rows, {"timings_s": run.timings})  # rows so far, before drawing
    out = run.dir / "report"
    out.mkdir(exist_ok=True)
    seed, n_shot = run.cfg.seeds[0], max(run.cfg.eval.n_shots)
    real = few_shot_set(run.data.novel, n_shot, seed)
    syn = run.state.synthetic.get((seed, n_shot))
    examples = examples_figure(real.images, real.labels, syn.images if syn is not None else None,
                               syn.labels if syn is not None else None, real.class_names, out / "examples.png")
    notes = [f"dataset: {run.data.protocol}"]
    if run.state.synthetic_source:
        notes.append(f"synthetic images: {run.state.synthetic_source}")
    page = write_report(run.dir, examples, notes, name=run.out.name if run.out else None)
    run.log(f"report: {page.relative_to(run.dir)} in the run folder")
