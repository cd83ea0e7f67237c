"""Training stage: TrainConfig -> train() -> TrainResult, a run folder with checkpoint, metrics and plot.

    from cifarkit.train import TrainConfig, train
    result = train(TrainConfig(data="/data/cifar10-jpeg", out="runs/blog"))
    print(result.metrics.accuracy)

A run reads as named phases (`_Run.run`): data -> net and batches -> optimization -> the budget's pacer -> per
epoch: train, evaluate if due, record, checkpoint -> summary. The pieces are in cifarkit.train.build, the stage
functions (`train_one_epoch`, `evaluate`) in cifarkit.train.loop.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from cifarkit.atomic import output_folder
from cifarkit.errors import CifarkitError
from cifarkit.model.checkpoint import Checkpoint
from cifarkit.model.nets import count_parameters
from cifarkit.stage import Reporter, Silent
from cifarkit.train import build, report
from cifarkit.train.budget import Clock, Pacer
from cifarkit.train.config import BUDGET_RECIPE, RECIPE_FIELDS, TrainConfig
from cifarkit.train.events import EVENTS_GLOB, JSONL_NAME, RunLog
from cifarkit.train.loop import train_one_epoch
from cifarkit.train.recipes import get_recipe
from cifarkit.train.report import EpochRecord, Metrics
from cifarkit.train.runtime import Runtime, runtime, select_device


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


RUN_FILES = ("checkpoint.pt", "metrics.json", "loss.png", JSONL_NAME)  # what a run folder holds (and EVENTS_GLOB)


def train(cfg: TrainConfig, reporter: Reporter | None = None, *, clock: Clock | None = None) -> TrainResult:
    """Fit a model as `cfg` says, writing the run folder (checkpoint.pt after every epoch, metrics.json and
    loss.png at the end). Under torchrun each process trains on its share of every epoch with
    DistributedDataParallel (nccl on CUDA, gloo on CPU); only rank 0 reports and writes. `clock` (seconds, like
    time.time) is what a time budget is measured with. Raises CifarkitError on bad input."""
    cfg, resumed, continue_plan = _resolve(cfg)
    with runtime(cfg.device, cfg.precision, cfg.channels_last, cfg.threads) as rt:
        if cfg.batch_size % rt.dist.world_size:
            raise CifarkitError(
                f"--batch-size {cfg.batch_size} must be divisible by the {rt.dist.world_size} processes"
            )
        rep = (reporter or Silent()) if rt.dist.main else Silent()
        out_dir = Path(cfg.out or f"runs/{cfg.model}-{time.strftime('%Y%m%d-%H%M%S')}")
        # Rank 0 owns the run folder, locked for the run; a run that fails before its first checkpoint leaves
        # none behind.
        with output_folder(out_dir) if rt.dist.main else contextlib.nullcontext(out_dir):
            if rt.dist.main:
                _claim_run_folder(out_dir, cfg)
            return _Run(cfg, rt, resumed, continue_plan, rep, out_dir, clock or time.time).run()


def _claim_run_folder(out_dir: Path, cfg: TrainConfig) -> None:
    """An earlier run's files are never replaced silently: continuing it needs --resume, replacing it
    --overwrite (which removes its files first, so that no old metrics.json outlives them)."""
    existing = [name for name in RUN_FILES if (out_dir / name).exists()]
    events = sorted(p.name for p in out_dir.glob(EVENTS_GLOB))
    if not existing + events or (cfg.resume and Path(cfg.resume).resolve().parent == out_dir.resolve()):
        return
    if not cfg.overwrite:
        named = existing + ([f"{len(events)} TensorBoard event file{'s' * (len(events) > 1)}"] if events else [])
        raise CifarkitError(
            f"--out {out_dir} already holds a run ({', '.join(named)}); pass --resume "
            f"{out_dir / 'checkpoint.pt'} to continue it, --overwrite to replace it, or another --out"
        )
    for name in existing + events:
        (out_dir / name).unlink()


def _resolve(cfg: TrainConfig) -> tuple[TrainConfig, Checkpoint | None, bool]:
    """The config with the recipe's values filled in and, when resuming, the checkpoint's recipe fields; the
    checkpoint; and whether the run continues the checkpoint's own plan (to its own target, and to the end of
    the schedule a budget fitted), which it does unless --epochs asks for another length."""
    if not cfg.resume:
        if cfg.recipe is None and cfg.time_budget and select_device(cfg.device).type == "cpu":
            cfg = replace(cfg, recipe=BUDGET_RECIPE)  # a budget on a CPU: the recipe made for it
        return cfg.resolved(), None, False
    cfg.validate()
    resumed = Checkpoint.load(cfg.resume)  # every field and the model checked, as export and eval check it
    saved = resumed.train_config or {}
    cfg = replace(cfg, **{name: saved[name] for name in RECIPE_FIELDS if name in saved})
    continue_plan = cfg.epochs is None
    if continue_plan:  # continue the interrupted run to its own target, not the recipe's default
        cfg = replace(cfg, epochs=saved.get("epochs"))
    if cfg.data is None and saved.get("data") not in (None, "torchvision", "download"):
        # A data path is never taken from a checkpoint: a checkpoint shipped beside a crafted data folder
        # must not choose what this process reads.
        raise CifarkitError(
            f"--resume: pass --data; {cfg.resume} was trained on {saved['data']} (cifarkit never reads a "
            "data path from a checkpoint)"
        )
    if cfg.out is None:
        cfg = replace(cfg, out=str(Path(cfg.resume).parent))
    if cfg.eval_every is None and saved.get("time_budget"):  # a budgeted run's plan paid for no evaluations
        cfg = replace(cfg, eval_every=0)
    cfg = cfg.resolved()  # fills the recipe's values, then validates
    plan = build.fitted_plan(resumed, continue_plan)
    if plan is not None:
        if (resumed.step or 0) >= plan.total_steps:
            raise CifarkitError(f"--resume: {cfg.resume} already finished its time-budgeted plan")
    elif resumed.epoch >= math.ceil(cfg.epochs):
        raise CifarkitError(
            f"--resume: {cfg.resume} already holds {resumed.epoch} epochs; pass --epochs "
            f"greater than that to train further"
        )
    return cfg, resumed, continue_plan


class _Clock:
    """Wall time per phase of a run, from `start` (the process's start under the CLI), on `clock`."""

    def __init__(self, start: float | None, clock: Clock) -> None:
        self.clock = clock
        now = clock()
        self.start = start if start is not None else now
        self.phases: dict[str, float] = {"start_up": now - self.start}
        self._mark = now

    def lap(self, name: str) -> None:
        now = self.clock()
        self.phases[name] = self.phases.get(name, 0.0) + now - self._mark
        self._mark = now

    def since_start(self) -> float:
        return self.clock() - self.start


class _Run:
    """One call of train(): the phases in order, sharing what they build."""

    def __init__(
        self, cfg: TrainConfig, rt: Runtime, resumed: Checkpoint | None, continue_plan: bool, rep: Reporter,
        out_dir: Path, clock: Clock,
    ) -> None:  # fmt: skip
        self.cfg, self.rt, self.resumed, self.continue_plan = cfg, rt, resumed, continue_plan
        self.rep, self.out_dir, self.clock = rep, out_dir, clock
        self.recipe = get_recipe(cfg.recipe)
        self.history = [EpochRecord(**r) for r in resumed.history] if resumed else []
        self.metrics: Metrics | None = None  # the latest evaluation
        self.log: RunLog | None = None  # metrics.jsonl and TensorBoard events (rank 0), from the first epoch on

    def run(self) -> TrainResult:
        cfg, rt, recipe, resumed = self.cfg, self.rt, self.recipe, self.resumed
        clock = self.phase_clock = _Clock(cfg.budget_start, self.clock)
        self.data = build.load_run_data(cfg, resumed, self.rep)
        clock.lap("data")
        self.model, self.batches = build.build_net(cfg, recipe, self.data, rt, resumed)
        self.step_model = build.wrap(self.model, rt, cfg.compile)
        plan = build.fitted_plan(resumed, self.continue_plan)
        self.opt = build.build_optimization(cfg, recipe, self.model, len(self.batches), rt, resumed, plan)
        self.scaler = rt.grad_scaler()  # fp16 only; its scale restarts at 2**16 on resume and re-adapts quickly
        # The test-time augmentation of the final evaluation and of the exported model: the recipe's, unless a
        # time budget chose a cheaper one (kept in the checkpoint, so that a resumed run ends with the same).
        self.final_tta = resumed.artifact.tta if resumed else recipe.tta
        self.final_precision = "fp32"  # the exported model's, unless a budget needs the training precision's speed
        self.pacer: Pacer | None = None
        if cfg.time_budget:
            self.pacer, self.final_tta, self.final_precision = build.make_pacer(
                cfg, recipe, self.model, self.data, rt, self.opt, len(self.batches), clock.start, self.clock
            )
        clock.lap("build")
        self.start_epoch = resumed.epoch if resumed else 0
        self.parameters = count_parameters(self.model)
        resuming = f", resuming after epoch {self.start_epoch}" if self.start_epoch else ""
        self.rep.note(
            f"model: {cfg.model} ({self.parameters:,} parameters) on {rt.device}, {rt.precision}, "
            f"channels_last={'on' if rt.channels_last else 'off'}{resuming}"
        )
        epoch = self.start_epoch
        self.log = RunLog(self.out_dir) if rt.dist.main else None
        try:
            while not self.opt.done:
                self.epoch(epoch)
                epoch += 1
            return self.finish(epoch)
        finally:
            if self.log is not None:
                self.log.close()

    def record_step(self, epoch: int) -> Callable[[float, float], None] | None:
        """What the step reporter calls with (mean loss, images/s): a line of the live log (rank 0)."""
        if self.log is None:
            return None
        opt, clock = self.opt, self.phase_clock

        def record(loss: float, images_per_s: float) -> None:
            self.log.step(
                step=opt.step, epoch=epoch + 1, loss=loss, lr=opt.main_lr(), lr_factor=opt.lr_factor(),
                images_per_s=images_per_s, elapsed_s=clock.since_start(),
            )  # fmt: skip

        return record

    def epochs_planned(self) -> int | None:
        """Epochs in the plan; None while a time budget has not fitted one yet (its warm-up)."""
        if self.opt.total_steps >= Pacer.UNPLANNED:
            return None
        return math.ceil(self.opt.total_steps / len(self.batches))

    def epochs_text(self) -> str:
        planned = self.epochs_planned()
        return "?" if planned is None else str(planned)

    def epoch(self, epoch: int) -> None:
        """Train one epoch, evaluate if due (always after the last), record it, checkpoint, report."""
        cfg, rt, opt, steps = self.cfg, self.rt, self.opt, len(self.batches)
        self.rep.phase(f"epoch {epoch + 1}/{self.epochs_text()}", steps)
        t0 = time.perf_counter()
        on_step = build.step_reporter(
            self.rep, epoch, self.epochs_text, opt, cfg, steps, rt.device, self.pacer, self.record_step(epoch)
        )
        losses = train_one_epoch(
            self.step_model, self.batches, opt, epoch, precision=rt.precision, scaler=self.scaler, on_step=on_step
        )
        last = opt.done  # the plan's end (under a budget it may fall inside an epoch)
        if last and opt.lookahead is not None:
            opt.lookahead.update(self.model, decay=1.0)  # the EMA becomes the final weights
        rt.synchronize()
        seconds = time.perf_counter() - t0
        if not torch.isfinite(losses).all():
            raise CifarkitError(f"training diverged in epoch {epoch + 1} (loss is not finite); lower --lr")
        losses = _mean_over_ranks(losses, rt)
        if last:
            self.phase_clock.lap("epochs")
        # The accuracy curve is cheap: no TTA, the training precision. The final figure is what the exported
        # model gives: fp32 with the recipe's TTA.
        tta = self.final_tta if last else "none"
        tested = None
        if last or (cfg.eval_every and (epoch + 1) % cfg.eval_every == 0):
            precision = self.final_precision if last else rt.precision
            t_eval = time.perf_counter()
            tested = self.metrics = build.measure_test(self.model, self.recipe, self.data, cfg, rt, tta, precision)
            if self.pacer is not None and not last:
                self.pacer.evaluated(time.perf_counter() - t_eval)
            if self.log is not None:
                self.log.evaluation(
                    step=opt.step, epoch=epoch + 1, accuracy=tested.accuracy, loss=tested.loss, tta=tta,
                    precision=precision, final=last, elapsed_s=self.phase_clock.since_start(),
                )  # fmt: skip
        record = EpochRecord(
            epoch=epoch + 1,
            losses=[float(v) for v in losses.tolist()],
            seconds=seconds,
            images_per_second=len(losses) * self.batches.batch_size * rt.dist.world_size / seconds,
            test_accuracy=tested.accuracy if tested else None,
            test_loss=tested.loss if tested else None,
            tta=tta,
            elapsed=(self.history[-1].elapsed if self.history else 0.0) + time.perf_counter() - t0,
        )
        self.history.append(record)
        if last:
            self.phase_clock.lap("final_evaluation")
        # Under a time budget the first checkpoint waits for the first fit: before it there is no plan to resume,
        # and a budget found too short leaves no run folder.
        if rt.dist.main and (self.pacer is None or self.pacer.fits or last):
            build.checkpoint_of(
                cfg, self.recipe, self.model, opt, self.data, rt, self.history, self.metrics, self.final_tta
            ).save(self.out_dir / "checkpoint.pt")
            if self.log is not None:
                self.log.commit()  # the live log's files appear with the first checkpoint
        acc = "" if tested is None else f", test accuracy {100 * tested.accuracy:.2f} %"
        how = [f"TTA {tta}"] if tta != "none" else []
        how += [f"in {self.final_precision}"] if last and self.final_precision != "fp32" else []
        acc += f" ({', '.join(how)})" if tested is not None and how else ""
        self.rep.note(
            f"Epoch [{record.epoch}/{self.epochs_text()}] done in {record.seconds:.2f} s "
            f"({record.images_per_second:,.0f} images/s){acc}, {record.elapsed:.1f} s elapsed"
        )

    def finish(self, epochs: int) -> TrainResult:
        """metrics.json and loss.png, and the result."""
        cfg, rt, opt, clock, data = self.cfg, self.rt, self.opt, self.phase_clock, self.data
        assert self.metrics is not None  # the last epoch always evaluates, and at least one epoch ran
        facts = {
            "recipe": self.recipe.name,
            "model": cfg.model,
            "parameters": self.parameters,
            "data": data.source,
            "data_kind": data.kind,
            "classes": list(data.classes),
            "epochs": epochs if cfg.time_budget else cfg.epochs,
            "steps": opt.step,
            "tta": self.final_tta,
            "final_precision": self.final_precision,
            **rt.info(),
            "compile": cfg.compile,
            "optimizer": type(opt.optimizer).__name__ + (" (fused)" if opt.optimizer.defaults.get("fused") else ""),
            "threads": torch.get_num_threads(),
            "data_load_seconds": data.load_seconds,
            "data_from_cache": data.from_cache,
            "resumed_from_epoch": self.start_epoch if self.resumed else None,
            "time_budget": self.pacer.to_dict() if self.pacer is not None else None,
            "train_config": asdict(cfg),
            "versions": build.run_versions(),
        }
        clock.lap("checkpoint")
        losses = [v for r in self.history for v in r.losses]
        if rt.dist.main:
            report.plot_loss(losses, self.out_dir / "loss.png", steps_per_epoch=len(self.batches))
        clock.lap("report")
        facts.update(total_seconds=clock.since_start(), phases=clock.phases)  # seconds since the budget's start
        summary = report.summary(self.history, self.metrics, facts)
        if rt.dist.main:
            report.write_metrics(self.out_dir, summary)
        this_call = self.history[self.start_epoch :]
        ips = sorted(r.images_per_second for r in this_call)
        return TrainResult(
            out_dir=self.out_dir,
            checkpoint=self.out_dir / "checkpoint.pt",
            metrics=self.metrics,
            epochs_run=len(this_call),
            epoch_seconds=[r.seconds for r in this_call],
            images_per_second=ips[len(ips) // 2],
            device=str(rt.device),
            precision=rt.precision,
            channels_last=rt.channels_last,
            summary=summary,
            rank=rt.dist.rank,
        )


def _mean_over_ranks(losses: torch.Tensor, rt: Runtime) -> torch.Tensor:
    if rt.dist.world_size == 1:
        return losses
    losses = losses.to(rt.device)
    rt.dist.all_reduce_sum_(losses)
    return (losses / rt.dist.world_size).cpu()
