"""Training stage: TrainConfig -> train() -> TrainResult, a run folder with checkpoint, metrics and plot.

    from cifarkit.train import TrainConfig, train
    result = train(TrainConfig(data="/data/cifar10-jpeg", out="runs/blog"))
    print(result.metrics.accuracy)

Stage functions are importable alone: `make_optimization`, `train_one_epoch`, `evaluate`. Devices and
torchrun live in cifarkit.runtime, the checkpoint format in cifarkit.checkpoint, metrics.json and the
plot in cifarkit.report.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from cifarkit import report
from cifarkit.atomic import output_folder
from cifarkit.batches import DeviceBatches
from cifarkit.budget import MAX_BUDGET_S, TTA_PASSES, Budget, Pacer, Progress, final_tta
from cifarkit.checkpoint import CHECKPOINT_FORMAT, CHECKPOINT_VERSION, load_checkpoint, load_weights, save_checkpoint
from cifarkit.data import CifarData, load_data
from cifarkit.errors import CifarkitError, first_line
from cifarkit.models import DeployedModel, Net, build_model, check_model_name, count_parameters
from cifarkit.recipes import Recipe, get_recipe
from cifarkit.report import EpochRecord, Metrics
from cifarkit.runtime import Dist, Runtime, autocast, check_options, runtime
from cifarkit.spec import ArtifactMeta, versions

# ---------------------------------------------------------------------------------------------------------
# Configuration and results
# ---------------------------------------------------------------------------------------------------------


@dataclass
class TrainConfig:
    """Everything a run needs. The CLI reads its defaults from here; the default recipe is the blog's.
    Fields left None take the recipe's value (see cifarkit.recipes.RECIPES)."""

    data: str | None = None  # "torchvision" | PATH (ImageFolder root or cifar-10-batches-py); None: torchvision,
    #                          or the checkpoint's source when resuming
    data_dir: str | None = None  # downloads and decoded-image cache; None: $CIFARKIT_CACHE or ~/.cache/cifarkit
    recipe: str = "blog"  # a name in cifarkit.recipes.RECIPES: "blog" (the default) or "airbench"
    model: str | None = None  # a name in cifarkit.models.MODELS; None: the recipe's
    epochs: float | None = None  # total epochs (fractions allowed); None: the recipe's (blog: 4)
    batch_size: int | None = None  # images per optimizer step, over all processes; None: the recipe's (blog: 32)
    lr: float | None = None  # learning rate (see Recipe.lr for its meaning); None: the recipe's (blog: 1e-3)
    seed: int = 0  # model init, shuffling and augmentation; on CPU the same seed gives the same run
    device: str = "auto"  # "auto" (CUDA, then MPS, then CPU) | "cpu" | "cuda" | "cuda:N" | "mps"
    precision: str = "auto"  # "auto" (bf16 autocast where the device has fast bf16, fp16 on pre-Ampere CUDA
    #                          GPUs) | "fp32" | "bf16" | "fp16" (CUDA only, with a gradient scaler)
    channels_last: str = "auto"  # "auto" (on for CPU and CUDA) | "on" | "off"
    compile: bool = False  # torch.compile the model (pays a one-off compile time)
    out: str | None = None  # run folder; None: runs/<model>-<timestamp>, or the checkpoint's folder on resume
    resume: str | None = None  # checkpoint.pt to continue from: its recipe and its target epochs are kept
    #                            (--epochs sets a new total); --data must be given unless it was torchvision
    overwrite: bool = False  # replace the run already in `out` (default: an existing run folder is an error)
    eval_batch_size: int = 1000  # images per forward pass when evaluating
    eval_every: int = 1  # epochs between test evaluations for the accuracy curve (no TTA, training precision);
    #                      0: only the final one (fp32, the recipe's TTA: what the exported model gives)
    time_budget: float | None = None  # seconds for the whole run, the final evaluation and writes included: the
    #                                   schedule is fitted to it (cifarkit.budget); excludes `epochs`
    budget_start: float | None = None  # time.time() the budget counts from; None: when train() is called (the
    #                                    CLI passes its process's start)
    log_every: int = 500  # batches between plain-text progress lines (the blog printed every 500)
    threads: int | None = None  # torch intra-op threads; None: torch's default (one per core)

    def resolved(self) -> TrainConfig:
        """A copy with every None that the recipe defines filled in, validated. Under a time budget `epochs`
        is the recipe's: the schedule's shape, stretched or squeezed to what the budget allows."""
        if self.time_budget is not None and self.epochs is not None:
            raise CifarkitError("--epochs and --time-budget exclude each other: the budget decides the length")
        r = get_recipe(self.recipe)
        cfg = replace(
            self,
            model=self.model or r.model,
            epochs=self.epochs if self.epochs is not None else r.epochs,
            batch_size=self.batch_size if self.batch_size is not None else r.batch_size,
            lr=self.lr if self.lr is not None else r.lr,
            data=self.data or "torchvision",
        )
        cfg.validate()
        return cfg

    def validate(self) -> None:
        """Every option within bounds, before anything is allocated or created (CifarkitError naming it)."""
        if self.epochs is not None and not (0 < self.epochs <= MAX_EPOCHS and math.isfinite(self.epochs)):
            raise CifarkitError(f"--epochs must be a positive number up to {MAX_EPOCHS:,}, got {self.epochs:g}")
        if self.batch_size is not None and not 1 <= self.batch_size <= MAX_BATCH_SIZE:
            raise CifarkitError(f"--batch-size must be 1 to {MAX_BATCH_SIZE:,}, got {self.batch_size}")
        if self.lr is not None and not (self.lr > 0 and math.isfinite(self.lr)):
            raise CifarkitError(f"--lr must be a positive number, got {self.lr}")
        if self.model is not None:
            check_model_name(self.model)
        check_options(self.precision, self.channels_last, self.threads)
        if not 1 <= self.eval_batch_size <= MAX_BATCH_SIZE:
            raise CifarkitError(f"--eval-batch-size must be 1 to {MAX_BATCH_SIZE:,}, got {self.eval_batch_size}")
        if self.eval_every < 0 or self.log_every < 1:
            raise CifarkitError("--eval-every must be 0 or more (and log_every at least 1)")
        budget = self.time_budget
        if budget is not None and not (math.isfinite(budget) and 0 < budget <= MAX_BUDGET_S):
            raise CifarkitError(f"--time-budget must be a positive duration up to 30 days, got {budget}")


