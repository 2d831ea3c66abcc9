"""The synthesis cache: generated images in a content-addressed store, resumable per image.

A synthetic set is a folder ``<cache>/synthetic/<key>/`` where the key hashes everything that
determines its pixels: the generator and adapter keys, the class names and prompts, the
sampler, steps, guidance, seed, images per class, image shape and chunk size. (diffusers'
DreamBooth tops a class-image folder up by file count, so a changed prompt silently reuses
stale images; a changed prompt, adapter or sampler here is a new key and a new folder.)

Images are PNG files ``images/<class>/<index>.png``. Image ``i`` of class ``c`` starts from
its own seed ``seed_hash("synthetic", seed, prompt_c, i)``. Work is done in chunks of
``chunk`` images of one class, always the same images in the same batch, so a chunk's bytes
do not depend on what ran before it or on which process ran it; a generator that draws
several prompts at once (Stable Diffusion without per-class adapters) packs small chunks of
consecutive classes into one batch of up to ``chunk`` images, again the same batches for the
same spec (:meth:`SynthesisSpec.batches`). After a chunk's files are
renamed into place a record ``chunks/<class>_<chunk>.json`` lists their sha256; a chunk
without a valid record (killed mid-way, file corrupted or deleted) is generated again. When
every chunk is done, ``manifest.json`` lists file, class, per-image seed and sha256 and the
entry is marked ``done``. Reading a finished set verifies every file against the manifest.
Chunks can also run in parallel streams within a process (:func:`parallel_streams`), which
changes neither a chunk's batch nor its bytes.
"""

from __future__ import annotations

import io
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fewgen.cache import ArtifactCache
from fewgen.data.base import ArrayDataset
from fewgen.errors import FewgenError
from fewgen.options import opt
from fewgen.synthesis.sharding import ProcessContext, shard
from fewgen.training import TrainingMonitor
from fewgen.utils import atomic_path, read_json, seed_hash, sha256_file, write_json

# sample_fn(class_index, seeds, image_indices) -> uint8 images (len(seeds), C, H, W); image i of a class
# starts from noise seeded by seeds[k] and is that class's image indices[k]. A sample_fn with the
# attribute ``mixes_classes = True`` may also be given a list of per-image class indices for a batch
# of several classes' chunks (SynthesisSpec.batches)
SampleFn = Callable[[int, Sequence[int], Sequence[int]], torch.Tensor]


@dataclass
class SynthesisConfig:
    """Synthetic images of the novel classes (fewgen.synthesis): sampler, count, cache."""

    synthetic_per_class: int = opt(20, "synthetic images per novel class", min=1)
    sampler: str = opt("dpmsolver++", "ddim, dpmsolver++ (time-uniform steps), dpmsolver++-logsnr "
                       "(steps uniform in log-SNR) or dpmsolver++-full (no lambda clipping near t = T)", choices="sampler")
    steps: int = opt(25, "sampling steps", min=1)
    guidance: float = opt(2.0, "classifier-free guidance scale (1 = none) of the class-token and Stable Diffusion "
                          "generators", min=0)
    exemplar_guidance: float = opt(0.5, "exemplar generator: Boutin et al.'s guidance w, eps = (1 + w) eps_c - w eps_u "
                                   "(0 = the conditional model; more: closer to the exemplar's class, less original)",
                                   min=0)
    exemplar_condition: str = opt("each", "exemplar generator with K > 1 shots: condition each image on its shot "
                                  "(each: image i on shot i mod K) or on the mean feature of the class's shots (mean)",
                                  choices=("each", "mean"))
    seed: int = opt(0, "synthesis seed (each image's seed derives from it, the class and the index)")
    chunk: int = opt(16, "images per generation batch (part of the cache key: fixes each image's batch); Stable "
                     "Diffusion without per-class adapters fills a batch with several classes' images", min=1)
    precision: str = opt("float32", "pixel UNet precision while sampling: float32, bfloat16 (2x the images/s on "
                         "CPUs with native bf16 at chunks >= 40), float16 (GPU); Stable Diffusion uses generator.stable_diffusion.dtype", choices=("float32", "bfloat16", "float16"))
    streams: int | None = opt(None, "parallel sampling streams in each process, each a copy of the pixel "
                              "generator with an equal share of the CPU threads (bytes unchanged); default: one "
                              "per CPU thread up to 8 on CPU, 1 on GPU and for Stable Diffusion", min=1)
    zero_shot: bool = opt(False, "no adaptation: generate novel classes from their names with the base generator")
    sdedit_strengths: list[float] = opt([], "SDEdit from the shots (DA-Fusion): image i of a class starts from its shot "
                                        "i mod K noised to strength s (0 = the shot, 1 = pure noise), s cycling "
                                        "through this list, e.g. [0.25, 0.5, 0.75]; empty: start from pure noise",
                                        min=0, max=1)
    grid_classes: int = opt(8, "novel classes drawn as real-vs-synthetic grids per (seed, K); 0 = none", min=0)
    import_dir: str | None = opt(None, "folder <dir>/<class>/*.png|jpg of images made elsewhere, read by the "
                                 "import-synthetic step as the synthetic set (first synthetic_per_class per class)")


