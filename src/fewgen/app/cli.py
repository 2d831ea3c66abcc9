"""The ``fewgen`` command: a thin layer over the library.

User errors (:class:`fewgen.FewgenError`) end with one ``error:`` line and exit code 2.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from fewgen.errors import FewgenError


def _cmd_run(args: argparse.Namespace) -> int:
    from fewgen.app.config import load_config
    from fewgen.app.runner import run

    cfg = load_config(args.config, args.overrides)
    run(cfg, out_dir=args.out, overwrite=args.overwrite, progress=not args.no_progress, quiet=args.quiet)
    return 0


def _cmd_datasets(args: argparse.Namespace) -> int:
    from fewgen.data import DATASETS, data_root, load_dataset

    if args.name:
        data = load_dataset(args.name, args.root, args.image_size)
        s = data.summary()
        print(f"{data.name}: {data.protocol}")
        for split in ("base", "val", "novel"):
            names = s[split]["class_names"]
            shown = ", ".join(names[:6]) + (", ..." if len(names) > 6 else "")
            print(f"  {split:<5} {s[split]['classes']:>4} classes {s[split]['images']:>6} images  ({shown})")
        return 0
    root = data_root(args.root)
    print(f"data root: {root}  (set with --root or FEWGEN_DATA)")
    for name in DATASETS:
        meta = DATASETS.meta(name)
        print(f"  {name:<12} {meta['image_size']:>3}px  {meta['description']}")
    print("`fewgen datasets NAME` loads one and prints its base / val / novel split.")
    return 0


def _cmd_presets(args: argparse.Namespace) -> int:
    from fewgen.app.config import describe, preset_names

    print("presets: " + ", ".join(preset_names()))
    if args.keys:
        for key, default, help_text in describe():
            print(f"  {key:<32} {default:<24} {help_text}")
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    from fewgen.app.config import load_config
    from fewgen.app.runner import run

    cfg = load_config(args.config, args.overrides)
    if args.zero_shot:
        cfg.synthesis.zero_shot = True
    cfg.pipeline = ["generator", "synthesize"] if cfg.synthesis.zero_shot else ["generator", "adapt", "synthesize"]
    r = run(cfg, out_dir=args.out, overwrite=args.overwrite, progress=not args.no_progress, quiet=args.quiet)
    if r.dir is None:  # a helper process of a launch: the main process reports
        return 0
    sets = r.state.synthetic
    print(f"{len(sets)} synthetic set(s), {sum(len(d) for d in sets.values())} images; grids in {r.dir / 'grids'}")
    return 0


def csv_text(cell: str) -> str:
    """A text cell a spreadsheet shows as text: one starting with ``=``, ``+``, ``-``, ``@``, a tab or a
    carriage return (a formula to Excel, LibreOffice and Google Sheets) gets a leading ``'``
    (OWASP's CSV injection rule). Numbers are written as they are, not through this."""
    return "'" + cell if cell[:1] in ("=", "+", "-", "@", "\t", "\r") else cell


def _cmd_predict(args: argparse.Namespace) -> int:
    import csv
    import io

    from fewgen.classifier import image_paths, load_classifier, predict_files
    from fewgen.utils import atomic_path

    out = Path(args.out).expanduser()
    if out.is_dir():
        raise FewgenError(f"--out {out} is a folder; give the CSV file to write, e.g. --out predictions.csv")
    clf = load_classifier(args.classifier)
    paths = image_paths(args.images)
    if not paths:
        raise FewgenError("no image files found in " + ", ".join(args.images))
    rows, skipped = predict_files(clf, paths, top_k=args.top_k, batch_size=args.batch_size,
                                  progress=not args.no_progress)
    if not rows:
        raise FewgenError(f"none of the {len(paths)} image(s) could be read (first: {skipped[0][1]})")
    k = max(len(r.top_k) for r in rows)
    header = ["file", "predicted", "probability",
              *[f"{name}_{i}" for i in range(2, k + 1) for name in ("top", "probability")], "error"]
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(header)
    for r in rows:
        w.writerow([csv_text(r.file), csv_text(r.label), f"{r.probability:.6f}",
                    *[v for label, prob in r.top_k[1:] for v in (csv_text(label), f"{prob:.6f}")], ""])
    for path, why in skipped:
        w.writerow([csv_text(str(path)), "", "", *[""] * (2 * (k - 1)), csv_text(why)])
    try:
        with atomic_path(out) as tmp:
            tmp.write_text(buf.getvalue())
    except OSError as e:
        raise FewgenError(f"cannot write {out} ({e.strerror or e}); choose another --out") from None
    counts: dict[str, int] = {}
    for r in rows:
        counts[r.label] = counts.get(r.label, 0) + 1
    print(f"{len(rows)} image(s) classified into {len(counts)} of {len(clf.class_names)} classes; written to {out}")
    print("  predicted: " + ", ".join(f"{c} {n}" for c, n in sorted(counts.items(), key=lambda kv: -kv[1])[:10])
          + (", ..." if len(counts) > 10 else ""))
    named = [Path(r.file).parent.name for r in rows]
    if all(n in clf.class_names for n in named):  # files sit in folders named by their class
        correct = sum(r.label == n for r, n in zip(rows, named))
        print(f"  accuracy against the folder names: {100 * correct / len(rows):.2f}% ({correct}/{len(rows)})")
    if skipped:
        print(f"  skipped {len(skipped)} unreadable file(s), listed in the CSV's error column:")
        for _, why in skipped[:20]:
            print(f"    {why}")
    return 0


def fit_config(shots: str | Path, preset: str = "demo", overrides: list[str] | None = None, name: str | None = None):
    """The :class:`~fewgen.app.config.RunConfig` of ``fewgen fit``: the preset with the user's shots as the novel
    classes, every image of a class a shot (one seed), the preset's pipeline without evaluate and learn (no
    queries) and with export; and, for a generator that draws from DataDream adapters of the shots, the adapt
    step before synthesize when the preset has none (unless synthesis.zero_shot)."""
    from fewgen.app.config import load_config
    from fewgen.generators.registry import generator_kind

    shots = Path(shots).expanduser()
    learner = [o for o in overrides or [] if o.startswith("learner.")]
    if learner and "export.model=learner" not in (overrides or []):  # dropped without a word: fit fine-tunes nothing
        raise FewgenError(f"fewgen fit exports the frozen backbone with export.head unless export.model=learner, so "
                          f"{learner[0]} would be ignored: add export.model=learner to export the fine-tuned CLIP + LoRA "
                          "learner (learner.model=clip), or drop the learner.* settings (for frozen CLIP features: "
                          "backbone.name=clip backbone.model=<folder or hub id>)")
    cfg = load_config(preset, ["data.novel_dataset=imagefolder", f"data.novel_root={shots}", "eval.n_shots=[0]",
                               "seeds=[0]", "export.n_shot=null", "export.seed=null", *(overrides or [])])
    steps = [s for s in cfg.pipeline if s not in ("evaluate", "learn")]
    if "export" not in steps:
        steps.insert(steps.index("report") if "report" in steps else len(steps), "export")
    if (generator_kind(cfg.generator.kind).adapted and "synthesize" in steps and "adapt" not in steps
            and not cfg.synthesis.zero_shot):
        steps.insert(steps.index("synthesize"), "adapt")
    cfg.pipeline = steps
    cfg.name = name or "fit-" + (re.sub(r"[^A-Za-z0-9._-]+", "-", shots.resolve().name).strip("-.") or "shots")
    return cfg


def _cmd_fit(args: argparse.Namespace) -> int:
    from fewgen.app.runner import run

    cfg = fit_config(args.shots, args.preset, args.overrides, args.name)
    r = run(cfg, out_dir=args.out, overwrite=args.overwrite, progress=not args.no_progress, quiet=args.quiet)
    if r.dir is None:  # a helper process of a launch: the main process reports
        return 0
    loo = r.state.classifier.info.get("leave_one_out") if r.state.classifier is not None else None
    if loo:
        ci = f" +- {loo['ci95']:.2f}" if loo["ci95"] is not None else ""
        print(f"estimated accuracy from your shots alone (each classified by the classifier fitted on the others): "
              f"{loo['accuracy']:.2f}%{ci} ({loo['correct']} of {loo['shots']} shots)")
    print(f"classifier for {len(r.data.novel.class_names)} classes in {r.dir / 'classifier'}; "
          f"use it with: fewgen predict {r.dir / 'classifier'} IMAGES... --out predictions.csv")
    return 0


def _add_run_arguments(p: argparse.ArgumentParser, first: tuple[str, str] = (
        "config", "preset name or YAML file; a bare name is the preset of that name even beside a file or "
                  "folder called so, a file is written with .yaml or as a path (./demo.yaml)")) -> None:
    """The arguments every command that makes a run directory takes (``first``: its positional one)."""
    p.add_argument(first[0], help=first[1])
    p.add_argument("overrides", nargs="*", help="key=value overrides (dotted keys)")
    p.add_argument("--out", help="run directory (default runs/<name>)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--quiet", action="store_true", help="print only errors (the log file still gets everything)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fewgen", description="Few-shot image classification with generated data.")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="run a preset or YAML config", description=(
        "Run a preset (fewgen presets lists them) or a YAML file, with dotted key=value overrides, "
        "e.g. `fewgen run demo pretrain.epochs=5 --out runs/quick`."))
    _add_run_arguments(r)
    r.set_defaults(func=_cmd_run)

    d = sub.add_parser("datasets", help="list datasets, or load one and print its splits")
    d.add_argument("name", nargs="?", help="dataset to load")
    d.add_argument("--root", help="data root (default $FEWGEN_DATA, else ./data)")
    d.add_argument("--image-size", type=int, default=None)
    d.set_defaults(func=_cmd_datasets)

    pr = sub.add_parser("presets", help="list presets (and, with --keys, every config key)")
    pr.add_argument("--keys", action="store_true", help="list every config key with its default and help")
    pr.set_defaults(func=_cmd_presets)

    g = sub.add_parser("generate", help="train the base generator, adapt it to the few shots, write synthetic sets",
                       description="Runs the generator, adapt and synthesize steps of a config, e.g. "
                                   "`fewgen generate generate synthesis.synthetic_per_class=50 --out runs/gen`.")
    _add_run_arguments(g)
    g.add_argument("--zero-shot", action="store_true", help="skip adaptation; generate novel classes from their names")
    g.set_defaults(func=_cmd_generate)

    f = sub.add_parser("fit", help="a classifier for your own few shots (a folder, one subfolder per class)",
                       description="Pretrains on the preset's base dataset, generates images of your classes from "
                                   "your shots and exports a classifier fitted on both, e.g. `fewgen fit my_shots/ "
                                   "--preset omniglot-synthetic --out runs/mine`; no query images needed.")
    _add_run_arguments(f, ("shots", "folder <shots>/<class>/*.png|jpg: your labelled images, two classes or more"))
    f.add_argument("--preset", default="demo", help="preset or YAML giving the base dataset and method (default demo)")
    f.add_argument("--name", help="run name (default fit-<folder>)")
    f.set_defaults(func=_cmd_fit)

    pr = sub.add_parser("predict", help="classify images with an exported classifier, into a CSV",
                        description="`fewgen predict runs/mine/classifier photos/ --out predictions.csv`: one row per "
                                    "image (file, predicted class, probability, the next classes); unreadable files "
                                    "are listed and skipped.")
    pr.add_argument("classifier", help="a classifier folder (<run>/classifier)")
    pr.add_argument("images", nargs="+", help="image files or folders of them (searched recursively)")
    pr.add_argument("--out", required=True, help="the CSV file to write")
    pr.add_argument("--top-k", type=int, default=3, help="classes per image in the CSV (default 3)")
    pr.add_argument("--batch-size", type=int, default=256, help="images read and classified at once")
    pr.add_argument("--no-progress", action="store_true", help="no progress bar")
    pr.set_defaults(func=_cmd_predict)
    return p


