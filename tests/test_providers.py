"""onnxruntime execution providers: `--device auto|cpu|cuda|tensorrt` in cifar-infer and Classifier.from_file.

No GPU is needed: the provider list onnxruntime offers is patched (onnxruntime.get_available_providers), and a
GPU provider that quietly falls back to the CPU is simulated by a session factory that ignores the GPU."""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from cifarkit.cli.infer import main
from cifarkit.errors import CifarkitError
from cifarkit.infer import Classifier, open_session, providers
from cifarkit.infer.providers import (
    CPU,
    CUDA,
    GPU_INSTALL,
    TENSORRT,
    ProviderFallbackWarning,
    choose_providers,
    fallback,
    provider_args,
    start_session,
)
from conftest import synthetic_images

CPU_BUILD = ["AzureExecutionProvider", CPU]  # what `pip install onnxruntime` offers
GPU_BUILD = [TENSORRT, CUDA, CPU]  # what `pip install onnxruntime-gpu` offers
CUDA_ONLY = [CUDA, CPU]
REAL_SESSION = ort.InferenceSession


@pytest.fixture(scope="module")
def model_path(exported) -> Path:
    return Path(exported.paths["onnx"])


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("provider-images")
    from PIL import Image

    for i, img in enumerate(synthetic_images(5, seed=3)[0]):
        Image.fromarray(img).save(root / f"{i}.png")
    return root


def offer(monkeypatch, names: list[str]) -> None:
    monkeypatch.setattr(ort, "get_available_providers", lambda: list(names))


def gpu_quietly_missing(monkeypatch) -> list[list]:
    """Sessions that run on the CPU whatever they are asked for, as onnxruntime-gpu does when its CUDA
    libraries do not load; returns the provider lists asked for."""
    asked: list[list] = []

    def session(model, sess_options=None, providers=None, **kwargs):
        asked.append(list(providers))
        return REAL_SESSION(model, sess_options=sess_options, providers=[CPU])

    monkeypatch.setattr(ort, "InferenceSession", session)
    return asked


# ---------------------------------------------------------------------------------------------------------
# Choosing providers
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("offered", "device", "expected"),
    [
        (CPU_BUILD, "auto", [CPU]),
        (CPU_BUILD, "cpu", [CPU]),
        (GPU_BUILD, "auto", [TENSORRT, CUDA, CPU]),
        (GPU_BUILD, "cuda", [CUDA, CPU]),
        (GPU_BUILD, "tensorrt", [TENSORRT, CUDA, CPU]),
        (GPU_BUILD, "cpu", [CPU]),
        (CUDA_ONLY, "auto", [CUDA, CPU]),
        (CUDA_ONLY, "cuda", [CUDA, CPU]),
    ],
)
def test_choice_follows_what_onnxruntime_offers(monkeypatch, offered, device, expected):
    offer(monkeypatch, offered)
    assert choose_providers(device) == expected


@pytest.mark.parametrize(
    ("offered", "device", "needle"),
    [
        (
            CPU_BUILD,
            "cuda",
            f"has no CUDA provider (it has Azure, CPU); install the GPU build in its place: {GPU_INSTALL}",
        ),
        (CPU_BUILD, "tensorrt", "pip install tensorrt"),
        (CUDA_ONLY, "tensorrt", "has no TensorRT provider"),
    ],
)
def test_a_missing_provider_says_what_to_install(monkeypatch, offered, device, needle):
    offer(monkeypatch, offered)
    with pytest.raises(CifarkitError) as info:
        choose_providers(device)
    message = str(info.value)
    assert message.startswith(f"--device {device}: ") and needle in message and "\n" not in message


def test_both_packages_installed_is_named(monkeypatch):
    offer(monkeypatch, CPU_BUILD)
    monkeypatch.setattr(providers, "_installed", lambda name: name in ("onnxruntime", "onnxruntime-gpu"))
    with pytest.raises(CifarkitError, match="onnxruntime and onnxruntime-gpu are both installed"):
        choose_providers("cuda")


def test_unknown_device():
    with pytest.raises(CifarkitError, match="--device must be one of auto, cpu, cuda, tensorrt, got 'gpu'"):
        choose_providers("gpu")


