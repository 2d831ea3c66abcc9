"""The parts of scripts/gpu_check.sh that run in Python: build the tiny models, run the photos-like
recipe as one process of a launch, and compare what one and two processes made.

    python scripts/gpu_check.py build WORK                 # tiny Stable Diffusion and CLIP under WORK
    python scripts/gpu_check.py worker WORK OUT [--cpu]    # one process (or one rank of torchrun)
    python scripts/gpu_check.py compare OUT1 OUT2 [--cpu]  # the table of checks; exit 1 on a failure

The recipe is the library's photos path, as ``fewgen run`` composes it with generator.kind=
stable-diffusion and learner.model=clip: the device each process resolves, a Stable Diffusion
generator (attention and VAE slicing on), DataDream ``dset`` adaptation to the few shots,
synthesis sharded over the processes in batches across classes, and the CLIP learner fine-tuned
on real + synthetic images in bfloat16 autocast (and float16 with loss scaling on CUDA).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # tests/ holds the tiny model builders
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

#: the novel classes (letters only: the tiny tokenizers know a-z)
CLASSES = ["cat", "dog", "fox"]


def build(work: Path) -> None:
    from tests.test_clip import tiny_clip_folder
    from tests.tiny_sd import build_tiny_pipeline

    build_tiny_pipeline(work / "sd")
    tiny_clip_folder(work / "clip")
    print(f"tiny Stable Diffusion in {work / 'sd' / 'pipe'}, tiny CLIP in {work / 'clip'}")


def photos(shots: int = 2):
    """A few-shot set of small RGB 'photos': each class a colour and a blob at its own place."""
    import torch

    from fewgen.data.base import ArrayDataset

    g = torch.Generator().manual_seed(0)
    images, labels = [], []
    for c in range(len(CLASSES)):
        for _ in range(shots):
            x = torch.rand(3, 32, 32, generator=g) * 0.3
            x[c] += 0.5
            x[:, 8 * c:8 * c + 12, 8 * c:8 * c + 12] = 1.0
            images.append((x.clamp(0, 1) * 255).round().to(torch.uint8))
            labels.append(c)
    return ArrayDataset(torch.stack(images), torch.tensor(labels), list(CLASSES), name="photos")


def worker(work: Path, out: Path, cpu: bool) -> None:
    import torch

    from fewgen.cache import ArtifactCache
    from fewgen.data.base import ArrayDataset
    from fewgen.generators.datadream import DataDreamConfig
    from fewgen.generators.stable_diffusion import StableDiffusionGenerator
    from fewgen.learners.clip import CLIPClassifier
    from fewgen.learners.finetune import FinetuneSettings, ce_batches, ce_loss, finetune
    from fewgen.synthesis.sharding import process_context
    from fewgen.synthesis.store import SynthesisCache, SynthesisSpec
    from fewgen.utils import is_main_process, resolve_device

    device = resolve_device("cpu" if cpu else "auto")
    ctx = process_context()
    torch.set_num_threads(1)
    report: dict = {"rank": ctx.rank, "world": ctx.world, "local_rank": int(os.environ.get("LOCAL_RANK", "0")),
                    "device": str(device), "main": is_main_process(),
                    "current_cuda": torch.cuda.current_device() if device.type == "cuda" else None}
    t0 = time.time()
    gen = StableDiffusionGenerator(work / "sd" / "pipe", device=device, attention_slicing=True, vae_slicing=True)
    report["unet_device"] = str(next(gen.pipe.unet.parameters()).device)
    few = photos()
    cache = ArtifactCache(out / "cache")
    cfg = DataDreamConfig(mode="dset", rank=4, alpha=4.0, steps_per_class=4, batch_size=2, lr=1e-3, warmup=1)
    adapter = gen.adapt(few, cfg, cache.entry("adapters", {"check": "photos"}), cache, ctx,
                        log=print if ctx.is_main else None, log_dir=out / f"tensorboard-rank{ctx.rank}")
    report["adapter_key"] = adapter.key
    spec = SynthesisSpec(gen.state_key(), list(CLASSES), gen.prompts_for(CLASSES), per_class=4,
                         image_shape=(3, 32, 32), adapter_key=adapter.key, steps=3, chunk=8)
    fn = gen.synthesis_sample_fn(spec, adapter, (3, 32, 32))
    report["mixed_batches"] = bool(getattr(fn, "mixes_classes", False))
    syn = SynthesisCache(cache).synthesize(spec, fn, ctx)
    entry = SynthesisCache(cache).path(spec)
    report["images"] = {f["file"]: f["sha256"] for f in json.loads((entry / "manifest.json").read_text())["images"]}
    both = ArrayDataset.concat([few, syn], name="real+synthetic")
    report["finetune"] = {}
    for precision in (["bfloat16", "float16"] if device.type == "cuda" else ["bfloat16"]):
        torch.manual_seed(0)
        model = CLIPClassifier.from_pretrained(work / "clip", list(CLASSES), rank=4)
        history = finetune(model, ce_batches(both, 4, "gpu-check", ctx.rank), ce_loss,
                           FinetuneSettings(steps=4, augment=["flip"], log_every=2, precision=precision),
                           (3, 32, 32), device)
        report["finetune"][precision] = {"loss": history[-1]["loss"],
                                         "device": str(next(model.parameters()).device)}
    report["seconds"] = round(time.time() - t0, 1)
    (out / f"rank{ctx.rank}.json").write_text(json.dumps(report, indent=1))
    print(f"rank {ctx.rank}/{ctx.world} on {device}: done in {report['seconds']}s", flush=True)


def compare(one: Path, two: Path, cpu: bool) -> int:
    import math

    rows: list[tuple[str, str, str]] = []

    def check(name: str, ok: bool | None, detail: str) -> None:
        rows.append((name, "SKIP" if ok is None else "PASS" if ok else "FAIL", detail))

    single = json.loads((one / "rank0.json").read_text())
    ranks = sorted(two.glob("rank*.json"))
    multi = [json.loads(p.read_text()) for p in ranks]
    expect = (lambda r: "cpu") if cpu else (lambda r: f"cuda:{r}")
    check("one process: device", single["device"] in (expect(0), "cuda") and single["unet_device"] == expect(0),
          f"resolved {single['device']}, UNet on {single['unet_device']}")
    check("two processes: both ran", len(multi) == 2, f"{len(multi)} rank reports ({', '.join(p.name for p in ranks)})")
    for r in multi:
        want = expect(r["local_rank"])
        where = [r["device"], r["unet_device"], *[f["device"] for f in r["finetune"].values()]]
        check(f"rank {r['rank']}: placement", all(w == want for w in where)
              and (cpu or r["current_cuda"] == r["local_rank"]),
              f"want {want}; device {r['device']}, UNet {r['unet_device']}, CLIP "
              f"{', '.join(f['device'] for f in r['finetune'].values())}, current cuda {r['current_cuda']}")
        check(f"rank {r['rank']}: main process", r["main"] == (r["rank"] == 0), f"is_main_process() = {r['main']}")
    if len(multi) == 2:
        check("ranks on distinct devices", None if cpu else len({r["device"] for r in multi}) == 2,
              " / ".join(r["device"] for r in multi))
        check("adapter: same as one process", all(r["adapter_key"] == single["adapter_key"] for r in multi),
              f"{single['adapter_key']} vs {', '.join(r['adapter_key'] for r in multi)}")
        n = len(single["images"])
        same = [sum(r["images"].get(k) == v for k, v in single["images"].items()) for r in multi]
        check("images: same bytes as one process", n > 0 and all(m == n for m in same),
              " / ".join(f"rank {r['rank']} reads {m}/{n} PNGs identical" for r, m in zip(multi, same)))
    check("synthesis: batches across classes", single["mixed_batches"], "dset adapter: several prompts per batch")
    for precision, f in single["finetune"].items():
        check(f"CLIP learner {precision}", math.isfinite(f["loss"]), f"final loss {f['loss']:.4f} on {f['device']}")
    if not cpu and "float16" not in single["finetune"]:
        check("CLIP learner float16", None, "not on CUDA")
    width = max(len(n) for n, _, _ in rows)
    print(f"\n{'check':<{width}}  result  detail\n{'-' * width}  ------  ------")
    for name, result, detail in rows:
        print(f"{name:<{width}}  {result:<6}  {detail}")
    failed = [n for n, r, _ in rows if r == "FAIL"]
    skipped = sum(r == "SKIP" for _, r, _ in rows)
    print(f"\n{len(rows) - len(failed) - skipped}/{len(rows) - skipped} checks passed"
          + (f", {skipped} skipped" if skipped else "") + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build")
    b.add_argument("work", type=Path)
    w = sub.add_parser("worker")
    w.add_argument("work", type=Path)
    w.add_argument("out", type=Path)
    w.add_argument("--cpu", action="store_true")
    c = sub.add_parser("compare")
    c.add_argument("one", type=Path)
    c.add_argument("two", type=Path)
    c.add_argument("--cpu", action="store_true")
    args = p.parse_args()
    if args.cmd == "build":
        build(args.work)
    elif args.cmd == "worker":
        args.out.mkdir(parents=True, exist_ok=True)
        worker(args.work, args.out, args.cpu)
    else:
        return compare(args.one, args.two, args.cpu)
    return 0


if __name__ == "__main__":
    sys.exit(main())