MAX_EPOCHS = 10_000
MAX_BATCH_SIZE = 65_536  # images per step or per evaluation pass; airbench's is 1,024


# Fields that define the recipe: a resumed run takes them from the checkpoint, not from the command line.
RECIPE_FIELDS = ("recipe", "model", "batch_size", "lr", "seed", "precision", "channels_last")


@dataclass
class TrainResult:
    out_dir: Path
    checkpoint: Path
    metrics: Metrics
    epochs_run: int  # epochs trained in this call (fewer than cfg.epochs when resuming)
    epoch_seconds: list[float]  # training time per epoch of this call, evaluation excluded
    images_per_second: float  # median over this call's epochs
    device: str
    precision: str
    channels_last: bool
    summary: dict[str, Any] = field(default_factory=dict)  # what metrics.json holds
    rank: int = 0  # this process's rank under torchrun (0 alone); only rank 0 writes and reports


class Reporter:
    """Progress hooks; the default does nothing. The CLI subclasses it to draw a bar or print lines."""

    every: int | None = None  # batches between step() calls; None: TrainConfig.log_every

    def data_loaded(self, data: CifarData) -> None: ...

    def start(self, info: dict[str, Any]) -> None: ...

    def epoch_start(self, epoch: int, epochs: int, steps: int) -> None: ...

    def step(self, epoch: int, epochs: int, step: int, steps: int, loss: float, images_per_s: float) -> None: ...

    def epoch_end(self, record: EpochRecord, epochs: int) -> None: ...


# ---------------------------------------------------------------------------------------------------------
# Optimization: optimizer, per-group learning rates, schedule, lookahead, loss
# ---------------------------------------------------------------------------------------------------------


def triangle_schedule(total_steps: int, start: float, peak: float, end: float) -> list[float]:
    """Learning-rate multipliers for steps 0..total_steps: linear from `start` up to 1 at `peak` * total,
    then linear down to `end` (airbench's schedule)."""
    xp = [0, int(peak * total_steps), total_steps]
    return [float(v) for v in np.interp(np.arange(total_steps + 1), xp, [start, 1.0, end])]


class Lookahead:
    """airbench's lookahead: every k steps the weights move to an EMA of themselves whose decay grows as
    0.95^5 * (step / total)^3, and at the end the EMA replaces the weights. Float state only (BN stats too)."""

    def __init__(self, model: nn.Module) -> None:
        self.ema = {k: v.detach().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: nn.Module, decay: float) -> None:
        for (_, ema), (_, param) in zip(self.ema.items(), model.state_dict().items(), strict=True):
            if param.dtype.is_floating_point:
                ema.lerp_(param, 1 - decay)
                param.copy_(ema)


