"""The two Reporters the command line uses (cifarkit.stage.Reporter): plain lines, or a progress bar on stderr.

    reporter = make_reporter("auto", info=sys.stdout)       # what cifar-train does
    train(cfg, reporter); reporter.close()

Notes of kind "error" and "warning" always reach stderr, one line each, as "error: ..." / "warning: ..." with names
escaped (cifarkit.escape: no control character from a file name reaches the terminal); an input that failed is
part of the commands' contract. "info" and "log" lines go to `info` (stdout for cifar-train, stderr where stdout
carries results). rich is imported only when a bar starts: short runs, logs and --progress none never pay for it.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import IO, Any

from cifarkit.cli import guarded, write_out

BAR_AFTER_S = 1.0  # --progress auto shows a bar only once a run has lasted this long: short runs stay quiet
REDRAW_S = 0.1  # ~10 redraws a second: rich's update costs ~20 us


class Lines:
    """Plain lines: info and log notes to `info` (none of them when `quiet`), warnings and errors to stderr."""

    def __init__(self, info: IO[str] | None = None, *, quiet: bool = False) -> None:
        self._info, self.quiet = info, quiet

    def phase(self, name: str, total: int | None = None) -> None:
        pass

    def progress(self, done: int, *, failed: int = 0, **figures: float) -> None:
        pass

    def note(self, text: str, kind: str = "info") -> None:
        if kind in ("error", "warning"):
            print(_line(text, kind), file=sys.stderr, flush=True)
        elif not self.quiet:
            write_out(text, self._info)

    def close(self) -> None:
        pass


class Bar(Lines):
    """A rich progress bar on stderr: the phase's count (of its total when known: then the time left too),
    failures and the running figures. `wait`: seconds before it first draws. `redirect_stdout`: rows printed
    to stdout while the bar shows go above it (stdout and stderr are the same terminal). Log notes are left
    out (the bar shows the same figures); other notes print above the bar."""

    def __init__(self, info: IO[str] | None = None, *, wait: float = 0.0, redirect_stdout: bool = False) -> None:
        super().__init__(info)
        self.wait, self.redirect = wait, redirect_stdout
        self.t0 = time.perf_counter()
        self.last = 0.0
        self.name, self.total = "", None
        self.progress_: Any = None
        self.task: Any = None
        self.shown = False  # a bar has been drawn (then a summary line is worth printing at the end)

    def phase(self, name: str, total: int | None = None) -> None:
        self.name, self.total = name, total
        if self.progress_ is not None:
            self.progress_.remove_task(self.task)
            self.task = self._task()
        self.last = 0.0

    def progress(self, done: int, *, failed: int = 0, **figures: float) -> None:
        now = time.perf_counter()
        if now - self.last < REDRAW_S and (self.total is None or done < self.total):
            return
        self.last = now
        if self.progress_ is None:
            if now - self.t0 < self.wait:
                return
            self._start()
        text = f"{failed:,} failed  " if failed else ""
        if "loss" in figures:
            text += f"loss {figures['loss']:.4f}  "
        if "images_per_s" in figures:
            text += f"{figures['images_per_s']:,.0f} images/s"
        self.progress_.update(self.task, completed=done + failed, figures=text.strip())

    def note(self, text: str, kind: str = "info") -> None:
        if self.progress_ is None:
            super().note(text, kind)
        elif kind != "log":
            text = _line(text, kind) if kind in ("error", "warning") else text
            self.progress_.console.print(text, markup=False, highlight=False, soft_wrap=True)

    def _start(self) -> None:
        from rich.console import Console
        from rich.progress import Progress

        self.progress_ = Progress(
            *self._columns(),
            console=Console(stderr=True),
            transient=True,
            redirect_stdout=self.redirect,
            redirect_stderr=False,
        )
        self.task = self._task()
        self.progress_.start()
        self.shown = True

    def _task(self) -> Any:
        return self.progress_.add_task(self.name, total=self.total, figures="")

    def _columns(self) -> tuple:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            SpinnerColumn,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        figures = TextColumn("{task.fields[figures]}")
        if self.total is None:  # folders are walked lazily: the count is not known in advance
            return (SpinnerColumn(), TextColumn("{task.completed:,} {task.description}"), figures, TimeElapsedColumn())
        return (
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            figures,
            TimeRemainingColumn(),
        )

    def close(self) -> None:
        if self.progress_ is not None:
            self.progress_.stop()
            self.progress_ = None


def run_reported(
    stage: Callable[[Any, Lines], Any], cfg: Any, mode: str, *, debug: bool, info: IO[str] | None,
    rows_on_terminal: bool = False,
) -> tuple[Any, Lines]:  # fmt: skip
    """stage(cfg, reporter) under the command line's exit rules (cifarkit.cli.guarded), with the reporter that
    --progress MODE asks for, closed afterwards: (the stage's result, the reporter)."""
    reporter = make_reporter(mode, info=info, rows_on_terminal=rows_on_terminal)
    try:
        return guarded(lambda: stage(cfg, reporter), debug=debug), reporter
    finally:
        reporter.close()


def _line(text: str, kind: str) -> str:
    from cifarkit.escape import escape_name

    return f"{kind}: {escape_name(text)}"


def make_reporter(mode: str, *, info: IO[str] | None = None, rows_on_terminal: bool = False) -> Lines:
    """The reporter for --progress MODE. auto: a bar when stderr is a terminal (after BAR_AFTER_S, and not when
    result rows go to the same terminal: they are their own progress), else plain lines. lines: plain lines.
    none: only warnings and errors. bar: a bar at once."""
    if mode == "bar":
        return Bar(info, redirect_stdout=rows_on_terminal)
    if mode == "auto" and sys.stderr is not None and sys.stderr.isatty() and not rows_on_terminal:
        return Bar(info, wait=BAR_AFTER_S)
    return Lines(info, quiet=mode == "none")
