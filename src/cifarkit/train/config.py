"""What a training run needs: `TrainConfig`, its bounds and its checks. Pure Python: `cifar-train` builds its
options from this dataclass and checks them before torch is imported.

    cfg = TrainConfig(data="/data/cifar10-jpeg", out="runs/blog").resolved()   # the recipe's values filled in
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from cifarkit.errors import CifarkitError
from cifarkit.model import check_model_name
from cifarkit.stage import option
from cifarkit.train.budget import MAX_BUDGET_S, parse_duration
from cifarkit.train.recipes import RECIPES, get_recipe

MAX_EPOCHS = 10_000
MAX_BATCH_SIZE = 65_536  # images per step or per evaluation pass; airbench's is 1,024
MAX_THREADS = 256  # torch intra-op threads at most: torch.set_num_threads(100000) crashes the process
MAX_SEED = 2**63 - 1  # torch.manual_seed takes a signed 64-bit integer
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
CHANNELS_LAST = ("auto", "on", "off")
DEVICE_HELP = "auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N, mps."
_BLOG = RECIPES["blog"]
BUDGET_RECIPE = "sprint"  # the recipe a time budget on a CPU trains when --recipe is not given


@dataclass(frozen=True)
class TrainConfig:
    """Everything a run needs. Fields left None take the recipe's value (cifarkit.train.recipes.RECIPES); the
    default recipe is the blog's (under a time budget on a CPU, BUDGET_RECIPE's: cifarkit.train.run picks it,
    knowing the device). Each option's flag is cifar-train's."""

    data: str | None = option(  # None: torchvision
        None,
        "--data",
        help="'torchvision' (download into --data-dir), an ImageFolder root with train/ and test/, an extracted "
        "cifar-10-batches-py folder, or 'sample' (the small CIFAR-10 sample bundled with cifarkit, for offline "
        "demos). Default: torchvision.",
    )
    data_dir: str | None = option(  # None: $CIFARKIT_CACHE or ~/.cache/cifarkit
        None,
        "--data-dir",
        help="Download and decoded-image cache folder (default: $CIFARKIT_CACHE or ~/.cache/cifarkit).",
    )
    recipe: str | None = option(  # None: blog, or BUDGET_RECIPE under --time-budget on a CPU
        None,
        "--recipe",
        help="Training recipe (default: blog; under --time-budget on a CPU, "
        + BUDGET_RECIPE
        + "): "
        + "; ".join(f"{n}: {r.summary}" for n, r in RECIPES.items()),
    )
    model: str | None = option(None, "--model", help="Model name (default: the recipe's).")  # cifarkit.model
    epochs: float | None = option(  # fractions allowed
        None, "--epochs", help=f"Total epochs, fractions allowed (default: the recipe's; blog: {_BLOG.epochs:g})."
    )
    batch_size: int | None = option(  # images per optimizer step, over all processes
        None,
        "--batch-size",
        help=f"Images per optimizer step, over all processes (default: the recipe's; blog: {_BLOG.batch_size}).",
    )
    lr: float | None = option(  # see Recipe.lr for its unit
        None, "--lr", help=f"Learning rate (default: the recipe's; blog: Adam {_BLOG.lr:g})."
    )
    seed: int = option(0, "--seed", help="Seed for init, shuffling and augmentation (0 to 2**63 - 1).")
    device: str = option("auto", "--device", help=DEVICE_HELP)
    precision: str = option(
        "auto",
        "--precision",
        help="auto (bf16 autocast where the device has fast bf16: recent CPUs, CUDA GPUs from Ampere on; fp16 on "
        "older CUDA GPUs; else fp32), fp32, bf16 or fp16 (CUDA only, with a gradient scaler).",
    )
    channels_last: str = option("auto", "--channels-last", help="auto (on for CPU and CUDA), on or off.")
    compile: bool = option(False, "--compile/--no-compile", help="torch.compile the model (a one-off compile time).")
    out: str | None = option(  # None: runs/<model>-<time>, or the checkpoint's folder on --resume
        None, "--out", help="Run folder (default: runs/<model>-<time>; the checkpoint's folder with --resume)."
    )
    resume: str | None = option(
        None,
        "--resume",
        help="checkpoint.pt to continue from, to its own target (--epochs sets a new total); pass --data again.",
    )
    overwrite: bool = option(False, "--overwrite", help="Replace the run already in --out (default: refuse).")
    eval_every: int | None = option(  # epochs; 0: only the final evaluation; None: 1, or 0 under a time budget
        None,
        "--eval-every",
        help="Epochs between test evaluations for the accuracy curve; 0: only the final. Default: 1, or 0 under "
        "--time-budget (a budget spends its time on training; evaluations asked for are paid for in its plan).",
    )
    time_budget: float | None = option(  # seconds for the whole process; excludes `epochs`
        None,
        "--time-budget",
        parse=parse_duration,
        metavar="DURATION",
        help="Train the best model that fits this wall time, e.g. 90s, 6m, 1h (the whole process: start-up, "
        "training, final evaluation and writes); the recipe's schedule is fitted to it. Excludes --epochs.",
    )
    threads: int | None = option(None, "--threads", help="Torch CPU threads (default: one per core).")
    # Library-only settings:
    eval_batch_size: int = 1000  # images per forward pass when evaluating
    budget_start: float | None = None  # time.time() the budget counts from; None: when train() is called (the CLI
    #                                    passes its process's start)
    log_every: int = 500  # batches between the blog's progress lines (it printed every 500)
    progress_every: int = field(default=20)  # batches between progress() calls (a bar's redraws); 50+ on a GPU

    def resolved(self) -> TrainConfig:
        """A copy with every None that the recipe defines filled in, validated. Under a time budget `epochs`
        is the recipe's: the schedule's shape, stretched or squeezed to what the budget allows."""
        self.validate()
        r = get_recipe(self.recipe or "blog")
        cfg = replace(
            self,
            recipe=r.name,
            model=self.model or r.model,
            epochs=self.epochs if self.epochs is not None else r.epochs,
            batch_size=self.batch_size if self.batch_size is not None else r.batch_size,
            lr=self.lr if self.lr is not None else r.lr,
            data=self.data or "torchvision",
            eval_every=self.eval_every if self.eval_every is not None else (0 if self.time_budget else 1),
        )
        cfg.check_bounds()  # the recipe's values (or a resumed run's) too
        return cfg

    def validate(self) -> None:
        """Every option's own rule, before anything is allocated or created (CifarkitError naming it)."""
        if self.time_budget is not None and self.epochs is not None:
            raise CifarkitError("--epochs and --time-budget exclude each other: the budget decides the length")
        if self.resume and self.time_budget is not None:
            raise CifarkitError("--time-budget cannot be combined with --resume: a resumed run finishes its own plan")
        self.check_bounds()

    def check_bounds(self) -> None:
        """Every value within bounds (CifarkitError naming the option)."""
        if self.recipe is not None:
            get_recipe(self.recipe)
        if self.epochs is not None and not (0 < self.epochs <= MAX_EPOCHS and math.isfinite(self.epochs)):
            raise CifarkitError(f"--epochs must be a positive number up to {MAX_EPOCHS:,}, got {self.epochs:g}")
        if self.batch_size is not None and not 1 <= self.batch_size <= MAX_BATCH_SIZE:
            raise CifarkitError(f"--batch-size must be 1 to {MAX_BATCH_SIZE:,}, got {self.batch_size}")
        if self.lr is not None and not (self.lr > 0 and math.isfinite(self.lr)):
            raise CifarkitError(f"--lr must be a positive number, got {self.lr}")
        if not 0 <= self.seed <= MAX_SEED:
            raise CifarkitError(f"--seed must be 0 to {MAX_SEED:,} (2**63 - 1), got {self.seed}")
        if self.model is not None:
            check_model_name(self.model)
        check_options(self.precision, self.channels_last, self.threads)
        if not 1 <= self.eval_batch_size <= MAX_BATCH_SIZE:
            raise CifarkitError(f"--eval-batch-size must be 1 to {MAX_BATCH_SIZE:,}, got {self.eval_batch_size}")
        if (self.eval_every is not None and self.eval_every < 0) or self.log_every < 1 or self.progress_every < 1:
            raise CifarkitError("--eval-every must be 0 or more (and log_every, progress_every at least 1)")
        budget = self.time_budget
        if budget is not None and not (math.isfinite(budget) and 0 < budget <= MAX_BUDGET_S):
            raise CifarkitError(f"--time-budget must be a positive duration up to 30 days, got {budget}")


# Fields that define the recipe: a resumed run takes them from the checkpoint, not from the command line.
RECIPE_FIELDS = ("recipe", "model", "batch_size", "lr", "seed", "precision", "channels_last")


def check_options(precision: str, channels_last: str, threads: int | None) -> None:
    """The runtime options' own rules, checked before anything is created (CifarkitError naming the option)."""
    if precision not in PRECISIONS:
        raise CifarkitError(f"--precision must be auto, fp32, bf16 or fp16, got {precision!r}")
    if channels_last not in CHANNELS_LAST:
        raise CifarkitError(f"--channels-last must be auto, on or off, got {channels_last!r}")
    if threads is not None and not 1 <= threads <= MAX_THREADS:
        raise CifarkitError(f"--threads must be 1 to {MAX_THREADS}, got {threads}")