@dataclass
class Optimization:
    """The optimizer and everything that steers it, stepped by train_one_epoch. The schedule is a function of
    progress through the run (cifarkit.budget.Progress): step / total steps for a fixed-length run, re-fitted
    to the clock under a time budget."""

    optimizer: torch.optim.Optimizer
    loss_fn: nn.Module
    base_lrs: list[float]  # per torch param group, before the schedule
    stops: list[float | None]  # per torch param group: progress from which it stops training (lr 0); None: never
    progress: Progress  # optimizer steps -> progress in [0, 1]; its total_steps ends the run
    loss_scale: float = 1.0  # multiplies the loss (world size for summed losses under DDP's gradient mean)
    schedule: tuple[float, float, float] | None = None  # triangle over progress (start, peak, end); None: constant
    lr_factors: list[float] | None = None  # the triangle per step, precomputed for a run of fixed length
    lookahead: Lookahead | None = None
    lookahead_every: int = 0  # steps between lookahead updates
    step: int = 0  # global steps done so far

    @property
    def total_steps(self) -> int:
        return self.progress.total_steps

    def lr_factor(self) -> float:
        if self.schedule is None:
            return 1.0
        if self.lr_factors is not None:
            return self.lr_factors[self.step]
        start, peak, end = self.schedule
        return float(np.interp(self.progress.at(self.step), [0.0, peak, 1.0], [start, 1.0, end]))

    def set_lr(self) -> None:
        factor, p = self.lr_factor(), self.progress.at(self.step)
        for group, base, stop in zip(self.optimizer.param_groups, self.base_lrs, self.stops, strict=True):
            group["lr"] = 0.0 if stop is not None and p >= stop else base * factor

    @property
    def done(self) -> bool:
        return self.step >= self.progress.total_steps


def make_optimization(
    model: Net,
    recipe: Recipe,
    *,
    lr: float,
    batch_size: int,
    device: torch.device,
    total_steps: int,
    steps_per_epoch: int,
    world_size: int = 1,
    fixed_length: bool = True,
) -> Optimization:
    """The recipe's optimizer over the model's own parameter groups (Net.param_groups). Adam for the blog
    (the fused kernel where the device has one: same maths, one kernel per step); Nesterov SGD with
    airbench's decoupled hyperparameters for the strong recipe. A group may scale the learning rate and stop
    training after some epochs (its learning rate drops to 0: the same trajectory as freezing it, and
    DistributedDataParallel keeps seeing every gradient); those epochs become a fraction of `total_steps`, so
    that a run fitted to a time budget stops the group at the same point of its schedule."""
    groups = [g for g in model.param_groups(recipe) if g.params]
    if recipe.optimizer == "adam":
        torch_groups = [{"params": g.params, "lr": lr * g.lr_scale} for g in groups]
        optimizer = _fused_if_possible(torch.optim.Adam, torch_groups, device, lr=lr)
    elif recipe.optimizer == "sgd_nesterov":
        # airbench gives lr and weight decay per 1,024 images, decoupled from momentum; PyTorch's SGD wants
        # them coupled, so convert. Decay is the same for every group, whatever its learning rate.
        kilostep_scale = 1024 * (1 + 1 / (1 - recipe.momentum))
        base_lr = lr / kilostep_scale
        wd = recipe.weight_decay * batch_size / kilostep_scale
        torch_groups = [
            {"params": g.params, "lr": base_lr * g.lr_scale, "weight_decay": wd / (base_lr * g.lr_scale)}
            for g in groups
        ]
        optimizer = _fused_if_possible(torch.optim.SGD, torch_groups, device, momentum=recipe.momentum, nesterov=True)
    else:
        raise CifarkitError(f"recipe {recipe.name!r}: unknown optimizer {recipe.optimizer!r}")
    return Optimization(
        optimizer=optimizer,
        loss_fn=nn.CrossEntropyLoss(label_smoothing=recipe.label_smoothing, reduction=recipe.loss_reduction),
        base_lrs=[g["lr"] for g in torch_groups],
        stops=[None if g.train_epochs is None else g.train_epochs * steps_per_epoch / total_steps for g in groups],
        progress=Progress(total_steps),
        loss_scale=float(world_size) if recipe.loss_reduction == "sum" else 1.0,
        schedule=recipe.schedule,
        lr_factors=triangle_schedule(total_steps, *recipe.schedule) if recipe.schedule and fixed_length else None,
        lookahead=Lookahead(model) if recipe.lookahead_every else None,
        lookahead_every=recipe.lookahead_every,
    )


def _fused_if_possible(
    ctor: Callable[..., torch.optim.Optimizer], groups: list[dict[str, Any]], device: torch.device, **kwargs: Any
) -> torch.optim.Optimizer:
    """The fused kernel where the device has one (same maths, one kernel per step), else the default."""
    if device.type in ("cpu", "cuda", "mps"):
        try:
            return ctor([dict(g) for g in groups], fused=True, **kwargs)  # copies: torch fills in the dicts
        except (RuntimeError, TypeError):
            pass
    return ctor([dict(g) for g in groups], **kwargs)


# ---------------------------------------------------------------------------------------------------------
# Stage functions
# ---------------------------------------------------------------------------------------------------------


