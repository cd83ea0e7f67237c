"""Training stage: TrainConfig -> train() -> TrainResult, a run folder with checkpoint, metrics and plot.

    from cifarkit.train import TrainConfig, train
    result = train(TrainConfig(data="/data/cifar10-jpeg", out="runs/blog"))
    print(result.metrics.accuracy)

Stage functions are importable alone: `select_device`, `train_one_epoch`, `evaluate`, `save_checkpoint`,
`load_checkpoint`, `model_from_checkpoint`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import platform
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from cifarkit import __version__, atomic
from cifarkit.atomic import atomic_path, output_folder
from cifarkit.data import CifarData, DeviceBatches, load_data, normalize_uint8
from cifarkit.errors import CifarkitError, first_line
from cifarkit.models import MODELS, DeployedModel, build_model, count_parameters, init_whitening
from cifarkit.recipes import Recipe, get_recipe
from cifarkit.spec import IMAGE_SIZE, MEAN, RESIZE_FILTER, RESIZE_MODE, STD

CHECKPOINT_FORMAT = "cifarkit.checkpoint"
CHECKPOINT_VERSION = 1


# ---------------------------------------------------------------------------------------------------------
# Configuration
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
    precision: str = "auto"  # "auto" (bf16 autocast where the device has fast bf16) | "fp32" | "bf16"
    channels_last: str = "auto"  # "auto" (on for CPU and CUDA) | "on" | "off"
    compile: bool = False  # torch.compile the model (pays a one-off compile time)
    out: str | None = None  # run folder; None: runs/<model>-<timestamp>, or the checkpoint's folder on resume
    resume: str | None = None  # checkpoint.pt to continue from (its recipe is kept; --epochs sets the total)
    eval_batch_size: int = 1000  # images per forward pass when evaluating
    eval_every: int = 1  # epochs between test evaluations for the accuracy curve (no TTA, training precision);
    #                      0: only the final one (fp32, the recipe's TTA: what the exported model gives)
    log_every: int = 500  # batches between plain-text progress lines (the blog printed every 500)
    threads: int | None = None  # torch intra-op threads; None: torch's default (one per core)

    def resolved(self) -> TrainConfig:
        """A copy with every None that the recipe defines filled in, validated."""
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
        if self.epochs is not None and not (self.epochs > 0 and math.isfinite(self.epochs)):
            raise CifarkitError(f"--epochs must be a positive number, got {self.epochs:g}")
        if self.batch_size is not None and self.batch_size < 1:
            raise CifarkitError(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.lr is not None and not (self.lr > 0 and math.isfinite(self.lr)):
            raise CifarkitError(f"--lr must be a positive number, got {self.lr}")
        if self.model is not None and self.model not in MODELS:
            raise CifarkitError(f"--model: unknown model {self.model!r}, expected one of {', '.join(sorted(MODELS))}")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise CifarkitError(f"--precision must be auto, fp32 or bf16, got {self.precision!r}")
        if self.channels_last not in ("auto", "on", "off"):
            raise CifarkitError(f"--channels-last must be auto, on or off, got {self.channels_last!r}")
        if self.eval_batch_size < 1:
            raise CifarkitError(f"--eval-batch-size must be at least 1, got {self.eval_batch_size}")
        if self.threads is not None and self.threads < 1:
            raise CifarkitError(f"--threads must be at least 1, got {self.threads}")


# Fields that define the recipe: a resumed run takes them from the checkpoint, not from the command line.
RECIPE_FIELDS = ("recipe", "model", "batch_size", "lr", "seed", "precision", "channels_last")


@dataclass
class Metrics:
    accuracy: float  # fraction correct in [0, 1]
    loss: float  # mean cross-entropy
    per_class: dict[str, float]  # class name -> accuracy in [0, 1]
    count: int  # images evaluated

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


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

    def epoch_end(self, epoch: int, epochs: int, stats: dict[str, Any]) -> None: ...


# ---------------------------------------------------------------------------------------------------------
# Device and precision
# ---------------------------------------------------------------------------------------------------------


def select_device(name: str = "auto") -> torch.device:
    """'auto' picks CUDA, then MPS, then CPU. Asking for a device that is not there is a CifarkitError."""
    mps = getattr(torch.backends, "mps", None)
    mps_ok = bool(mps and mps.is_available())
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps") if mps_ok else torch.device("cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise CifarkitError(f"--device {name}: CUDA is not available on this machine (try --device auto or cpu)")
        dev = torch.device(name)
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise CifarkitError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) present")
        return dev
    if name == "mps":
        if not mps_ok:
            raise CifarkitError("--device mps: Apple's MPS backend is not available on this machine")
        return torch.device("mps")
    raise CifarkitError(f"--device must be auto, cpu, cuda, cuda:N or mps, got {name!r}")


def resolve_precision(precision: str, device: torch.device) -> str:
    """'auto' -> 'bf16' where autocast to bf16 is fast (CPUs with AVX512-BF16 or AMX, CUDA with bf16)."""
    if precision != "auto":
        if precision == "bf16" and not _bf16_ok(device):
            raise CifarkitError(f"--precision bf16: not supported on {device}")
        return precision
    return "bf16" if _bf16_fast(device) else "fp32"


def _bf16_ok(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type in ("cpu", "mps")


def _bf16_fast(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        # Measured on an AVX512-BF16 CPU: bf16 autocast + channels_last ~2x faster than fp32 for the blog CNN.
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()) and (
            torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
        )
    return False


def tune_cpu_allocator() -> bool:
    """Keep glibc from handing freed activation buffers back to the OS after every step.

    A batch's activations are a few MB each; by default glibc serves such blocks with mmap and unmaps them
    on free, so every step page-faults them back in. Raising M_MMAP_THRESHOLD and M_TRIM_THRESHOLD keeps
    them in the heap: measured 5.5 -> 3.7 ms per blog-CNN step (batch 32, bf16) on a 2-core CPU.
    Returns True when the setting took effect (glibc Linux only)."""
    if platform.system() != "Linux":
        return False
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        return bool(libc.mallopt(m_mmap_threshold, 256 << 20)) and bool(libc.mallopt(m_trim_threshold, 512 << 20))
    except (OSError, AttributeError):
        return False


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def make_optimizer(
    model: nn.Module, recipe: Recipe, lr: float, batch_size: int, device: torch.device
) -> torch.optim.Optimizer:
    """Adam for the blog (the fused kernel where the device has one: same maths, one kernel per step);
    Nesterov SGD with airbench's decoupled hyperparameters for the strong recipe."""
    fused = device.type in ("cpu", "cuda", "mps")
    params = [p for p in model.parameters() if p.requires_grad]
    if recipe.optimizer == "adam":
        try:
            return torch.optim.Adam(params, lr=lr, fused=fused)
        except (RuntimeError, TypeError):
            return torch.optim.Adam(params, lr=lr)
    if recipe.optimizer != "sgd_nesterov":
        raise CifarkitError(f"recipe {recipe.name!r}: unknown optimizer {recipe.optimizer!r}")
    # airbench: lr and weight decay are given per 1,024 images and decoupled from momentum; PyTorch's SGD
    # wants them coupled, so convert. BatchNorm biases learn bias_lr_scale times faster, same decay.
    kilostep_scale = 1024 * (1 + 1 / (1 - recipe.momentum))
    base_lr = lr / kilostep_scale
    wd = recipe.weight_decay * batch_size / kilostep_scale
    bias_lr = base_lr * recipe.bias_lr_scale
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    norm_biases = [p for n, p in named if "norm" in n]
    whiten_bias = [p for n, p in named if n == "whiten.bias"]
    others = [p for n, p in named if "norm" not in n and n != "whiten.bias"]
    groups = [
        dict(params=norm_biases, lr=bias_lr, weight_decay=wd / bias_lr),
        dict(params=others, lr=base_lr, weight_decay=wd / base_lr),
    ]
    if whiten_bias:
        # airbench trains the whitening bias for the first few epochs only. Its learning rate drops to 0
        # then (same trajectory as freezing it, and DistributedDataParallel keeps seeing every gradient).
        groups.append(
            dict(params=whiten_bias, lr=base_lr, weight_decay=wd / base_lr, train_epochs=recipe.whiten_bias_epochs)
        )
    try:
        return torch.optim.SGD(groups, momentum=recipe.momentum, nesterov=True, fused=fused)
    except (RuntimeError, TypeError):
        return torch.optim.SGD(groups, momentum=recipe.momentum, nesterov=True)


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


