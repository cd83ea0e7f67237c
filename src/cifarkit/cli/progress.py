"""The progress bar that cifar-infer and cifar-eval draw on stderr, and the lines printed past it.

rich is imported only when a bar starts: short runs (and --progress none) never pay for it.
"""

from __future__ import annotations

import sys
import time
from typing import Any

PROGRESS = ("auto", "bar", "none")
BAR_AFTER_S = 1.0  # --progress auto shows a bar only once a run has lasted this long: short runs stay quiet
REDRAW_S = 0.1  # ~10 redraws a second: rich's update costs ~20 us, a row ~2 us


class Bar:
    """Images done (of `total` when it is known: a bar, the time left; else a spinner and the time so far),
    failures and images/s, on stderr. `mode`: "bar" always, "none" never, "auto" when stderr is a terminal,
    the run has lasted BAR_AFTER_S, and stdout is not the same terminal (then the rows are their own
    progress, and a bar would fight them; `redirect` keeps rows printed while a bar shows above it)."""

    def __init__(self, mode: str, verb: str, *, total: int | None = None, stdout_is_terminal: bool = False) -> None:
        self.enabled = mode == "bar" or (mode == "auto" and sys.stderr.isatty() and not stdout_is_terminal)
        self.wait = 0.0 if mode == "bar" else BAR_AFTER_S
        self.verb, self.total, self.redirect = verb, total, stdout_is_terminal
        self.t0 = time.perf_counter()
        self.last = 0.0
        self.progress: Any = None
        self.task: Any = None

    def update(self, done: int, failed: int) -> None:
        """The counts so far (not increments)."""
        if not self.enabled:
            return
        now = time.perf_counter()
        if now - self.last < REDRAW_S:
            return
        self.last = now
        if self.progress is None:
            if now - self.t0 < self.wait:
                return
            self._start()
        ips = done / max(now - self.t0, 1e-9)
        self.progress.update(self.task, completed=done + failed, failed=failed, ips=f"{ips:,.0f}")

    def _start(self) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            SpinnerColumn,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        rate = TextColumn("{task.fields[failed]} failed, {task.fields[ips]} images/s")
        if self.total is None:  # folders are walked lazily: the count is not known in advance
            columns = (
                SpinnerColumn(),
                TextColumn(f"{{task.completed:,}} images {self.verb}"),
                rate,
                TimeElapsedColumn(),
            )
        else:
            columns = (TextColumn(self.verb), BarColumn(), MofNCompleteColumn(), rate, TimeRemainingColumn())
        self.progress = Progress(
            *columns,
            console=Console(stderr=True),
            transient=True,
            redirect_stdout=self.redirect,
            redirect_stderr=False,
        )
        self.task = self.progress.add_task(self.verb, total=self.total, failed=0, ips="-")
        self.progress.start()

    def say(self, line: str) -> None:
        """A line on stderr (an input's error), above the bar if one shows."""
        if self.progress is not None:
            self.progress.console.print(line, markup=False, highlight=False, soft_wrap=True)
        else:
            print(line, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()

    @property
    def shown(self) -> bool:
        return self.progress is not None
