"""Hostile input, round two: the ten cases an outside probe found (issue "Hostile input, round two"), each built
here and run through the real commands. Before the fix each of them failed as the issue says (NaN scored as class
0, tracebacks, gigabytes allocated for a few hundred bytes, a log file replaced, a bug report for a full disk, a
hang at load); after it, each is one line naming the file or option, with the promised exit status, and nothing
written or lost."""

from __future__ import annotations

import json
import os
import pickle
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper
from PIL import Image

from cifarkit.batches_py import read_batch
from cifarkit.errors import CifarkitError
from conftest import synthetic_images, write_batches_py

BIN = Path(sys.executable).parent


def run(*cmd: object, timeout: float = 120, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, **kwargs)


def one_line(proc: subprocess.CompletedProcess) -> str:
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr + proc.stdout
    return lines[0]


def peak_rss_mib(*cmd: object) -> tuple[subprocess.CompletedProcess, float]:
    """Run `cmd` as the only child of a fresh interpreter: (its result, its peak RSS in MiB)."""
    code = textwrap.dedent(
        """
        import json, resource, subprocess, sys
        p = subprocess.run(sys.argv[1:], capture_output=True, text=True, timeout=300)
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        print(json.dumps([p.returncode, p.stdout, p.stderr, peak]))
        """
    )
    out = subprocess.run([sys.executable, "-c", code, *map(str, cmd)], capture_output=True, text=True, timeout=330)
    code_, stdout, stderr, peak = json.loads(out.stdout)
    return subprocess.CompletedProcess(cmd, code_, stdout, stderr), peak


@pytest.fixture(scope="module")
def model(exported) -> Path:
    return Path(exported.paths["onnx"])


@pytest.fixture(scope="module")
def labelled(tmp_path_factory) -> Path:
    """A folder of class folders named after CIFAR-10's classes: 4 images each, half with a dark corner."""
    from cifarkit.spec import CIFAR10_CLASSES

    root = tmp_path_factory.mktemp("labelled")
    x, y = synthetic_images(40, seed=3)
    for i, (img, label) in enumerate(zip(x, y, strict=True)):
        img = img.copy()
        img[0, 0, 0] = 10 if i % 2 else 250  # the pixel the partly-NaN model looks at
        folder = root / CIFAR10_CLASSES[label]
        folder.mkdir(exist_ok=True)
        Image.fromarray(img).save(folder / f"{i:02d}.png")
    return root


# ---------------------------------------------------------------------------------------------------------
# 1. Non-finite outputs are per-image failures in cifar-eval too
# ---------------------------------------------------------------------------------------------------------


def nan_when_dark(model: Path, out: Path) -> Path:
    """The model, but its logits are NaN for an image whose top-left red value is under 128 (sqrt of a negative
    number, times zero, added to every logit); exact elsewhere."""
    proto = onnx.load(str(model))
    g = proto.graph
    images, logits = g.input[0].name, g.output[0].name
    for node in g.node:
        node.output[:] = [f"{o}_pre" if o == logits else o for o in node.output]
    g.node.extend([
        helper.make_node("Cast", [images], ["px"], to=TensorProto.FLOAT),
        helper.make_node("Slice", ["px", "starts", "ends"], ["corner"]),  # [N, 1, 1, 1]: pixel (0, 0), red
        helper.make_node("Reshape", ["corner", "n1"], ["corner2"]),  # [N, 1]
        helper.make_node("Sub", ["corner2", "half"], ["shifted"]),
        helper.make_node("Sqrt", ["shifted"], ["root"]),  # NaN where the corner is dark
        helper.make_node("Mul", ["root", "zero"], ["poison"]),
        helper.make_node("Add", [f"{logits}_pre", "poison"], [logits]),
    ])  # fmt: skip
    g.initializer.extend([
        helper.make_tensor("starts", TensorProto.INT64, [4], [0, 0, 0, 0]),
        helper.make_tensor("ends", TensorProto.INT64, [4], [2**62, 1, 1, 1]),
        helper.make_tensor("n1", TensorProto.INT64, [2], [-1, 1]),
        helper.make_tensor("half", TensorProto.FLOAT, [], [128.0]),
        helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0]),
    ])  # fmt: skip
    for node in g.node:  # the softmax reads the poisoned logits
        if node.op_type == "Softmax":
            node.input[:] = [logits if i == f"{logits}_pre" else i for i in node.input]
    onnx.save(proto, str(out))
    return out