def test_tensorrt_keeps_its_engines_in_a_cache(tmp_path):
    args = provider_args([TENSORRT, CUDA, CPU], cache_dir=tmp_path)
    name, options = args[0]
    assert name == TENSORRT and args[1:] == [CUDA, CPU]
    assert options["trt_engine_cache_enable"] == "True" and options["trt_engine_cache_path"] == str(tmp_path)


def test_fallback_rule():
    assert fallback("cuda", [CUDA, CPU], [CPU])
    assert not fallback("cuda", [CUDA, CPU], [CUDA, CPU])
    assert fallback("tensorrt", [TENSORRT, CUDA, CPU], [CUDA, CPU])  # asked for TensorRT, got CUDA
    assert not fallback("auto", [TENSORRT, CUDA, CPU], [CUDA, CPU])  # auto: any GPU will do
    assert fallback("auto", [CUDA, CPU], [CPU])
    assert not fallback("auto", [CPU], [CPU])


# ---------------------------------------------------------------------------------------------------------
# Starting a session: quiet fallbacks are caught
# ---------------------------------------------------------------------------------------------------------


def test_explicit_cuda_that_falls_back_to_cpu_is_an_error(monkeypatch, model_path):
    offer(monkeypatch, CUDA_ONLY)
    asked = gpu_quietly_missing(monkeypatch)
    with pytest.raises(CifarkitError) as info:
        start_session(model_path.read_bytes(), ort.SessionOptions(), "cuda")
    assert asked[0] == [CUDA, CPU]
    message = str(info.value)
    assert "could not start its CUDA provider" in message and providers.CUDA_LIBS_INSTALL in message
    assert "\n" not in message


def test_auto_that_falls_back_to_cpu_warns_and_runs(monkeypatch, model_path):
    offer(monkeypatch, GPU_BUILD)
    asked = gpu_quietly_missing(monkeypatch)
    with pytest.warns(ProviderFallbackWarning, match="running on the CPU"):
        session = start_session(model_path.read_bytes(), ort.SessionOptions(), "auto")
    assert asked[0][0][0] == TENSORRT  # TensorRT asked first, with its cache options
    assert session.get_providers() == [CPU]


def test_a_provider_that_raises_is_reported_with_its_reason(monkeypatch, model_path):
    offer(monkeypatch, CUDA_ONLY)

    def session(model, sess_options=None, providers=None, **kwargs):
        if providers != [CPU]:
            raise RuntimeError("CUDA_PATH is set but CUDA wasn't able to be loaded\nmore detail")
        return REAL_SESSION(model, sess_options=sess_options, providers=providers)

    monkeypatch.setattr(ort, "InferenceSession", session)
    payload = model_path.read_bytes()
    with pytest.raises(CifarkitError, match=r"\(CUDA_PATH is set but CUDA wasn't able to be loaded\)"):
        start_session(payload, ort.SessionOptions(), "cuda")
    with pytest.warns(ProviderFallbackWarning, match="CUDA_PATH is set"):
        assert start_session(payload, ort.SessionOptions(), "auto").get_providers() == [CPU]


@pytest.mark.filterwarnings("ignore:Specified provider:UserWarning")  # patched list: CUDA; this build: none
def test_a_bad_model_is_still_a_model_error(monkeypatch, tmp_path):
    offer(monkeypatch, CUDA_ONLY)
    bad = tmp_path / "model.onnx"
    bad.write_bytes(b"\x08\x07 not a model")
    with pytest.raises(CifarkitError, match="is not a valid ONNX model"):
        open_session(bad, device="auto")


def test_gpu_library_preloading_keeps_stdout_clean(monkeypatch, model_path, capsys):
    offer(monkeypatch, CUDA_ONLY)
    gpu_quietly_missing(monkeypatch)
    monkeypatch.setattr(ort, "preload_dlls", lambda *a, **k: print("Failed to load libcudnn.so.9"), raising=False)
    with pytest.warns(ProviderFallbackWarning):
        start_session(model_path.read_bytes(), ort.SessionOptions(), "auto")
    assert capsys.readouterr().out == ""


# ---------------------------------------------------------------------------------------------------------
# The Python API and the CLI
# ---------------------------------------------------------------------------------------------------------


