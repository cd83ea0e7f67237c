"""Optimization: the recipe's optimizer over the model's own parameter groups, per-group learning rates, the
schedule as a function of progress through the run, lookahead (EMA) and the loss.

    opt = make_optimization(model, recipe, lr=1e-3, batch_size=32, device=device, total_steps=6252,
                            steps_per_epoch=1563)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from cifarkit.errors import CifarkitError
from cifarkit.model.nets import Net, ParamGroup
from cifarkit.train.budget import Progress
from cifarkit.train.muon import MuonSGD
from cifarkit.train.optimizers import SGD, Adam
from cifarkit.train.recipes import Recipe


def side_at(stages: tuple[tuple[float, int], ...], progress: float) -> int | None:
    """The side of the progressive-resizing stage that `progress` falls in; None after the last (full size)."""
    return next((side for until, side in stages if progress < until), None)


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
    progress through the run (cifarkit.train.budget.Progress): step / total steps for a fixed-length run, re-fitted
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
    progressive: tuple[tuple[float, int], ...] = ()  # (progress, side) stages: side x side pixels until then
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

    def train_side(self) -> int | None:
        """The side training images are resized to at this step (progressive resizing); None: as they are."""
        return side_at(self.progressive, self.progress.at(self.step))

    def main_lr(self) -> float:
        """The learning rate now of the param group with the most values (the weights): what a log reports."""
        groups = self.optimizer.param_groups
        biggest = max(groups, key=lambda g: sum(p.numel() for p in g["params"]))
        return float(biggest["lr"])

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
        optimizer = _fused_if_possible(Adam, torch_groups, device, lr=lr)
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
        optimizer = _fused_if_possible(SGD, torch_groups, device, momentum=recipe.momentum, nesterov=True)
    elif recipe.optimizer == "muon":
        torch_groups = _muon_groups(groups, recipe, lr, batch_size)
        optimizer = MuonSGD(torch_groups)
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
        progressive=recipe.progressive,
    )


def _muon_groups(groups: list[ParamGroup], recipe: Recipe, lr: float, batch_size: int) -> list[dict[str, Any]]:
    """airbench94_muon's settings: Muon at `lr` for the filters; Nesterov SGD for the classifier (head_lr) and
    the biases (bias_lr), with weight decay of `weight_decay` per image of the batch, decoupled from their
    learning rates. `lr` scales every rate against the recipe's (cifar-train --lr)."""
    scale = lr / recipe.lr
    rates = {"filters": recipe.lr, "head": recipe.head_lr, "norm_biases": recipe.bias_lr, "whiten_bias": recipe.bias_lr}
    unknown = [g.name for g in groups if g.name not in rates]
    if unknown:
        raise CifarkitError(
            f"--model: recipe {recipe.name!r} trains its filters with Muon and has no rule for this model's parameter "
            f"group(s) {', '.join(unknown)}; use --model {recipe.model}"
        )
    out = []
    for g in groups:
        muon = g.name == "filters"
        group_lr = rates[g.name] * scale * g.lr_scale
        decay = 0.0 if muon else recipe.weight_decay * batch_size / group_lr
        momentum = recipe.muon_momentum if muon else recipe.momentum
        out.append({"params": g.params, "lr": group_lr, "muon": muon, "momentum": momentum, "weight_decay": decay})
    return out


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
