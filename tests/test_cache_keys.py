"""Cache keys are derived, not hand-written: every config field moves the key of every cached
artifact kind exactly when that kind's rule (fewgen.keys) says the artifact depends on it."""

from __future__ import annotations

import copy
import functools

import pytest

from fewgen.app.config import RunConfig
from fewgen.keys import NOT_IN_KEYS, RULES, RUN_ONLY, config_leaves, config_value, key_parts
from fewgen.utils import stable_hash

#: representative inputs per kind; kinds whose rules depend on an input get one case per variant
CASES = {
    "backbones": [{"base": "b", "val": "v"}],
    "pretrained-backbones": [{"model": "m"}],
    "features": [{"checkpoint": "c", "images": "i"}],
    "generators": [{"base": "b", "encoder": None}, {"base": "b", "encoder": "e"}],
    "adapters": [{"generator": "g", "few_shot": "f"}],
    "synthetic": [{"generator": "g", "adapter": "a", "class_names": ["x", "y"], "image_shape": [1, 8, 8],
                   "stable_diffusion": sd, "sources": "f"} for sd in (False, True)],
    "learners": [{"method": {"name": m, "kind": m, "weights": w}, "backbone": "k", "real": "r", "synthetic": "s",
                  "base": "b", "seed": 0}
                 for m, w in (("real-only", None), ("datadream", None),
                              ("diffalign", {"hallucination": 1.0}), ("diffalign", {"hallucination": 0.0}))],
    "gans": [{"images": "i", "channels": 1}],
    "gan-adapted": [{"source": "s", "shots": "h", "target": "t", "method": m, "seed": 0, "feature_net": "n",
                     "lpips": None} for m in ("tgan", "freezed", "cdc", "dcl", "dcl-cl1")],
    "dg-diffusion": [{"data": "d", "sources": ["a", "b"]}],
    "dg-result": [{"data": "d", "target": "t", "seed": 0, "method": "df", "generator": "g", "pretrained": None}],
}


@functools.lru_cache(maxsize=1)
def _vocabularies():
    from fewgen.app.runner import vocabularies

    return vocabularies()


def perturbed(cfg: RunConfig, path: str):
    """A copy of ``cfg`` with the field at ``path`` changed to another value it admits."""
    import dataclasses

    out = copy.deepcopy(cfg)
    *parents, name = path.split(".")
    obj = out
    for p in parents:
        obj = getattr(obj, p)
    value = getattr(obj, name)
    meta = next(f for f in dataclasses.fields(obj) if f.name == name).metadata
    choices = meta.get("choices")
    allowed = list(_vocabularies()[choices]) if isinstance(choices, str) else list(choices or [])
    if allowed and not isinstance(value, list):
        new = next(a for a in allowed if a != value)
    elif allowed:
        new = [*value, next(a for a in allowed if a not in value)] if len(value) < len(allowed) else value[:-1]
    elif isinstance(value, bool):
        new = not value
    elif isinstance(value, int):
        new = value + 1
    elif isinstance(value, float):
        new = value + 0.25 if value + 0.25 <= (meta.get("max") or float("inf")) else value / 2
    elif isinstance(value, str):
        new = value + " x" if "{}" not in value else value.replace("{}", "a {}")
    elif value is None:
        new = 3
    elif isinstance(value, list):
        new = [*value, value[-1] if value else 1]
    elif isinstance(value, dict):
        new = {**value, "extra": 1}
    else:  # pragma: no cover
        raise AssertionError(f"no perturbation for {path}={value!r}")
    setattr(obj, name, new)
    return out


FIELDS = [path for path, _ in config_leaves(RunConfig())]


@pytest.mark.parametrize("kind", sorted(CASES))
def test_every_field_moves_the_key_exactly_when_declared(kind):
    rule = RULES[kind]
    for cfg in (RunConfig(), _ier_config(), _exemplar_config()):
        for inputs in CASES[kind]:
            base = stable_hash(key_parts(kind, cfg, **inputs))
            depends = rule.fields(cfg, inputs)
            ignored = rule.ignored(cfg, inputs)
            for path in FIELDS:
                other = perturbed(cfg, path)
                moved = stable_hash(key_parts(kind, other, **inputs)) != base
                if path in depends:
                    assert moved, f"{kind}: {path} is declared a dependency but does not change the key"
                elif set(rule.fields(other, inputs)) == set(depends):  # not a switch of what counts
                    assert not moved, f"{kind}: {path} changes the key but the rule does not declare it"
                under = any(path == c or path.startswith(c + ".") for c in rule.config)
                if under and path not in depends:
                    reason = next(v for k, v in ignored.items() if path == k or path.startswith(k + "."))
                    assert reason.strip(), f"{kind}: {path} is ignored without a reason"


def _exemplar_config() -> RunConfig:
    cfg = RunConfig()
    cfg.generator.kind = "exemplar"
    return cfg


def _ier_config() -> RunConfig:
    cfg = RunConfig()
    cfg.pretrain.recipe = "ier"
    return cfg


def test_every_input_moves_the_key():
    cfg = RunConfig()
    cfg.synthesis.sdedit_strengths = [0.5]  # the shots SDEdit starts from count only with SDEdit on
    for kind, cases in CASES.items():
        for inputs in cases:
            base = stable_hash(key_parts(kind, cfg, **inputs))
            for name, value in inputs.items():
                if name in ("method", "stable_diffusion"):  # variants covered by the cases themselves
                    continue
                if isinstance(value, list):
                    new = [*value, value[-1]]
                elif isinstance(value, int):
                    new = value + 1
                else:
                    new = f"{value}-other"
                changed = dict(inputs, **{name: new})
                assert stable_hash(key_parts(kind, cfg, **changed)) != base, f"{kind}: input {name}"


def test_every_config_field_is_accounted_for():
    """A field is in some kind's rule, or declared as entering no key (with the reason)."""
    declared = {**RUN_ONLY, **NOT_IN_KEYS}
    for path in FIELDS:
        in_rule = any(any(path == c or path.startswith(c + ".") for c in r.config) for r in RULES.values())
        in_declared = any(path == d or path.startswith(d + ".") for d in declared)
        assert in_rule or in_declared, f"{path} is in no cache rule and not declared as entering none"


def test_keys_need_exactly_their_inputs():
    with pytest.raises(TypeError, match="takes inputs"):
        key_parts("backbones", RunConfig(), base="b")
    with pytest.raises(TypeError, match="takes inputs"):
        key_parts("features", None, checkpoint="c", images="i", extra="e")


def test_config_value_reads_dotted_paths():
    cfg = RunConfig()
    assert config_value(cfg, "pretrain.ier.temperature") == cfg.pretrain.ier.temperature
