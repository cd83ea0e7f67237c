"""The console scripts, end to end: cifar-train and cifar-export through subprocesses and their main(argv)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cifarkit.cli.export import main as export_app
from cifarkit.cli.train import main as train_app

BIN = Path(sys.executable).parent


def _cli(main, args):
    """(exit status, stdout and stderr together) of a console script's main, run in this process."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        try:
            code = main([str(a) for a in args])
        except SystemExit as exc:
            code = exc.code
    return code, out.getvalue()


def test_train_prints_blog_lines_and_the_accuracy_table(tmp_path, batches_py):
    code, out = _cli(
        train_app,
        ["--data", batches_py, "--epochs", 1, "--out", tmp_path / "run", "--progress", "lines", "--device", "cpu"],
    )
    assert code == 0, out
    assert "Epoch [1/1], Batch [32/32], Loss: " in out
    assert "Accuracy of the network on the 200 test images:" in out
    for name in ("airplane", "truck"):
        assert any(line.startswith(name) and line.endswith("%") for line in out.splitlines())
    assert (tmp_path / "run" / "checkpoint.pt").is_file()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--data", "{tmp}/missing"], "--data: {tmp}/missing does not exist"),
        (["--data", "{tmp}/empty"], "is empty"),
        (["--data", "{tmp}/flat"], "has no train/ and test/"),
        (["--epochs", "0"], "--epochs must be a positive number"),
        (["--lr", "-0.5"], "--lr must be a positive number"),
        (["--resume", "{tmp}/corrupt.pt"], "cannot be read"),
        (["--resume", "{tmp}/foreign.pt"], "not a cifarkit checkpoint"),
        (["--recipe", "fastest"], "unknown recipe 'fastest'"),
        (["--device", "cuda"], "CUDA is not available"),
    ],
)
def test_train_bad_input_is_one_line_and_exit_2(tmp_path, batches_py, args, message):
    if "cuda" in args and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    (tmp_path / "empty").mkdir()
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "a.png").write_bytes(b"")
    (tmp_path / "corrupt.pt").write_bytes(b"\x00" * 100)
    torch.save({"hello": torch.ones(1)}, tmp_path / "foreign.pt")
    full = ["--data", str(batches_py), "--out", str(tmp_path / "run")] + [a.format(tmp=tmp_path) for a in args]
    proc = subprocess.run([BIN / "cifar-train", *full], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert message.format(tmp=tmp_path) in lines[0]
    assert "Traceback" not in proc.stderr + proc.stdout
    assert not (tmp_path / "run").exists()


def test_export_cli_writes_three_verified_files(tmp_path, trained_run):
    code, out = _cli(export_app, [trained_run.checkpoint, "--out", tmp_path, "--format", "all"])
    assert code == 0, out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.json", "model.onnx", "model.pt"]
    assert "verified onnx" in out and "verified torchscript" in out
    code, out = _cli(export_app, [trained_run.checkpoint, "--out", tmp_path / "o", "--format", "onnx"])
    assert code == 0 and sorted(p.name for p in (tmp_path / "o").iterdir()) == ["model.json", "model.onnx"]


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("format", "--format must be onnx, torchscript or all"),
        ("missing", "does not exist"),
        ("corrupt", "cannot be read"),
        ("out", "cannot write"),
    ],
)
def test_export_cli_bad_input(tmp_path, trained_run, case, message):
    checkpoint, out, fmt = trained_run.checkpoint, tmp_path / "out", "all"
    if case == "format":
        fmt = "coreml"
    elif case == "missing":
        checkpoint = tmp_path / "none.pt"
    elif case == "corrupt":
        checkpoint = tmp_path / "c.pt"
        checkpoint.write_bytes(b"PK\x03\x04 truncated zip")
    else:
        out = tmp_path / "a-file"
        out.write_text("x")
    proc = subprocess.run(
        [BIN / "cifar-export", checkpoint, "--out", out, "--format", fmt], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and message in proc.stderr
    if case != "out":
        assert not out.exists()


def _torchrun(args, timeout=300):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(
        [
            BIN / "torchrun",
            "--nproc_per_node=2",
            "--master_port",
            str(29500 + os.getpid() % 1000),
            BIN / "cifar-train",
            *args,
            "--device",
            "cpu",
            "--progress",
            "lines",
            "--threads",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


@pytest.mark.skipif(shutil.which("torchrun", path=str(BIN)) is None, reason="torchrun not installed")
def test_torchrun_two_processes_with_gloo(tmp_path, batches_py):
    """DDP on CPU: two ranks each train on half of every epoch; rank 0 alone prints and writes one run."""
    out = tmp_path / "ddp"
    proc = _torchrun(["--data", batches_py, "--epochs", "2", "--out", out])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("Accuracy of the network on the 200 test images") == 1  # counts summed over ranks
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == 2
    # The global batch stays 32 (16 per rank, 500 images per rank): 32 steps an epoch, as a single process.
    assert len(metrics["loss_per_batch"]) == 2 * 32
    assert metrics["test"]["count"] == 200
    assert metrics["test"]["accuracy"] > 0.5
    names = sorted(p.name for p in out.iterdir())  # rank 0 writes; the other rank writes nothing
    events = [n for n in names if n.startswith("events.out.tfevents.")]
    assert len(events) == 1 and sorted(set(names) - set(events)) == [
        "checkpoint.pt", "loss.png", "metrics.json", "metrics.jsonl"
    ]  # fmt: skip


@pytest.mark.slow  # ~45 s; DDP itself is in the default suite (test_torchrun_two_processes_with_gloo)
@pytest.mark.skipif(shutil.which("torchrun", path=str(BIN)) is None, reason="torchrun not installed")
def test_torchrun_airbench_past_the_whitening_bias_freeze(tmp_path, batches_py):
    """The strong recipe under DDP, across epoch 3 where the whitening bias stops learning."""
    out = tmp_path / "ddp-airbench"
    proc = _torchrun(
        ["--data", batches_py, "--recipe", "airbench", "--epochs", "3.5", "--batch-size", "128", "--out", out]
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["tta"] == "hflip_translate"
    assert metrics["test"]["accuracy"] > 0.5
