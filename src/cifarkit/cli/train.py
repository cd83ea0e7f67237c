"""`cifar-train`: fit a model on CIFAR-10 (or an ImageFolder) and leave a run folder.

cifar-train --data ~/data/cifar10-jpeg --out runs/blog
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

import typer

from cifarkit.cli import console, fail, guarded, make_app
from cifarkit.recipes import RECIPES
from cifarkit.train import TrainConfig

app = make_app("Train a CNN on CIFAR-10 (the blog's recipe by default) and write a run folder.")
D = TrainConfig()  # CLI defaults are read from the dataclass, not copied by hand


@app.command()
def main(
    data: str = typer.Option(
        None,
        "--data",
        help="'torchvision' (download into --data-dir), an ImageFolder root "
        "with train/ and test/, an extracted cifar-10-batches-py folder, or 'sample' (the small "
        "CIFAR-10 sample bundled with cifarkit, for offline demos). Default: torchvision.",
    ),
    data_dir: str = typer.Option(
        D.data_dir,
        "--data-dir",
        help="Download and decoded-image cache folder (default: $CIFARKIT_CACHE or ~/.cache/cifarkit).",
    ),
    recipe: str = typer.Option(
        D.recipe,
        "--recipe",
        help="Training recipe: " + "; ".join(f"{name}: {r.summary}" for name, r in RECIPES.items()),
    ),
    model: str = typer.Option(D.model, "--model", help="Model name (default: the recipe's)."),
    epochs: float = typer.Option(
        D.epochs,
        "--epochs",
        help=f"Total epochs, fractions allowed (default: the recipe's; blog: {RECIPES['blog'].epochs:g}).",
    ),
    batch_size: int = typer.Option(
        D.batch_size,
        "--batch-size",
        help="Images per optimizer step, over all "
        f"processes (default: the recipe's; blog: {RECIPES['blog'].batch_size}).",
    ),
    lr: float = typer.Option(
        D.lr, "--lr", help=f"Learning rate (default: the recipe's; blog: Adam {RECIPES['blog'].lr:g})."
    ),
    seed: int = typer.Option(D.seed, "--seed", help="Seed for init and shuffling."),
    device: str = typer.Option(D.device, "--device", help="auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N, mps."),
    precision: str = typer.Option(
        D.precision,
        "--precision",
        help="auto (bf16 autocast where the device has fast bf16: recent CPUs, CUDA GPUs from Ampere on; "
        "fp16 on older CUDA GPUs; else fp32), fp32, bf16 or fp16 (CUDA only, with a gradient scaler).",
    ),
    channels_last: str = typer.Option(D.channels_last, "--channels-last", help="auto, on or off."),
    compile: bool = typer.Option(D.compile, "--compile/--no-compile", help="torch.compile the model."),
    out: str = typer.Option(
        D.out, "--out", help="Run folder (default: runs/<model>-<time>; the checkpoint's folder with --resume)."
    ),
    resume: str = typer.Option(
        D.resume,
        "--resume",
        help="checkpoint.pt to continue from, to its own target (--epochs sets a new total); pass --data again.",
    ),
    overwrite: bool = typer.Option(
        D.overwrite, "--overwrite", help="Replace the run already in --out (default: refuse to touch it)."
    ),
    eval_every: int = typer.Option(
        D.eval_every, "--eval-every", help="Epochs between test evaluations for the accuracy curve; 0: only the final."
    ),
    threads: int = typer.Option(D.threads, "--threads", help="Torch CPU threads (default: one per core)."),
    time_budget: str = typer.Option(
        None,
        "--time-budget",
        help="Train the best model that fits this wall time, e.g. 90s, 6m, 1h (the whole process: start-up, "
        "training, final evaluation and writes); the recipe's schedule is fitted to it. Excludes --epochs.",
    ),
    progress: str = typer.Option("auto", "--progress", help="auto (bar on a terminal), bar, lines or none."),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks."),
) -> None:
    """Train; prints progress, then overall and per-class test accuracy."""
    from cifarkit.budget import parse_duration, process_start
    from cifarkit.train import train

    budget = guarded(lambda: parse_duration(time_budget), debug=debug) if time_budget is not None else None
    cfg = TrainConfig(
        data=data,
        data_dir=data_dir,
        recipe=recipe,
        model=model,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        seed=seed,
        device=device,
        precision=precision,
        channels_last=channels_last,
        compile=compile,
        out=out,
        resume=resume,
        overwrite=overwrite,
        threads=threads,
        eval_every=eval_every,
        time_budget=budget,
        budget_start=process_start(),
    )
    if progress not in ("auto", "bar", "lines", "none"):
        fail("--progress must be auto, bar, lines or none")
    use_bar = progress == "bar" or (progress == "auto" and sys.stderr.isatty())
    main_rank = os.environ.get("RANK", "0") == "0"  # under torchrun only rank 0 talks
    reporter = _BarReporter() if use_bar and main_rank else _LineReporter(quiet=progress == "none" or not main_rank)
    try:
        result = guarded(lambda: train(cfg, reporter), debug=debug)
    finally:
        reporter.close()
    if result.rank == 0:
        _print_results(result)


def _print_results(result: Any) -> None:
    m = result.metrics
    print(f"\nAccuracy of the network on the {m.count} test images: {100 * m.accuracy:.2f} %")
    width = max(len(c) for c in m.per_class)
    print(f"{'class':<{width}}  accuracy")
    for name, acc in m.per_class.items():
        print(f"{name:<{width}}  {100 * acc:6.2f} %")
    secs = result.epoch_seconds
    if secs:
        print(
            f"\n{len(secs)} epoch(s) on {result.device} ({result.precision}, channels_last="
            f"{'on' if result.channels_last else 'off'}): median {sorted(secs)[len(secs) // 2]:.2f} s/epoch, "
            f"{result.images_per_second:,.0f} images/s"
        )
    fitted = result.summary.get("time_budget")
    if fitted:
        print(
            f"time budget {fitted['seconds']:g} s: {result.summary['steps']:,} steps ({result.summary['epochs']} "
            f"epochs; {fitted['planned_steps']:,} planned after the warm-up, re-fitted {len(fitted['fits']) - 1} "
            f"time(s)), {result.summary['total_seconds']:.1f} s at the last write"
        )
    print(f"run folder: {result.out_dir}  (checkpoint.pt, metrics.json, loss.png)")


class _LineReporter:
    """Plain lines in the blog's format, for logs and pipes."""

    def __init__(self, quiet: bool = False) -> None:
        self.quiet = quiet

    def _say(self, text: str) -> None:
        if not self.quiet:
            print(text, flush=True)

    def data_loaded(self, data: Any) -> None:
        how = "from cache" if data.from_cache else "decoded"
        self._say(
            f"data: {data.source} ({data.kind}, {len(data.train_y)} train / {len(data.test_y)} test, "
            f"{data.num_classes} classes, {how} in {data.load_seconds:.1f} s)"
        )

    def start(self, info: dict[str, Any]) -> None:
        resumed = f", resuming after epoch {info['start_epoch']}" if info["start_epoch"] else ""
        self._say(
            f"model: {info['model']} ({info['parameters']:,} parameters) on {info['device']}, "
            f"{info['precision']}, channels_last={'on' if info['channels_last'] else 'off'}{resumed}"
        )

    def epoch_start(self, epoch: int, epochs: int, steps: int) -> None: ...

    def step(self, epoch: int, epochs: int, step: int, steps: int, loss: float, ips: float) -> None:
        self._say(f"Epoch [{epoch + 1}/{epochs}], Batch [{step}/{steps}], Loss: {loss:.4f}")

    def epoch_end(self, record: Any, epochs: int) -> None:
        acc = record.test_accuracy
        tta = f" (TTA {record.tta})" if record.tta != "none" else ""
        acc_text = f", test accuracy {100 * acc:.2f} %{tta}" if acc is not None else ""
        self._say(
            f"Epoch [{record.epoch}/{epochs}] done in {record.seconds:.2f} s "
            f"({record.images_per_second:,.0f} images/s){acc_text}, {record.elapsed:.1f} s elapsed"
        )

    def close(self) -> None: ...


