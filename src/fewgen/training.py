"""The training core every loop in fewgen shares: the learning-rate schedule (linear warmup, then
cosine decay to 0) and the optimiser step (backward, gradient clipping, step).

Pretraining (``pretrain/loop.py``), fine-tuning (``learners/finetune.py``), DG training
(``dg/protocol.py``) and the generators' training (pixel diffusion, the exemplar generator,
DataDream LoRA, Stable Diffusion LoRA) all use these, so a schedule means the same thing
everywhere; and :class:`TrainingMonitor`, every loop's progress bar, time estimate and
TensorBoard scalars.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable

import torch


def cosine_factor(progress: float) -> float:
    """LR multiplier at ``progress`` (fraction of training done, clipped to [0, 1]): 1 -> 0 along a
    half cosine."""
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def cosine_with_warmup(warmup: int, total: int) -> Callable[[int], float]:
    """LR multiplier per step for ``torch.optim.lr_scheduler.LambdaLR``: linear warmup over
    ``warmup`` steps, then cosine decay to 0 at ``total``."""
    def fn(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        return cosine_factor((step - warmup) / max(1, total - warmup))
    return fn


def cosine_schedule(opt: torch.optim.Optimizer, total: int, warmup: int = 0) -> torch.optim.lr_scheduler.LambdaLR:
    """The ``LambdaLR`` of :func:`cosine_with_warmup` on ``opt``."""
    return torch.optim.lr_scheduler.LambdaLR(opt, cosine_with_warmup(warmup, total))


def optimizer_step(loss: torch.Tensor, opt: torch.optim.Optimizer, sched=None, params=None,
                   max_norm: float | None = None, scaler=None) -> None:
    """One optimiser step on ``loss``: zero the gradients, backward (scaled by ``scaler``, a
    ``GradScaler``, when given), clip the gradient norm of ``params`` to ``max_norm`` (None: no
    clipping), step the optimiser, then the schedule (None: none)."""
    opt.zero_grad(set_to_none=True)
    if scaler is None:
        loss.backward()
        if max_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, max_norm)
        opt.step()
    else:
        scaler.scale(loss).backward()
        if max_norm is not None:
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(params, max_norm)
        scaler.step(opt)
        scaler.update()
    if sched is not None:
        sched.step()


def run_steps(step_loss: Callable[[int], torch.Tensor | dict[str, torch.Tensor]], opt: torch.optim.Optimizer,
              sched, total: int, *, start: int = 0, params=None, max_norm: float | None = None, scaler=None,
              monitor: TrainingMonitor | None = None, after_step: Callable[[int, dict[str, float]], None] | None = None,
              name: str = "training", hint: str = "lower the learning rate") -> list[float]:
    """The training core every step-based loop runs: for each step from ``start`` to ``total``,
    ``step_loss(step)`` (a loss, or named loss terms that are summed), one optimiser step
    (:func:`optimizer_step`: clipping to ``max_norm``, loss scaling with ``scaler``, the schedule),
    the values (``loss``, ``loss/<term>``, the last parameter group's ``lr``) to ``monitor`` (a bar
    with the ETA, the time estimate, TensorBoard), then ``after_step(step, values)``: the loop's own
    history, periodic log lines and checkpoints. A loss that is not finite stops the loop with one
    line naming the step and ``hint``. Returns the losses of the steps run.

    Each loop draws its step's batch and noise from generators seeded by the step, so a loop resumed
    at ``start`` from its checkpoint computes what an uninterrupted one does."""
    losses = []
    for step in range(start, total):
        out = step_loss(step)
        terms = out if isinstance(out, dict) else None
        loss = sum(terms.values()) if terms is not None else out
        value = loss.item()
        if not math.isfinite(value):
            from fewgen.errors import FewgenError

            raise FewgenError(f"{name}: loss became {value} at step {step}; {hint}")
        optimizer_step(loss, opt, sched, params, max_norm, scaler)
        values = {"loss": value}
        if terms is not None:
            values.update({f"loss/{k}": float(v.detach()) for k, v in terms.items()})
        losses.append(value)
        if monitor is not None:
            monitor.step({**values, "lr": opt.param_groups[-1]["lr"]})
        if after_step is not None:
            after_step(step, values)
    return losses


def periodic(log: Callable[[str], None] | None, log_every: int, label: str, total: int, t0: float,
             state_path=None, modules: dict | None = None, opt=None, sched=None,
             save_every: int = 0) -> Callable[[int, dict[str, float]], None]:
    """An ``after_step`` for :func:`run_steps`: every ``log_every`` steps a line ``<label> step s/total
    loss=<mean of those steps> (<seconds>s)``; every ``save_every`` steps and at the last, the
    resumable training state (``modules``, ``opt``, ``sched`` and the step) in ``state_path``."""
    recent: list[float] = []

    def after(step: int, values: dict[str, float]) -> None:
        done = step + 1
        recent.append(values["loss"])
        if log and log_every and done % log_every == 0:
            log(f"{label} step {done}/{total} loss={sum(recent[-log_every:]) / len(recent[-log_every:]):.4f} "
                f"({time.time() - t0:.0f}s)")
        if state_path is not None and save_every and (done % save_every == 0 or done == total):
            from fewgen.checkpoint import save_training_state

            save_training_state(state_path, modules, opt, sched, extra={"step": done})

    return after


#: what a training loop's ``precision`` may be: exact float32, or autocast to a half type
TRAINING_PRECISIONS = ("float32", "bfloat16", "float16")


def mixed_precision(device: torch.device, precision: str):
    """``(autocast, scaler)`` for a training loop on ``device`` in ``precision``: ``autocast()`` makes
    the context of the forward pass and loss (nothing for float32, so float32 computes exactly what
    it did without it), ``scaler`` a ``torch.amp.GradScaler`` for float16 (whose small gradients
    underflow without loss scaling) or None. float16 needs CUDA; bfloat16 runs on CPU and GPU."""
    import contextlib

    from fewgen.errors import FewgenError

    if precision not in TRAINING_PRECISIONS:
        raise FewgenError(f"unknown precision {precision!r}; choose one of {', '.join(TRAINING_PRECISIONS)}")
    if precision == "float32":
        return contextlib.nullcontext, None
    if precision == "float16" and device.type != "cuda":
        raise FewgenError(f"precision float16 needs a CUDA device (this loop runs on {device}); use bfloat16 or float32")
    dtype = getattr(torch, precision)
    scaler = torch.amp.GradScaler("cuda") if precision == "float16" else None
    return (lambda: torch.autocast(device.type, dtype=dtype)), scaler


def format_duration(seconds: float) -> str:
    """``45 s``, ``12 min``, ``2.3 h``: a duration as a person reads an estimate."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def format_rate(per_second: float, unit: str = "step") -> str:
    """``4.1 steps/s``, or ``2.5 s/step`` below one per second."""
    if per_second >= 1:
        return f"{per_second:.1f} {unit}s/s"
    return f"{1 / max(per_second, 1e-9):.1f} s/{unit}"