# ---------------------------------------------------------------------------------------------------------
# Stage functions
# ---------------------------------------------------------------------------------------------------------


@dataclass
class StepPlan:
    """What the loop needs beyond model, data and optimizer: the loss, the schedule and where to stop."""

    loss_fn: nn.Module
    loss_scale: float = 1.0  # multiplies the loss (world size for summed losses under DDP's gradient mean)
    lr_factors: list[float] | None = None  # per global step; None: constant
    lookahead: Lookahead | None = None
    lookahead_every: int = 0
    total_steps: int = 0  # global steps over the whole run
    step: int = 0  # global steps done so far


def train_one_epoch(
    model: nn.Module,
    batches: DeviceBatches,
    optimizer: torch.optim.Optimizer,
    epoch: int,
    *,
    precision: str = "fp32",
    plan: StepPlan | None = None,
    on_step: Any = None,  # callable(step, losses_tensor) every step; may be None
) -> torch.Tensor:
    """One pass over `batches` (or up to plan.total_steps). Returns per-batch losses (float32, CPU)."""
    model.train()
    plan = plan or StepPlan(loss_fn=nn.CrossEntropyLoss())
    device = batches.device
    losses = torch.empty(len(batches), dtype=torch.float32, device=device)
    base_lrs = [g.setdefault("initial_lr", g["lr"]) for g in optimizer.param_groups]
    done = 0
    for i, (x, y) in enumerate(batches.epoch(epoch)):
        if plan.total_steps and plan.step >= plan.total_steps:
            break
        factor = plan.lr_factors[plan.step] if plan.lr_factors is not None else 1.0
        for g, base in zip(optimizer.param_groups, base_lrs, strict=True):
            frozen = g.get("train_epochs") is not None and epoch >= g["train_epochs"]
            g["lr"] = 0.0 if frozen else base * factor
        with autocast(device, precision):
            loss = plan.loss_fn(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        (loss * plan.loss_scale if plan.loss_scale != 1.0 else loss).backward()
        optimizer.step()
        plan.step += 1
        if plan.lookahead is not None and plan.step % plan.lookahead_every == 0:
            plan.lookahead.update(_unwrap(model), decay=0.95**5 * (plan.step / plan.total_steps) ** 3)
        losses[i] = loss.detach() / (len(y) if plan.loss_fn.reduction == "sum" else 1)
        done = i + 1
        if on_step is not None:
            on_step(i, losses)
    return losses[:done].cpu()


def _unwrap(model: nn.Module) -> nn.Module:
    model = getattr(model, "module", model)  # DistributedDataParallel
    return getattr(model, "_orig_mod", model)  # torch.compile


@torch.no_grad()
def evaluate(
    model: nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    classes: tuple[str, ...],
    *,
    device: torch.device,
    batch_size: int = 1000,
    mean: tuple[float, ...] = MEAN,
    std: tuple[float, ...] = STD,
    tta: str = "none",
    precision: str = "fp32",
    rank: int = 0,
    world_size: int = 1,
) -> Metrics:
    """Evaluate uint8 [N, H, W, 3] images through the deployed module (normalization and TTA exactly as
    exported; fp32 unless `precision` says otherwise): accuracy, mean loss and per-class accuracy. Under DDP
    each rank takes a share and the counts are summed over ranks."""
    deployed = DeployedModel(model, mean, std, tta).to(device).eval()
    correct = torch.zeros(len(classes), dtype=torch.float64, device=device)
    total = torch.zeros(len(classes), dtype=torch.float64, device=device)
    loss_sum = torch.zeros(1, dtype=torch.float64, device=device)
    share = range(rank * batch_size, len(x), batch_size * world_size)
    for start in share:
        xb = torch.from_numpy(np.ascontiguousarray(x[start : start + batch_size])).to(device)
        yb = torch.from_numpy(np.ascontiguousarray(y[start : start + batch_size])).to(device)
        with autocast(device, precision):
            logits, _ = deployed(xb)
        loss_sum += nn.functional.cross_entropy(logits.float(), yb, reduction="sum").double()
        correct.index_add_(0, yb, (logits.argmax(1) == yb).double())
        total.index_add_(0, yb, torch.ones_like(yb, dtype=torch.float64))
    if world_size > 1:
        import torch.distributed as dist

        for t in (correct, total, loss_sum):
            dist.all_reduce(t)
    correct_c, total_c = correct.cpu().long(), total.cpu().long()
    n = int(total_c.sum())
    per_class = {
        name: (int(correct_c[i]) / int(total_c[i]) if int(total_c[i]) else float("nan"))
        for i, name in enumerate(classes)
    }
    return Metrics(
        accuracy=int(correct_c.sum()) / max(n, 1), loss=float(loss_sum) / max(n, 1), per_class=per_class, count=n
    )


@torch.no_grad()
def predict_logits(
    model: nn.Module,
    x: np.ndarray,
    *,
    device: torch.device,
    batch_size: int = 1000,
    mean: tuple[float, ...] = MEAN,
    std: tuple[float, ...] = STD,
    tta: str = "none",
) -> np.ndarray:
    """fp32 logits [N, C] for uint8 [N, H, W, 3] images (the eager reference for parity checks)."""
    return DeployedModel(model, mean, std, tta).to(device).eval().run_numpy(x, batch_size)[0]


# ---------------------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------------------


def versions() -> dict[str, str]:
    import torchvision

    # str(): torch.__version__ is a TorchVersion object, which weights_only loading refuses.
    return {
        "cifarkit": __version__,
        "torch": str(torch.__version__),
        "torchvision": str(torchvision.__version__),
        "numpy": str(np.__version__),
        "python": platform.python_version(),
    }


def save_checkpoint(path: str | os.PathLike[str], state: dict[str, Any]) -> None:
    """Write atomically: a temporary file in the same folder, then rename. A crash leaves the old file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a cifarkit checkpoint with weights_only=True. Missing, corrupt or foreign files are CifarkitErrors."""
    path = Path(path)
    if not path.exists():
        raise CifarkitError(f"checkpoint {path} does not exist")
    if path.is_dir():
        raise CifarkitError(f"checkpoint {path} is a folder, expected a checkpoint.pt file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns about the pickle protocol of foreign files
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        text = str(exc)
        if "Unsupported global" in text:
            why = "it holds pickled Python objects, not plain data (refusing to unpickle them)"
        elif "WeightsUnpickler" in text or "invalid load key" in text or "zip archive" in text:
            why = "not a PyTorch checkpoint, or the file is corrupt or truncated"
        else:
            why = first_line(exc, 160)
        raise CifarkitError(f"checkpoint {path} cannot be read: {why}") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CifarkitError(f"checkpoint {path} is not a cifarkit checkpoint (no '{CHECKPOINT_FORMAT}' marker)")
    if state.get("format_version", 0) > CHECKPOINT_VERSION:
        raise CifarkitError(
            f"checkpoint {path} has format version {state['format_version']}, this cifarkit "
            f"reads up to {CHECKPOINT_VERSION}; upgrade cifarkit"
        )
    missing = [k for k in ("model_name", "model_kwargs", "class_names", "model_state") if k not in state]
    if missing:
        raise CifarkitError(f"checkpoint {path} is incomplete: missing {', '.join(missing)}")
    return state


def model_from_checkpoint(state: dict[str, Any]) -> nn.Module:
    """Rebuild the model from the checkpoint alone, weights loaded, in eval mode, fp32, on the CPU."""
    model = build_model(state["model_name"], num_classes=len(state["class_names"]), **state["model_kwargs"])
    try:
        model.load_state_dict(state["model_state"])
    except RuntimeError as exc:
        raise CifarkitError(
            f"checkpoint weights do not fit model {state['model_name']!r}: {first_line(exc, 160)}"
        ) from None
    return model.eval()


def file_sha256(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------------


@dataclass
class Dist:
    """Where this process stands in a torchrun job (world_size 1 when run alone)."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def dist_from_env() -> Dist:
    """torchrun sets RANK, LOCAL_RANK and WORLD_SIZE; without them this is a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    return Dist(rank=int(os.environ["RANK"]), local_rank=int(os.environ.get("LOCAL_RANK", "0")), world_size=world)


def train(cfg: TrainConfig, reporter: Reporter | None = None) -> TrainResult:
    """Fit a model as `cfg` says, writing the run folder (checkpoint.pt after every epoch, metrics.json and
    loss.png at the end). Under torchrun each process trains on its share of every epoch with
    DistributedDataParallel (nccl on CUDA, gloo on CPU); only rank 0 reports and writes.
    Raises CifarkitError on bad input."""
    resumed: dict[str, Any] | None = None
    if cfg.resume:
        resumed = load_checkpoint(cfg.resume)
        saved = resumed.get("train_config", {})
        cfg = replace(cfg, **{name: saved[name] for name in RECIPE_FIELDS if name in saved})
        if cfg.data is None:
            cfg = replace(cfg, data=saved.get("data"))
        if cfg.out is None:
            cfg = replace(cfg, out=str(Path(cfg.resume).parent))
    cfg = cfg.resolved()  # fills the recipe's values, then validates
    if resumed is not None and resumed.get("epoch", 0) >= math.ceil(cfg.epochs):
        raise CifarkitError(
            f"--resume: {cfg.resume} already holds {resumed['epoch']} epochs; pass --epochs "
            f"greater than that to train further"
        )
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    dist = dist_from_env()
    device = select_device(cfg.device)
    if dist.world_size > 1 and device.type == "cuda":
        device = torch.device("cuda", dist.local_rank)
    if cfg.batch_size % dist.world_size:
        raise CifarkitError(f"--batch-size {cfg.batch_size} must be divisible by the {dist.world_size} processes")
    rep = (reporter or Reporter()) if dist.main else Reporter()
    allocator_tuned = tune_cpu_allocator() if device.type == "cpu" else False
    precision = resolve_precision(cfg.precision, device)
    channels_last = cfg.channels_last == "on" or (cfg.channels_last == "auto" and device.type in ("cpu", "cuda"))
    out_dir = Path(cfg.out or f"runs/{cfg.model}-{time.strftime('%Y%m%d-%H%M%S')}")
    if dist.world_size > 1:
        import torch.distributed as tdist

        if device.type == "cuda":
            torch.cuda.set_device(device)
        tdist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        # Rank 0 owns the run folder; a run that fails before its first checkpoint leaves none behind.
        with output_folder(out_dir) if dist.main else contextlib.nullcontext(out_dir):
            return _run(cfg, rep, resumed, device, precision, channels_last, allocator_tuned, out_dir, dist)
    finally:
        if dist.world_size > 1:
            import torch.distributed as tdist

            if tdist.is_initialized():
                tdist.destroy_process_group()


def _run(
    cfg: TrainConfig,
    rep: Reporter,
    resumed: dict[str, Any] | None,
    device: torch.device,
    precision: str,
    channels_last: bool,
    allocator_tuned: bool,
    out_dir: Path,
    dist: Dist,
) -> TrainResult:
    t_start = time.perf_counter()
    recipe = get_recipe(cfg.recipe)
    data = load_data(cfg.data, cfg.data_dir)
    rep.data_loaded(data)
    if resumed is not None and list(resumed["class_names"]) != list(data.classes):
        raise CifarkitError(
            f"--resume: the checkpoint's classes {resumed['class_names']} differ from the data's {list(data.classes)}"
        )

    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, num_classes=data.num_classes)
    batches = DeviceBatches(
        data.train_x,
        data.train_y,
        batch_size=cfg.batch_size // dist.world_size,
        device=device,
        seed=cfg.seed,
        mean=recipe.mean,
        std=recipe.std,
        channels_last=channels_last,
        rank=dist.rank,
        world_size=dist.world_size,
        translate=recipe.translate,
        flip=recipe.flip,
        drop_last=recipe.drop_last,
    )
    whiten = getattr(model, "whiten", None)
    if resumed is not None:
        model.load_state_dict(resumed["model_state"])
    elif isinstance(whiten, nn.Conv2d):
        # Patch-whitening init from the first 5,000 training images, unaugmented (airbench).
        first = normalize_uint8(batches.x[:5000], batches.mean, batches.std).contiguous().cpu()
        init_whitening(whiten, first)
    model = model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(model, recipe, cfg.lr, cfg.batch_size, device)
    if resumed is not None and resumed.get("optimizer_state"):
        optimizer.load_state_dict(resumed["optimizer_state"])
    step_model: nn.Module = model
    if dist.world_size > 1:
        from torch.nn.parallel import DistributedDataParallel

        step_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:
        step_model = torch.compile(step_model)

    total_epochs = math.ceil(cfg.epochs)
    total_steps = math.ceil(len(batches) * cfg.epochs)
    start_epoch = int(resumed.get("epoch", 0)) if resumed else 0
    plan = StepPlan(
        loss_fn=nn.CrossEntropyLoss(label_smoothing=recipe.label_smoothing, reduction=recipe.loss_reduction),
        loss_scale=float(dist.world_size) if recipe.loss_reduction == "sum" else 1.0,
        lr_factors=triangle_schedule(total_steps, *recipe.schedule) if recipe.schedule else None,
        lookahead=Lookahead(model) if recipe.lookahead_every else None,
        lookahead_every=recipe.lookahead_every,
        total_steps=total_steps,
        step=min(start_epoch * len(batches), total_steps),
    )
    if resumed is not None and plan.lookahead is not None and resumed.get("lookahead_state"):
        plan.lookahead.ema = {k: v.to(device) for k, v in resumed["lookahead_state"].items()}

    history = resumed.get("history") if resumed else None
    history = history or {
        "loss": [],
        "epoch_seconds": [],
        "images_per_second": [],
        "test_accuracy": [],
        "test_loss": [],
        "elapsed_seconds": [],
    }
    info = {
        "device": str(device),
        "precision": precision,
        "channels_last": channels_last,
        "compile": cfg.compile,
        "allocator_tuned": allocator_tuned,
        "recipe": recipe.name,
        "model": cfg.model,
        "parameters": count_parameters(model),
        "train_images": len(data.train_y),
        "test_images": len(data.test_y),
        "start_epoch": start_epoch,
        "epochs": total_epochs,
        "steps_per_epoch": len(batches),
        "world_size": dist.world_size,
        "out": str(out_dir),
    }
    rep.start(info)

    run_seconds: list[float] = []
    metrics: Metrics | None = None
    elapsed = history["elapsed_seconds"][-1] if history["elapsed_seconds"] else 0.0
    eval_kwargs = dict(
        device=device,
        batch_size=cfg.eval_batch_size,
        mean=recipe.mean,
        std=recipe.std,
        rank=dist.rank,
        world_size=dist.world_size,
    )
    for epoch in range(start_epoch, total_epochs):
        rep.epoch_start(epoch, total_epochs, len(batches))
        t0 = time.perf_counter()
        on_step = _step_reporter(rep, epoch, total_epochs, cfg, len(batches), t0, device)
        losses = train_one_epoch(step_model, batches, optimizer, epoch, precision=precision, plan=plan, on_step=on_step)
        last = epoch + 1 == total_epochs
        if last and plan.lookahead is not None:
            plan.lookahead.update(model, decay=1.0)  # the EMA becomes the final weights
        _sync(device)
        seconds = time.perf_counter() - t0
        if not torch.isfinite(losses).all():
            raise CifarkitError(f"training diverged in epoch {epoch + 1} (loss is not finite); lower --lr")
        if dist.world_size > 1:
            import torch.distributed as tdist

            losses = losses.to(device)
            tdist.all_reduce(losses)
            losses = (losses / dist.world_size).cpu()
        images = len(losses) * batches.batch_size * dist.world_size
        if last or (cfg.eval_every and (epoch + 1) % cfg.eval_every == 0):
            # The accuracy curve is cheap: no TTA, the training precision. The final figure is what the
            # exported model gives: fp32 with the recipe's TTA.
            metrics = evaluate(
                model,
                data.test_x,
                data.test_y,
                data.classes,
                tta=recipe.tta if last else "none",
                precision="fp32" if last else precision,
                **eval_kwargs,
            )
            history["test_accuracy"].append(metrics.accuracy)
            history["test_loss"].append(metrics.loss)
        else:
            history["test_accuracy"].append(None)
            history["test_loss"].append(None)
        elapsed += time.perf_counter() - t0
        run_seconds.append(seconds)
        history["loss"].extend(float(v) for v in losses.tolist())
        history["epoch_seconds"].append(seconds)
        history["images_per_second"].append(images / seconds)
        history["elapsed_seconds"].append(elapsed)
        if dist.main:
            state = _checkpoint_state(cfg, recipe, model, optimizer, plan, data, epoch + 1, history, metrics, info)
            save_checkpoint(out_dir / "checkpoint.pt", state)
        rep.epoch_end(
            epoch,
            total_epochs,
            {
                "seconds": seconds,
                "train_loss": float(losses.mean()),
                "images_per_second": images / seconds,
                "test_accuracy": history["test_accuracy"][-1],
                "test_loss": history["test_loss"][-1],
                "tta": recipe.tta if last else "none",
                "elapsed": elapsed,
            },
        )

    assert metrics is not None  # the last epoch always evaluates, and at least one epoch ran
    summary = {
        "recipe": recipe.name,
        "model": cfg.model,
        "parameters": info["parameters"],
        "data": data.source,
        "data_kind": data.kind,
        "classes": list(data.classes),
        "epochs": cfg.epochs,
        "test": metrics.to_dict(),
        "tta": recipe.tta,
        "loss_per_batch": history["loss"],
        "epoch_seconds": history["epoch_seconds"],
        "images_per_second": history["images_per_second"],
        "test_accuracy_per_epoch": history["test_accuracy"],
        "elapsed_seconds_per_epoch": history["elapsed_seconds"],
        "total_seconds": time.perf_counter() - t_start,
        "device": str(device),
        "precision": precision,
        "channels_last": channels_last,
        "compile": cfg.compile,
        "optimizer": type(optimizer).__name__ + (" (fused)" if optimizer.defaults.get("fused") else ""),
        "threads": torch.get_num_threads(),
        "allocator_tuned": allocator_tuned,
        "world_size": dist.world_size,
        "data_load_seconds": data.load_seconds,
        "data_from_cache": data.from_cache,
        "resumed_from_epoch": start_epoch if resumed else None,
        "train_config": asdict(cfg),
        "versions": versions(),
    }
    if dist.main:
        atomic.write_text(out_dir / "metrics.json", json.dumps(summary, indent=2) + "\n")
        plot_loss(history["loss"], out_dir / "loss.png", steps_per_epoch=len(batches))
    ips = sorted(history["images_per_second"][start_epoch:])
    return TrainResult(
        out_dir=out_dir,
        checkpoint=out_dir / "checkpoint.pt",
        metrics=metrics,
        epochs_run=total_epochs - start_epoch,
        epoch_seconds=run_seconds,
        images_per_second=ips[len(ips) // 2],
        device=str(device),
        precision=precision,
        channels_last=channels_last,
        summary=summary,
        rank=dist.rank,
    )


def _step_reporter(
    rep: Reporter, epoch: int, epochs: int, cfg: TrainConfig, steps: int, t0: float, device: torch.device
):
    """Calls rep.step every `every` batches with the mean loss since the last call. On CPU reading the loss
    costs nothing; on a GPU it syncs, so it happens at most every 50 batches."""
    wanted = max(1, getattr(rep, "every", None) or cfg.log_every)
    every = max(wanted, 50) if device.type != "cpu" else wanted
    last = [0]

    def on_step(i: int, losses: torch.Tensor) -> None:
        if (i + 1) % every == 0 or i + 1 == steps:
            window = losses[last[0] : i + 1]
            last[0] = i + 1
            rate = (i + 1) * cfg.batch_size / max(time.perf_counter() - t0, 1e-9)
            rep.step(epoch, epochs, i + 1, steps, float(window.mean()), rate)

    return on_step


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def _checkpoint_state(
    cfg: TrainConfig,
    recipe: Recipe,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    plan: StepPlan,
    data: CifarData,
    epoch: int,
    history: dict[str, list],
    metrics: Metrics | None,
    info: dict[str, Any],
) -> dict[str, Any]:
    def cpu(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.detach().to("cpu", memory_format=torch.contiguous_format).clone() for k, v in tensors.items()}

    return {
        "format": CHECKPOINT_FORMAT,
        "format_version": CHECKPOINT_VERSION,
        "model_name": cfg.model,
        "model_kwargs": {},
        "class_names": list(data.classes),
        "image_size": list(IMAGE_SIZE),
        "mean": list(recipe.mean),
        "std": list(recipe.std),
        "resize_mode": RESIZE_MODE,
        "resize_filter": RESIZE_FILTER,
        "tta": recipe.tta,
        "recipe": asdict(recipe),
        "train_config": asdict(cfg),
        "epoch": epoch,
        "model_state": cpu(model.state_dict()),
        "optimizer_state": optimizer.state_dict(),
        "lookahead_state": cpu(plan.lookahead.ema) if plan.lookahead is not None else None,
        "history": history,
        "metrics": metrics.to_dict() if metrics is not None else None,
        "data_source": data.source,
        "precision": info["precision"],
        "device": info["device"],
        "world_size": info["world_size"],
        "versions": versions(),
    }


def smooth(values: list[float], window: int) -> np.ndarray:
    """Trailing moving average (the first points average what exists so far)."""
    v = np.asarray(values, dtype=np.float64)
    if len(v) == 0:
        return v
    c = np.cumsum(np.insert(v, 0, 0.0))
    idx = np.arange(1, len(v) + 1)
    lo = np.maximum(0, idx - window)
    return (c[idx] - c[lo]) / (idx - lo)


def plot_loss(losses: list[float], path: Path, *, steps_per_epoch: int) -> None:
    """loss.png: the loss of every batch and a smoothed curve, epochs marked. Written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    steps = np.arange(1, len(losses) + 1)
    ax.plot(steps, losses, color="#9ecae1", linewidth=0.6, label="loss per batch")
    ax.plot(steps, smooth(losses, max(10, steps_per_epoch // 20)), color="#08519c", linewidth=1.8, label="smoothed")
    for e in range(steps_per_epoch, len(losses), steps_per_epoch):
        ax.axvline(e, color="#bbbbbb", linewidth=0.8, linestyle=":")
    ax.set_xlabel("batch (optimizer step)")
    ax.set_ylabel("cross-entropy loss")
    ax.set_title("training loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png")
    finally:
        plt.close(fig)
