"""Training in a time budget: durations, the progress map, the pacer, and whole budgeted runs on a simulated
clock (StepClock: a step takes a fixed time), so that no assertion depends on how fast this machine is."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from cifarkit.errors import CifarkitError
from cifarkit.model.checkpoint import Checkpoint
from cifarkit.spec import TTA_MODES
from cifarkit.stage import Silent
from cifarkit.train import TrainConfig, train
from cifarkit.train.budget import (
    FINAL_EVAL_SHARE,
    TTA_PASSES,
    Budget,
    Pacer,
    Progress,
    final_evaluation,
    parse_duration,
)
from cifarkit.train.recipes import RECIPES

BIN = Path(sys.executable).parent


@pytest.mark.parametrize(
    ("text", "seconds"), [("90s", 90), ("6m", 360), ("1h", 3600), ("1h30m", 5400), ("2.5m", 150), ("45", 45)]
)
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["0", "-5", "0s", "abc", "6x", "6m junk", "nan", "inf", "1e9"])
def test_bad_durations_name_the_option(text):
    with pytest.raises(CifarkitError, match="--time-budget"):
        parse_duration(text)


def test_progress_is_refitted_without_a_jump():
    p = Progress(100)
    assert [p.at(s) for s in (0, 50, 100)] == [0.0, 0.5, 1.0]
    p.refit(50, 250)  # slower than planned: the other half of the schedule over 200 steps
    assert p.at(50) == 0.5 and p.at(150) == pytest.approx(0.75) and p.at(250) == 1.0
    assert p.at(49) == pytest.approx(0.49)  # the past is unchanged
    p.refit(150, 160)  # faster again
    assert p.at(150) == pytest.approx(0.75) and p.at(155) == pytest.approx(0.875) and p.at(160) == 1.0
    assert all(a <= b for a, b in zip([p.at(s) for s in range(161)], [p.at(s) for s in range(1, 162)], strict=True))


def test_pacer_fits_the_steps_to_the_clock_and_refits_on_drift():
    budget = Budget(seconds=100.0, started=0.0, reserve=10.0)
    progress = Progress(1000)
    pacer = Pacer(budget, progress, warmup_steps=5, warmup_seconds=1.0, refit_seconds=5.0)
    now, step = 2.0, 0
    while step < 30:  # 0.5 s a step
        step += 1
        now += 0.5
        pacer.step_done(step, now)
    first = pacer.fits[0]
    # (100 - 10 - now) / 0.5 steps still fit at the moment of the first fit
    assert first["seconds_per_step"] == pytest.approx(0.5)
    assert first["total_steps"] == first["step"] + int((90 - (2.0 + 0.5 * first["step"])) / 0.5)
    while step < 100:  # the machine gets twice as slow
        step += 1
        now += 1.0
        pacer.step_done(step, now)
    assert len(pacer.fits) > 1 and progress.total_steps < first["total_steps"]
    assert progress.at(progress.total_steps) == 1.0


def test_pacer_says_when_the_budget_is_too_short():
    pacer = Pacer(Budget(seconds=10.0, started=0.0, reserve=5.0), Progress(100), warmup_steps=2, warmup_seconds=0.5)
    with pytest.raises(CifarkitError, match=r"--time-budget 10s is too short here"):
        for step in range(1, 20):
            pacer.step_done(step, 3.0 + step * 0.5)


@pytest.fixture
def small_data(tmp_path_factory):
    from conftest import write_batches_py

    return write_batches_py(tmp_path_factory.mktemp("budget") / "cifar-10-batches-py", n_train=1000, n_test=200)


class StepClock:
    """A clock that advances `tick` seconds at every reading. The pacer reads it once per optimizer step, so a
    step "takes" `tick` seconds on any machine: what a budget decides does not depend on the machine's speed."""

    def __init__(self, start: float, tick: float) -> None:
        self.now, self.tick = start, tick

    def __call__(self) -> float:
        self.now += self.tick
        return self.now


@pytest.mark.parametrize(("recipe", "batch_size", "tick"), [("blog", None, 0.05), ("airbench", 128, 1.0)])
def test_a_budgeted_run_fits_its_schedule_to_the_clock_and_runs_it_to_its_end(
    small_data, tmp_path, recipe, batch_size, tick
):
    """Both recipes under a 60 s budget on a simulated clock (a step takes `tick` s): the plan ends within the
    budget counted from the process's start, the schedule runs to its end, and the run records what it did."""
    clock = StepClock(start=2.0, tick=tick)  # 2 s of start-up before train() is called
    cfg = TrainConfig(data=str(small_data), recipe=recipe, batch_size=batch_size, time_budget=60, budget_start=0.0,
                      out=str(tmp_path / recipe), device="cpu")  # fmt: skip
    result = train(cfg, clock=clock)
    summary = result.summary
    fitted = summary["time_budget"]
    assert summary["steps"] == fitted["final_planned_steps"] and fitted["planned_steps"] > 0
    assert summary["total_seconds"] <= 60  # on the run's own clock, the whole process
    assert summary["total_seconds"] >= 60 * 0.75, f"used only {summary['total_seconds']:.1f} s of its budget"
    state = Checkpoint.load(result.checkpoint)
    plan = Progress(state.plan["total_steps"], [tuple(k) for k in state.plan["knots"]])
    assert plan.at(state.step) == 1.0  # the schedule ran to its end
    schedule = RECIPES[recipe].schedule
    if schedule is not None:  # the learning rate at the end is the schedule's final value
        end = float(np.interp(plan.at(state.step), [0, schedule[1], 1], [schedule[0], 1, schedule[2]]))
        assert end == pytest.approx(schedule[2])
        last = float(np.interp(plan.at(state.step - 1), [0, schedule[1], 1], [schedule[0], 1, schedule[2]]))
        assert abs(last - schedule[2]) < 0.1  # the last step taken was at the tail, not cut off mid-way
    assert {"start_up", "data", "build", "epochs", "final_evaluation", "report"} <= set(summary["phases"])
    # The final evaluation's TTA is what the budget chose, and the checkpoint (so the export) carries it.
    assert fitted["final_tta"] in TTA_MODES and summary["tta"] == fitted["final_tta"]
    assert state.artifact.tta == fitted["final_tta"]