def train_one_epoch(
    model: nn.Module,
    batches: DeviceBatches,
    opt: Optimization,
    epoch: int,
    *,
    precision: str = "fp32",
    scaler: torch.amp.GradScaler | None = None,  # fp16 loss scaling (cifarkit.runtime.grad_scaler); None: off
    on_step: Callable[[int, torch.Tensor], None] | None = None,  # (step, losses so far) after every step
) -> torch.Tensor:
    """One pass over `batches` (or up to opt.total_steps). Returns per-batch losses (float32, CPU).

    Nothing here waits for the device: losses stay on it until the epoch ends (on_step decides when to read
    them), and with a scaler the fused optimizers unscale and skip non-finite steps on the device."""
    model.train()
    device = batches.device
    losses = torch.empty(len(batches), dtype=torch.float32, device=device)
    per_image = opt.loss_fn.reduction == "sum"
    done = 0
    for i, (x, y) in enumerate(batches.epoch(epoch)):
        if opt.done:
            break
        opt.set_lr()
        with autocast(device, precision):
            loss = opt.loss_fn(model(x), y)
        opt.optimizer.zero_grad(set_to_none=True)
        scaled = loss * opt.loss_scale if opt.loss_scale != 1.0 else loss
        if scaler is None:
            scaled.backward()
            opt.optimizer.step()
        else:
            scaler.scale(scaled).backward()
            scaler.step(opt.optimizer)
            scaler.update()
        opt.step += 1
        if opt.lookahead is not None and opt.step % opt.lookahead_every == 0:
            opt.lookahead.update(_unwrap(model), decay=0.95**5 * opt.progress.at(opt.step) ** 3)
        losses[i] = loss.detach() / (len(y) if per_image else 1)
        done = i + 1
        if on_step is not None:
            on_step(i, losses)
    return losses[:done].cpu()


def _unwrap(model: nn.Module) -> nn.Module:
    model = getattr(model, "module", model)  # DistributedDataParallel
    return getattr(model, "_orig_mod", model)  # torch.compile


@torch.no_grad()
def evaluate(
    model: DeployedModel,
    x: np.ndarray,
    y: np.ndarray,
    classes: tuple[str, ...],
    *,
    device: torch.device,
    batch_size: int = 1000,
    precision: str = "fp32",
    dist: Dist = Dist(),  # noqa: B008 (frozen, never mutated)
) -> Metrics:
    """Evaluate uint8 [N, H, W, 3] images through a DeployedModel, which carries the normalization and the
    TTA (exactly what is exported; `deployed_from_checkpoint` builds one from a checkpoint): accuracy, mean
    loss and per-class accuracy, in fp32 unless `precision` says otherwise. Under DDP each rank takes a
    share and the counts are summed over ranks."""
    if not isinstance(model, DeployedModel):
        raise TypeError(
            "evaluate() takes a DeployedModel, which carries the normalization: DeployedModel(net, mean, std) "
            "or cifarkit.checkpoint.deployed_from_checkpoint(state)"
        )
    model = model.to(device).eval()
    correct = torch.zeros(len(classes), dtype=torch.float64, device=device)
    total = torch.zeros(len(classes), dtype=torch.float64, device=device)
    loss_sum = torch.zeros(1, dtype=torch.float64, device=device)
    for start in range(dist.rank * batch_size, len(x), batch_size * dist.world_size):
        xb = torch.from_numpy(np.ascontiguousarray(x[start : start + batch_size]))
        yb = torch.from_numpy(np.ascontiguousarray(y[start : start + batch_size]))
        if device.type == "cuda":  # from pinned memory the copy is queued, not waited for: the host runs ahead
            xb, yb = xb.pin_memory(), yb.pin_memory()
        xb, yb = xb.to(device, non_blocking=True), yb.to(device, non_blocking=True)
        with autocast(device, precision):
            logits, _ = model(xb)
        loss_sum += nn.functional.cross_entropy(logits.float(), yb, reduction="sum").double()
        correct.index_add_(0, yb, (logits.argmax(1) == yb).double())
        total.index_add_(0, yb, torch.ones_like(yb, dtype=torch.float64))
    dist.all_reduce_sum_(correct, total, loss_sum)
    correct_c, total_c = correct.cpu().long(), total.cpu().long()
    n = int(total_c.sum())
    per_class = {
        name: (int(correct_c[i]) / int(total_c[i]) if int(total_c[i]) else float("nan"))
        for i, name in enumerate(classes)
    }
    return Metrics(
        accuracy=int(correct_c.sum()) / max(n, 1), loss=float(loss_sum) / max(n, 1), per_class=per_class, count=n
    )


# ---------------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------------


def train(cfg: TrainConfig, reporter: Reporter | None = None) -> TrainResult:
    """Fit a model as `cfg` says, writing the run folder (checkpoint.pt after every epoch, metrics.json and
    loss.png at the end). Under torchrun each process trains on its share of every epoch with
    DistributedDataParallel (nccl on CUDA, gloo on CPU); only rank 0 reports and writes.
    Raises CifarkitError on bad input."""
    cfg, resumed = _resolve(cfg)
    with runtime(cfg.device, cfg.precision, cfg.channels_last, cfg.threads) as rt:
        if cfg.batch_size % rt.dist.world_size:
            raise CifarkitError(
                f"--batch-size {cfg.batch_size} must be divisible by the {rt.dist.world_size} processes"
            )
        rep = (reporter or Reporter()) if rt.dist.main else Reporter()
        out_dir = Path(cfg.out or f"runs/{cfg.model}-{time.strftime('%Y%m%d-%H%M%S')}")
        # Rank 0 owns the run folder, locked for the run; a run that fails before its first checkpoint leaves
        # none behind.
        with output_folder(out_dir) if rt.dist.main else contextlib.nullcontext(out_dir):
            if rt.dist.main:
                _claim_run_folder(out_dir, cfg)
            return _run(cfg, rt, resumed, rep, out_dir)


