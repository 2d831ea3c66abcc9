"""The training core every step-based loop runs (fewgen.training.run_steps)."""

from __future__ import annotations

import pytest
import torch

from fewgen.errors import FewgenError
from fewgen.training import cosine_schedule, run_steps


def _problem(seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Linear(4, 1)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    return model, opt, cosine_schedule(opt, 10, warmup=2)


def _step_loss(model):
    def step_loss(step: int) -> dict[str, torch.Tensor]:  # the step's batch from a generator seeded by the step
        g = torch.Generator().manual_seed(step)
        x, y = torch.randn(8, 4, generator=g), torch.randn(8, 1, generator=g)
        return {"mse": torch.nn.functional.mse_loss(model(x), y), "l2": 1e-2 * model.weight.pow(2).sum()}
    return step_loss


def test_terms_are_summed_and_reported_and_a_resumed_loop_equals_an_uninterrupted_one():
    model, opt, sched = _problem()
    seen = []
    losses = run_steps(_step_loss(model), opt, sched, 10, params=list(model.parameters()), max_norm=1.0,
                       after_step=lambda step, values: seen.append((step, values)))
    assert [s for s, _ in seen] == list(range(10)) and len(losses) == 10
    assert all(v["loss"] == pytest.approx(v["loss/mse"] + v["loss/l2"]) for _, v in seen)
    assert losses == [v["loss"] for _, v in seen]

    part, opt2, sched2 = _problem()
    first = run_steps(_step_loss(part), opt2, sched2, 4, params=list(part.parameters()), max_norm=1.0)
    state = {"model": part.state_dict(), "opt": opt2.state_dict(), "sched": sched2.state_dict()}
    again, opt3, sched3 = _problem(seed=1)  # other weights, all replaced by the saved state
    again.load_state_dict(state["model"])
    opt3.load_state_dict(state["opt"])
    sched3.load_state_dict(state["sched"])
    rest = run_steps(_step_loss(again), opt3, sched3, 10, start=4, params=list(again.parameters()), max_norm=1.0)
    assert first + rest == losses
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))


def test_a_loss_that_is_not_finite_stops_the_loop_with_one_line():
    model, opt, sched = _problem()
    before = [p.detach().clone() for p in model.parameters()]

    def step_loss(step: int) -> torch.Tensor:
        return model(torch.ones(1, 4)).sum() * (float("nan") if step == 2 else 1.0)

    with pytest.raises(FewgenError, match=r"^toy: loss became nan at step 2; lower toy\.lr$"):
        run_steps(step_loss, opt, sched, 5, name="toy", hint="lower toy.lr")
    # steps 0 and 1 ran, step 2 did not reach the optimiser
    assert sched.last_epoch == 2 and not all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