def test_eval_counts_non_finite_outputs_as_failed_images(model, labelled, tmp_path):
    """Before: every image scored as class 0, 'ECE nan %', exit 0; with --out, a ValueError about NaN in JSON."""
    nan_model = nan_when_dark(model, tmp_path / "partly-broken.onnx")
    out = tmp_path / "eval"
    proc = run(BIN / "cifar-eval", nan_model, "--data", labelled, "--out", out, "--progress", "none")
    assert proc.returncode == 1, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 20 and all("output is not finite (NaN or Inf)" in line for line in errors)
    assert proc.stderr.strip().endswith("20 of 40 input(s) failed; see the lines above")
    assert "nan" not in proc.stdout.lower() and "evaluated 20 images" in proc.stdout
    report = json.loads((out / "report.json").read_text())  # valid JSON: no NaN anywhere
    assert report["images"] == 20 and report["failed"] == 20
    assert len((out / "predictions.csv").read_text().splitlines()) == 21


# ---------------------------------------------------------------------------------------------------------
# 2, 3, 9. One checkpoint check for every reader: export, eval and --resume
# ---------------------------------------------------------------------------------------------------------


def doctored(trained_run, out: Path, *, image_size=None, model_kwargs=None) -> Path:
    state = torch.load(trained_run.checkpoint, weights_only=True)
    if image_size is not None:
        state["artifact"]["image_size"] = image_size
    if model_kwargs is not None:
        state["model_kwargs"] = model_kwargs
    torch.save(state, out)
    return out


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"image_size": [64, 64]}, "its image size 64x64 does not fit model 'blog_cnn'"),
        ({"model_kwargs": {"num_classes": 10}}, "model_kwargs sets 'num_classes', which cifarkit takes from the"),
    ],
    ids=["misfit-image-size", "repeated-argument"],
)
def test_every_reader_refuses_a_checkpoint_its_model_cannot_be_built_from(
    trained_run, batches_py, tmp_path, change, message
):
    """Before: export and eval exited 1 with 39 lines of fake-tensor traceback, or 'got multiple values for keyword
    argument'; --resume trained an epoch and rewrote the file with clean metadata."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    bad = doctored(trained_run, run_dir / "checkpoint.pt", **change)
    before = bad.read_bytes()
    commands = [
        [BIN / "cifar-export", bad, "--out", tmp_path / "art"],
        [BIN / "cifar-eval", bad, "--data", batches_py, "--progress", "none"],
        [BIN / "cifar-train", "--resume", bad, "--data", batches_py, "--epochs", "3", "--device", "cpu"],
    ]
    for cmd in commands:
        proc = run(*cmd)
        assert proc.returncode == 2, (cmd[0], proc.stderr[-2000:])
        line = one_line(proc)
        assert message in line and str(bad) in line, line
    assert bad.read_bytes() == before and not (tmp_path / "art").exists()
    assert sorted(p.name for p in run_dir.iterdir()) == ["checkpoint.pt"]


# ---------------------------------------------------------------------------------------------------------
# 4. A CIFAR batch file of a few hundred bytes cannot allocate gigabytes
# ---------------------------------------------------------------------------------------------------------


class _StridedView:
    """Pickles as numpy.ndarray(shape, dtype, buffer=8 bytes, strides=0): a zero-stride view of a few bytes that
    claims `rows` rows of `width` values (width 0: a vector). The probe's 277-byte data_batch_1 held such pixels,
    and such labels, so that they matched."""

    def __init__(self, rows: int, width: int = 3072, dtype: str = "u1") -> None:
        self.rows, self.width, self.dtype = rows, width, dtype

    def __reduce__(self):
        shape, strides = ((self.rows, self.width), (0, 0)) if self.width else ((self.rows,), (0,))
        return (np.ndarray, (shape, self.dtype, bytes(8), 0, strides))  # dtype by name: numpy.uint8 is refused


class _ClaimedArray:
    """Pickles as numpy's own reconstruction with a shape that claims `rows` x 3072 bytes and 10 bytes of data."""

    def __init__(self, rows: int) -> None:
        self.rows = rows

    def __reduce__(self):
        from numpy._core.multiarray import _reconstruct

        state = (1, (self.rows, 3072), np.dtype(np.uint8), False, b"0123456789")
        return (_reconstruct, (np.ndarray, (0,), b"b"), state)


