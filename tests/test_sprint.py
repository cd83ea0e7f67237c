"""The CPU budget recipe (`sprint`) and what a budget spends its time on: Muon, progressive resizing, a plan that
pays for every evaluation asked for and none that was not, a warm-up measured in seconds, and the live record of
a run (metrics.jsonl, TensorBoard events). Every budget decision runs on a simulated clock (StepClock)."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from cifarkit.model.checkpoint import Checkpoint
from cifarkit.model.nets import AirbenchNet, SprintNet, multiply_adds
from cifarkit.train import TrainConfig, train
from cifarkit.train.budget import Budget, Pacer, Progress
from cifarkit.train.config import BUDGET_RECIPE
from cifarkit.train.muon import MuonSGD, orthogonalize
from cifarkit.train.recipes import RECIPES
from test_budget import StepClock


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    from conftest import write_batches_py

    return write_batches_py(tmp_path_factory.mktemp("sprint") / "cifar-10-batches-py", n_train=1000, n_test=200)


# ---------------------------------------------------------------------------------------------------------
# Muon
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(64, 576), (256, 2304), (300, 40)])
def test_orthogonalize_pushes_every_singular_value_towards_one(shape):
    torch.manual_seed(0)
    m, n = shape
    k = min(m, n)
    u, _ = torch.linalg.qr(torch.randn(m, k))
    v, _ = torch.linalg.qr(torch.randn(n, k))
    g = u @ torch.diag(torch.logspace(-2, 1, k)) @ v.T  # singular values over three decades
    s3 = torch.linalg.svdvals(orthogonalize(g, steps=3).float())
    s5 = torch.linalg.svdvals(orthogonalize(g, steps=5).float())
    assert s3.max() < 1.25 and s5.max() < 1.25  # never above ~1.2 (the quintic's overshoot)
    assert s5.min() > 0.15 and s5.median() > 0.7  # five steps lift even the 1e-3-relative values
    assert s3.min() > 1.5 * 1e-2 / torch.linalg.svdvals(g).norm()  # three lift every one of them
    assert (s5.max() / s5.min()) < (1e3 / 100)  # the spread shrinks from 1,000x to under 10x


def test_muon_keeps_each_filter_at_its_norm_and_sgd_decays_the_rest():
    torch.manual_seed(0)
    conv = torch.nn.Parameter(torch.randn(32, 16, 3, 3) * 5)
    bias = torch.nn.Parameter(torch.ones(32))
    opt = MuonSGD([
        {"params": [conv], "lr": 0.1, "muon": True, "momentum": 0.6},
        {"params": [bias], "lr": 0.1, "muon": False, "momentum": 0.0, "weight_decay": 0.5},
    ])  # fmt: skip
    conv.grad, bias.grad = torch.randn_like(conv), torch.zeros_like(bias)
    before = conv.detach().clone()
    opt.step()
    # renormalized to norm sqrt(32), then an update whose size lr * ~||semi-orthogonal|| does not depend on the
    # gradient's scale
    assert float((conv.detach() - before * (32**0.5 / before.norm())).norm()) == pytest.approx(0.1 * 32**0.5, rel=0.35)
    assert torch.allclose(bias, torch.full((32,), 1 - 0.1 * 0.5))  # plain SGD: lr * weight decay * p
    state = opt.state_dict()  # what a checkpoint holds: one optimizer, both rules
    again = MuonSGD([{"params": [conv], "muon": True}, {"params": [bias], "muon": False}])
    again.load_state_dict(state)
    assert again.param_groups[0]["momentum"] == 0.6 and "momentum_buffer" in again.state[conv]
    with pytest.raises(ValueError, match="not vectors"):
        MuonSGD([{"params": [bias], "muon": True}])


# ---------------------------------------------------------------------------------------------------------
# The net
# ---------------------------------------------------------------------------------------------------------


def test_sprint_net_takes_any_side_and_answers_like_airbench_at_32():
    torch.manual_seed(0)
    sprint = SprintNet(10).eval()
    airbench = AirbenchNet(10, scaling_factor=1 / 256).eval()
    airbench.load_state_dict(sprint.state_dict())
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(sprint(x), airbench(x), atol=1e-5)  # the global pool is airbench's 3x3 pool here
        for side in (9, 16, 24, 40):
            assert sprint(torch.randn(2, 3, side, side)).shape == (2, 10)
    assert multiply_adds(sprint, 32) == multiply_adds(airbench, 32)
    assert 0.45 < multiply_adds(sprint, 24) / multiply_adds(sprint, 32) < 0.65
    assert sprint.training is False  # counting moved no BatchNorm statistic and kept the mode


# ---------------------------------------------------------------------------------------------------------
# The plan: warm-up in seconds, evaluations paid for, cheaper low-resolution steps
# ---------------------------------------------------------------------------------------------------------


def test_a_slow_step_is_measured_after_a_few_steps_not_nine():
    # 2.6 s a step (the airbench net on a 2,000-image subset): the first fit comes at step 4, ~10 s in.
    pacer = Pacer(Budget(seconds=60.0, started=0.0, reserve=5.0), Progress(100))
    now, step = 3.0, 0
    while not pacer.fits:
        step += 1
        now += 2.6
        pacer.step_done(step, now)
    assert step == 4 and pacer.fits[0]["seconds_per_step"] == pytest.approx(2.6)
    assert pacer.progress.total_steps == 4 + int((60 - 5 - now) / 2.6)


def _fit_with_evals(eval_seconds: float, every: int) -> Pacer:
    pacer = Pacer(Budget(seconds=100.0, started=0.0, reserve=10.0), Progress(1000),
                  eval_seconds=eval_seconds, eval_every_steps=every)  # fmt: skip
    now = 0.0
    for step in range(1, 12):
        now += 0.5
        pacer.step_done(step, now)
    return pacer


def test_evaluations_asked_for_are_paid_for_in_the_plan():
    free = _fit_with_evals(0.0, 0).progress.total_steps
    paid = _fit_with_evals(5.0, 20)
    total = paid.progress.total_steps
    step = paid.fits[0]["step"]
    evals = (total - 1) // 20 - step // 20
    # the steps and the evaluations they bring fit in what is left, and one step more would not
    left = 100 - 10 - 0.5 * step
    assert (total - step) * 0.5 + evals * 5.0 <= left < (total + 1 - step) * 0.5 + ((total) // 20 - step // 20) * 5.0
    assert total < free


def test_evaluation_time_is_not_step_time():
    pacer = Pacer(Budget(seconds=1000.0, started=0.0, reserve=10.0), Progress(1000), refit_seconds=0.0,
                  eval_every_steps=10, eval_seconds=1.0)  # fmt: skip
    now = 0.0
    for step in range(1, 40):
        now += 0.5
        if step % 10 == 0:
            now += 7.0  # an evaluation
            pacer.evaluated(7.0)
        pacer.step_done(step, now)
    assert pacer.fits[-1]["seconds_per_step"] == pytest.approx(0.5)
    assert pacer.eval_seconds == 7.0  # what the plan now charges for each evaluation still due


def test_cheap_low_resolution_steps_are_planned_as_such():
    # Steps at progress < 0.5 cost 0.25 of a full one: measured at 0.1 s in the warm-up, the plan expects the
    # rest to average (0.5 * 0.25 + 0.5 * 1) / 0.25 times that.
    cost = lambda p: 0.25 if p < 0.5 else 1.0  # noqa: E731
    pacer = Pacer(Budget(seconds=100.0, started=0.0, reserve=0.0), Progress(10), step_cost=cost)
    now = 0.0
    for step in range(1, 30):
        now += 0.1
        pacer.step_done(step, now)
    fit = pacer.fits[0]
    assert fit["seconds_per_step"] == pytest.approx(0.1 / 0.25 * pacer.mean_cost(0.0), rel=1e-6)
    assert pacer.mean_cost(0.0) == pytest.approx(0.625, abs=0.01)
    assert fit["total_steps"] == fit["step"] + int((100 - 0.1 * fit["step"]) / fit["seconds_per_step"])


# ---------------------------------------------------------------------------------------------------------
# Whole runs
# ---------------------------------------------------------------------------------------------------------


def test_a_budget_on_a_cpu_trains_the_sprint_recipe_and_evaluates_only_at_the_end(small_data, tmp_path):
    cfg = TrainConfig(data=str(small_data), time_budget=40, budget_start=0.0, out=str(tmp_path / "run"),
                      device="cpu", batch_size=50)  # fmt: skip
    result = train(cfg, clock=StepClock(start=1.0, tick=0.25))
    summary = result.summary
    assert summary["recipe"] == BUDGET_RECIPE == "sprint" and summary["train_config"]["eval_every"] == 0
    evaluated = [a for a in summary["test_accuracy_per_epoch"] if a is not None]
    assert len(evaluated) == 1 and summary["epochs"] > 1  # only the final evaluation
    assert summary["total_seconds"] <= 40
    assert TrainConfig(recipe="blog", time_budget=40).resolved().eval_every == 0
    assert TrainConfig(recipe="blog").resolved().eval_every == 1
    assert TrainConfig(recipe="blog", time_budget=40, eval_every=2).resolved().eval_every == 2


def test_a_run_writes_its_metrics_as_it_goes(small_data, tmp_path):
    out = tmp_path / "run"
    cfg = TrainConfig(data=str(small_data), recipe="sprint", epochs=3, batch_size=100, out=str(out), device="cpu")
    cfg = replace(cfg, progress_every=2)
    result = train(cfg)
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in lines if r["kind"] == "step"]
    evals = [r for r in lines if r["kind"] == "eval"]
    assert [r["step"] for r in steps] == sorted(r["step"] for r in steps) and steps[-1]["step"] == 30
    assert all(math.isfinite(r["loss"]) and r["lr"] >= 0 and r["images_per_s"] > 0 for r in steps)
    assert [r["epoch"] for r in evals] == [1, 2, 3] and evals[-1]["final"] and not evals[0]["final"]
    assert evals[-1]["accuracy"] == pytest.approx(result.metrics.accuracy, abs=1e-6)
    assert steps[0]["lr_factor"] > steps[-1]["lr_factor"]  # the schedule decays to the end
    # TensorBoard's own reader finds the same curves in the run folder
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/learning_rate", "train/images_per_s", "test/accuracy", "test/loss"} <= tags
    assert [e.step for e in acc.Scalars("train/loss")] == [r["step"] for r in steps]
    # a resumed run appends; --overwrite starts again
    train(TrainConfig(resume=str(out / "checkpoint.pt"), data=str(small_data), epochs=4, device="cpu"))
    more = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert more[: len(lines)] == lines and more[-1]["kind"] == "eval" and more[-1]["epoch"] == 4
    train(replace(cfg, overwrite=True, epochs=1))
    fresh = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert fresh[-1]["epoch"] == 1 and len(fresh) < len(lines)
    assert len(list(Path(out).glob("events.out.tfevents.*"))) == 1


def test_progressive_resizing_trains_small_first_then_at_full_size(small_data, tmp_path):
    seen: list[int] = []
    recipe = replace(RECIPES["sprint"], progressive=((0.25, 16), (0.5, 20)))
    RECIPES["sprint-test"] = recipe = replace(recipe, name="sprint-test")
    try:
        cfg = TrainConfig(data=str(small_data), recipe="sprint-test", epochs=4, batch_size=250,
                          out=str(tmp_path / "run"), device="cpu", eval_every=0)  # fmt: skip
        original = SprintNet.forward

        def spy(self, x):
            if self.training:
                seen.append(x.shape[-1])
            return original(self, x)

        SprintNet.forward = spy
        try:
            result = train(cfg)
        finally:
            SprintNet.forward = original
    finally:
        del RECIPES["sprint-test"]
    assert seen == [16] * 4 + [20] * 4 + [32] * 8  # 16 steps: a quarter at 16 x 16, a quarter at 20 x 20
    assert Checkpoint.load(result.checkpoint).artifact.image_size == (32, 32)  # the model is a 32x32 model


@pytest.mark.parametrize("recipe", ["blog", "sprint"])
def test_a_run_never_imports_dynamo(small_data, tmp_path, recipe):
    # torch.optim's wrappers import torch._dynamo on first use (~1.3 s and ~150 MB): a fixed cost every run paid
    # for nothing, which the optimizers of cifarkit.train.optimizers leave out, checkpoint and resume included.
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from cifarkit.train import TrainConfig, train\n"
        f"cfg = TrainConfig(data={str(small_data)!r}, recipe={recipe!r}, epochs=1, out={str(tmp_path / 'run')!r}, "
        "device='cpu', batch_size=100)\n"
        "train(cfg)\n"
        f"train(TrainConfig(resume={str(tmp_path / 'run' / 'checkpoint.pt')!r}, data={str(small_data)!r}, epochs=2, "
        "device='cpu'))\n"
        "print('torch._dynamo' in sys.modules)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "False"