class TrainingMonitor:
    """Feedback on one training loop, written once for every loop: a tqdm bar with its ETA
    (``progress``), one log line estimating the loop's time from the rate of its first units
    (``log``), and scalars as TensorBoard events in ``log_dir`` (``torch.utils.tensorboard``).

    It only reads the numbers it is given, so a loop computes the same with or without it::

        with TrainingMonitor("generator", total=steps, start=start, log=log, progress=True,
                             log_dir=run_dir / "tensorboard" / "generator") as monitor:
            for step in range(start, steps):
                loss = ...
                monitor.step({"loss": loss, "lr": opt.param_groups[0]["lr"]})

    The estimate, ``generator: 3000 steps, ~12 min at the measured 4.1 steps/s``, is logged once,
    after ``warmup`` units (left out of the rate: CUDA initialisation, autotuning and compilation
    happen there) and then ``estimate_after`` more, when the whole loop would take at least
    ``estimate_min_s`` seconds; a short loop logs nothing.
    """

    def __init__(self, name: str, total: int, *, start: int = 0, log: Callable[[str], None] | None = None,
                 progress: bool = False, log_dir: str | os.PathLike | None = None, unit: str = "step",
                 warmup: int = 1, estimate_after: int = 5, estimate_min_s: float = 30.0):
        self.name, self.total, self.unit = name, int(total), unit
        self.done = int(start)
        self.start = int(start)
        self.log = log
        self.warmup, self.estimate_after, self.estimate_min_s = warmup, estimate_after, estimate_min_s
        self._ref: tuple[int, float] | None = (self.done, time.perf_counter()) if warmup <= 0 else None
        self._estimated = False
        self.bar = None
        if progress and self.done < self.total:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=self.total, initial=self.done, desc=name, unit=unit, leave=False,
                            dynamic_ncols=True)
        self.writer = None
        if log_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:  # tensorboard is a core dependency; a broken install says so here
                from fewgen.errors import FewgenError

                raise FewgenError(f"TensorBoard events need the tensorboard package ({e}); "
                                  "pip install 'tensorboard>=2.14'") from None
            self.writer = SummaryWriter(log_dir=str(log_dir), flush_secs=10)  # readable while the loop runs

    def step(self, scalars: dict[str, float] | None = None, n: int = 1, **postfix) -> None:
        """``n`` more units done; ``scalars`` (tag -> number) are written at the new count and shown
        on the bar with ``postfix``."""
        self.done += n
        if scalars:
            self.scalars(scalars, self.done)
        if self.bar is not None:
            if scalars or postfix:
                shown = {k.removeprefix("loss/"): f"{v:.4g}" for k, v in (scalars or {}).items() if k != "lr"}
                self.bar.set_postfix({**shown, **postfix}, refresh=False)
            self.bar.update(n)
        self._maybe_estimate()

    def scalars(self, values: dict[str, float], step: int) -> None:
        """Write ``values`` (tag -> number) as TensorBoard scalars at ``step`` (nothing without a log dir)."""
        if self.writer is not None:
            for tag, value in values.items():
                self.writer.add_scalar(tag, float(value), step)

    def _maybe_estimate(self) -> None:
        if self._estimated or self.log is None or self.done >= self.total:
            return
        now = time.perf_counter()
        if self._ref is None:  # the rate is measured from the end of the warmup units
            if self.done - self.start >= self.warmup:
                self._ref = (self.done, now)
            return
        measured = self.done - self._ref[0]
        if measured < self.estimate_after:
            return
        self._estimated = True
        rate = measured / max(now - self._ref[1], 1e-9)
        todo = self.total - self.start
        if todo / rate < self.estimate_min_s:
            return
        what = f"{todo} {self.unit}s" if self.start == 0 else f"{todo} of {self.total} {self.unit}s to go"
        self.log(f"{self.name}: {what}, ~{format_duration(todo / rate)} at the measured {format_rate(rate, self.unit)}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    def __enter__(self) -> TrainingMonitor:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
