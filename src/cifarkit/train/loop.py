"""The stage functions a run is made of, importable alone: `train_one_epoch` (one pass over the batches) and
`evaluate` (a DeployedModel on uint8 images: accuracy, loss, per-class accuracy).

    losses = train_one_epoch(model, batches, opt, epoch, precision="bf16")
    metrics = evaluate(DeployedModel(net, mean, std), x, y, classes, device=torch.device("cpu"))
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from cifarkit.model.deployed import DeployedModel
from cifarkit.train.batches import DeviceBatches
from cifarkit.train.optim import Optimization
from cifarkit.train.report import Metrics
from cifarkit.train.runtime import Dist, autocast


def train_one_epoch(
    model: nn.Module,
    batches: DeviceBatches,
    opt: Optimization,
    epoch: int,
    *,
    precision: str = "fp32",
    scaler: torch.amp.GradScaler | None = None,  # fp16 loss scaling (cifarkit.train.runtime.grad_scaler); None: off
    on_step: Callable[[int, torch.Tensor], None] | None = None,  # (step, losses so far) after every step
) -> torch.Tensor:
    """One pass over `batches` (or up to opt.total_steps). Returns per-batch losses (float32, CPU).

    Nothing here waits for the device: losses stay on it until the epoch ends (on_step decides when to read
    them), and with a scaler the fused optimizers unscale and skip non-finite steps on the device."""
    model.train()
    device = batches.device
    losses = torch.empty(len(batches), dtype=torch.float32, device=device)
    per_image = opt.loss_fn.reduction == "sum"
    params = [p for g in opt.optimizer.param_groups for p in g["params"]]
    done = 0
    for i, (x, y) in enumerate(batches.epoch(epoch)):
        if opt.done:
            break
        opt.set_lr()
        side = opt.train_side() if opt.progressive else None
        if side is not None and side != x.shape[-1]:
            x = nn.functional.interpolate(x, size=(side, side), mode="bilinear", antialias=True, align_corners=False)
        with autocast(device, precision):
            loss = opt.loss_fn(model(x), y)
        for p in params:  # zero_grad(set_to_none=True), without its profiler annotation: a batch-32 step is short
            p.grad = None
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
        losses[i] = loss.detach() / len(y) if per_image else loss.detach()
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
    TTA (exactly what is exported; `Checkpoint.deployed()` builds one from a checkpoint): accuracy, mean
    loss and per-class accuracy, in fp32 unless `precision` says otherwise. Under DDP each rank takes a
    share and the counts are summed over ranks."""
    if not isinstance(model, DeployedModel):
        raise TypeError(
            "evaluate() takes a DeployedModel, which carries the normalization: DeployedModel(net, mean, std) "
            "or cifarkit.model.checkpoint.Checkpoint.load(path).deployed()"
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
