"""The synthesis cache: manifest, read-back, invalidation, corrupt files, kill -9 resume, 2 processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fewgen.errors import FewgenError
from fewgen.synthesis.sharding import shard
from fewgen.synthesis.store import SynthesisCache, SynthesisSpec

sys.path.insert(0, str(Path(__file__).parent))
from synth_worker import sample_fn_for, spec_for, tiny_generator, toy_few_shot  # noqa: E402

WORKER = Path(__file__).parent / "synth_worker.py"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
       "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1] / "src"), str(Path(__file__).parents[1]),
                                      os.environ.get("PYTHONPATH", "")])}  # the root: tests.conftest


def set_files(root: Path, key: str | None = None) -> dict[str, bytes]:
    """Every image file and the manifest of one set under ``root`` (the only one, or the one
    named ``key``: other tests add sets to the shared reference cache), by relative path."""
    if key is None:
        (entry,) = (root / "synthetic").iterdir()
    else:
        entry = root / "synthetic" / key
    return {str(p.relative_to(entry)): p.read_bytes() for p in sorted(entry.rglob("*"))
            if p.is_file() and (p.suffix == ".png" or p.name == "manifest.json")}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One uninterrupted single-process run (1 thread, like the workers)."""
    root = tmp_path_factory.mktemp("ref")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        gen = tiny_generator()
        spec = spec_for(gen)
        calls = []
        fn = sample_fn_for(gen, spec)
        ds = SynthesisCache(root).synthesize(spec, lambda c, s, i: (calls.append(c), fn(c, s, i))[1])
    finally:
        torch.set_num_threads(threads)
    return root, gen, spec, ds, calls


def counting(gen, spec):
    calls = []
    fn = sample_fn_for(gen, spec)
    return calls, lambda c, s, i: (calls.append((c, list(s))), fn(c, s, i))[1]


def test_set_reads_back_with_manifest(reference):
    root, gen, spec, ds, calls = reference
    assert len(ds) == 3 * 6 and ds.images.dtype == torch.uint8 and ds.image_shape == (1, 8, 8)
    assert ds.labels.tolist() == sorted([0, 1, 2] * 6) and ds.class_names == gen.class_names
    assert len(calls) == 9  # 3 classes x 3 chunks of 2
    sc = SynthesisCache(root)
    import json

    manifest = json.loads((sc.path(spec) / "manifest.json").read_text())
    row = manifest["images"][0]
    assert set(row) >= {"file", "class", "seed", "sha256"} and row["seed"] == spec.image_seed(0, 0)
    assert len({r["seed"] for r in manifest["images"]}) == 18
    again = sc.synthesize(spec, None)  # complete: no generator needed
    assert torch.equal(again.images, ds.images)


def test_changed_prompt_adapter_or_sampler_never_reuses(reference, tmp_path):
    root, gen, spec, ds, _ = reference
    sc = SynthesisCache(root)
    for changed in (spec_for(gen, prompt_suffix=" v2"), spec_for(gen, adapter_key="lora-abc"),
                    spec_for(gen, sampler="dpmsolver++"), spec_for(gen, precision="bfloat16")):
        assert sc.key(changed) != sc.key(spec)
        assert not sc.path(changed).exists()
        with pytest.raises(FewgenError, match="incomplete"):
            sc.synthesize(changed, None)
    calls, fn = counting(gen, spec_for(gen, sampler="dpmsolver++"))
    out = sc.synthesize(spec_for(gen, sampler="dpmsolver++"), fn)
    assert len(calls) == 9 and not torch.equal(out.images, ds.images)


def test_corrupt_and_missing_files_are_regenerated(reference, tmp_path):
    _, gen, spec, ds, _ = reference
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        sc = SynthesisCache(tmp_path)
        sc.synthesize(spec, sample_fn_for(gen, spec))
        entry = sc.path(spec)
        (entry / "images/0001/00003.png").write_bytes(b"not a png")
        (entry / "images/0002/00000.png").unlink()
        assert sorted(sc.verify(spec)) == ["images/0001/00003.png", "images/0002/00000.png"]
        with pytest.raises(FewgenError, match="missing or corrupt"):
            sc.read(spec)
        calls, fn = counting(gen, spec)
        out = sc.synthesize(spec, fn)
    finally:
        torch.set_num_threads(threads)
    assert sorted(c for c, _ in calls) == [1, 2]  # only the two broken chunks
    assert torch.equal(out.images, ds.images) and sc.verify(spec) == []