class Terminated(BaseException):
    """Raised in the main thread when the process gets SIGTERM (not an Exception: nothing swallows it)."""


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # key=value overrides may also come after the options (`fewgen run demo --out x seeds=[0]`)
    args, extra = parser.parse_known_args(argv)
    stray = [a for a in extra if a.startswith("-") or "=" not in a or not hasattr(args, "overrides")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    import signal

    def _terminated(signum, frame):  # SIGTERM (a scheduler, `kill`): stop as Ctrl-C does, with the resume line
        raise Terminated(signum)

    previous = signal.signal(signal.SIGTERM, _terminated)
    try:
        return args.func(args)
    except Terminated:
        import shlex

        command = shlex.join(["fewgen", *(argv if argv is not None else sys.argv[1:])])
        print(f"terminated (SIGTERM); run the same command again to resume from the cache: {command}", file=sys.stderr)
        return 143
    except FewgenError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # the machine, not fewgen: a full disk, a folder that became unwritable
        import errno

        where = f" ({e.filename})" if e.filename else ""
        fix = {errno.ENOSPC: "free some space", errno.EDQUOT: "free some space",
               errno.EACCES: "fix the permissions", errno.EPERM: "fix the permissions",
               errno.EROFS: "choose a writable place"}.get(e.errno, "check that nothing else changes these files")
        print(f"error: {e.strerror or e}{where}; {fix}, then run the same command again (finished steps are cached)",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        import shlex

        command = shlex.join(["fewgen", *(argv if argv is not None else sys.argv[1:])])
        print(f"interrupted; run the same command again to resume from the cache: {command}", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