RUN_FILES = ("checkpoint.pt", "metrics.json", "loss.png")  # what a run folder holds


def _claim_run_folder(out_dir: Path, cfg: TrainConfig) -> None:
    """An earlier run's files are never replaced silently: continuing it needs --resume, replacing it
    --overwrite (which removes its files first, so that no old metrics.json outlives them)."""
    existing = [name for name in RUN_FILES if (out_dir / name).exists()]
    if not existing or (cfg.resume and Path(cfg.resume).resolve().parent == out_dir.resolve()):
        return
    if not cfg.overwrite:
        raise CifarkitError(
            f"--out {out_dir} already holds a run ({', '.join(existing)}); pass --resume "
            f"{out_dir / 'checkpoint.pt'} to continue it, --overwrite to replace it, or another --out"
        )
    for name in existing:
        (out_dir / name).unlink()


def _resolve(cfg: TrainConfig) -> tuple[TrainConfig, dict[str, Any] | None]:
    """The config with the recipe's values filled in and, when resuming, the checkpoint's recipe fields."""
    resumed = None
    if cfg.resume and cfg.time_budget is not None:
        raise CifarkitError("--time-budget cannot be combined with --resume: a resumed run finishes its own plan")
    if cfg.resume:
        resumed = load_checkpoint(cfg.resume)
        saved = resumed.get("train_config", {})
        cfg = replace(cfg, **{name: saved[name] for name in RECIPE_FIELDS if name in saved})
        if cfg.epochs is None:  # continue the interrupted run to its own target, not the recipe's default
            cfg = replace(cfg, epochs=saved.get("epochs"))
            resumed["continue_plan"] = True  # and, if a budget fitted its schedule, to that schedule's end
        if cfg.data is None and saved.get("data") not in (None, "torchvision", "download"):
            # A data path is never taken from a checkpoint: a checkpoint shipped beside a crafted data folder
            # must not choose what this process reads.
            raise CifarkitError(
                f"--resume: pass --data; {cfg.resume} was trained on {saved['data']} (cifarkit never reads a "
                "data path from a checkpoint)"
            )
        if cfg.out is None:
            cfg = replace(cfg, out=str(Path(cfg.resume).parent))
    cfg = cfg.resolved()  # fills the recipe's values, then validates
    plan = _fitted_plan(resumed)
    if plan is not None:
        if resumed.get("step", 0) >= plan.get("total_steps", 0):
            raise CifarkitError(f"--resume: {cfg.resume} already finished its time-budgeted plan")
    elif resumed is not None and resumed.get("epoch", 0) >= math.ceil(cfg.epochs):
        raise CifarkitError(
            f"--resume: {cfg.resume} already holds {resumed['epoch']} epochs; pass --epochs "
            f"greater than that to train further"
        )
    return cfg, resumed


