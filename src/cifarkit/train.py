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
import tempfile
import time
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from cifarkit import __version__, atomic
from cifarkit.atomic import atomic_path
from cifarkit.data import CifarData, DeviceBatches, load_data, normalize_uint8
from cifarkit.errors import CifarkitError
from cifarkit.models import MODELS, build_model, count_parameters
from cifarkit.spec import IMAGE_SIZE, MEAN, RESIZE_FILTER, RESIZE_MODE, STD

CHECKPOINT_FORMAT = "cifarkit.checkpoint"
CHECKPOINT_VERSION = 1


# ---------------------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------------------


@dataclass
class TrainConfig:
    """Everything a run needs. The CLI reads its defaults from here; the defaults are the blog's recipe."""

    data: str | None = None  # "torchvision" | PATH (ImageFolder root or cifar-10-batches-py); None: torchvision,
    #                          or the checkpoint's source when resuming
    data_dir: str | None = None  # downloads and decoded-image cache; None: $CIFARKIT_CACHE or ~/.cache/cifarkit
    model: str = "blog_cnn"  # a name in cifarkit.models.MODELS
    epochs: int = 4  # total epochs; with --resume, training continues up to this many
    batch_size: int = 32  # images per optimizer step
    lr: float = 1e-3  # Adam learning rate
    seed: int = 0  # model init and per-epoch shuffling; on CPU the same seed gives the same run
    device: str = "auto"  # "auto" (CUDA, then MPS, then CPU) | "cpu" | "cuda" | "cuda:N" | "mps"
    precision: str = "auto"  # "auto" (bf16 autocast where the device has fast bf16) | "fp32" | "bf16"
    channels_last: str = "auto"  # "auto" (on for CPU and CUDA) | "on" | "off"
    compile: bool = False  # torch.compile the model (pays a one-off compile time)
    out: str | None = None  # run folder; None: runs/<model>-<timestamp>, or the checkpoint's folder on resume
    resume: str | None = None  # checkpoint.pt to continue from (its recipe is kept; --epochs sets the total)
    eval_batch_size: int = 1000  # images per forward pass when evaluating
    log_every: int = 500  # batches between plain-text progress lines (the blog printed every 500)
    threads: int | None = None  # torch intra-op threads; None: torch's default (one per core)

    def validate(self) -> None:
        if self.epochs < 1:
            raise CifarkitError(f"--epochs must be at least 1, got {self.epochs}")
        if self.batch_size < 1:
            raise CifarkitError(f"--batch-size must be at least 1, got {self.batch_size}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise CifarkitError(f"--lr must be a positive number, got {self.lr}")
        if self.model not in MODELS:
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
RECIPE_FIELDS = ("model", "batch_size", "lr", "seed", "precision", "channels_last")


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


def make_optimizer(model: nn.Module, lr: float, device: torch.device) -> torch.optim.Optimizer:
    """Adam, as the blog; the fused kernel where the device has one (same maths, one kernel per step)."""
    try:
        return torch.optim.Adam(model.parameters(), lr=lr, fused=device.type in ("cpu", "cuda", "mps"))
    except (RuntimeError, TypeError):
        return torch.optim.Adam(model.parameters(), lr=lr)


# ---------------------------------------------------------------------------------------------------------
# Stage functions
# ---------------------------------------------------------------------------------------------------------


def train_one_epoch(
    model: nn.Module,
    batches: DeviceBatches,
    optimizer: torch.optim.Optimizer,
    epoch: int,
    *,
    precision: str = "fp32",
    on_step: Any = None,  # callable(step, loss_tensor) every step; may be None
) -> torch.Tensor:
    """One pass over `batches`. Returns the per-batch losses as a float32 tensor on the CPU."""
    model.train()
    device = batches.device
    losses = torch.empty(len(batches), dtype=torch.float32, device=device)
    loss_fn = nn.CrossEntropyLoss()
    for i, (x, y) in enumerate(batches.epoch(epoch)):
        with autocast(device, precision):
            loss = loss_fn(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses[i] = loss.detach()
        if on_step is not None:
            on_step(i, losses)
    return losses.cpu()


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
) -> Metrics:
    """fp32 evaluation of uint8 [N, H, W, 3] images: accuracy, mean loss and per-class accuracy."""
    model.eval()
    batches = DeviceBatches(
        x,
        y,
        batch_size=batch_size,
        device=device,
        shuffle=False,
        mean=mean,
        std=std,
        channels_last=_is_channels_last(model),
    )
    correct = torch.zeros(len(classes), dtype=torch.int64, device=device)
    total = torch.zeros(len(classes), dtype=torch.int64, device=device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    for xb, yb in batches.epoch(0):
        logits = model(xb).float()
        loss_sum += nn.functional.cross_entropy(logits, yb, reduction="sum").double()
        hit = (logits.argmax(1) == yb).long()
        correct.index_add_(0, yb, hit)
        total.index_add_(0, yb, torch.ones_like(yb))
    correct_c, total_c = correct.cpu(), total.cpu()
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
) -> np.ndarray:
    """fp32 logits [N, C] for uint8 [N, H, W, 3] images (the eager reference for parity checks)."""
    model.eval()
    mean_t = torch.tensor(mean, device=device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, device=device).view(1, 3, 1, 1)
    out = []
    for start in range(0, len(x), batch_size):
        xb = torch.from_numpy(np.ascontiguousarray(x[start : start + batch_size])).to(device)
        out.append(model(normalize_uint8(xb, mean_t, std_t).contiguous()).float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def _is_channels_last(model: nn.Module) -> bool:
    for p in model.parameters():
        if p.dim() == 4:
            return p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous()
    return False


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
            why = text.strip().splitlines()[0][:160] if text.strip() else type(exc).__name__
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
            f"checkpoint weights do not fit model {state['model_name']!r}: {str(exc).splitlines()[0][:160]}"
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


def train(cfg: TrainConfig, reporter: Reporter | None = None) -> TrainResult:
    """Fit a model as `cfg` says, writing the run folder (checkpoint.pt after every epoch, metrics.json and
    loss.png at the end). Raises CifarkitError on bad input."""
    rep = reporter or Reporter()
    resumed: dict[str, Any] | None = None
    if cfg.resume:
        resumed = load_checkpoint(cfg.resume)
        saved = resumed.get("train_config", {})
        for name in RECIPE_FIELDS:
            if name in saved:
                setattr(cfg, name, saved[name])
        if cfg.data is None:
            cfg.data = saved.get("data")
        if cfg.out is None:
            cfg.out = str(Path(cfg.resume).parent)
    cfg.data = cfg.data or "torchvision"
    cfg.validate()
    if resumed is not None and resumed.get("epoch", 0) >= cfg.epochs:
        raise CifarkitError(
            f"--resume: {cfg.resume} already holds {resumed['epoch']} epochs; pass --epochs "
            f"greater than that to train further"
        )
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = select_device(cfg.device)
    allocator_tuned = tune_cpu_allocator() if device.type == "cpu" else False
    precision = resolve_precision(cfg.precision, device)
    channels_last = cfg.channels_last == "on" or (cfg.channels_last == "auto" and device.type in ("cpu", "cuda"))
    out_dir = Path(cfg.out or f"runs/{cfg.model}-{time.strftime('%Y%m%d-%H%M%S')}")
    created = not out_dir.exists()
    _check_writable(out_dir)
    try:
        return _run(cfg, rep, resumed, device, precision, channels_last, allocator_tuned, out_dir)
    except BaseException:
        # A run that fails before its first checkpoint leaves no empty run folder behind.
        if created and out_dir.is_dir() and not any(out_dir.iterdir()):
            out_dir.rmdir()
        raise


def _run(cfg: TrainConfig, rep: Reporter, resumed: dict[str, Any] | None, device: torch.device, precision: str,
         channels_last: bool, allocator_tuned: bool, out_dir: Path) -> TrainResult:
    data = load_data(cfg.data, cfg.data_dir)
    rep.data_loaded(data)
    if resumed is not None and list(resumed["class_names"]) != list(data.classes):
        raise CifarkitError(
            f"--resume: the checkpoint's classes {resumed['class_names']} differ from the data's {list(data.classes)}"
        )

    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, num_classes=data.num_classes)
    if resumed is not None:
        model.load_state_dict(resumed["model_state"])
    model = model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(model, cfg.lr, device)
    if resumed is not None and resumed.get("optimizer_state"):
        optimizer.load_state_dict(resumed["optimizer_state"])
    step_model = torch.compile(model) if cfg.compile else model

    batches = DeviceBatches(
        data.train_x, data.train_y, batch_size=cfg.batch_size, device=device, seed=cfg.seed, channels_last=channels_last
    )
    history = resumed.get("history") if resumed else None
    history = history or {
        "loss": [],
        "epoch_seconds": [],
        "images_per_second": [],
        "test_accuracy": [],
        "test_loss": [],
        "elapsed_seconds": [],
    }
    start_epoch = int(resumed.get("epoch", 0)) if resumed else 0
    info = {
        "device": str(device),
        "precision": precision,
        "channels_last": channels_last,
        "compile": cfg.compile,
        "allocator_tuned": allocator_tuned,
        "model": cfg.model,
        "parameters": count_parameters(model),
        "train_images": len(data.train_y),
        "test_images": len(data.test_y),
        "start_epoch": start_epoch,
        "epochs": cfg.epochs,
        "steps_per_epoch": len(batches),
        "out": str(out_dir),
    }
    rep.start(info)

    run_seconds: list[float] = []
    metrics: Metrics | None = None
    elapsed = history["elapsed_seconds"][-1] if history["elapsed_seconds"] else 0.0
    for epoch in range(start_epoch, cfg.epochs):
        rep.epoch_start(epoch, cfg.epochs, len(batches))
        t0 = time.perf_counter()
        on_step = _step_reporter(rep, epoch, cfg, len(batches), t0, device)
        losses = train_one_epoch(step_model, batches, optimizer, epoch, precision=precision, on_step=on_step)
        _sync(device)
        seconds = time.perf_counter() - t0
        if not torch.isfinite(losses).all():
            raise CifarkitError(f"training diverged in epoch {epoch + 1} (loss is not finite); lower --lr")
        metrics = evaluate(model, data.test_x, data.test_y, data.classes, device=device, batch_size=cfg.eval_batch_size)
        elapsed += time.perf_counter() - t0
        run_seconds.append(seconds)
        history["loss"].extend(float(v) for v in losses.tolist())
        history["epoch_seconds"].append(seconds)
        history["images_per_second"].append(batches.per_rank / seconds)
        history["test_accuracy"].append(metrics.accuracy)
        history["test_loss"].append(metrics.loss)
        history["elapsed_seconds"].append(elapsed)
        state = _checkpoint_state(cfg, model, optimizer, data, epoch + 1, history, metrics, info)
        save_checkpoint(out_dir / "checkpoint.pt", state)
        rep.epoch_end(
            epoch,
            cfg.epochs,
            {
                "seconds": seconds,
                "train_loss": float(losses.mean()),
                "test_accuracy": metrics.accuracy,
                "test_loss": metrics.loss,
                "images_per_second": batches.per_rank / seconds,
            },
        )

    assert metrics is not None  # cfg.epochs > start_epoch was checked above
    summary = {
        "model": cfg.model,
        "parameters": info["parameters"],
        "data": data.source,
        "data_kind": data.kind,
        "classes": list(data.classes),
        "epochs": cfg.epochs,
        "test": metrics.to_dict(),
        "loss_per_batch": history["loss"],
        "epoch_seconds": history["epoch_seconds"],
        "images_per_second": history["images_per_second"],
        "test_accuracy_per_epoch": history["test_accuracy"],
        "elapsed_seconds_per_epoch": history["elapsed_seconds"],
        "device": str(device),
        "precision": precision,
        "channels_last": channels_last,
        "compile": cfg.compile,
        "optimizer": "Adam (fused)" if optimizer.defaults.get("fused") else "Adam",
        "threads": torch.get_num_threads(),
        "allocator_tuned": allocator_tuned,
        "data_load_seconds": data.load_seconds,
        "data_from_cache": data.from_cache,
        "resumed_from_epoch": start_epoch if resumed else None,
        "train_config": asdict(cfg),
        "versions": versions(),
    }
    atomic.write_text(out_dir / "metrics.json", json.dumps(summary, indent=2) + "\n")
    plot_loss(history["loss"], out_dir / "loss.png", steps_per_epoch=len(batches))
    ips = sorted(history["images_per_second"][start_epoch:])
    return TrainResult(
        out_dir=out_dir,
        checkpoint=out_dir / "checkpoint.pt",
        metrics=metrics,
        epochs_run=cfg.epochs - start_epoch,
        epoch_seconds=run_seconds,
        images_per_second=ips[len(ips) // 2],
        device=str(device),
        precision=precision,
        channels_last=channels_last,
        summary=summary,
    )


def _step_reporter(rep: Reporter, epoch: int, cfg: TrainConfig, steps: int, t0: float, device: torch.device):
    """Calls rep.step every `every` batches with the mean loss since the last call. On CPU reading the loss
    costs nothing; on a GPU it syncs, so it happens at most every 50 batches."""
    wanted = getattr(rep, "every", None) or cfg.log_every
    every = max(1, min(wanted, 50) if device.type != "cpu" else wanted)
    last = [0]

    def on_step(i: int, losses: torch.Tensor) -> None:
        if (i + 1) % every == 0 or i + 1 == steps:
            window = losses[last[0] : i + 1]
            last[0] = i + 1
            rate = (i + 1) * cfg.batch_size / max(time.perf_counter() - t0, 1e-9)
            rep.step(epoch, cfg.epochs, i + 1, steps, float(window.mean()), rate)

    return on_step


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def _checkpoint_state(
    cfg: TrainConfig,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    data: CifarData,
    epoch: int,
    history: dict[str, list[float]],
    metrics: Metrics,
    info: dict[str, Any],
) -> dict[str, Any]:
    model_state = {
        k: v.detach().to("cpu", memory_format=torch.contiguous_format).clone() for k, v in model.state_dict().items()
    }
    return {
        "format": CHECKPOINT_FORMAT,
        "format_version": CHECKPOINT_VERSION,
        "model_name": cfg.model,
        "model_kwargs": {},
        "class_names": list(data.classes),
        "image_size": list(IMAGE_SIZE),
        "mean": list(MEAN),
        "std": list(STD),
        "resize_mode": RESIZE_MODE,
        "resize_filter": RESIZE_FILTER,
        "train_config": asdict(cfg),
        "epoch": epoch,
        "model_state": model_state,
        "optimizer_state": optimizer.state_dict(),
        "history": history,
        "metrics": metrics.to_dict(),
        "data_source": data.source,
        "precision": info["precision"],
        "device": info["device"],
        "versions": versions(),
    }


def _check_writable(out_dir: Path) -> None:
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=out_dir, prefix=".probe")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise CifarkitError(f"--out: cannot write to {out_dir} ({exc.strerror or exc})") from None


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


def config_fields() -> Iterator[str]:
    return (f.name for f in fields(TrainConfig))
