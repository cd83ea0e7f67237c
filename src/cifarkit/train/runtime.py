"""Where and how training runs: device, precision, memory layout, allocator, and the distributed context.

One value, `Runtime`, made once by `runtime(...)` and passed to training, the way torchvision's references
keep `init_distributed_mode` and friends out of the training story.

    with runtime(device="auto", precision="auto") as rt:
        model.to(rt.device)
        with rt.autocast():
            loss = ...
"""

from __future__ import annotations

import contextlib
import os
import platform
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from cifarkit.errors import CifarkitError
from cifarkit.train.config import check_options

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
            raise CifarkitError(f"--device {name}: CUDA is not available: {_why_no_cuda()}")
        dev = torch.device(name)
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise CifarkitError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) present")
        return dev
    if name == "mps":
        if not mps_ok:
            raise CifarkitError("--device mps: Apple's MPS backend is not available on this machine")
        return torch.device("mps")
    raise CifarkitError(f"--device must be auto, cpu, cuda, cuda:N or mps, got {name!r}")


def _why_no_cuda() -> str:
    """What to install, in one clause: a CUDA build of PyTorch, or the NVIDIA driver it cannot find."""
    if torch.version.cuda is None and getattr(torch.version, "hip", None) is None:
        return (
            f"this PyTorch ({torch.__version__}) is a CPU-only build; install a CUDA build of torch (the pip "
            "command for your driver is on https://pytorch.org/get-started/locally/) or use --device cpu"
        )
    built = f"CUDA {torch.version.cuda}" if torch.version.cuda else f"ROCm {torch.version.hip}"
    return (
        f"this PyTorch ({torch.__version__}, built for {built}) finds no GPU; install the GPU driver "
        "(nvidia-smi must list the GPU) or use --device cpu"
    )


def resolve_precision(precision: str, device: torch.device) -> str:
    """'auto' -> 'bf16' where autocast to bf16 is fast (CPUs with AVX512-BF16 or AMX, CUDA GPUs of compute
    capability 8.0 and newer), 'fp16' on older CUDA GPUs with tensor cores (7.x), else 'fp32'."""
    if precision == "auto":
        if _bf16_fast(device):
            return "bf16"
        # Volta and Turing (7.x) have fp16 tensor cores but no bf16 ones; before 7.0 there are no tensor cores.
        return "fp16" if device.type == "cuda" and cuda_capability(device) >= (7, 0) else "fp32"
    if precision == "bf16" and not _bf16_ok(device):
        raise CifarkitError(f"--precision bf16: not supported on {device}")
    if precision == "fp16" and device.type != "cuda":
        raise CifarkitError(
            f"--precision fp16: needs a CUDA device (fp16 autocast with a gradient scaler); on {device.type} "
            "use bf16 or fp32"
        )
    return precision


def cuda_capability(device: torch.device) -> tuple[int, int]:
    """(major, minor) compute capability of a CUDA device: 8.0 is Ampere, 9.0 Hopper."""
    return torch.cuda.get_device_capability(device)


def _bf16_ok(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type in ("cpu", "mps")


def _bf16_fast(device: torch.device) -> bool:
    if device.type == "cuda":
        # Not torch.cuda.is_bf16_supported(): by default it also says yes where bf16 is only emulated (pre-Ampere),
        # which runs slower than fp32.
        return cuda_capability(device) >= (8, 0)
    if device.type == "cpu":
        # Measured on an AVX512-BF16 CPU: bf16 autocast + channels_last ~2x faster than fp32 for the blog CNN.
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()) and (
            torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
        )
    return False


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if precision == "fp16":
        return torch.autocast(device.type, dtype=torch.float16)
    return contextlib.nullcontext()


def grad_scaler(device: torch.device, precision: str) -> torch.amp.GradScaler | None:
    """A gradient scaler for fp16 training, None otherwise. fp16's smallest normal number is 6e-5, so small
    gradients underflow to zero unless the loss is scaled up first; bf16 has fp32's exponent range and needs
    no scaling."""
    return torch.amp.GradScaler(device.type) if precision == "fp16" else None


@contextlib.contextmanager
def cudnn_autotune(device: torch.device) -> Iterator[None]:
    """On CUDA, let cuDNN time its convolution algorithms for each new input shape and keep the fastest
    (torch.backends.cudnn.benchmark): a recipe's batches all have one shape, so the timing is paid once.
    The previous setting is restored afterwards."""
    before = torch.backends.cudnn.benchmark
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = before


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on the CPU), so that a clock read after it means something."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


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


# ---------------------------------------------------------------------------------------------------------
# The distributed context
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Dist:
    """Where this process stands in a torchrun job (world_size 1 when run alone)."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def all_reduce_sum_(self, *tensors: torch.Tensor) -> None:
        """Sum each tensor over all ranks, in place (nothing to do alone)."""
        if self.world_size > 1:
            import torch.distributed as tdist

            for t in tensors:
                tdist.all_reduce(t)


def dist_from_env() -> Dist:
    """torchrun sets RANK, LOCAL_RANK and WORLD_SIZE; without them this is a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    return Dist(rank=int(os.environ["RANK"]), local_rank=int(os.environ.get("LOCAL_RANK", "0")), world_size=world)


# ---------------------------------------------------------------------------------------------------------
# The runtime: everything above, resolved once
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    precision: str  # "fp32" | "bf16" | "fp16" (autocast; fp16 with a gradient scaler)
    channels_last: bool  # model weights and batches in NHWC memory order
    allocator_tuned: bool  # tune_cpu_allocator() took effect
    dist: Dist = field(default_factory=Dist)

    def autocast(self) -> contextlib.AbstractContextManager:
        return autocast(self.device, self.precision)

    def grad_scaler(self) -> torch.amp.GradScaler | None:
        return grad_scaler(self.device, self.precision)

    def synchronize(self) -> None:
        synchronize(self.device)

    def info(self) -> dict[str, object]:
        return {
            "device": str(self.device),
            "precision": self.precision,
            "channels_last": self.channels_last,
            "allocator_tuned": self.allocator_tuned,
            "world_size": self.dist.world_size,
        }


@contextlib.contextmanager
def runtime(
    device: str = "auto", precision: str = "auto", channels_last: str = "auto", threads: int | None = None
) -> Iterator[Runtime]:
    """Resolve the options into a Runtime; under torchrun, join the process group (nccl on CUDA, gloo
    otherwise) for the body and leave it afterwards. On CUDA, cuDNN autotunes for the body (cudnn_autotune)."""
    check_options(precision, channels_last, threads)
    if threads:
        torch.set_num_threads(threads)
    dist = dist_from_env()
    dev = select_device(device)
    if dist.world_size > 1 and dev.type == "cuda":
        dev = torch.device("cuda", dist.local_rank)
    rt = Runtime(
        device=dev,
        precision=resolve_precision(precision, dev),
        channels_last=channels_last == "on" or (channels_last == "auto" and dev.type in ("cpu", "cuda")),
        allocator_tuned=tune_cpu_allocator() if dev.type == "cpu" else False,
        dist=dist,
    )
    with cudnn_autotune(dev):
        if dist.world_size == 1:
            yield rt
            return
        import torch.distributed as tdist

        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        tdist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
        try:
            yield rt
        finally:
            if tdist.is_initialized():
                tdist.destroy_process_group()
