"""Training in a time budget: durations, the process clock, and a schedule whose length follows the clock.

A recipe's schedule (learning-rate triangle, lookahead decay, the whitening bias's training window) is a
function of *progress* through the run, from 0 to 1. Without a budget, progress is step / total steps.
With one, the run measures its own speed, fixes the number of steps that fit, and re-fits that number when the
speed drifts: `Progress.refit` keeps the progress already reached and spreads the rest over the new number of
remaining steps, so the schedule never jumps and always runs to its end.

    budget = parse_duration("6m")                     # 360.0
    progress = Progress(total_steps=1000)
    progress.refit(step=100, total_steps=800)         # the rest of the schedule over 700 steps
"""

from __future__ import annotations

import math
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from cifarkit.errors import CifarkitError

_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0}
_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*([smh])")
MAX_BUDGET_S = 30 * 24 * 3600.0  # a month: beyond that a budget is a typo

# The clock a budgeted run reads: seconds on time.time()'s scale. Tests pass one that advances by a fixed amount
# at each reading (the pacer reads it once per optimizer step): a step-time model, so that what a budget
# decides never depends on how fast the machine running the tests is.
Clock = Callable[[], float]


def parse_duration(text: str | float, option: str = "--time-budget") -> float:
    """'90s', '6m', '1h', '1h30m', '2.5m' or a number of seconds -> seconds (a CifarkitError naming `option`
    for anything else, zero, negative or absurd)."""
    raw = str(text).strip().lower()
    try:
        seconds = float(raw)
    except ValueError:
        parts = _DURATION.findall(raw)
        if not parts or _DURATION.sub("", raw).strip():
            raise CifarkitError(
                f"{option}: cannot read {str(text)!r} as a duration (expected e.g. 90s, 6m, 1h30m or seconds)"
            ) from None
        seconds = sum(float(v) * _UNITS[u] for v, u in parts)
    if not (math.isfinite(seconds) and 0 < seconds <= MAX_BUDGET_S):
        raise CifarkitError(f"{option} must be a positive duration up to 30 days, got {str(text)!r}")
    return seconds


def process_start() -> float:
    """When this process started, on the time.time() clock: the budget covers the whole process, the
    interpreter's start and the imports included. Linux: /proc/self/stat; elsewhere: this module's import."""
    try:
        with open("/proc/self/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        started_ticks = int(fields[19])  # field 22 of stat(5), counted after the ")" that ends the name
        uptime = time.clock_gettime(time.CLOCK_BOOTTIME)
        return time.time() - (uptime - started_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError, AttributeError):
        return _IMPORTED


_IMPORTED = time.time()


@dataclass
class Progress:
    """Optimizer steps -> progress through the schedule in [0, 1], piecewise linear. Knots are (step,
    progress) pairs; the last segment runs from the last knot to (total_steps, 1.0)."""

    total_steps: int
    knots: list[tuple[int, float]] = field(default_factory=lambda: [(0, 0.0)])

    def at(self, step: int) -> float:
        for (s0, p0), (s1, p1) in zip(self.knots, self.knots[1:], strict=False):
            if s0 <= step < s1:
                return p0 + (p1 - p0) * (step - s0) / (s1 - s0)
        s0, p0 = self.knots[-1]
        if step >= self.total_steps:
            return 1.0
        return p0 + (1.0 - p0) * (step - s0) / (self.total_steps - s0)

    def refit(self, step: int, total_steps: int) -> None:
        """From `step` on, finish the schedule in `total_steps` steps in all (at least one more step)."""
        reached = self.at(step)
        self.knots = [k for k in self.knots if k[0] < step] + [(step, reached)]
        self.total_steps = max(total_steps, step + 1)

    def to_dict(self) -> dict[str, object]:
        return {"total_steps": self.total_steps, "knots": [list(k) for k in self.knots]}


# Forward passes per image of each test-time augmentation (models.DeployedModel), cheapest first.
TTA_PASSES = {"none": 1, "hflip": 2, "hflip_translate": 6}
# The final evaluation may take at most this share of a time budget; beyond it the time goes to training. On a
# 2-core CPU without bf16, airbench's 6-pass TTA took 112 s of a 6-minute budget: a third of the run.
FINAL_EVAL_SHARE = 0.10


