"""The shape every stage shares: a config dataclass -> one function -> a typed result, with progress told to
one Reporter. Pure Python (no torch, no numpy): the command line imports it to check options before any stage
pays for its imports.

    @dataclass(frozen=True)
    class PackConfig:
        inputs: tuple[str, ...] = argument(help="folders (or files) of images")
        shard_rows: int = option(100_000, "--shard-rows", help="images per shard at most")

    result = pack(PackConfig(inputs=("photos/",), out="shards/"), reporter)

A field made with `option()` or `argument()` carries its command-line flag and help text: the dataclass is the
single source of the CLI's options and defaults (cifarkit.cli.shell builds the command from it), and its
comments and help are the documentation. A plain `field()` is a library-only setting.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable
from typing import Any, Protocol

# ---------------------------------------------------------------------------------------------------------
# Config fields that are also command-line options
# ---------------------------------------------------------------------------------------------------------

_MISSING: Any = dataclasses.MISSING
REQUIRED: Any = dataclasses.MISSING  # option(REQUIRED, "--out", ...): a field without a default, a required option


def option(
    default: Any = _MISSING,
    *flags: str,
    help: str,  # noqa: A002 (the CLI's word for it)
    parse: Callable[[str], Any] | None = None,
    metavar: str | None = None,
    default_factory: Callable[[], Any] | None = None,
) -> Any:
    """A config field exposed as `flags` (e.g. "--top-k", "-k"). `parse` turns the option's text into the
    field's value (a duration, a size); without it the field's annotation is the option's type."""
    meta = {"flags": flags, "help": help, "parse": parse, "metavar": metavar, "kind": "option"}
    if default_factory is not None:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def argument(default: Any = _MISSING, *, help: str, metavar: str) -> Any:  # noqa: A002
    """A config field given positionally on the command line (a tuple field takes one or more values)."""
    meta = {"flags": (), "help": help, "parse": None, "metavar": metavar, "kind": "argument"}
    return dataclasses.field(default=default, metadata=meta)


def cli_fields(config: type) -> list[dataclasses.Field]:
    """The fields of a config dataclass that are command-line options or arguments, in declaration order."""
    return [f for f in dataclasses.fields(config) if f.metadata.get("kind") in ("option", "argument")]


# ---------------------------------------------------------------------------------------------------------
# Progress: one protocol for every stage
# ---------------------------------------------------------------------------------------------------------


class Reporter(Protocol):
    """What a stage tells the outside world while it runs. The command line draws a bar or prints lines
    (cifarkit.cli.progress); the library's default, Silent, ignores everything.

    - phase(name, total): a counted stretch of work begins ("epoch 2/4" of 1,563 steps; the images of a run,
      total None when a folder is walked lazily)
    - progress(done, failed=, **figures): counts so far in the phase (not increments) and running figures
      (loss, images_per_s)
    - note(text, kind): a line for people. kind "info" (what is happening), "log" (a periodic line that a
      progress bar already shows: the blog's "Epoch [1/4], Batch [500/1563], Loss: ..."), "warning", or
      "error" (one input that failed; the run goes on)
    - close(): the run is over (also after an error)"""

    def phase(self, name: str, total: int | None = None) -> None: ...

    def progress(self, done: int, *, failed: int = 0, **figures: float) -> None: ...

    def note(self, text: str, kind: str = "info") -> None: ...

    def close(self) -> None: ...


class Silent:
    """A Reporter that says nothing: the default for library calls."""

    def phase(self, name: str, total: int | None = None) -> None:
        pass

    def progress(self, done: int, *, failed: int = 0, **figures: float) -> None:
        pass

    def note(self, text: str, kind: str = "info") -> None:
        pass

    def close(self) -> None:
        pass


class Recorder(Silent):
    """A Reporter that keeps every note (kind, text): for tests and for callers that want the lines."""

    def __init__(self) -> None:
        self.notes: list[tuple[str, str]] = []
        self.phases: list[tuple[str, int | None]] = []

    def phase(self, name: str, total: int | None = None) -> None:
        self.phases.append((name, total))

    def note(self, text: str, kind: str = "info") -> None:
        self.notes.append((kind, text))

    def lines(self, kind: str | None = None) -> list[str]:
        return [text for k, text in self.notes if kind is None or k == kind]


# ---------------------------------------------------------------------------------------------------------
# A stage package's face: names imported on first use
# ---------------------------------------------------------------------------------------------------------


def lazy_exports(package: str, exports: dict[str, str]) -> Callable[[str], Any]:
    """A module __getattr__ (PEP 562) for a stage package: `name` is taken from `package.exports[name]` when
    first asked for, so that importing the package (or its config module) loads nothing heavy."""

    def __getattr__(name: str) -> Any:
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(f"{package}.{module}"), name)

    return __getattr__
