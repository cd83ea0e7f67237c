"""One command-line shape for every console script: click builds the command from a stage's config dataclass
(its `option()` and `argument()` fields, cifarkit.stage), the options are checked by the config's own
`validate()` before the stage is imported (so a typo is answered without paying for torch), and the stage
runs under cifarkit's exit rules.

    COMMAND = Command("cifar-pack", PackConfig, body=run, extras=Progress, help="Pack folders ...")
    def main(argv=None) -> int: return COMMAND(argv)

click only parses: its callback returns the values, and the stage runs outside it, so errors, Ctrl-C and
SIGTERM follow the same path whatever the command. Usage errors are one line on stderr and exit 2, like every
other bad input. click is imported when a command starts (~6 ms), never by the library. Why click and not
typer (which is built on it): typer 0.28 costs ~18 ms more per start (its import pulls in shell completion,
subprocess, platform, uuid, datetime), 0.29 ~100 ms more (pydantic), measured on one-image cifar-infer runs
of ~0.17 s; and a config dataclass already says everything typer would read from a function signature.
"""

from __future__ import annotations

import dataclasses
import sys
import typing
from collections.abc import Callable
from typing import Any

from cifarkit.cli import EXIT_OK, EXIT_USAGE, fail, guarded
from cifarkit.errors import CifarkitError
from cifarkit.stage import cli_fields, option


@dataclasses.dataclass(frozen=True)
class Debug:
    """The option every command has."""

    debug: bool = option(False, "--debug", help="Show tracebacks and library warnings.")


@dataclasses.dataclass(frozen=True)
class Progress(Debug):
    """--progress and --debug: how a command shows a long run."""

    progress: str = option(
        "auto",
        "--progress",
        help="auto (a bar on a terminal once a run has lasted a second), bar, lines (plain lines, for logs) or none.",
    )

    def validate(self) -> None:
        if self.progress not in PROGRESS_MODES:
            fail(f"--progress must be one of {', '.join(PROGRESS_MODES)}, got {self.progress!r}")


PROGRESS_MODES = ("auto", "bar", "lines", "none")


class Command:
    """A console script: `config` (a stage's dataclass) and `extras` (CLI-only options, a dataclass too) become
    click options; `body(config, extras)` runs the stage and returns the exit status."""

    def __init__(
        self,
        name: str,
        config: type,
        body: Callable[[Any, Any], int],
        *,
        help: str,  # noqa: A002
        extras: type = Debug,
        epilog: str | None = None,
        prepare: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
    ) -> None:
        self.name, self.config, self.body, self.extras = name, config, body, extras
        self.help, self.epilog = help, epilog
        self.prepare = prepare  # parsed values -> config arguments (e.g. "--format all" -> a tuple of formats)

    def __call__(self, argv: list[str] | None = None) -> int:
        values = self.parse(sys.argv[1:] if argv is None else list(argv))
        if values is None:  # --help
            return EXIT_OK
        extras = self.extras(**{k: values.pop(k) for k in _names(self.extras)})
        debug = getattr(extras, "debug", False)
        guarded(getattr(extras, "validate", lambda: None), debug=debug)
        cfg = guarded(lambda: self._config(values), debug=debug)
        if not debug:
            import warnings

            warnings.simplefilter("ignore")  # Pillow's EXIF notes, torch.jit's deprecation: not the user's business
        return self.body(cfg, extras)

    def _config(self, values: dict[str, Any]) -> Any:
        for f in cli_fields(self.config):
            parse = f.metadata.get("parse")
            if parse is not None and isinstance(values.get(f.name), str):
                try:
                    values[f.name] = parse(values[f.name])
                except ValueError as exc:  # a parser's own complaint, named after the option here
                    raise CifarkitError(f"{f.metadata['flags'][0]}: {exc}") from None
        if self.prepare is not None:
            values = self.prepare(values)
        cfg = self.config(**values)
        if hasattr(cfg, "validate"):
            cfg.validate()  # torch-free: every option's own rule, before any stage is imported
        return cfg

    # ---- click ------------------------------------------------------------------------------------------

    def parse(self, argv: list[str]) -> dict[str, Any] | None:
        """The options' values by field name (click's conversion), or None after --help. A usage error is one
        line naming the option, and exit 2."""
        import click

        command = click.Command(
            self.name,
            params=[_param(f, hint) for cls in (self.config, self.extras) for f, hint in _fields(cls)],
            callback=lambda **values: {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()},
            help=self.help,
            epilog=self.epilog,
            context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
        )
        try:
            values = command.main(args=argv, prog_name=self.name, standalone_mode=False)
        except click.ClickException as exc:  # UsageError, BadParameter, NoSuchOption, ...
            fail(f"{_one_line(exc.format_message())} (see {self.name} --help)", EXIT_USAGE)
        except click.Abort as exc:  # Ctrl-C or SIGTERM while click parsed: it wraps the interrupt
            raise (exc.__context__ if isinstance(exc.__context__, BaseException) else KeyboardInterrupt()) from None
        return values if isinstance(values, dict) else None


def _fields(cls: type) -> list[tuple[dataclasses.Field, Any]]:
    types = typing.get_type_hints(cls)
    return [(f, types[f.name]) for f in cli_fields(cls)]


def _param(f: dataclasses.Field, hint: Any) -> Any:
    """The click parameter for a config field: its flags, help, default and type (the field's own, or text
    where the field has a parser; a tuple field takes one or more values)."""
    import click

    meta = f.metadata
    required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING  # type: ignore[misc]
    default = None if required else (f.default_factory() if f.default is dataclasses.MISSING else f.default)  # type: ignore[misc]
    inner = next((a for a in typing.get_args(hint) if a is not type(None)), hint) if _optional(hint) else hint
    many = typing.get_origin(inner) is tuple
    kind = str if meta.get("parse") is not None or many else inner
    click_type = {int: click.INT, float: click.FLOAT, str: click.STRING, bool: click.BOOL}[kind]
    if meta["kind"] == "argument":
        metavar = meta["metavar"] + ("..." if many else "")
        return click.Argument([f.name], nargs=-1 if many else 1, required=required, metavar=metavar, type=click_type)
    flag = kind is bool and meta.get("parse") is None
    return click.Option(
        [*meta["flags"], f.name],
        type=None if flag else click_type,
        is_flag=flag,
        default=default,
        required=required,
        help=meta["help"],
        metavar=meta.get("metavar"),
        show_default=not flag and default is not None and meta.get("parse") is None,
    )


def _optional(hint: Any) -> bool:
    return type(None) in typing.get_args(hint)


def _names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def _one_line(text: str) -> str:
    return " ".join(text.split())
