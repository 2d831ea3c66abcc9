"""The sample functions the synthesis store calls (``sample_fn(class, seeds, image indices)``), one
per pixel generator kind, and how many in-process streams sample in parallel."""

from __future__ import annotations

import torch

from fewgen.errors import FewgenError


def pixel_sample_fn(gen, spec, adapter=None, sources: list[torch.Tensor] | None = None):
    """sample_fn(class index, seeds, image indices) for the synthesis cache: the adapted generator
    (class tokens + LoRA) or the base one from class names (zero-shot); from pure noise, or SDEdit
    from ``sources[c]`` (class c's shots, uint8 (K, C, H, W)) when ``spec.strengths`` is set."""
    from fewgen.generators.datadream import AdaptedDiffusion
    from fewgen.synthesis.store import sdedit_or_sample

    if adapter is not None:
        adapted = AdaptedDiffusion(gen, adapter)
        model, labels, use_class = adapted.gen, adapted.labels, True
    else:
        import copy

        if not gen.conditioner.use_name:
            raise FewgenError("zero-shot synthesis needs a name-conditioned generator (generator.cond_mode=name or "
                              "class+name); or adapt it first (put 'adapt' before 'synthesize')")
        adapted = None
        model = copy.deepcopy(gen)
        labels, use_class = model.add_classes(spec.class_names), False
    kw = {"steps": spec.steps, "guidance": spec.guidance, "sampler": spec.sampler, "batch_size": spec.chunk,
          "precision": spec.precision, "use_class": use_class}

    def fn(c, seeds, indices):
        if adapted is not None:
            adapted.use(c)
        return sdedit_or_sample(
            spec, None if sources is None else sources[c], seeds, indices,
            sample=lambda s: model.sample([labels[c]] * len(s), seeds=list(s), **kw),
            img2img=lambda x, strength, s: model.img2img(x, [labels[c]] * len(x), strength=strength, seeds=list(s),
                                                          **kw))
    return fn


def exemplar_sample_fn(gen, spec, adapter=None, sources: list[torch.Tensor] | None = None):
    """sample_fn(class index, seeds, image indices) of an exemplar generator: image i of class c is
    conditioned on its shot ``sources[c][i mod K]`` (or, ``exemplar_condition=mean``, on the mean
    feature of the class's shots) and starts from pure noise or, with ``spec.strengths``, from
    that shot noised to its strength (SDEdit)."""
    from fewgen.generators.exemplar import AdaptedExemplar

    if sources is None:
        raise FewgenError("the exemplar generator draws from the shots: give each class's shots")
    import copy

    model = copy.deepcopy(gen) if adapter is None else AdaptedExemplar(gen, adapter)  # one copy per stream
    mean = spec.extra.get("exemplar_condition") == "mean"

    def fn(c, seeds, indices):
        if adapter is not None:
            model.use(c)
        shots = sources[c]
        starts = [spec.start(i, len(shots)) for i in indices]
        exemplars = shots[torch.tensor([j for j, _ in starts])]
        feats = None
        if mean and gen.cfg.uses_features:
            from fewgen.generators.diffusion import to_model_space

            feats = model.gen.encode(to_model_space(shots)) if adapter is not None else model.encode(to_model_space(shots))
            feats = feats.mean(0, keepdim=True).expand(len(seeds), -1)
        return model.sdedit(exemplars, [1.0 if s is None else s for _, s in starts], list(seeds), steps=spec.steps,
                            guidance=spec.guidance, sampler=spec.sampler, precision=spec.precision,
                            batch_size=spec.chunk, feats=feats)
    return fn


def sampling_streams(streams: int | None, device) -> int:
    """Parallel sampling streams for the pixel generator: ``streams`` if given, else one per torch
    CPU thread (at most 8) on CPU and 1 on GPU."""
    if streams is not None:
        if streams < 1:
            raise FewgenError(f"synthesis.streams must be >= 1, got {streams}")
        return streams
    return 1 if torch.device(device).type != "cpu" else max(1, min(8, torch.get_num_threads()))
