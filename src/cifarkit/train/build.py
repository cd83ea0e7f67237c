"""The pieces a run is built from, one function each: the data, the net and its batches, the optimization
(positioned where a resumed run stopped), the time budget's pacer, and the checkpoint a finished epoch leaves.
cifarkit.train.run calls them in order.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, replace

import torch
from torch import nn

from cifarkit.data import CifarData, load_data
from cifarkit.errors import CifarkitError, first_line
from cifarkit.model.checkpoint import Checkpoint, load_weights
from cifarkit.model.deployed import DeployedModel
from cifarkit.model.nets import Net, build_model, multiply_adds
from cifarkit.spec import ArtifactMeta, versions
from cifarkit.stage import Reporter
from cifarkit.train.batches import DeviceBatches
from cifarkit.train.budget import TTA_PASSES, Budget, Clock, Pacer, Progress, final_evaluation
from cifarkit.train.config import TrainConfig
from cifarkit.train.loop import evaluate
from cifarkit.train.optim import Optimization, make_optimization, side_at
from cifarkit.train.recipes import Recipe
from cifarkit.train.report import EpochRecord, Metrics
from cifarkit.train.runtime import Runtime


def load_run_data(cfg: TrainConfig, resumed: Checkpoint | None, rep: Reporter) -> CifarData:
    data = load_data(cfg.data, cfg.data_dir)
    how = "from cache" if data.from_cache else "decoded"
    rep.note(
        f"data: {data.source} ({data.kind}, {len(data.train_y)} train / {len(data.test_y)} test, "
        f"{data.num_classes} classes, {how} in {data.load_seconds:.1f} s)"
    )
    if resumed is not None and resumed.class_names != tuple(data.classes):
        raise CifarkitError(
            f"--resume: the checkpoint's classes {list(resumed.class_names)} differ from the data's "
            f"{list(data.classes)}"
        )
    return data


def build_net(
    cfg: TrainConfig, recipe: Recipe, data: CifarData, rt: Runtime, resumed: Checkpoint | None
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
        load_weights(model, resumed.model_state, cfg.model)
    else:
        model.init_from_data(batches.x, batches.mean, batches.std)
    model = model.to(rt.device)
    if rt.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model, batches


def wrap(model: nn.Module, rt: Runtime, compile: bool) -> nn.Module:
    """What the training step calls: DistributedDataParallel under torchrun, torch.compile on request."""
    if rt.dist.world_size > 1:
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [rt.device.index] if rt.device.type == "cuda" else None
        model = DistributedDataParallel(model, device_ids=device_ids)  # broadcasts rank 0's weights
    return torch.compile(model) if compile else model


def build_optimization(
    cfg: TrainConfig, recipe: Recipe, model: Net, steps_per_epoch: int, rt: Runtime, resumed: Checkpoint | None,
    plan: Progress | None,
) -> Optimization:  # fmt: skip
    """The recipe's optimization, positioned where a resumed run stopped (step, optimizer and EMA state, and
    the `plan` of a budgeted run, which a resume finishes as it was fitted)."""
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
        opt.progress = plan
    if resumed is None:
        return opt
    step = resumed.step if resumed.step is not None else resumed.epoch * steps_per_epoch
    opt.step = min(step, opt.total_steps)
    try:
        if resumed.optimizer_state:
            opt.optimizer.load_state_dict(dict(resumed.optimizer_state))
        if opt.lookahead is not None and resumed.lookahead_state:
            ema = resumed.lookahead_state
            if ema.keys() != opt.lookahead.ema.keys():
                raise ValueError("its lookahead state names other tensors than the model's")
            opt.lookahead.ema = {k: v.to(rt.device) for k, v in ema.items()}
    except (ValueError, KeyError, TypeError, RuntimeError) as exc:
        raise CifarkitError(f"--resume: {cfg.resume} cannot continue this run ({first_line(exc, 160)})") from None
    return opt


def fitted_plan(resumed: Checkpoint | None, continue_plan: bool) -> Progress | None:
    """The plan a resumed run continues when a time budget fitted it (and --epochs did not ask for another)."""
    plan = resumed.plan if resumed is not None and continue_plan else None
    if not isinstance(plan, dict) or len(plan.get("knots", [])) <= 1:
        return None
    return Progress(int(plan["total_steps"]), [(int(s), float(p)) for s, p in plan["knots"]])


def measure_test(
    model: Net, recipe: Recipe, data: CifarData, cfg: TrainConfig, rt: Runtime, tta: str, precision: str
) -> Metrics:
    deployed = DeployedModel(model, recipe.mean, recipe.std, tta)
    return evaluate(
        deployed, data.test_x, data.test_y, data.classes, device=rt.device,
        batch_size=cfg.eval_batch_size, precision=precision, dist=rt.dist,
    )  # fmt: skip


def step_cost(model: Net, recipe: Recipe, data: CifarData) -> Callable[[float], float] | None:
    """A step's cost at a point of the schedule, relative to a step at the data's own size: under progressive
    resizing the low-resolution steps cost their share of multiply-adds (an estimate: the pacer's re-fits
    correct it once full-size steps are measured). None: every step costs the same."""
    if not recipe.progressive:
        return None
    full = max(multiply_adds(model, data.train_x.shape[1]), 1)
    ratios = {side: multiply_adds(model, side) / full for _, side in recipe.progressive}

    def cost(progress: float) -> float:
        side = side_at(recipe.progressive, progress)
        return 1.0 if side is None else ratios[side]

    return cost


def make_pacer(
    cfg: TrainConfig, recipe: Recipe, model: Net, data: CifarData, rt: Runtime, opt: Optimization,
    steps_per_epoch: int, started: float, clock: Clock,
) -> tuple[Pacer, str, str]:  # fmt: skip
    """The time budget's pacer, its reserve measured, and the final evaluation's TTA and precision. One forward
    pass of the test set is timed on a slice, in fp32 and in the training precision, and scaled to all of it;
    the final evaluation keeps the recipe's TTA if it fits in its share of the budget (in fp32, else in the
    training precision), else a cheaper one (cifarkit.train.budget.final_evaluation). The reserve: that
    evaluation plus what the checkpoint, the reports and the exit take."""
    assert cfg.time_budget is not None
    if clock() - started >= cfg.time_budget:
        raise CifarkitError(
            f"--time-budget {cfg.time_budget:g}s is already spent ({clock() - started:.0f} s of start-up and data)"
        )
    probe = min(len(data.test_y), 512)
    small = replace(cfg, eval_batch_size=min(cfg.eval_batch_size, probe))
    warm = replace(data, test_x=data.test_x[:16], test_y=data.test_y[:16])
    head = replace(data, test_x=data.test_x[:probe], test_y=data.test_y[:probe])
    passes: dict[str, float] = {}
    for precision in dict.fromkeys(("fp32", rt.precision)):  # the exported model's first
        measure_test(model, recipe, warm, small, rt, "none", precision)  # first-call costs (allocations) not counted
        t0 = clock()
        measure_test(model, recipe, head, small, rt, "none", precision)
        passes[precision] = (clock() - t0) * len(data.test_y) / probe
    model.train()
    one_pass = passes["fp32"]
    tta, precision = final_evaluation(recipe.tta, passes, cfg.time_budget)
    final_eval = TTA_PASSES[tta] * passes[precision]
    # What follows the last step besides the evaluation: the checkpoint (~10 MB/s at worst here, plus torch's
    # serialisation), metrics.json and loss.png (matplotlib's first import and drawing: ~0.5 s on a 2-core CPU)
    # and the interpreter's exit (torch's teardown, ~0.5 s); 0.5 % of the budget on top for the clock's noise.
    weights_mb = sum(t.numel() * t.element_size() for t in model.state_dict().values()) / 2**20
    reserve = 1.05 * final_eval + 3 * weights_mb / 10 + 1.5 + 0.005 * cfg.time_budget
    budget = Budget(seconds=cfg.time_budget, started=started, reserve=reserve)
    # Evaluations asked for along the way (--eval-every) are paid for in the plan: charged at one fp32 pass until
    # the first has been timed (they run in the training precision, so that is an upper bound).
    pacer = Pacer(
        budget, opt.progress, refit_seconds=max(5.0, cfg.time_budget / 40), final_tta=tta, clock=clock,
        final_precision=precision,
        eval_seconds=one_pass, eval_every_steps=(cfg.eval_every or 0) * steps_per_epoch,
        step_cost=step_cost(model, recipe, data),
    )  # fmt: skip
    return pacer, tta, precision


def step_reporter(
    rep: Reporter, epoch: int, epochs: Callable[[], str], opt: Optimization, cfg: TrainConfig, steps: int,
    device: torch.device, pacer: Pacer | None, record: Callable[[float, float], None] | None = None,
) -> Callable[[int, torch.Tensor], None]:  # fmt: skip
    """After every step: the pacer (under a time budget); every `progress_every` steps rep.progress and
    `record` (the run's live log) with the mean loss since the last call and images/s; every `log_every` steps
    the blog's line ("Epoch [1/4], Batch [500/1563], Loss: 1.2798", the mean since the last line). On a CPU
    reading the loss costs nothing; on a GPU it syncs, so it happens at most every 50 steps (the pacer reads
    only the clock)."""
    every = cfg.progress_every if device.type == "cpu" else max(cfg.progress_every, 50)
    log = cfg.log_every if device.type == "cpu" else max(cfg.log_every, 50)
    last = {"progress": 0, "log": 0}
    t0 = time.perf_counter()

    def mean_since(name: str, i: int, losses: torch.Tensor) -> float:
        value = float(losses[last[name] : i + 1].mean())
        last[name] = i + 1
        return value

    def on_step(i: int, losses: torch.Tensor) -> None:
        if pacer is not None:
            pacer.step_done(opt.step)
        end = i + 1 == steps or opt.done
        if (i + 1) % every == 0 or end:
            rate = (i + 1) * cfg.batch_size / max(time.perf_counter() - t0, 1e-9)
            mean = mean_since("progress", i, losses)
            rep.progress(i + 1, loss=mean, images_per_s=rate)
            if record is not None:
                record(mean, rate)
        if (i + 1) % log == 0 or end:
            loss = mean_since("log", i, losses)
            rep.note(f"Epoch [{epoch + 1}/{epochs()}], Batch [{i + 1}/{steps}], Loss: {loss:.4f}", "log")

    return on_step


def checkpoint_of(
    cfg: TrainConfig, recipe: Recipe, model: nn.Module, opt: Optimization, data: CifarData, rt: Runtime,
    history: list[EpochRecord], metrics: Metrics | None, tta: str,
) -> Checkpoint:  # fmt: skip
    """The run as it stands, as the checkpoint cifarkit.model.checkpoint documents (plain data on the CPU)."""

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
    return Checkpoint(
        artifact=artifact,
        model_state=cpu(model.state_dict()),
        model_kwargs={},
        epoch=history[-1].epoch,
        step=opt.step,
        plan=opt.progress.to_dict(),  # knots beyond (0, 0): fitted to a time budget
        recipe=asdict(recipe),
        train_config=asdict(cfg),
        optimizer_state=opt.optimizer.state_dict(),
        lookahead_state=cpu(opt.lookahead.ema) if opt.lookahead is not None else None,
        history=tuple(asdict(r) for r in history),
        metrics=metrics.to_dict() if metrics is not None else None,
        data_source=data.source,
        runtime=rt.info(),
        versions=run_versions(),
    )


def run_versions() -> dict[str, str]:
    return versions("torch", "torchvision", "numpy", "python")
