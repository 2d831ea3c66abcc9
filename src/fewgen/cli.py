"""The ``fewgen`` command: a thin layer over the library.

User errors (:class:`fewgen.FewgenError`) end with one ``error:`` line and exit code 2.
"""

from __future__ import annotations

import argparse
import sys

from fewgen.errors import FewgenError


def _cmd_run(args: argparse.Namespace) -> int:
    from fewgen.config import load_config
    from fewgen.pipeline import run

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
    from fewgen.config import describe, preset_names

    print("presets: " + ", ".join(preset_names()))
    if args.keys:
        for key, default, help_text in describe():
            print(f"  {key:<32} {default:<24} {help_text}")
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    from fewgen.config import load_config
    from fewgen.pipeline import run

    cfg = load_config(args.config, args.overrides)
    if args.zero_shot:
        cfg.synthesis.zero_shot = True
    if cfg.synthesis.zero_shot and cfg.generator.kind == "diffusion" and cfg.generator.cond_mode == "class":
        raise FewgenError("zero-shot generation needs the class names: set generator.cond_mode=name or class+name")
    cfg.pipeline = ["generator", "synthesize"] if cfg.synthesis.zero_shot else ["generator", "adapt", "synthesize"]
    r = run(cfg, out_dir=args.out, overwrite=args.overwrite, progress=not args.no_progress, quiet=args.quiet)
    sets = r.artifacts.get("synthetic", {})
    print(f"{len(sets)} synthetic set(s), {sum(len(d) for d in sets.values())} images; grids in {r.dir / 'grids'}")
    return 0


def _add_run_arguments(p: argparse.ArgumentParser) -> None:
    """The arguments every command that makes a run directory takes."""
    p.add_argument("config", help="preset name or path to a YAML config")
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
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # key=value overrides may also come after the options (`fewgen run demo --out x seeds=[0]`)
    args, extra = parser.parse_known_args(argv)
    stray = [a for a in extra if a.startswith("-") or "=" not in a or not hasattr(args, "overrides")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    try:
        return args.func(args)
    except FewgenError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # the machine, not fewgen: a full disk, a folder that became unwritable
        where = f" ({e.filename})" if e.filename else ""
        print(f"error: {e.strerror or e}{where}; free space or fix the permissions, then run the same command "
              "again (finished steps are cached)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        import shlex

        command = shlex.join(["fewgen", *(argv if argv is not None else sys.argv[1:])])
        print(f"interrupted; run the same command again to resume from the cache: {command}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