def _run(cfg: TrainConfig, rt: Runtime, resumed: dict[str, Any] | None, rep: Reporter, out_dir: Path) -> TrainResult:
    clock = _Clock(cfg.budget_start)
    recipe = get_recipe(cfg.recipe)
    data = _load_data(cfg, resumed, rep)
    clock.lap("data")
    model, batches = _build_model(cfg, recipe, data, rt, resumed)
    step_model = _wrap(model, rt, cfg.compile)
    opt = _build_optimization(cfg, recipe, model, len(batches), rt, resumed)
    scaler = rt.grad_scaler()  # fp16 only; its scale restarts at 2**16 on resume and re-adapts in a few steps
    # The test-time augmentation of the final evaluation and of the exported model: the recipe's, unless a time
    # budget chose a cheaper one (kept in the checkpoint, so that a resumed run ends with the same).
    final_tta = resumed["artifact"]["tta"] if resumed else recipe.tta
    pacer = None
    if cfg.time_budget:
        pacer, final_tta = _pacer(cfg, recipe, model, data, rt, opt, clock)
    clock.lap("build")
    start_epoch = int(resumed["epoch"]) if resumed else 0
    parameters = count_parameters(model)
    rep.start(
        {
            **rt.info(),
            "compile": cfg.compile,
            "recipe": recipe.name,
            "model": cfg.model,
            "parameters": parameters,
            "train_images": len(data.train_y),
            "test_images": len(data.test_y),
            "start_epoch": start_epoch,
            "epochs": _epochs_planned(opt, len(batches)),
            "steps_per_epoch": len(batches),
            "time_budget": cfg.time_budget,
            "out": str(out_dir),
        }
    )

    # ---- per epoch: train, evaluate if due, record, checkpoint, report -----------------------------------
    history = [EpochRecord(**r) for r in resumed["history"]] if resumed else []
    metrics: Metrics | None = None  # the latest evaluation
    epoch = start_epoch
    while not opt.done:
        rep.epoch_start(epoch, _epochs_planned(opt, len(batches)), len(batches))
        t0 = time.perf_counter()
        on_step = _step_reporter(rep, epoch, opt, cfg, len(batches), t0, rt.device, pacer)
        losses = train_one_epoch(
            step_model, batches, opt, epoch, precision=rt.precision, scaler=scaler, on_step=on_step
        )
        last = opt.done  # the plan's end (under a budget it may fall inside an epoch)
        if last and opt.lookahead is not None:
            opt.lookahead.update(model, decay=1.0)  # the EMA becomes the final weights
        rt.synchronize()
        seconds = time.perf_counter() - t0
        if not torch.isfinite(losses).all():
            raise CifarkitError(f"training diverged in epoch {epoch + 1} (loss is not finite); lower --lr")
        losses = _mean_over_ranks(losses, rt)
        if last:
            clock.lap("epochs")

        # The accuracy curve is cheap: no TTA, the training precision. The final figure is what the exported
        # model gives: fp32 with the recipe's TTA.
        tta = final_tta if last else "none"
        tested = None
        if last or (cfg.eval_every and (epoch + 1) % cfg.eval_every == 0):
            tested = metrics = _test(model, recipe, data, cfg, rt, tta, "fp32" if last else rt.precision)

        record = EpochRecord(
            epoch=epoch + 1,
            losses=[float(v) for v in losses.tolist()],
            seconds=seconds,
            images_per_second=len(losses) * batches.batch_size * rt.dist.world_size / seconds,
            test_accuracy=tested.accuracy if tested else None,
            test_loss=tested.loss if tested else None,
            tta=tta,
            elapsed=(history[-1].elapsed if history else 0.0) + time.perf_counter() - t0,
        )
        history.append(record)
        if last:
            clock.lap("final_evaluation")
        # Under a time budget the first checkpoint waits for the first fit: before it there is no plan to resume,
        # and a budget found too short leaves no run folder.
        if rt.dist.main and (pacer is None or pacer.fits or last):
            state = _checkpoint_state(cfg, recipe, model, opt, data, rt, history, metrics, final_tta)
            save_checkpoint(out_dir / "checkpoint.pt", state)
        rep.epoch_end(record, _epochs_planned(opt, len(batches)))
        epoch += 1

    # ---- summary ---------------------------------------------------------------------------------------
    assert metrics is not None  # the last epoch always evaluates, and at least one epoch ran
    facts = {
        "recipe": recipe.name,
        "model": cfg.model,
        "parameters": parameters,
        "data": data.source,
        "data_kind": data.kind,
        "classes": list(data.classes),
        "epochs": epoch if cfg.time_budget else cfg.epochs,
        "steps": opt.step,
        "tta": final_tta,
        **rt.info(),
        "compile": cfg.compile,
        "optimizer": type(opt.optimizer).__name__ + (" (fused)" if opt.optimizer.defaults.get("fused") else ""),
        "threads": torch.get_num_threads(),
        "data_load_seconds": data.load_seconds,
        "data_from_cache": data.from_cache,
        "resumed_from_epoch": start_epoch if resumed else None,
        "time_budget": pacer.to_dict() if pacer is not None else None,
        "train_config": asdict(cfg),
        "versions": _versions(),
    }
    clock.lap("checkpoint")
    if rt.dist.main:
        report.plot_loss([v for r in history for v in r.losses], out_dir / "loss.png", steps_per_epoch=len(batches))
    clock.lap("report")
    facts.update(total_seconds=clock.since_start(), phases=clock.phases)  # seconds since the budget's start
    summary = report.summary(history, metrics, facts)
    if rt.dist.main:
        report.write_metrics(out_dir, summary)
    this_call = history[start_epoch:]
    ips = sorted(r.images_per_second for r in this_call)
    return TrainResult(
        out_dir=out_dir,
        checkpoint=out_dir / "checkpoint.pt",
        metrics=metrics,
        epochs_run=len(this_call),
        epoch_seconds=[r.seconds for r in this_call],
        images_per_second=ips[len(ips) // 2],
        device=str(rt.device),
        precision=rt.precision,
        channels_last=rt.channels_last,
        summary=summary,
        rank=rt.dist.rank,
    )


class _Clock:
    """Wall time per phase of a run, from `start` (time.time(); the process's start under the CLI)."""

    def __init__(self, start: float | None) -> None:
        now = time.time()
        self.start = start if start is not None else now
        self.phases: dict[str, float] = {"start_up": now - self.start}
        self._mark = now

    def lap(self, name: str) -> None:
        now = time.time()
        self.phases[name] = self.phases.get(name, 0.0) + now - self._mark
        self._mark = now

    def since_start(self) -> float:
        return time.time() - self.start


def _epochs_planned(opt: Optimization, steps_per_epoch: int) -> int:
    return math.ceil(opt.total_steps / steps_per_epoch)


def _test(
    model: Net, recipe: Recipe, data: CifarData, cfg: TrainConfig, rt: Runtime, tta: str, precision: str
) -> Metrics:
    deployed = DeployedModel(model, recipe.mean, recipe.std, tta)
    return evaluate(
        deployed, data.test_x, data.test_y, data.classes, device=rt.device,
        batch_size=cfg.eval_batch_size, precision=precision, dist=rt.dist,
    )  # fmt: skip


def _pacer(
    cfg: TrainConfig, recipe: Recipe, model: Net, data: CifarData, rt: Runtime, opt: Optimization, clock: _Clock
) -> tuple[Pacer, str]:
    """The time budget's pacer, its reserve measured, and the final test-time augmentation. One forward pass
    of the test set (fp32) is timed on a slice and scaled to all of it; the final evaluation keeps the recipe's
    TTA if it fits in its share of the budget, else a cheaper one (cifarkit.budget.final_tta). The reserve:
    that evaluation plus what the checkpoint, the reports and the exit take."""
    if clock.since_start() >= cfg.time_budget:
        raise CifarkitError(
            f"--time-budget {cfg.time_budget:g}s is already spent ({clock.since_start():.0f} s of start-up and data)"
        )
    probe = min(len(data.test_y), 512)
    small = replace(cfg, eval_batch_size=min(cfg.eval_batch_size, probe))
    warm = replace(data, test_x=data.test_x[:16], test_y=data.test_y[:16])
    _test(model, recipe, warm, small, rt, "none", "fp32")  # first-call costs (allocations, kernels) not counted
    t0 = time.perf_counter()
    head = replace(data, test_x=data.test_x[:probe], test_y=data.test_y[:probe])
    _test(model, recipe, head, small, rt, "none", "fp32")
    model.train()
    one_pass = (time.perf_counter() - t0) * len(data.test_y) / probe
    tta = final_tta(recipe.tta, one_pass, cfg.time_budget)
    final_eval = TTA_PASSES[tta] * one_pass
    # What follows the last step besides the evaluation: the checkpoint (~10 MB/s at worst here, plus torch's
    # serialisation), metrics.json and loss.png (matplotlib's first import and drawing: ~1 s on a 2-core CPU)
    # and the interpreter's exit (torch's teardown, ~0.5 s); 1 % of the budget on top for the clock's noise.
    weights_mb = sum(t.numel() * t.element_size() for t in model.state_dict().values()) / 2**20
    reserve = 1.1 * final_eval + 3 * weights_mb / 10 + 2.0 + 0.01 * cfg.time_budget
    budget = Budget(seconds=cfg.time_budget, started=clock.start, reserve=reserve)
    return Pacer(budget, opt.progress, refit_seconds=max(5.0, cfg.time_budget / 40), final_tta=tta), tta


# ---- the run's phases -------------------------------------------------------------------------------------


def _load_data(cfg: TrainConfig, resumed: dict[str, Any] | None, rep: Reporter) -> CifarData:
    data = load_data(cfg.data, cfg.data_dir)
    rep.data_loaded(data)
    if resumed is not None and list(resumed["artifact"]["class_names"]) != list(data.classes):
        raise CifarkitError(
            f"--resume: the checkpoint's classes {resumed['artifact']['class_names']} differ from the data's "
            f"{list(data.classes)}"
        )
    return data


def _build_model(
    cfg: TrainConfig, recipe: Recipe, data: CifarData, rt: Runtime, resumed: dict[str, Any] | None
) -> tuple[Net, DeviceBatches]:
    """The net (seeded init, then the checkpoint's weights or its data-dependent init) on the device, and
    the training split on the device as batches."""
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, num_classes=data.num_classes)
    batches = DeviceBatches(
        data.train_x,
        data.train_y,
        batch_size=cfg.batch_size // rt.dist.world_size,
        device=rt.device,
        mean=recipe.mean,
        std=recipe.std,
        seed=cfg.seed,
        channels_last=rt.channels_last,
        rank=rt.dist.rank,
        world_size=rt.dist.world_size,
        translate=recipe.translate,
        flip=recipe.flip,
        drop_last=recipe.drop_last,
    )
    if resumed is not None:
        load_weights(model, resumed["model_state"], cfg.model)
    else:
        model.init_from_data(batches.x, batches.mean, batches.std)
    model = model.to(rt.device)
    if rt.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model, batches


