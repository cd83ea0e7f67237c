"""Where onnxruntime runs a model: `--device auto|cpu|cuda|tensorrt` -> execution providers, and a session that
really runs on them. No torch, no numpy; onnxruntime is imported only when a session is made.

    session = start_session("model.onnx", ort.SessionOptions(), device="auto")
    session.get_providers()     # ['CPUExecutionProvider'] with the standard onnxruntime package

`auto` takes the best provider the installed onnxruntime offers: TensorRT, then CUDA, then the CPU. The
standard `onnxruntime` package offers only the CPU, so there `auto` is the CPU, as before. The GPU providers
come with `onnxruntime-gpu`, which must replace `onnxruntime` rather than sit beside it: both packages install
the same `onnxruntime` folder, and with both installed only the CPU build's providers load (GPU_INSTALL says
how to swap them). A GPU provider whose CUDA, cuDNN or TensorRT libraries fail to load does not raise: the
session quietly runs on the CPU. `start_session` compares `session.get_providers()` with what was asked: an
explicit device that did not start is a CifarkitError, and `auto` warns (ProviderFallbackWarning) and carries
on on the CPU.
"""

from __future__ import annotations

import contextlib
import io
import os
import warnings
from collections.abc import Sequence
from typing import Any

from cifarkit.errors import CifarkitError, first_line

DEVICES = ("auto", "cpu", "cuda", "tensorrt")
CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
TENSORRT = "TensorrtExecutionProvider"
BEST_FIRST = (TENSORRT, CUDA, CPU)  # what `auto` prefers; each falls back to the ones after it
_ASKED = {"cpu": CPU, "cuda": CUDA, "tensorrt": TENSORRT}

# Both names: uninstalling only `onnxruntime` after `onnxruntime-gpu` went in beside it deletes files the two
# share, which leaves the GPU package broken until it is reinstalled.
GPU_INSTALL = "pip uninstall -y onnxruntime onnxruntime-gpu && pip install onnxruntime-gpu"
CUDA_LIBS_INSTALL = 'pip install "onnxruntime-gpu[cuda,cudnn]"'  # 1.21+: CUDA and cuDNN as pip packages
TENSORRT_INSTALL = "pip install tensorrt"
REQUIREMENTS_URL = "https://onnxruntime.ai/docs/execution-providers/CUDA-ExecutionProvider.html#requirements"


class ProviderFallbackWarning(RuntimeWarning):
    """`device="auto"` found a GPU provider that did not start; the session runs on the CPU."""


# ---------------------------------------------------------------------------------------------------------
# Choosing
# ---------------------------------------------------------------------------------------------------------


def check_device(device: str) -> None:
    if device not in DEVICES:
        raise CifarkitError(f"--device must be one of {', '.join(DEVICES)}, got {device!r}")


def available_providers() -> list[str]:
    """The execution providers the installed onnxruntime build offers."""
    import onnxruntime as ort

    return list(ort.get_available_providers())


def choose_providers(device: str = "auto", available: Sequence[str] | None = None) -> list[str]:
    """The providers to ask for, best first, ending with the CPU (which runs any node the others cannot).
    Raises CifarkitError, saying what to install, when `device` names a provider this onnxruntime lacks."""
    check_device(device)
    if device == "cpu":
        return [CPU]  # the default path of old, without even asking onnxruntime what it has
    offered = list(available) if available is not None else available_providers()
    if device == "auto":
        best = next(p for p in BEST_FIRST if p in offered or p == CPU)
    else:
        best = _ASKED[device]
        if best not in offered:
            raise CifarkitError(missing_provider_message(device, offered))
    return [p for p in BEST_FIRST[BEST_FIRST.index(best) :] if p in offered or p == CPU]


def missing_provider_message(device: str, offered: Sequence[str]) -> str:
    """One line: `device`'s provider is not in this onnxruntime build, and what to install."""
    if _installed("onnxruntime") and _installed("onnxruntime-gpu"):
        return (
            f"--device {device}: onnxruntime and onnxruntime-gpu are both installed, which leaves only the CPU "
            f"build's providers; keep only the GPU build: {GPU_INSTALL}"
        )
    has = ", ".join(p.removesuffix("ExecutionProvider") for p in offered) or "none"
    what = "TensorRT" if device == "tensorrt" else "CUDA"
    message = f"--device {device}: the installed {_ort_version()} has no {what} provider (it has {has}); "
    if device == "tensorrt":
        return message + f"install the GPU build in its place ({GPU_INSTALL}) and TensorRT ({TENSORRT_INSTALL})"
    return message + f"install the GPU build in its place: {GPU_INSTALL}"


def provider_args(names: Sequence[str], cache_dir: str | os.PathLike[str] | None = None) -> list[Any]:
    """`names` as InferenceSession's `providers` argument. TensorRT builds an engine for the model on first
    use, which takes seconds to minutes; its engine and timing caches (in `cache_dir`, default
    $CIFARKIT_CACHE/tensorrt or ~/.cache/cifarkit/tensorrt) make later sessions start fast."""
    out: list[Any] = []
    for name in names:
        if name == TENSORRT:
            if cache_dir is None:
                from cifarkit.data import default_data_dir  # numpy only; imported just for this path

                cache_dir = default_data_dir() / "tensorrt"
            path = os.fspath(cache_dir)
            options = {
                "trt_engine_cache_enable": "True",
                "trt_engine_cache_path": path,
                "trt_timing_cache_enable": "True",
                "trt_timing_cache_path": path,
            }
            out.append((name, options))
        else:
            out.append(name)
    return out