def test_from_file_on_each_device_of_a_cpu_build(model_path, monkeypatch):
    offer(monkeypatch, CPU_BUILD)
    batch = synthetic_images(6, seed=2)[0]
    default = Classifier.from_file(model_path)
    assert default.providers == (CPU,)
    on_cpu = Classifier.from_file(model_path, device="cpu")
    assert np.array_equal(default.run(batch)[0], on_cpu.run(batch)[0])
    with pytest.raises(CifarkitError, match="pip uninstall -y onnxruntime onnxruntime-gpu"):
        Classifier.from_file(model_path, device="cuda")


class _GpuLooking:
    """A real CPU session that reports a CUDA provider: the Classifier then takes its GPU path."""

    def __init__(self, session) -> None:
        self._session = session

    def get_providers(self):
        return [CUDA, CPU]

    def __getattr__(self, name):
        return getattr(self._session, name)


def test_io_binding_gives_the_same_answers(model_path):
    session, meta, source = open_session(model_path, device="cpu")
    plain = Classifier(session, meta, source=source)
    gpu_like = Classifier(_GpuLooking(session), meta, source=source)
    assert not plain._io_binding and gpu_like._io_binding  # on by default exactly on a GPU provider
    batch = synthetic_images(37, seed=4)[0]
    for a, b in zip(plain.run(batch, batch_size=16), gpu_like.run(batch, batch_size=16), strict=True):
        assert a.dtype == b.dtype == np.float32 and np.array_equal(a, b)


def infer(*args) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), warnings.catch_warnings():
        try:
            code = main([str(a) for a in args])
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
    return code, out.getvalue(), err.getvalue()


def test_cli_device_cpu_output_is_the_default_output(model_path, images):
    runs = [infer(images, "--model", model_path, "-f", "csv", *extra) for extra in ([], ["--device", "cpu"])]
    assert runs[0][0] == runs[1][0] == 0
    assert runs[0][1] == runs[1][1] and runs[0][1].count("\n") == 6
    assert runs[1][2] == ""


def test_cli_device_cuda_without_a_cuda_provider_is_one_line_exit_2(model_path, images):
    proc = subprocess.run(
        [Path(sys.executable).parent / "cifar-infer", images, "--model", model_path, "--device", "cuda"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    if CUDA in ort.get_available_providers():
        pytest.skip("this onnxruntime has a CUDA provider")
    assert proc.returncode == 2 and proc.stdout == ""
    [line] = proc.stderr.splitlines()
    assert line.startswith("error: --device cuda: ") and GPU_INSTALL in line


def test_cli_bad_device_is_a_usage_error(model_path, images):
    code, out, err = infer(images, "--model", model_path, "--device", "gpu")
    assert code == 2 and out == "" and "--device must be one of auto, cpu, cuda, tensorrt" in err


def test_cli_auto_fallback_is_one_warning_line_and_the_run_goes_on(model_path, images, monkeypatch):
    offer(monkeypatch, CUDA_ONLY)
    gpu_quietly_missing(monkeypatch)
    code, out, err = infer(images, "--model", model_path, "-f", "jsonl")
    assert code == 0 and len(out.splitlines()) == 5 and json.loads(out.splitlines()[0])["label"]
    [line] = err.splitlines()
    assert line.startswith("warning: onnxruntime could not start a GPU provider")


# ---------------------------------------------------------------------------------------------------------
# The exported graph and the module's weight
# ---------------------------------------------------------------------------------------------------------


def test_the_uint8_input_feeds_a_cast_and_nothing_else(exported):
    # TensorRT takes a uint8 network input only when a Cast consumes it directly (NVIDIA/TensorRT#3985).
    graph = onnx.load(str(exported.paths["onnx"])).graph
    [image_input] = [i.name for i in graph.input]
    consumers = [node.op_type for node in graph.node if image_input in node.input]
    assert consumers == ["Cast"]


def test_providers_module_imports_neither_torch_nor_numpy():
    code = "import json, sys, cifarkit.infer.providers; print(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    loaded = set(json.loads(out.stdout))
    assert not ({"torch", "numpy", "onnxruntime"} & loaded)