def crafted_batches(folder: Path, data: object) -> Path:
    """A cifar-10-batches-py folder whose data_batch_1 (and test_batch) hold `data` as their pixel array, and as
    many labels as it claims rows (a zero-stride view for a zero-stride view)."""
    write_batches_py(folder, n_train=50, n_test=10)
    rows = data.rows if isinstance(data, (_StridedView, _ClaimedArray)) else len(data)
    labels = _StridedView(rows, width=0, dtype="i8") if isinstance(data, _StridedView) else [0] * min(rows, 10_001)
    for name in ("data_batch_1", "test_batch"):
        with open(folder / name, "wb") as f:
            pickle.dump({b"data": data, b"labels": labels}, f, protocol=2)
    return folder


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (_StridedView(1_000_000), "calls numpy.ndarray directly"),
        (_StridedView(2**40 // 3072), "calls numpy.ndarray directly"),
        (_ClaimedArray(2**40 // 3072), "not a CIFAR-10 python batch"),
        (np.zeros((10_001, 3072), np.uint8), "10,001 rows; a CIFAR-10 batch holds at most 10,000"),
        (np.zeros((10, 3071), np.uint8), "expected uint8 [N, 3072]"),
    ],
    ids=["zero-stride-3GB", "zero-stride-1TiB", "claims-1TiB", "too-many-rows", "wrong-width"],
)
def test_a_batch_file_is_refused_before_any_allocation(tmp_path, model, data, message):
    """Before: a 277-byte file reached 3.7 GiB of RSS in cifar-train before failing (3.1 GiB in cifar-eval); one
    claiming 1 TiB exited 1 with a bare MemoryError naming no file."""
    folder = crafted_batches(tmp_path / "cifar-10-batches-py", data)
    with pytest.raises(CifarkitError, match=re.escape(message)):
        read_batch(folder / "data_batch_1")
    for cmd, name in (
        ([BIN / "cifar-train", "--data", folder, "--out", tmp_path / "run", "--device", "cpu"], "data_batch_1"),
        ([BIN / "cifar-eval", model, "--data", folder, "--progress", "none"], "test_batch"),
    ):
        proc, peak = peak_rss_mib(*cmd)
        assert proc.returncode == 2, proc.stderr[-2000:]
        line = one_line(proc)
        assert name in line and message in line, line
        assert peak < 1024, f"{cmd[0].name}: peak RSS {peak:.0f} MiB"  # torch included
    assert not (tmp_path / "run").exists()


def test_eval_reads_only_the_batch_of_its_split(tmp_path, model):
    """Case 10 (batches-py): evaluating the test split needs test_batch and batches.meta, not data_batch_2."""
    folder = write_batches_py(tmp_path / "cifar-10-batches-py", n_train=50, n_test=20)
    for i in range(1, 6):
        (folder / f"data_batch_{i}").unlink()
    proc = run(BIN / "cifar-eval", model, "--data", folder, "--progress", "none")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "20 images of 10 classes" in proc.stdout
    proc = run(BIN / "cifar-eval", model, "--data", folder, "--split", "train")
    assert proc.returncode == 2 and "data_batch_1 is missing" in one_line(proc)


def test_eval_takes_a_root_holding_only_test_as_an_imagefolder(tmp_path, model, labelled):
    """Case 10 (ImageFolder): a root with test/ alone is an ImageFolder root, not a class named 'test'."""
    root = tmp_path / "root"
    (root / "test").mkdir(parents=True)
    for d in labelled.iterdir():
        os.symlink(d, root / "test" / d.name)
    proc = run(BIN / "cifar-eval", model, "--data", root, "--progress", "none")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "(imagefolder, test split): 40 images" in proc.stdout


# ---------------------------------------------------------------------------------------------------------
# 5, 6. One output stream rule: --output /dev/stdout, full and closed stdout
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pictures(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("pictures")
    for i, img in enumerate(synthetic_images(3, seed=9)[0]):
        Image.fromarray(img).save(folder / f"{i}.png")
    return folder


def test_output_dev_stdout_appends_to_the_log_stdout_appends_to(model, pictures, tmp_path):
    """Before: the log was replaced by a rename (earlier lines gone, later writes to a deleted file)."""
    log = tmp_path / "run.log"
    log.write_text("earlier line\n")
    inode = log.stat().st_ino
    with open(log, "a") as f:
        proc = subprocess.run(
            [BIN / "cifar-infer", pictures, "-m", model, "-f", "csv", "--output", "/dev/stdout"],
            stdout=f, stderr=subprocess.PIPE, text=True, timeout=120,
        )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    lines = log.read_text().splitlines()
    assert lines[0] == "earlier line" and lines[1].startswith("path,label") and len(lines) == 5
    assert log.stat().st_ino == inode  # the same file, written through, never replaced


def test_output_dev_stdout_into_a_pipe(model, pictures):
    """Before: 'cannot write to /proc/PID/fd (No such file or directory)', naming neither the option nor the pipe."""
    proc = run(BIN / "cifar-infer", pictures, "-m", model, "-f", "csv", "--output", "/dev/stdout")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("path,label") and len(proc.stdout.splitlines()) == 4


def test_output_a_fifo_with_a_reader_is_written_into(model, pictures, tmp_path):
    fifo = tmp_path / "rows.fifo"
    os.mkfifo(fifo)
    reader = subprocess.Popen(["cat", str(fifo)], stdout=subprocess.PIPE, text=True)
    try:
        proc = run(BIN / "cifar-infer", pictures, "-m", model, "-f", "jsonl", "--output", fifo)
        rows, _ = reader.communicate(timeout=60)
    finally:
        reader.kill()
    assert proc.returncode == 0 and len(rows.splitlines()) == 3 and fifo.exists() and not fifo.is_file()


@pytest.mark.parametrize(
    "cmd",
    [
        ["cifar-infer", "{pictures}", "-m", "{model}"],
        ["cifar-eval", "{model}", "--data", "{labelled}", "--progress", "none"],
        ["cifar-train", "--data", "{batches}", "--epochs", "1", "--out", "{tmp}/run", "--device", "cpu"],
        ["cifar-pack", "{pictures}", "--out", "{tmp}/shards"],
    ],
    ids=["infer", "eval", "train", "pack"],
)
@pytest.mark.parametrize("stdout", ["full", "closed"])
def test_a_full_or_closed_stdout_is_one_line_and_exit_2(cmd, stdout, model, pictures, labelled, batches_py, tmp_path):
    """Before: 'OSError: [Errno 28] ... (run again with --debug)' (exit 1), full tracebacks from cifar-eval and
    cifar-train, and 'AttributeError: NoneType has no attribute isatty' with stdout closed."""
    values = {"pictures": pictures, "model": model, "labelled": labelled, "batches": batches_py, "tmp": tmp_path}
    argv = [str(BIN / cmd[0])] + [a.format(**values) for a in cmd[1:]]
    if stdout == "full":
        with open("/dev/full", "w") as full:
            proc = subprocess.run(argv, stdout=full, stderr=subprocess.PIPE, text=True, timeout=300)
        expected = "error: standard output: cannot write (No space left on device)"
    else:
        proc = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, timeout=300,
                              preexec_fn=lambda: os.close(1))  # fmt: skip
        expected = "error: standard output is closed"
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == expected and "Traceback" not in proc.stderr
    assert not (tmp_path / "run").exists() or not (tmp_path / "run" / "checkpoint.pt").exists()


def test_output_a_full_device_is_one_line(model, pictures):
    proc = run(BIN / "cifar-infer", pictures, "-m", model, "--output", "/dev/full")
    assert (
        proc.returncode == 2 and one_line(proc) == "error: --output /dev/full: cannot write (No space left on device)"
    )


# ---------------------------------------------------------------------------------------------------------
# 7. An out-of-range --seed
# ---------------------------------------------------------------------------------------------------------


def test_an_out_of_range_seed_names_the_option(batches_py, tmp_path):
    """Before: exit 1, 'ValueError: Overflow when unpacking long long'."""
    proc = run(BIN / "cifar-train", "--data", batches_py, "--seed", "99999999999999999999999", "--out", tmp_path / "r")
    assert proc.returncode == 2 and "--seed must be 0 to 9,223,372,036,854,775,807" in one_line(proc)
    assert not (tmp_path / "r").exists()


# ---------------------------------------------------------------------------------------------------------
# 8. A model that never answers: the load-time check runs under a time limit
# ---------------------------------------------------------------------------------------------------------


def test_a_model_that_never_answers_is_one_line_after_the_load_timeout(model, pictures, tmp_path):
    """Before: cifar-infer and cifar-eval waited for ever in the load-time probe (only a signal ended them)."""
    from test_hostile import _endless_model

    endless = _endless_model(model, tmp_path / "endless.onnx")
    for cmd in (
        [BIN / "cifar-infer", pictures, "-m", endless, "--load-timeout", "1"],
        [BIN / "cifar-eval", endless, "--data", pictures, "--load-timeout", "1"],
    ):
        proc = run(*cmd, timeout=120)
        assert proc.returncode == 2, proc.stderr[-2000:]
        line = one_line(proc)
        assert f"model {endless} did not answer one image within 1 s" in line and "--load-timeout" in line
    proc = run(BIN / "cifar-infer", pictures, "-m", model, "--load-timeout", "-1")
    assert proc.returncode == 2 and "--load-timeout must be" in one_line(proc)


def test_the_load_timeout_leaves_ctrl_c_working(model, pictures, tmp_path):
    """--load-timeout 0 turns the limit off; the model then runs until a signal ends it (exit 130)."""
    from test_hostile import _endless_model

    endless = _endless_model(model, tmp_path / "endless.onnx")
    proc = subprocess.Popen(
        [BIN / "cifar-infer", pictures, "-m", endless, "--load-timeout", "0"], stderr=subprocess.PIPE
    )
    try:
        with pytest.raises(subprocess.TimeoutExpired):
            proc.wait(timeout=3)  # still in the endless graph: no limit
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130 and err.decode().strip() == "interrupted"