# ---------------------------------------------------------------------------------------------------------
# Starting a session, and noticing when a provider quietly did not start
# ---------------------------------------------------------------------------------------------------------


def start_session(
    model: bytes | str, options: Any, device: str = "auto", *, cache_dir: str | os.PathLike[str] | None = None
) -> Any:
    """An onnxruntime InferenceSession for `model` (bytes or a path) on the providers `device` asks for.

    Raises CifarkitError when an explicit device's provider is missing or does not start; with `auto`, a GPU
    provider that does not start gives a ProviderFallbackWarning and a CPU session. An invalid model raises
    onnxruntime's own error, as a CPU session would."""
    import onnxruntime as ort

    names = choose_providers(device)
    if names == [CPU]:
        return ort.InferenceSession(model, sess_options=options, providers=[CPU])
    preload_gpu_libraries()
    reason = None
    try:
        # enable_fallback=0: onnxruntime's own fallback prints a banner to stdout, where results go.
        session = ort.InferenceSession(
            model, sess_options=options, providers=provider_args(names, cache_dir), enable_fallback=0
        )
    except Exception as exc:  # a provider failed loudly (CUDA_PATH set, no GPU memory, ...) or the model is bad
        reason = first_line(exc)
        session = ort.InferenceSession(model, sess_options=options, providers=[CPU])  # a bad model raises here
    problem = fallback(device, names, session.get_providers())
    if problem and device != "auto":
        raise CifarkitError(failed_provider_message(device, reason))
    if problem:
        warnings.warn(fallback_message(reason), ProviderFallbackWarning, stacklevel=2)
    return session


def fallback(device: str, asked: Sequence[str], running: Sequence[str]) -> bool:
    """Whether the session does not run where `device` asked: an explicit device's provider missing from
    `running` (TensorRT carrying on as CUDA counts), or `auto` that asked for a GPU and got only the CPU.
    onnxruntime reports a GPU provider that failed to load with a log line only, so this is how it shows."""
    if device == "auto":
        return asked[0] != CPU and list(running)[:1] == [CPU]
    return asked[0] not in running


def failed_provider_message(device: str, reason: str | None) -> str:
    """One line: `device`'s provider is installed but did not start, and what to install."""
    if device == "tensorrt":
        why = reason or "its TensorRT libraries (libnvinfer) did not load"
        return (
            f"--device tensorrt: onnxruntime ({_ort_version()}) could not start its TensorRT provider ({why}); "
            f"install the TensorRT release it was built for ({TENSORRT_INSTALL}) and check that nvidia-smi "
            "lists a GPU"
        )
    cuda = _ort_cuda_version()
    built = f", built for CUDA {cuda}" if cuda else ""
    why = reason or "its CUDA or cuDNN libraries did not load, or there is no GPU"
    return (
        f"--device cuda: onnxruntime ({_ort_version()}{built}) could not start its CUDA provider ({why}); "
        f"install the CUDA and cuDNN libraries it needs ({CUDA_LIBS_INSTALL}; see {REQUIREMENTS_URL}) and check "
        "that nvidia-smi lists a GPU"
    )


def fallback_message(reason: str | None) -> str:
    why = reason or "its CUDA or cuDNN libraries did not load, or there is no GPU"
    return (
        f"onnxruntime could not start a GPU provider ({why}); running on the CPU "
        f"(--device cuda turns this into an error that says what to install)"
    )


def preload_gpu_libraries() -> None:
    """onnxruntime-gpu (1.21+) finds CUDA and cuDNN installed as pip packages (onnxruntime-gpu[cuda,cudnn])
    only once preload_dlls() has loaded them. It prints what it could not load; that must not reach stdout,
    where cifar-infer writes its results, and a library that did not load shows up as a provider that did
    not start, which start_session reports."""
    import onnxruntime as ort

    preload = getattr(ort, "preload_dlls", None)
    if preload is None:
        return
    with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(Exception):
        preload()


def quiet_native_logs() -> None:
    """Keep onnxruntime's C++ log lines (a GPU provider that failed to load logs several) off stderr, where
    the CLI promises one line per problem; start_session's own messages say what happened."""
    import onnxruntime as ort

    ort.set_default_logger_severity(4)  # 4: fatal only


# ---------------------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------------------


def _installed(distribution: str) -> bool:
    import importlib.metadata

    try:
        importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def _ort_version() -> str:
    import onnxruntime as ort

    info = getattr(getattr(ort, "capi", None), "build_and_package_info", None)
    package = getattr(info, "package_name", "onnxruntime")
    return f"{package} {ort.__version__}"


def _ort_cuda_version() -> str | None:
    import onnxruntime as ort

    info = getattr(getattr(ort, "capi", None), "build_and_package_info", None)
    return getattr(info, "cuda_version", None)