def final_evaluation(recipe_tta: str, pass_seconds: dict[str, float], budget_seconds: float) -> tuple[str, str]:
    """(TTA, precision) of a budgeted run's final evaluation. `pass_seconds`: one pass over the test set in each
    precision the run may evaluate in, the exported model's (fp32) first. The richest TTA up to the recipe's whose
    passes fit in FINAL_EVAL_SHARE of the budget, in the first precision where they fit (a TTA is worth more
    than fp32 arithmetic: bf16 moves a few test images, the recipe's TTA a point), else none in the fastest."""
    modes = list(TTA_PASSES)[: list(TTA_PASSES).index(recipe_tta) + 1]  # the recipe's and the cheaper ones
    allowed = FINAL_EVAL_SHARE * budget_seconds
    for mode in reversed(modes):
        for precision, seconds in pass_seconds.items():
            if TTA_PASSES[mode] * seconds <= allowed:
                return mode, precision
    return "none", min(pass_seconds, key=pass_seconds.__getitem__)


@dataclass
class Budget:
    """The clock of a budgeted run: when it must end, and what the end itself costs."""

    seconds: float  # the whole process, from its start
    started: float  # time.time() when the process started
    reserve: float = 0.0  # seconds kept for what follows the last step: final evaluation, writes, exit

    @property
    def deadline(self) -> float:
        return self.started + self.seconds

    def steps_that_fit(self, seconds_per_step: float, now: float) -> int:
        """How many more steps fit before the deadline, the reserve kept."""
        left = self.deadline - now - self.reserve
        return max(0, int(left / max(seconds_per_step, 1e-9)))