def _wrap(model: nn.Module, rt: Runtime, compile: bool) -> nn.Module:
    """What the training step calls: DistributedDataParallel under torchrun, torch.compile on request."""
    if rt.dist.world_size > 1:
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [rt.device.index] if rt.device.type == "cuda" else None
        model = DistributedDataParallel(model, device_ids=device_ids)  # broadcasts rank 0's weights
    return torch.compile(model) if compile else model


def _build_optimization(
    cfg: TrainConfig, recipe: Recipe, model: Net, steps_per_epoch: int, rt: Runtime, resumed: dict[str, Any] | None
) -> Optimization:
    """The recipe's optimization, positioned where a resumed run stopped (step, optimizer and EMA state, and
    the plan of a budgeted run, which a resume finishes as it was fitted)."""
    plan = _fitted_plan(resumed)
    opt = make_optimization(
        model,
        recipe,
        lr=cfg.lr,
        batch_size=cfg.batch_size,
        device=rt.device,
        total_steps=math.ceil(steps_per_epoch * cfg.epochs),
        steps_per_epoch=steps_per_epoch,
        world_size=rt.dist.world_size,
        fixed_length=not (cfg.time_budget or plan),
    )
    if plan is not None:
        opt.progress = Progress(int(plan["total_steps"]), [(int(s), float(p)) for s, p in plan["knots"]])
    if resumed is not None:
        opt.step = min(int(resumed.get("step", int(resumed["epoch"]) * steps_per_epoch)), opt.total_steps)
        try:
            if resumed.get("optimizer_state"):
                opt.optimizer.load_state_dict(resumed["optimizer_state"])
            if opt.lookahead is not None and resumed.get("lookahead_state"):
                ema = resumed["lookahead_state"]
                if ema.keys() != opt.lookahead.ema.keys():
                    raise ValueError("its lookahead state names other tensors than the model's")
                opt.lookahead.ema = {k: v.to(rt.device) for k, v in ema.items()}
        except (ValueError, KeyError, TypeError, RuntimeError) as exc:
            raise CifarkitError(f"--resume: {cfg.resume} cannot continue this run ({first_line(exc, 160)})") from None
    return opt


