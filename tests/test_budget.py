"""Training in a time budget: durations, the progress map, the pacer, and whole budgeted runs."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from cifarkit.budget import FINAL_EVAL_SHARE, TTA_PASSES, Budget, Pacer, Progress, final_tta, parse_duration
from cifarkit.checkpoint import load_checkpoint
from cifarkit.errors import CifarkitError
from cifarkit.recipes import RECIPES
from cifarkit.spec import TTA_MODES
from cifarkit.train import Reporter, TrainConfig, train

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


def test_sixty_second_budgets_end_in_time_with_the_schedule_run_to_its_end(small_data, tmp_path):
    """Both recipes under `cifar-train --time-budget 60s`, side by side on the 2 cores (one thread each, so each
    also sees the other's load): every process ends within the budget plus 3 %, counted from its own start."""
    runs = {}
    for recipe, extra in (("blog", []), ("airbench", ["--batch-size", "128"])):
        out = tmp_path / recipe
        cmd = [BIN / "cifar-train", "--data", small_data, "--recipe", recipe, *extra, "--time-budget", "60s"]
        cmd += ["--out", out, "--device", "cpu", "--threads", "1", "--progress", "none"]
        runs[recipe] = (time.monotonic(), subprocess.Popen([str(c) for c in cmd], stderr=subprocess.PIPE), out)
    for recipe, (t0, proc, out) in runs.items():
        _, err = proc.communicate(timeout=120)
        wall = time.monotonic() - t0
        assert proc.returncode == 0, err.decode()[-2000:]
        assert wall <= 60 * 1.03, f"{recipe}: {wall:.1f} s"
        assert wall >= 60 * 0.75, f"{recipe} used only {wall:.1f} s of its budget"
        metrics = json.loads((out / "metrics.json").read_text())
        fitted = metrics["time_budget"]
        assert metrics["steps"] == fitted["final_planned_steps"] and fitted["planned_steps"] > 0
        state = load_checkpoint(out / "checkpoint.pt")
        plan = Progress(state["plan"]["total_steps"], [tuple(k) for k in state["plan"]["knots"]])
        assert plan.at(state["step"]) == 1.0  # the schedule ran to its end
        schedule = RECIPES[recipe].schedule
        if schedule is not None:  # the learning rate at the end is the schedule's final value
            end = float(np.interp(plan.at(state["step"]), [0, schedule[1], 1], [schedule[0], 1, schedule[2]]))
            assert end == pytest.approx(schedule[2])
            last = float(np.interp(plan.at(state["step"] - 1), [0, schedule[1], 1], [schedule[0], 1, schedule[2]]))
            assert abs(last - schedule[2]) < 0.1  # the last step taken was at the tail, not cut off mid-way
        assert {"start_up", "data", "build", "epochs", "final_evaluation", "report"} <= set(metrics["phases"])
        # The final evaluation's TTA is what the budget chose, and the checkpoint (so the export) carries it.
        assert fitted["final_tta"] in TTA_MODES and metrics["tta"] == fitted["final_tta"]
        assert state["artifact"]["tta"] == fitted["final_tta"]


def test_the_final_tta_fits_its_share_of_the_budget():
    assert tuple(TTA_PASSES) == TTA_MODES  # every mode has a cost, cheapest first
    budget = 360.0
    allowed = FINAL_EVAL_SHARE * budget  # 36 s
    assert final_tta("hflip_translate", allowed / 6, budget) == "hflip_translate"  # 6 passes fit exactly
    assert final_tta("hflip_translate", allowed / 6 * 1.01, budget) == "hflip"
    assert final_tta("hflip_translate", allowed / 2 * 1.01, budget) == "none"
    assert final_tta("hflip", allowed / 2, budget) == "hflip"  # never richer than the recipe's
    assert final_tta("none", 0.001, budget) == "none"
    assert final_tta("hflip_translate", allowed * 5, budget) == "none"  # even one pass over: none, never fail


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
    with pytest.raises(CifarkitError, match="--time-budget 30s is (too short here|already spent)"):
        # 24 of the 30 seconds are gone before the call: the end alone needs more than what is left
        train(TrainConfig(data=str(small_data), recipe="airbench", batch_size=128, out=str(out), device="cpu",
                          time_budget=30, budget_start=time.time() - 24))  # fmt: skip
    assert not out.exists()


class _StopAfter(Reporter):
    def __init__(self, epochs: int) -> None:
        self.epochs = epochs

    def epoch_start(self, epoch, epochs, steps):
        if epoch == self.epochs:
            raise KeyboardInterrupt


def test_a_budgeted_run_resumes_to_the_end_of_its_own_plan(small_data, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        cfg = TrainConfig(data=str(small_data), out=str(out), device="cpu", time_budget=20, budget_start=time.time())
        train(cfg, _StopAfter(12))  # past the warm-up (2 s and more), where the first fit happens
    state = load_checkpoint(out / "checkpoint.pt")
    planned = state["plan"]["total_steps"]
    assert len(state["plan"]["knots"]) > 1 and state["step"] == 12 * 32 < planned
    with pytest.raises(CifarkitError, match="cannot be combined with --resume"):
        train(TrainConfig(resume=str(out / "checkpoint.pt"), data=str(small_data), time_budget=20, device="cpu"))
    resumed = train(TrainConfig(resume=str(out / "checkpoint.pt"), data=str(small_data), device="cpu"))
    assert resumed.summary["steps"] == planned  # no new fit: the interrupted plan, finished
    final = load_checkpoint(out / "checkpoint.pt")
    assert final["plan"] == state["plan"] and torch.isfinite(torch.tensor(final["metrics"]["loss"]))