def test_a_slower_clock_plans_fewer_steps(small_data, tmp_path):
    """The same budget on a clock twice as slow (a machine half as fast): about half the steps, same shape."""
    steps = []
    for tick in (0.05, 0.1):
        cfg = TrainConfig(data=str(small_data), recipe="blog", time_budget=30, budget_start=0.0,
                          out=str(tmp_path / str(tick)), device="cpu", eval_every=0)  # fmt: skip
        steps.append(train(cfg, clock=StepClock(start=1.0, tick=tick)).summary["steps"])
    assert 0.4 < steps[1] / steps[0] < 0.6, steps


def test_the_final_tta_fits_its_share_of_the_budget():
    assert tuple(TTA_PASSES) == TTA_MODES  # every mode has a cost, cheapest first
    budget = 360.0
    allowed = FINAL_EVAL_SHARE * budget  # 36 s

    def final_tta(recipe_tta: str, one_pass: float, budget: float) -> str:  # fp32 alone
        return final_evaluation(recipe_tta, {"fp32": one_pass}, budget)[0]

    assert final_tta("hflip_translate", allowed / 6, budget) == "hflip_translate"  # 6 passes fit exactly
    assert final_tta("hflip_translate", allowed / 6 * 1.01, budget) == "hflip"
    assert final_tta("hflip_translate", allowed / 2 * 1.01, budget) == "none"
    assert final_tta("hflip", allowed / 2, budget) == "hflip"  # never richer than the recipe's
    assert final_tta("none", 0.001, budget) == "none"
    assert final_tta("hflip_translate", allowed * 5, budget) == "none"  # even one pass over: none, never fail
    # With a faster precision too: the richest TTA first, in fp32 if it fits there, else in bf16; none in the faster
    fast = {"fp32": allowed / 4, "bf16": allowed / 6}
    assert final_evaluation("hflip_translate", fast, budget) == ("hflip_translate", "bf16")
    assert final_evaluation("hflip", fast, budget) == ("hflip", "fp32")
    assert final_evaluation("hflip_translate", {"fp32": allowed * 5, "bf16": allowed * 2}, budget) == ("none", "bf16")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--time-budget", "0"], "--time-budget must be a positive duration"),
        (["--time-budget", "-3m"], "--time-budget"),
        (["--time-budget", "soon"], "--time-budget: cannot read 'soon' as a duration"),
        (["--time-budget", "60s", "--epochs", "2"], "--epochs and --time-budget exclude each other"),
    ],
)
def test_bad_budgets_are_one_line_and_no_run_folder(small_data, tmp_path, args, message):
    out = tmp_path / "run"
    proc = subprocess.run(
        [str(c) for c in (BIN / "cifar-train", "--data", small_data, "--out", out, *args)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0]
    assert not out.exists()


def test_a_budget_shorter_than_the_warm_up_needs(small_data, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(CifarkitError, match="--time-budget 30s is too short here"):
        # 24 of the 30 seconds are gone before the call, a step takes 1 s: the end alone needs more than is left
        train(TrainConfig(data=str(small_data), recipe="airbench", batch_size=128, out=str(out), device="cpu",
                          time_budget=30, budget_start=0.0), clock=StepClock(start=24.0, tick=1.0))  # fmt: skip
    assert not out.exists()


def test_a_spent_budget_is_one_line(small_data, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(CifarkitError, match="--time-budget 30s is already spent"):
        train(TrainConfig(data=str(small_data), out=str(out), device="cpu", time_budget=30, budget_start=0.0),
              clock=StepClock(start=31.0, tick=0.1))  # fmt: skip
    assert not out.exists()


class _StopAfter(Silent):
    def __init__(self, epochs: int) -> None:
        self.epochs = epochs

    def phase(self, name, total=None):
        if name.startswith(f"epoch {self.epochs + 1}/"):
            raise KeyboardInterrupt


def test_a_budgeted_run_resumes_to_the_end_of_its_own_plan(small_data, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        cfg = TrainConfig(data=str(small_data), recipe="blog", out=str(out), device="cpu", time_budget=20,
                          budget_start=0.0)  # fmt: skip
        # A step takes 0.02 s: the warm-up (5 steps and 2 s, then 1 s of measuring) ends at step ~150, well
        # before the 12th epoch (384 steps), where the run is stopped.
        train(cfg, _StopAfter(12), clock=StepClock(start=1.0, tick=0.02))
    state = Checkpoint.load(out / "checkpoint.pt")
    planned = state.plan["total_steps"]
    assert len(state.plan["knots"]) > 1 and state.step == 12 * 32 < planned
    with pytest.raises(CifarkitError, match="cannot be combined with --resume"):
        train(TrainConfig(resume=str(out / "checkpoint.pt"), data=str(small_data), time_budget=20, device="cpu"))
    resumed = train(TrainConfig(resume=str(out / "checkpoint.pt"), data=str(small_data), device="cpu"))
    assert resumed.summary["steps"] == planned  # no new fit: the interrupted plan, finished
    final = Checkpoint.load(out / "checkpoint.pt")
    assert final.plan == state.plan and torch.isfinite(torch.tensor(final.metrics["loss"]))