@dataclass
class SynthesisSpec:
    """Everything that determines a synthetic set's pixels (its cache key is the hash of this)."""

    generator_key: str
    class_names: list[str]
    prompts: list[str]
    per_class: int
    image_shape: tuple[int, int, int]
    adapter_key: str | None = None
    sampler: str = "ddim"
    steps: int = 50
    guidance: float = 2.0
    seed: int = 0
    chunk: int = 16
    precision: str = "float32"
    strengths: list[float] = field(default_factory=list)
    sources: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.prompts) != len(self.class_names):
            raise FewgenError(f"{len(self.prompts)} prompts for {len(self.class_names)} classes; give one per class")
        if self.per_class < 1 or self.chunk < 1:
            raise FewgenError(f"per_class ({self.per_class}) and chunk ({self.chunk}) must be at least 1")
        self.image_shape = tuple(int(s) for s in self.image_shape)

    def parts(self) -> dict[str, Any]:
        d = asdict(self)
        d["image_shape"] = list(self.image_shape)
        if SAMPLER_REVISIONS.get(self.sampler, 1) > 1:  # a fixed sampler never reuses the old one's images
            d["sampler_revision"] = SAMPLER_REVISIONS[self.sampler]
        return {"kind": "synthetic-set", **d}

    def image_seed(self, class_index: int, i: int) -> int:
        return seed_hash("synthetic", self.seed, self.prompts[class_index], i)

    def start(self, i: int, n_sources: int) -> tuple[int, float | None]:
        """Where image ``i`` of a class starts: (index of its class's source image, SDEdit strength),
        or strength None for pure noise. Image i takes source ``i mod K`` (K = ``n_sources``, the
        class's shots) and strength ``strengths[(i // K) mod S]``, so every shot gets every
        strength equally often (DA-Fusion mixes strengths this way)."""
        j = i % max(1, n_sources)
        if not self.strengths:
            return j, None
        return j, float(self.strengths[(i // max(1, n_sources)) % len(self.strengths)])

    def chunks(self) -> list[tuple[int, int]]:
        """(class index, chunk index) in the global order that processes shard."""
        n = math.ceil(self.per_class / self.chunk)
        return [(c, j) for c in range(len(self.class_names)) for j in range(n)]

    def chunk_images(self, j: int) -> range:
        return range(j * self.chunk, min(self.per_class, (j + 1) * self.chunk))

    def batches(self, mix_classes: bool = False) -> list[list[tuple[int, int]]]:
        """The units of work, in the global order processes shard: each chunk alone, or, for a
        generator that draws several prompts in one batch (``mix_classes``), consecutive chunks
        packed while their images fit in ``chunk`` (with 4 images per class and chunk 16, a batch
        holds 4 classes). A batch depends on the spec alone, never on what ran before or where."""
        if not mix_classes:
            return [[cj] for cj in self.chunks()]
        out: list[list[tuple[int, int]]] = []
        size = 0
        for c, j in self.chunks():
            n = len(self.chunk_images(j))
            if out and size + n <= self.chunk:
                out[-1].append((c, j))
                size += n
            else:
                out.append([(c, j)])
                size = n
        return out


def synthesis_spec(sc, gc, *, generator: str, adapter: str | None, class_names: Sequence[str],
                   image_shape: Sequence[int], stable_diffusion: bool, sources: str | None) -> SynthesisSpec:
    """The spec of a synthetic set from the synthesis config ``sc`` (and, for Stable Diffusion, the
    prompt template of the generator config ``gc``), the generator's and adapter's keys, the classes,
    the image shape and the content digest of the real images the set starts from (``sources``: the
    few shots, for SDEdit; None when it starts from noise). ``fewgen.keys`` (kind ``synthetic``)
    declares what of the config it holds."""
    template = gc.stable_diffusion.prompt if stable_diffusion else "{}"
    from fewgen.generators.registry import generator_kind

    exemplar = generator_kind(gc.kind).exemplar
    extra = {"exemplar_condition": sc.exemplar_condition} if exemplar else \
        {"zero_shot": bool(sc.zero_shot or adapter is None)}
    return SynthesisSpec(generator_key=generator, class_names=list(class_names),
                         prompts=[template.format(n) for n in class_names], per_class=sc.synthetic_per_class,
                         image_shape=tuple(image_shape), adapter_key=adapter, sampler=sc.sampler, steps=sc.steps,
                         guidance=sc.exemplar_guidance if exemplar else sc.guidance, seed=sc.seed, chunk=sc.chunk,
                         precision="float32" if stable_diffusion else sc.precision,  # SD: generator.stable_diffusion.dtype
                         strengths=list(sc.sdedit_strengths),
                         sources=sources if sc.sdedit_strengths or exemplar else None,  # what the images start from
                         extra=extra)


#: bumped when a sampler's images change for the same name (ddim 2: no x0 clipping)
SAMPLER_REVISIONS = {"ddim": 2}


def sdedit_or_sample(spec: SynthesisSpec, sources: torch.Tensor | None, seeds: Sequence[int], indices: Sequence[int],
                     sample: Callable[[Sequence[int]], torch.Tensor],
                     img2img: Callable[[torch.Tensor, float, Sequence[int]], torch.Tensor]) -> torch.Tensor:
    """One chunk of a class: from pure noise (``sample(seeds)``), or, when ``spec.strengths`` is set,
    SDEdit from the class's ``sources`` (uint8 (K, C, H, W), its shots): image ``indices[k]`` starts
    from the source and strength :meth:`SynthesisSpec.start` gives it, images of one strength in one
    ``img2img(images, strength, seeds)`` call, returned in chunk order."""
    if not spec.strengths:
        return sample(seeds)
    if sources is None or not len(sources):
        raise FewgenError("SDEdit (synthesis.sdedit_strengths) needs the real shots of every class to start from")
    starts = [spec.start(i, len(sources)) for i in indices]
    out = torch.empty(len(seeds), *spec.image_shape, dtype=torch.uint8)
    for s in sorted({st for _, st in starts}):
        pos = [k for k, (_, st) in enumerate(starts) if st == s]
        src = sources[torch.tensor([starts[k][0] for k in pos])]
        out[pos] = img2img(src, s, [seeds[k] for k in pos])
    return out


def image_file(c: int, i: int) -> str:
    return f"images/{c:04d}/{i:05d}.png"


def write_png(path: Path, image: torch.Tensor) -> None:
    """uint8 (C, H, W) -> PNG (grey for C=1), written atomically with fixed encoder settings."""
    from PIL import Image

    arr = image.cpu().numpy()
    arr = arr[0] if arr.shape[0] == 1 else np.transpose(arr, (1, 2, 0))
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", compress_level=6)
    with atomic_path(path) as tmp:
        tmp.write_bytes(buf.getvalue())


def read_png(path: Path, channels: int) -> torch.Tensor:
    """One of the set's PNGs as uint8 (C, H, W), read by fewgen's one reader
    (:func:`fewgen.data.reader.read_image_array`)."""
    from fewgen.data.reader import read_image_array

    return torch.from_numpy(read_image_array(path, channels))


def parallel_streams(items: Sequence[Any], workers: Sequence[Any], run: Callable[[Any, Any], None],
                     progress: Callable[[int], None] | None = None) -> None:
    """``run(worker, item)`` for every item, one thread per worker, each taking the next item.

    With more than one worker, torch's CPU threads are split evenly among them for the duration
    (a small UNet's convolutions are too small to keep several threads busy, so streams of one
    thread each sample faster; ``benchmarks/bench_generators.py --speed`` measures it). ``progress(n)`` is
    called after each item with the number done. The first error stops the other workers after
    their current item and is raised.
    """
    import threading

    if len(workers) <= 1:
        for n, item in enumerate(items):
            run(workers[0], item)
            if progress:
                progress(n + 1)
        return
    from concurrent.futures import ThreadPoolExecutor

    queue, lock, failed, done = iter(items), threading.Lock(), threading.Event(), [0]

    def loop(worker) -> None:
        while not failed.is_set():
            with lock:
                item = next(queue, None)
            if item is None:
                return
            try:
                run(worker, item)
            except BaseException:
                failed.set()
                raise
            with lock:
                done[0] += 1
                if progress:
                    progress(done[0])

    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, threads // len(workers)))
    try:
        with ThreadPoolExecutor(len(workers)) as pool:
            for f in [pool.submit(loop, w) for w in workers]:
                f.result()
    finally:
        torch.set_num_threads(threads)


class SynthesisCache:
    """Synthetic sets in ``<root>/synthetic/<key>``: create, resume, verify, read."""

    kind = "synthetic"

    def __init__(self, cache: ArtifactCache | str | Path | None = None):
        self.cache = cache if isinstance(cache, ArtifactCache) else ArtifactCache(cache)

    def key(self, spec: SynthesisSpec) -> str:
        return self.cache.key(spec.parts())

    def path(self, spec: SynthesisSpec) -> Path:
        return self.cache.path(self.kind, spec.parts())

    # ------------------------------------------------------------------ chunk records
    def _chunk_ok(self, entry: Path, c: int, j: int) -> bool:
        rec = entry / "chunks" / f"{c:04d}_{j:04d}.json"
        if not rec.exists():
            return False
        try:
            files = read_json(rec)["files"]
        except (FewgenError, KeyError, TypeError):
            return False
        return all((entry / f["file"]).exists() and sha256_file(entry / f["file"]) == f["sha256"] for f in files)

    def _run_batch(self, entry: Path, spec: SynthesisSpec, batch: list[tuple[int, int]], sample_fn: SampleFn) -> None:
        """Draw one batch (:meth:`SynthesisSpec.batches`: one chunk, or several classes' chunks for a
        sample_fn that ``mixes_classes``) and write each chunk's files and record."""
        parts = [(c, j, list(spec.chunk_images(j))) for c, j in batch]
        classes = [c for c, _, idx in parts for _ in idx]
        indices = [i for _, _, idx in parts for i in idx]
        seeds = [spec.image_seed(c, i) for c, i in zip(classes, indices)]
        images = sample_fn(batch[0][0] if len(batch) == 1 else classes, seeds, indices)
        if images.dtype != torch.uint8 or tuple(images.shape) != (len(seeds), *spec.image_shape):
            raise FewgenError(f"the generator returned {images.dtype} {tuple(images.shape)}, expected uint8 "
                              f"{(len(seeds), *spec.image_shape)}")
        k = 0
        for c, j, idx in parts:
            files = []
            for i in idx:
                path = entry / image_file(c, i)
                write_png(path, images[k])
                files.append({"file": image_file(c, i), "class": c, "class_name": spec.class_names[c], "index": i,
                              "seed": seeds[k], "sha256": sha256_file(path)})
                k += 1
            write_json(entry / "chunks" / f"{c:04d}_{j:04d}.json", {"files": files})

    # ------------------------------------------------------------------ public API
    def status(self, spec: SynthesisSpec) -> dict[str, int]:
        """How many chunks are valid on disk (for messages and tests)."""
        entry = self.path(spec)
        chunks = spec.chunks()
        ok = sum(self._chunk_ok(entry, c, j) for c, j in chunks) if entry.exists() else 0
        return {"chunks": len(chunks), "valid": ok}

    def verify(self, spec: SynthesisSpec) -> list[str]:
        """Files of a finished set that are missing or do not match the manifest's sha256."""
        entry = self.path(spec)
        manifest = entry / "manifest.json"
        if not manifest.exists() or self.cache.problem(entry) is not None:  # checksum of the manifest in done
            return ["manifest.json"]
        bad = []
        for f in read_json(manifest)["images"]:
            p = entry / f["file"]
            if not p.exists() or sha256_file(p) != f["sha256"]:
                bad.append(f["file"])
        return bad

    def synthesize(self, spec: SynthesisSpec, sample_fn: SampleFn | Sequence[SampleFn] | None,
                   ctx: ProcessContext | None = None, log: Callable[[str], None] | None = None,
                   progress: bool = False) -> ArrayDataset:
        """The set ``spec`` describes: read from the cache, or generated (resuming per chunk, each
        process doing its shard of chunks) and then read. ``sample_fn`` may be None only when the
        set is complete on disk. ``progress``: a bar over the batches with the ETA; with ``log``,
        one line estimates the time from the first batches.

        A list of sample functions (each with its own copy of the model) runs that many parallel
        streams in this process, each taking the next chunk and using an equal share of torch's
        CPU threads (see :func:`parallel_streams`); a chunk's bytes do not depend on the stream."""
        ctx = ctx or ProcessContext()
        entry = self.cache.entry(self.kind, spec.parts())
        if self.cache.is_done(entry):
            bad = self.verify(spec)
            if not bad:
                return self.read(spec)
            if log:
                log(f"synthetic set {entry.name}: {len(bad)} file(s) missing or corrupt, regenerating them")
            ctx.barrier()
            if ctx.is_main:
                (entry / "done").unlink(missing_ok=True)
                if "manifest.json" in bad:
                    (entry / "manifest.json").unlink(missing_ok=True)
            ctx.barrier()
        fns = [] if sample_fn is None else list(sample_fn) if isinstance(sample_fn, (list, tuple)) else [sample_fn]
        mixes = bool(fns) and all(getattr(fn, "mixes_classes", False) for fn in fns)
        todo = [b for b in shard(spec.batches(mixes), ctx.rank, ctx.world)
                if not all(self._chunk_ok(entry, c, j) for c, j in b)]
        if todo and not fns:
            raise FewgenError(f"synthetic set {entry} is incomplete and no generator was given to finish it")
        t0 = time.time()
        monitor = TrainingMonitor(f"synthetic set {entry.name}", len(todo), log=log, progress=progress and bool(todo),
                                  unit="batch", estimate_after=max(1, min(5, len(fns))))

        def done(n: int) -> None:
            monitor.step()
            if log and n % max(1, len(todo) // 10) == 0:
                log(f"synthetic set {entry.name}: {n}/{len(todo)} batches on rank {ctx.rank} ({time.time() - t0:.0f}s)")

        with monitor:
            if todo:
                parallel_streams(todo, fns[:len(todo)], lambda fn, b: self._run_batch(entry, spec, b, fn), done)
        made = sum(len(spec.chunk_images(j)) for b in todo for _, j in b)
        timing = ctx.gather_objects((made, time.time() - t0))
        ctx.barrier()
        if ctx.is_main:  # images drawn in this call and its wall time (the slowest process's)
            self._finish(entry, spec, {"generated": sum(m for m, _ in timing),
                                       "seconds": round(max(s for _, s in timing), 2)})
        ctx.barrier()
        return self.read(spec)

    def _finish(self, entry: Path, spec: SynthesisSpec, timing: dict | None = None) -> None:
        images = []
        for c, j in spec.chunks():
            if not self._chunk_ok(entry, c, j):
                raise FewgenError(f"chunk {c}/{j} of {entry} is not valid after generation; rerun to regenerate it")
            images += read_json(entry / "chunks" / f"{c:04d}_{j:04d}.json")["files"]
        write_json(entry / "manifest.json", {"key": entry.name, "spec": spec.parts(), "images": images})
        self.cache.mark_done(entry, {"images": len(images), **(timing or {})},
                             files=["manifest.json"])  # the images' checksums are in the manifest

    def read(self, spec: SynthesisSpec) -> ArrayDataset:
        """A finished set as an ArrayDataset (labels index ``spec.class_names``), verified."""
        entry = self.path(spec)
        if not self.cache.is_done(entry):
            raise FewgenError(f"synthetic set {entry} is not finished; run synthesize() to generate it")
        return read_set(entry)


def read_set(entry: str | Path, verify: bool = True) -> ArrayDataset:
    """Read a finished set folder (its ``manifest.json``) as an ArrayDataset."""
    entry = Path(entry)
    manifest = read_json(entry / "manifest.json")
    spec = manifest["spec"]
    channels = spec["image_shape"][0]
    images, labels = [], []
    for f in manifest["images"]:
        p = entry / f["file"]
        if verify and (not p.exists() or sha256_file(p) != f["sha256"]):
            raise FewgenError(f"{p} is missing or corrupt; rerun the synthesis step to regenerate it")
        images.append(read_png(p, channels))
        labels.append(f["class"])
    x = torch.stack(images) if images else torch.zeros(0, *spec["image_shape"], dtype=torch.uint8)
    return ArrayDataset(x, torch.tensor(labels, dtype=torch.long), list(spec["class_names"]),
                        name=f"synthetic/{entry.name}")