def _fitted_plan(resumed: dict[str, Any] | None) -> dict[str, Any] | None:
    """The plan a resumed run continues when a time budget fitted it (and --epochs did not ask for another)."""
    plan = resumed.get("plan") if resumed is not None and resumed.get("continue_plan") else None
    return plan if isinstance(plan, dict) and len(plan.get("knots", [])) > 1 else None


def _mean_over_ranks(losses: torch.Tensor, rt: Runtime) -> torch.Tensor:
    if rt.dist.world_size == 1:
        return losses
    losses = losses.to(rt.device)
    rt.dist.all_reduce_sum_(losses)
    return (losses / rt.dist.world_size).cpu()


def _step_reporter(
    rep: Reporter,
    epoch: int,
    opt: Optimization,
    cfg: TrainConfig,
    steps: int,
    t0: float,
    device: torch.device,
    pacer: Pacer | None = None,
) -> Callable[[int, torch.Tensor], None]:
    """Calls rep.step every `every` batches with the mean loss since the last call, and the pacer (under a
    time budget) after every step. On CPU reading the loss costs nothing; on a GPU it syncs, so it happens at
    most every 50 batches (the pacer reads only the clock)."""
    wanted = max(1, getattr(rep, "every", None) or cfg.log_every)
    every = max(wanted, 50) if device.type != "cpu" else wanted
    last = [0]

    def on_step(i: int, losses: torch.Tensor) -> None:
        if pacer is not None:
            pacer.step_done(opt.step)
        if (i + 1) % every == 0 or i + 1 == steps or opt.done:
            window = losses[last[0] : i + 1]
            last[0] = i + 1
            rate = (i + 1) * cfg.batch_size / max(time.perf_counter() - t0, 1e-9)
            rep.step(epoch, _epochs_planned(opt, steps), i + 1, steps, float(window.mean()), rate)

    return on_step


def _versions() -> dict[str, str]:
    return versions("torch", "torchvision", "numpy", "python")


def _checkpoint_state(
    cfg: TrainConfig,
    recipe: Recipe,
    model: nn.Module,
    opt: Optimization,
    data: CifarData,
    rt: Runtime,
    history: list[EpochRecord],
    metrics: Metrics | None,
    tta: str,
) -> dict[str, Any]:
    """Everything cifarkit.checkpoint documents, as plain data on the CPU."""

    def cpu(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.detach().to("cpu", memory_format=torch.contiguous_format).clone() for k, v in tensors.items()}

    artifact = ArtifactMeta(
        class_names=tuple(data.classes),
        model_name=cfg.model,
        mean=recipe.mean,
        std=recipe.std,
        tta=tta,
        test_accuracy=None if metrics is None else round(metrics.accuracy, 6),
    )
    return {
        "format": CHECKPOINT_FORMAT,
        "format_version": CHECKPOINT_VERSION,
        "artifact": artifact.to_dict(),
        "model_kwargs": {},
        "model_state": cpu(model.state_dict()),
        "recipe": asdict(recipe),
        "train_config": asdict(cfg),
        "epoch": history[-1].epoch,
        "step": opt.step,
        "plan": opt.progress.to_dict(),  # knots beyond (0, 0): fitted to a time budget
        "optimizer_state": opt.optimizer.state_dict(),
        "lookahead_state": cpu(opt.lookahead.ema) if opt.lookahead is not None else None,
        "history": [asdict(r) for r in history],
        "metrics": metrics.to_dict() if metrics is not None else None,
        "data_source": data.source,
        "runtime": rt.info(),
        "versions": _versions(),
    }