@pytest.mark.slow
@pytest.mark.parametrize("generator", ["class-token", "exemplar"])
def test_resume_after_kill_matches_uninterrupted_run(reference, tmp_path, generator):
    flags = ["--exemplar"] if generator == "exemplar" else []
    if generator == "exemplar":  # the uninterrupted reference of this job
        ref_root = tmp_path / "reference"
        done = subprocess.run([sys.executable, str(WORKER), str(ref_root), *flags], env=ENV, capture_output=True,
                              text=True, timeout=600)
        assert done.returncode == 0, done.stdout + done.stderr
        tmp_path = tmp_path / "killed"
    else:
        ref_root = reference[0]
    proc = subprocess.Popen([sys.executable, str(WORKER), str(tmp_path), "--slow", "0.4", *flags], env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 600  # generous: the worker imports diffusers on a loaded machine
    chunks = []
    while time.time() < deadline and proc.poll() is None:
        chunks = list(tmp_path.glob("synthetic/*/chunks/*.json"))
        if len(chunks) >= 2:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the worker finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    (entry,) = (tmp_path / "synthetic").iterdir()
    assert not (entry / "done").exists() and 2 <= len(list(entry.glob("chunks/*.json"))) < 9
    out = subprocess.run([sys.executable, str(WORKER), str(tmp_path), *flags], env=ENV, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    (entry,) = (tmp_path / "synthetic").iterdir()
    assert set_files(tmp_path) == set_files(ref_root, entry.name)
    assert not list(entry.rglob("*.tmp"))


@pytest.mark.slow
def test_two_processes_write_the_same_bytes_as_one(reference, tmp_path):
    from fewgen.generators.datadream import DataDreamConfig, train_datadream

    ref_root, gen = reference[0], reference[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone", str(WORKER),
           str(tmp_path), "--adapt"]
    out = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=600)
    ranks = "\n".join(line for line in out.stderr.splitlines() if line.startswith("[rank"))  # the workers' tracebacks
    assert out.returncode == 0, out.stdout[-2000:] + ranks[-4000:] + out.stderr[-1000:]
    assert "world=2" in out.stdout
    (entry,) = (tmp_path / "synthetic").iterdir()
    assert set_files(tmp_path) == set_files(ref_root, entry.name)
    # DataDream cls adapters sharded over the 2 processes equal one process's
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one = train_datadream(gen, toy_few_shot(), DataDreamConfig(mode="cls", rank=2, alpha=2.0, steps_per_class=2,
                                                                    batch_size=2))
    finally:
        torch.set_num_threads(threads)
    assert f"ADAPTER {one.key}" in out.stdout


def test_shard_covers_every_item_once():
    items = list(range(11))
    parts = [shard(items, r, 3) for r in range(3)]
    assert sorted(sum(parts, [])) == items and parts[1] == [1, 4, 7, 10]


def test_spec_rejects_mismatched_prompts():
    with pytest.raises(FewgenError, match="one per class"):
        SynthesisSpec("g", ["a", "b"], ["a"], per_class=2, image_shape=(1, 8, 8))


def test_cache_entry_created_by_many_workers_at_once(tmp_path):
    """Several processes open the same new entry at the same moment (the 2-process launch does)."""
    import threading

    from fewgen.cache import ArtifactCache

    cache, errors, n = ArtifactCache(tmp_path), [], 4
    start = threading.Barrier(n)

    def worker():
        for i in range(40):
            start.wait()
            try:
                cache.entry("synthetic", {"item": i})
            except Exception as e:  # noqa: BLE001 - collected and asserted below
                errors.append(repr(e))

    threads = [threading.Thread(target=worker) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    entries = list((tmp_path / "synthetic").iterdir())
    assert len(entries) == 40 and all(sorted(p.name for p in e.iterdir()) == ["key.json"] for e in entries)


def test_parallel_streams_write_the_same_bytes_as_one(tmp_path):
    """Three in-process streams, each with its own copy of a generator whose ``cls`` adapter
    switches LoRA weights per class, write the bytes one stream writes; torch's thread count is
    split among the streams and restored."""
    from fewgen.generators.datadream import DataDreamConfig, train_datadream
    from fewgen.generators.diffusion import pixel_sample_fn

    gen = tiny_generator()
    adapter = train_datadream(gen, toy_few_shot(), DataDreamConfig(mode="cls", rank=2, alpha=2.0, steps_per_class=2,
                                                                   batch_size=2))
    spec = SynthesisSpec(generator_key="tiny-test", class_names=adapter.class_names, prompts=adapter.class_names,
                         per_class=6, image_shape=(1, 8, 8), adapter_key=adapter.key, sampler="dpmsolver++", steps=3,
                         guidance=2.0, chunk=2)
    threads = torch.get_num_threads()
    one = SynthesisCache(tmp_path / "one").synthesize(spec, pixel_sample_fn(gen, spec, adapter))
    seen = []

    def stream():
        fn = pixel_sample_fn(gen, spec, adapter)
        return lambda c, s, i: (seen.append(torch.get_num_threads()), fn(c, s, i))[1]

    three = SynthesisCache(tmp_path / "three").synthesize(spec, [stream() for _ in range(3)])
    assert torch.get_num_threads() == threads
    assert set(seen) == {max(1, threads // 3)} and len(seen) == 9
    assert set_files(tmp_path / "three") == set_files(tmp_path / "one")
    assert torch.equal(three.images, one.images) and torch.equal(three.labels, one.labels)
    assert len(set(one.labels.tolist())) == 3 and not torch.equal(one.images[:6], one.images[6:12])


def test_a_failing_stream_stops_the_others_and_raises(tmp_path):
    gen = tiny_generator()
    spec = spec_for(gen, per_class=8)
    calls = []
    fn = sample_fn_for(gen, spec)

    def bad(c, s, i):
        calls.append(c)
        raise FewgenError("stream broke")

    def good(c, s, i):
        calls.append(c)
        time.sleep(0.05)
        return fn(c, s, i)

    with pytest.raises(FewgenError, match="stream broke"):
        SynthesisCache(tmp_path).synthesize(spec, [good, bad])
    assert len(calls) < 12  # 3 classes x 4 chunks: the good stream stopped early
    sc = SynthesisCache(tmp_path)
    assert sc.status(spec)["valid"] == len(calls) - 1  # every finished chunk kept for the resume
    done = sc.synthesize(spec, fn)
    assert len(done) == 24


def test_sampling_streams_default_and_bad_value():
    from fewgen.generators.sampling import sampling_streams

    assert sampling_streams(None, "cpu") == min(8, torch.get_num_threads())
    assert sampling_streams(None, "cuda") == 1 and sampling_streams(3, "cpu") == 3
    with pytest.raises(FewgenError, match="synthesis.streams must be >= 1"):
        sampling_streams(0, "cpu")


def test_sdedit_spreads_strengths_evenly_over_each_shot():
    spec = SynthesisSpec(generator_key="g", class_names=["a"], prompts=["a"], per_class=12, image_shape=(1, 8, 8),
                         strengths=[0.25, 0.5, 0.75])
    starts = [spec.start(i, 2) for i in range(12)]
    assert {(j, s): starts.count((j, s)) for j, s in starts} == {(j, s): 2 for j in (0, 1) for s in (0.25, 0.5, 0.75)}
    assert SynthesisSpec(generator_key="g", class_names=["a"], prompts=["a"], per_class=2,
                         image_shape=(1, 8, 8)).start(3, 2) == (1, None)


def test_sdedit_starts_from_the_shots(tmp_path):
    """Strength 0 returns each class's shots unchanged; larger strengths move away from them; the
    set's key holds the shots, so other shots are another set."""
    from fewgen.generators.datadream import DataDreamConfig, train_datadream
    from fewgen.generators.diffusion import pixel_sample_fn

    gen = tiny_generator()
    few = toy_few_shot()
    adapter = train_datadream(gen, few, DataDreamConfig(mode="dset", rank=2, alpha=2.0, steps_per_class=2,
                                                        batch_size=2))
    sources = [few.images[ix] for ix in few.indices_by_class()]

    def make(strengths, shots_digest="shots-a"):
        return SynthesisSpec(generator_key="tiny-test", class_names=adapter.class_names, prompts=adapter.class_names,
                             per_class=4, image_shape=(1, 8, 8), adapter_key=adapter.key, sampler="ddim", steps=4,
                             guidance=2.0, chunk=4, strengths=strengths, sources=shots_digest)

    store = SynthesisCache(tmp_path)
    copies = store.synthesize(make([0.0]), pixel_sample_fn(gen, make([0.0]), adapter, sources))
    for c, shots in enumerate(sources):
        got = copies.images[copies.labels == c]
        assert torch.equal(got, shots[torch.arange(4) % len(shots)])  # image i starts from shot i mod K
    spec = make([0.5, 1.0])
    edited = store.synthesize(spec, pixel_sample_fn(gen, spec, adapter, sources))
    assert not torch.equal(edited.images, copies.images)
    first = (edited.images[edited.labels == 0][:1].float() - sources[0][:1].float()).abs().mean()
    assert 0 < first < 100  # strength 0.5: near its shot, not a copy
    assert store.key(make([0.5, 1.0], "shots-b")) != store.key(spec) != store.key(make([0.5]))
    with pytest.raises(FewgenError, match="needs the real shots"):
        SynthesisCache(tmp_path / "x").synthesize(spec, pixel_sample_fn(gen, spec, adapter, None))
