"""The shape of the code: no import cycle in src/, the library never imports the app, and every
registered learner method trains (the registry, not a hand-written list, says which exist)."""

from __future__ import annotations

import ast
import dataclasses
import math
from pathlib import Path

import pytest
import torch

SRC = Path(__file__).resolve().parents[1] / "src"


def import_graph() -> dict[str, set[str]]:
    """Module -> the fewgen modules it imports: at module level, inside functions and under ``if
    TYPE_CHECKING:`` (a cycle there is a cycle in the design, even if it never runs)."""
    mods = {}
    for p in SRC.rglob("*.py"):
        name = ".".join(p.relative_to(SRC).with_suffix("").parts)
        mods[name.removesuffix(".__init__")] = p
    graph: dict[str, set[str]] = {}
    for m, p in mods.items():
        tree = ast.parse(p.read_text())
        deps = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("fewgen"):
                for a in node.names:
                    sub = f"{node.module}.{a.name}"
                    deps.add(sub if sub in mods else node.module)
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name.startswith("fewgen"))
        graph[m] = {d for d in deps if d in mods and d != m}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_in_src():
    assert cycles(import_graph()) == []


def test_library_never_imports_the_app():
    graph = import_graph()
    assert "fewgen.app.runner" in graph
    bad = sorted((m, d) for m, deps in graph.items() if not m.startswith("fewgen.app")
                 for d in deps if d.startswith("fewgen.app"))
    assert bad == []


def test_every_registered_learner_method_makes_rows_and_a_finite_loss():
    from fewgen.app.config import LearnerConfig
    from fewgen.backbones import create_backbone
    from fewgen.data import load_dataset
    from fewgen.data.fewshot import few_shot_set
    from fewgen.learners import LEARNER_METHODS, Sources, method_specs
    from fewgen.learners.finetune import BackboneClassifier

    digits = load_dataset("digits")
    names = LEARNER_METHODS.names()
    assert {"real-only", "synthetic-only", "datadream", "diffalign"} <= set(names)
    real = few_shot_set(digits.novel, 2, seed=0)
    syn = few_shot_set(digits.novel, 4, seed=1)
    n_way = len(digits.novel.class_names)
    base = digits.base.images[:24]
    src = Sources(real, syn, base, lambda: torch.full((len(base), n_way), 1.0 / n_way), 8, ("test",))
    for name in names:
        specs = method_specs(LearnerConfig(methods=[name]))
        assert specs and all(s.kind == name for s in specs), name
        for spec in specs:
            batch_fn, loss_fn = spec.method.objective(spec, LearnerConfig(methods=[name]), src)
            batch = batch_fn(0)
            assert all(v.dtype == torch.uint8 for k, v in batch.items() if k.startswith("x_")), name
            model = BackboneClassifier(create_backbone("conv4", in_chans=1, hidden=8, out_channels=8), n_way)
            fbatch = {k: (v.float() / 255 if k.startswith("x_") else v) for k, v in batch.items()}
            terms = loss_fn(model, fbatch)
            loss = sum(terms.values())
            assert terms and math.isfinite(loss.item()), (name, spec.name)
            loss.backward()
            assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters()), (name, spec.name)


@pytest.mark.parametrize("section", ["learner", "gan", "domainfusion"])
def test_method_options_are_config_keys_beside_their_methods(section):
    """Each family's options dataclasses are inherited by its config section, so every option
    a method defines is a config key with the method's default."""
    import dataclasses

    from fewgen.app.config import DomainFusionConfig, GANConfig, LearnerConfig

    cls = {"learner": LearnerConfig, "gan": GANConfig, "domainfusion": DomainFusionConfig}[section]
    bases = [b for b in cls.__mro__[1:] if dataclasses.is_dataclass(b)]
    assert bases, f"{section} inherits no method options"
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for base in bases:
        for f in dataclasses.fields(base):
            assert f.name in fields and fields[f.name].default == f.default, (section, base.__name__, f.name)


def test_every_generator_kind_is_registered_with_a_class_that_has_its_constructors():
    pytest.importorskip("diffusers")
    from fewgen.app.config import GeneratorConfig
    from fewgen.generators.registry import GENERATORS

    assert set(GENERATORS.names()) >= {"diffusion", "exemplar", "stable-diffusion"}
    assert GeneratorConfig().kind in GENERATORS
    for name in GENERATORS.names():
        kind = GENERATORS.get(name)
        cls = kind.generator_class()
        assert cls.kind == name, name  # one vocabulary: the class's kind is the config's
        for method in ("from_options", "state_key", "adapt", "synthesis_sample_fn"):
            assert callable(getattr(cls, method, None)), (name, method)
        if not kind.pretrained:  # trained on the base classes here: fit, save, and load back from the cache
            for method in ("fit", "save", "load_trained"):
                assert callable(getattr(cls, method, None)), (name, method)
        # its options are its own section of the generator config, a dataclass declared beside it
        section = kind.section(GeneratorConfig())
        assert dataclasses.is_dataclass(section) and section.__module__ == cls.__module__, name
        assert callable(getattr(section, "fit_arguments", None)) or kind.pretrained, name


def test_a_generator_reads_its_own_section_only_and_a_flat_key_names_the_sections():
    """No flat generator options: each kind's key holds generator.kind and its section, and an old
    flat key (generator.train_steps) is refused with the sections that hold it."""
    from fewgen.app.config import load_config
    from fewgen.errors import FewgenError
    from fewgen.generators.registry import GENERATORS
    from fewgen.keys import key_parts

    for name in ("diffusion", "exemplar"):
        kind = GENERATORS.get(name)
        cfg = load_config(None, [f"generator.kind={name}"])
        paths = key_parts("generators", cfg, base="b", encoder="e")["config"]
        assert paths and all(p == "generator.kind" or p.startswith(f"generator.{kind.options}.") for p in paths)
        other = "exemplar" if name == "diffusion" else "diffusion"
        moved = load_config(None, [f"generator.kind={name}", f"generator.{other}.train_steps=7"])
        assert key_parts("generators", moved, base="b", encoder="e") == key_parts("generators", cfg, base="b",
                                                                                  encoder="e")
    with pytest.raises(FewgenError, match="generator.diffusion.train_steps, generator.exemplar.train_steps"):
        load_config(None, ["generator.train_steps=7"])
    with pytest.raises(FewgenError, match="generator.exemplar.cond"):
        load_config(None, ["generator.exemplar_cond=both"])


def test_a_step_that_leaves_what_it_declares_empty_is_reported():
    from types import SimpleNamespace

    from fewgen.app.runner import RunState, check_made, import_steps

    import_steps()
    with pytest.raises(RuntimeError, match="step 'pretrain' declares that it makes backbone but left it empty"):
        check_made(SimpleNamespace(state=RunState()), "pretrain")
    check_made(SimpleNamespace(state=RunState(backbone=object())), "pretrain")