class _BarReporter(_LineReporter):
    """A rich progress bar on stderr with the running loss and images/s; epoch summaries as lines."""

    every = 20

    def __init__(self) -> None:
        super().__init__()
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.console = Console(stderr=True)
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"),
            TextColumn("{task.fields[ips]} img/s"),
            TimeRemainingColumn(),
            console=self.console,
            transient=True,
        )
        self.task = None
        self.started = False

    def _say(self, text: str) -> None:
        self.console.print(text, highlight=False) if self.started else print(text, flush=True)

    def epoch_start(self, epoch: int, epochs: int, steps: int) -> None:
        if not self.started:
            self.progress.start()
            self.started = True
        self.task = self.progress.add_task(f"epoch {epoch + 1}/{epochs}", total=steps, loss="-", ips="-")
        self._t0 = time.perf_counter()

    def step(self, epoch: int, epochs: int, step: int, steps: int, loss: float, ips: float) -> None:
        self.progress.update(self.task, completed=step, loss=f"{loss:.4f}", ips=f"{ips:,.0f}")

    def epoch_end(self, record: Any, epochs: int) -> None:
        self.progress.remove_task(self.task)
        super().epoch_end(record, epochs)

    def close(self) -> None:
        if self.started:
            self.progress.stop()
            self.started = False


def run() -> None:
    """The console script's entry point: the app under cifarkit's signal rules (exit 130 / 143)."""
    console(app)


if __name__ == "__main__":
    run()