class Pacer:
    """Fits a budgeted run's length to the clock. Called after every optimizer step: once a short warm-up has
    passed it measures seconds per step (wall time since the warm-up, less the evaluations the run reports with
    `evaluated`, so checkpoint writes and augmentation passes are counted in), fixes how many steps fit before
    the deadline with the reserve kept and the evaluations still due paid for, and re-fits that number whenever
    the estimate moves by more than `tolerance`. The progress map is re-fitted, never cut: the schedule always
    runs to its end. The warm-up is measured in seconds, not steps: its steps train like any other (at the
    start of the schedule, where progress is 0), and a slow step is never waited for twice."""

    UNPLANNED = 1 << 40  # total steps before the first fit: progress stays ~0, no plan can end early

    def __init__(
        self,
        budget: Budget,
        progress: Progress,
        *,
        warmup_steps: int = 1,  # steps whose time is not counted (first-call allocations, caches, autotuning)
        warmup_seconds: float = 1.0,  # ... and at least this long, so that a fast step is measured over many
        measure_seconds: float = 1.0,  # then at least this long (and 2 steps) measured before the first fit
        refit_seconds: float = 10.0,  # seconds between re-fits
        tolerance: float = 0.02,  # relative change of the remaining steps that triggers a re-fit
        min_steps: int = 10,  # fewer steps than this after the warm-up: the budget is too short
        final_tta: str | None = None,  # the test-time augmentation chosen for the final evaluation (a record)
        final_precision: str = "fp32",  # ... and the precision it runs in (a record)
        eval_seconds: float = 0.0,  # what one evaluation asked for along the way (--eval-every) costs
        eval_every_steps: int = 0,  # steps between those evaluations; 0: none
        step_cost: Callable[[float], float] | None = None,  # a step's cost at a progress, relative; None: all alike
        clock: Clock = time.time,
    ) -> None:
        self.budget, self.progress, self.final_tta, self.clock = budget, progress, final_tta, clock
        self.final_precision = final_precision
        progress.total_steps = self.UNPLANNED  # until the warm-up has measured the speed
        self.warmup_steps, self.warmup_seconds, self.measure_seconds = warmup_steps, warmup_seconds, measure_seconds
        self.refit_seconds, self.tolerance, self.min_steps = refit_seconds, tolerance, min_steps
        self.eval_seconds, self.eval_every_steps = eval_seconds, eval_every_steps
        self.step_cost = step_cost or (lambda _: 1.0)
        self.units = 0.0  # the measured steps' cost, in steps at cost 1 (progressive resizing makes some cheaper)
        self.mark: tuple[int, float] | None = None  # (step, time) where measuring began
        self.first: tuple[int, float] | None = None  # (step, time) of the first step seen
        self.paused = 0.0  # seconds of evaluation since the mark, not part of a step
        self.last_fit = 0.0
        self.fits: list[dict[str, float]] = []  # every plan: at step, steps in all, seconds per step

    def evaluated(self, seconds: float) -> None:
        """An evaluation along the way took `seconds`: not step time (the plan pays for it separately), and
        from now on its measured cost is what the plan charges for each one still due."""
        self.paused += seconds
        if self.eval_every_steps:
            self.eval_seconds = seconds

    def step_done(self, step: int, now: float | None = None) -> None:
        now = self.clock() if now is None else now
        if self.first is None:
            self.first = (step, now)
        if self.mark is None:
            if step - self.first[0] >= self.warmup_steps and now - self.first[1] >= self.warmup_seconds:
                self.mark, self.paused, self.units = (step, now), 0.0, 0.0
            return
        self.units += self.step_cost(self.progress.at(step - 1))  # the step just done ran at that progress
        measured_steps, measured_s = step - self.mark[0], now - self.mark[1] - self.paused
        if measured_steps < 2 or measured_s < self.measure_seconds:
            return
        if self.fits and now - self.last_fit < self.refit_seconds:
            return
        per_step = measured_s / max(self.units, 1e-9) * self.mean_cost(self.progress.at(step))
        total = step + self.steps_that_fit(step, per_step, now)
        if not self.fits and total - step < self.min_steps:
            spent = now - self.budget.started
            raise CifarkitError(
                f"--time-budget {self.budget.seconds:g}s is too short here: {spent:.0f} s went to start-up, data and "
                f"a warm-up, a step takes {per_step:.2f} s and the end needs ~{self.budget.reserve:.0f} s; give it "
                f"at least {spent + self.budget.reserve + self.min_steps * per_step * 2:.0f} s"
            )
        remaining_now = self.progress.total_steps - step
        if not self.fits or abs((total - step) - remaining_now) > self.tolerance * max(remaining_now, 1):
            self.progress.refit(step, total)
            self.fits.append({"step": step, "total_steps": self.progress.total_steps, "seconds_per_step": per_step})
        self.last_fit = now

    def mean_cost(self, reached: float, samples: int = 64) -> float:
        """The mean relative cost of the steps from progress `reached` to the end (a step at each progress is as
        likely: the plan spreads them evenly)."""
        if reached >= 1.0:
            return self.step_cost(1.0)
        points = [reached + (1.0 - reached) * (i + 0.5) / samples for i in range(samples)]
        return sum(self.step_cost(p) for p in points) / samples

    def steps_that_fit(self, step: int, per_step: float, now: float) -> int:
        """Steps after `step` that fit before the deadline: the reserve kept, and every evaluation along the way
        that they would bring (one each eval_every_steps, the last step's excepted: it is the final one, in the
        reserve) paid for."""
        n = self.budget.steps_that_fit(per_step, now)
        every, cost = self.eval_every_steps, self.eval_seconds
        if not every or cost <= 0 or n == 0:
            return n
        left = self.budget.deadline - now - self.budget.reserve
        n = min(n, int(left / (per_step + cost / every)) + every)  # the average rate, then exactly
        while n > 0 and n * per_step + ((step + n - 1) // every - step // every) * cost > left:
            n -= 1
        return n

    def to_dict(self) -> dict[str, object]:
        return {
            "seconds": self.budget.seconds,
            "reserve_seconds": round(self.budget.reserve, 2),
            "final_tta": self.final_tta,
            "final_precision": self.final_precision,
            "planned_steps": self.fits[0]["total_steps"] if self.fits else None,
            "evaluations_along_the_way": {"every_steps": self.eval_every_steps, "seconds": round(self.eval_seconds, 3)},
            "final_planned_steps": self.progress.total_steps,
            "fits": self.fits,
        }
