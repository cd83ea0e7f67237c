"""Hostile files, faults and signals: nothing executed, nothing lost, one line for every failure.

One section per class of failure in the issue "Hostile files, faults and signals"; each test is the repro
of that class (it failed before the fix: noted in each docstring) and checks the behaviour now."""

from __future__ import annotations

import csv
import io
import json
import os
import pickle
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from PIL import Image

from cifarkit.atomic import SET_JOURNAL, atomic_path, finish_pending_set, output_folder, write_set
from cifarkit.data import load_data
from cifarkit.errors import CifarkitError, first_line
from cifarkit.escape import escape_name, unescape_name
from cifarkit.infer import Classifier, Failure, Prediction
from cifarkit.model.checkpoint import Checkpoint
from cifarkit.model.nets import build_model
from cifarkit.train import TrainConfig, train
from conftest import export_checkpoint, synthetic_images, write_batches_py

BIN = Path(sys.executable).parent
ROOT_USER = hasattr(os, "geteuid") and os.geteuid() == 0


def infer(*args: object, timeout: float = 60) -> subprocess.CompletedProcess:
    """cifar-infer in a subprocess; arguments may be bytes (file names that are not UTF-8)."""
    cmd = [os.fsencode(BIN / "cifar-infer"), *(a if isinstance(a, bytes) else os.fsencode(str(a)) for a in args)]
    return subprocess.run(cmd, capture_output=True, timeout=timeout)


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    err = proc.stderr.decode("utf-8", "replace").strip()
    assert "Traceback" not in err, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


@pytest.fixture(scope="module")
def model(exported, tmp_path_factory) -> Path:
    """A private copy of the exported model set (tests below modify copies of it)."""
    folder = tmp_path_factory.mktemp("model")
    for p in exported.paths.values():
        shutil.copy(p, folder / p.name)
    return folder / "model.onnx"


@pytest.fixture(scope="module")
def pictures(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("pictures")
    for i, img in enumerate(synthetic_images(4, seed=3)[0]):
        Image.fromarray(img).save(folder / f"{i}.png")
    return folder


def with_metadata(model: Path, out: Path, **changes: str) -> Path:
    """A copy of `model` with some metadata_props replaced (values as stored: strings)."""
    proto = onnx.load(str(model))
    props = {p.key: p.value for p in proto.metadata_props}
    props.update(changes)
    del proto.metadata_props[:]
    for key, value in props.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(proto, str(out))
    return out


# ---------------------------------------------------------------------------------------------------------
# 1. Code execution from a data folder
# ---------------------------------------------------------------------------------------------------------


class _Payload:
    """A pickle that runs a command when loaded with plain pickle.load (what cifarkit 0.1 did)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("victim", ["test_batch", "data_batch_3", "batches.meta"])
def test_a_crafted_batch_file_is_refused_and_runs_nothing(tmp_path, victim):
    """Before: plain pickle.load ran the payload, then 'unexpected layout'. Now: refused, nothing runs."""
    folder = write_batches_py(tmp_path / "cifar-10-batches-py", n_train=50, n_test=10)
    marker = tmp_path / "PWNED"
    with open(folder / victim, "wb") as f:
        pickle.dump({b"data": _Payload(marker), b"labels": [0], b"label_names": [b"a", b"b"]}, f)
    with pytest.raises(CifarkitError, match=rf"{victim} is refused: it asks for posix\.system"):
        load_data(str(folder), tmp_path / "cache")
    assert not marker.exists()


def test_batch_files_with_the_wrong_content_are_named(tmp_path):
    folder = write_batches_py(tmp_path / "b", n_train=50, n_test=10)
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({b"data": np.zeros((10, 3072), np.float32), b"labels": [0] * 10}, f)
    with pytest.raises(CifarkitError, match=r"'data' is float32 \[10, 3072\], expected uint8"):
        load_data(str(folder), tmp_path / "cache")
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({b"data": np.zeros((10, 3072), np.uint8), b"labels": ["x"] * 10}, f)
    with pytest.raises(CifarkitError, match="'labels' must be 10 integers"):
        load_data(str(folder), tmp_path / "cache")
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({b"data": np.zeros((10, 3072), np.uint8), b"labels": [99] * 10}, f)
    with pytest.raises(CifarkitError, match=r"labels outside 0\.\.9"):
        load_data(str(folder), tmp_path / "cache")


def test_resume_never_reads_a_data_path_from_the_checkpoint(tmp_path, trained_run):
    """Before: --resume without --data read train_config.data, a folder shipped beside the checkpoint."""
    crafted = write_batches_py(tmp_path / "shipped", n_train=50, n_test=10)
    marker = tmp_path / "PWNED"
    with open(crafted / "test_batch", "wb") as f:
        pickle.dump(_Payload(marker), f)
    state = torch.load(trained_run.checkpoint, weights_only=True)  # the plain data, to doctor
    state["train_config"]["data"] = str(crafted)
    state["train_config"]["epochs"] = 5
    (tmp_path / "run").mkdir()
    torch.save(state, tmp_path / "run" / "checkpoint.pt")
    with pytest.raises(CifarkitError, match="pass --data"):
        train(TrainConfig(resume=str(tmp_path / "run" / "checkpoint.pt"), device="cpu"))
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------------------
# 2. Output written over things that are not ours
# ---------------------------------------------------------------------------------------------------------


def test_output_that_is_not_a_regular_file_is_never_replaced(model, pictures, tmp_path):
    """Before: the result was renamed over a FIFO, a device node (as root), a folder's name. A FIFO or a device is
    now written into as it is (never replaced); one that nobody reads, a socket or a folder is one line."""
    fifo = tmp_path / "out.fifo"
    os.mkfifo(fifo)
    proc = infer(pictures, "--model", model, "--output", fifo)
    assert proc.returncode == 2
    assert "a FIFO that no process reads" in one_error_line(proc)
    assert fifo.exists() and not fifo.is_file()
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(tmp_path / "out.sock"))
    try:
        proc = infer(pictures, "--model", model, "--output", tmp_path / "out.sock")
        assert proc.returncode == 2 and "is a socket; refusing to write over it" in one_error_line(proc)
    finally:
        sock.close()
    proc = infer(pictures, "--model", model, "--output", tmp_path)
    assert proc.returncode == 2 and "is a folder, expected a file name" in one_error_line(proc)


def test_output_may_not_be_the_model_or_an_input(model, pictures, tmp_path):
    before = model.read_bytes()
    proc = infer(pictures, "--model", model, "--output", model)
    assert proc.returncode == 2 and "is the model file" in one_error_line(proc)
    assert model.read_bytes() == before
    image = pictures / "0.png"
    before = image.read_bytes()
    for args in ([image], [pictures]):  # named explicitly, or inside a folder being read
        proc = infer(*args, "--model", model, "--output", image)
        assert proc.returncode == 2 and "is one of the inputs" in one_error_line(proc)
    assert image.read_bytes() == before
    link = tmp_path / "sneaky.csv"
    link.symlink_to(model)  # the link's target is the model: refused as well
    proc = infer(pictures, "--model", model, "--output", link)
    assert proc.returncode == 2 and "is the model file" in one_error_line(proc)


def test_output_through_a_symlink_replaces_its_target_and_keeps_the_link(model, pictures, tmp_path):
    target = tmp_path / "results" / "latest.csv"
    target.parent.mkdir()
    target.write_text("old\n")
    link = tmp_path / "out.csv"
    link.symlink_to(target)
    proc = infer(pictures, "--model", model, "--format", "csv", "--output", link)
    assert proc.returncode == 0, proc.stderr
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert target.read_text().startswith("path,label,index,probability")
    assert sorted(p.name for p in target.parent.iterdir()) == ["latest.csv"]  # no temporary file left


# ---------------------------------------------------------------------------------------------------------
# 3. Run folders silently overwritten
# ---------------------------------------------------------------------------------------------------------


def test_an_existing_run_folder_is_not_replaced(tmp_path, batches_py, trained_run):
    """Before: a second cifar-train --out DIR replaced the earlier run's checkpoint and exited 0."""
    out = tmp_path / "run"
    shutil.copytree(trained_run.out_dir, out)
    before = (out / "checkpoint.pt").read_bytes()
    with pytest.raises(
        CifarkitError,
        match=r"already holds a run \(checkpoint\.pt, metrics\.json, loss\.png, "
        r"metrics\.jsonl, 1 TensorBoard event file\)",
    ):
        train(TrainConfig(data=str(batches_py), epochs=1, out=str(out), device="cpu"))
    assert (out / "checkpoint.pt").read_bytes() == before
    result = train(TrainConfig(data=str(batches_py), epochs=1, out=str(out), device="cpu", overwrite=True))
    assert Checkpoint.load(result.checkpoint).epoch == 1


def test_two_processes_cannot_share_a_run_folder(tmp_path, batches_py):
    out = tmp_path / "busy"
    busy = pytest.raises(CifarkitError, match="is in use by another cifarkit process")
    with output_folder(out), busy:  # as a running cifar-train holds it
        train(TrainConfig(data=str(batches_py), epochs=1, out=str(out), device="cpu"))
    assert not any(out.iterdir())


# ---------------------------------------------------------------------------------------------------------
# 5. Hangs that ignore Ctrl-C
# ---------------------------------------------------------------------------------------------------------


def test_fifos_are_never_opened(model, pictures, tmp_path):
    """Before: a FIFO named like an image, or given as --model, blocked forever."""
    folder = tmp_path / "imgs"
    shutil.copytree(pictures, folder)
    os.mkfifo(folder / "pipe.jpg")
    proc = infer(folder, "--model", model, "--format", "csv", timeout=30)
    assert proc.returncode == 1
    assert b"pipe.jpg: is a FIFO (named pipe), expected a regular file" in proc.stderr
    assert proc.stdout.count(b"\n") == 1 + 4  # header and the four real images
    os.mkfifo(tmp_path / "model.onnx")
    proc = infer(pictures, "--model", tmp_path / "model.onnx", timeout=30)
    assert proc.returncode == 2 and "is a FIFO (named pipe), expected a regular file" in one_error_line(proc)
    with pytest.raises(CifarkitError, match="is a FIFO"):
        Checkpoint.load(tmp_path / "model.onnx")


def test_dev_zero_is_not_an_empty_file(model):
    proc = infer("/dev/zero", "--model", model, timeout=30)
    assert proc.returncode == 1 and b"/dev/zero: is a character device, expected a regular file" in proc.stderr


def _endless_model(model: Path, out: Path) -> Path:
    """A model with cifarkit's contract whose graph runs a Loop of 10^12 iterations before answering."""
    from onnx import TensorProto, helper

    proto = onnx.load(str(model))
    g = proto.graph
    (images,) = [i.name for i in g.input]
    nodes = [
        helper.make_node("Cast", [images], ["f"], to=TensorProto.FLOAT),
        helper.make_node("ReduceMax", ["f"], ["mx"], keepdims=0),
        helper.make_node("Cast", ["mx"], ["mxi"], to=TensorProto.INT64),
        helper.make_node("Add", ["mxi", "huge"], ["trips"]),  # depends on the input: not folded away
        helper.make_node("Loop", ["trips", "", "zero"], ["spun"], body=helper.make_graph(
            [helper.make_node("Add", ["v", "one_f"], ["v2"]), helper.make_node("Identity", ["cond"], ["cond2"])],
            "body",
            [helper.make_tensor_value_info("i", TensorProto.INT64, []),
             helper.make_tensor_value_info("cond", TensorProto.BOOL, []),
             helper.make_tensor_value_info("v", TensorProto.FLOAT, [])],
            [helper.make_tensor_value_info("cond2", TensorProto.BOOL, []),
             helper.make_tensor_value_info("v2", TensorProto.FLOAT, [])],
            [helper.make_tensor("one_f", TensorProto.FLOAT, [], [1.0])],
        )),
        helper.make_node("Mul", ["spun", "zero"], ["nothing"]),
    ]  # fmt: skip
    inits = [
        helper.make_tensor("huge", TensorProto.INT64, [], [10**12]),
        helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0]),
    ]
    logits = g.output[0].name
    for node in g.node:  # logits + nothing: the loop's result feeds the output
        node.output[:] = [f"{o}_pre" if o == logits else o for o in node.output]
    g.node.extend(nodes + [helper.make_node("Add", [f"{logits}_pre", "nothing"], [logits])])
    for node in g.node:
        if node.op_type == "Softmax" and f"{logits}_pre" in node.input:
            node.input[:] = [logits if i == f"{logits}_pre" else i for i in node.input]
    g.initializer.extend(inits)
    onnx.save(proto, str(out))
    return out


def test_ctrl_c_ends_a_model_that_runs_forever(model, pictures, tmp_path):
    """Before: an ONNX Loop of 10^12 steps held the main thread inside onnxruntime; SIGINT was ignored."""
    endless = _endless_model(model, tmp_path / "endless.onnx")
    out = tmp_path / "out.csv"
    proc = subprocess.Popen(
        [BIN / "cifar-infer", pictures, "--model", endless, "--output", out], stderr=subprocess.PIPE
    )
    time.sleep(3.0)  # well inside the endless loop (the model's load-time probe already runs it)
    assert proc.poll() is None
    t0 = time.perf_counter()
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=10)
    assert time.perf_counter() - t0 < 2.0
    assert proc.returncode == 130 and err.decode().strip() == "interrupted"
    assert not list(tmp_path.glob(".out.csv.*")) and not out.exists()


def test_sigterm_mid_run_removes_the_temporary_output(model, tmp_path):
    """SIGTERM: exit 143, one line, the temporary output file removed, the old output untouched."""
    folder = tmp_path / "many"
    folder.mkdir()
    img = synthetic_images(1, seed=4, size=600)[0][0]
    for i in range(400):  # big PNGs: a few seconds of decoding
        Image.fromarray(img).save(folder / f"{i:03d}.png", compress_level=0)
    out = tmp_path / "out.csv"
    out.write_text("previous results\n")
    proc = subprocess.Popen(
        [BIN / "cifar-infer", folder, "--model", model, "--output", out, "--threads", "3", "--batch-size", "8"],
        stderr=subprocess.PIPE,
    )
    deadline = time.time() + 20
    while not list(tmp_path.glob(".out.csv.*.tmp")) and time.time() < deadline:
        time.sleep(0.05)
    assert list(tmp_path.glob(".out.csv.*.tmp")), "the run never started writing"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=10)
    assert proc.returncode == 143 and err.decode().strip() == "terminated"
    assert out.read_text() == "previous results\n"
    assert not list(tmp_path.glob(".out.csv.*"))


# ---------------------------------------------------------------------------------------------------------
# 6. Unbounded resources from options and metadata
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--batch-size", "1000000000"], "--batch-size must be 1 to 4096"),
        (["--threads", "100000"], "--threads must be 0 to 256"),
    ],
)
def test_inference_options_are_bounded(model, pictures, args, message):
    """Before: --batch-size 1000000000 took 6 GB on 50,000 images."""
    proc = infer(pictures, "--model", model, *args)
    assert proc.returncode == 2 and message in one_error_line(proc)


def test_metadata_cannot_ask_for_huge_inputs(model, tmp_path):
    """Before: image_size 20000x20000 in the metadata allocated gigabytes per batch before failing."""
    big = with_metadata(model, tmp_path / "big.onnx", image_size="[20000, 20000]")
    with pytest.raises(CifarkitError, match=r"'image_size' must be \[height, width\], each 1 to 1024"):
        Classifier.from_file(big)


def test_checkpoint_model_kwargs_are_bounded_before_allocation(trained_run, tmp_path):
    """Before: model_kwargs asking for huge widths allocated gigabytes before failing."""
    with pytest.raises(CifarkitError, match=r"over the 200,000,000 limit"):
        build_model("airbench", num_classes=10, widths=(64, 100_000, 100_000))
    with pytest.raises(CifarkitError, match="cannot be built"):
        build_model("blog_cnn", num_classes=10, depth=99)
    state = torch.load(trained_run.checkpoint, weights_only=True)  # the plain data, to doctor
    state["model_kwargs"] = {"widths": [10**6, 10**6, 10**6]}
    state["artifact"]["model_name"] = "airbench"
    torch.save(state, tmp_path / "huge.pt")
    with pytest.raises(CifarkitError, match="over the 200,000,000 limit"):
        export_checkpoint(tmp_path / "huge.pt", tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------------------
# 7. "Verified" NaN
# ---------------------------------------------------------------------------------------------------------


def test_non_finite_weights_and_zero_std_are_export_errors(trained_run, tmp_path):
    """Before: a NaN-filled checkpoint exported as 'verified, max |dlogit| 0.00e+00'."""
    state = torch.load(trained_run.checkpoint, weights_only=True)  # the plain data, to doctor
    state["model_state"]["fc2.bias"] = torch.full_like(state["model_state"]["fc2.bias"], float("nan"))
    torch.save(state, tmp_path / "nan.pt")
    with pytest.raises(CifarkitError, match=r"weights hold NaN or Inf \(in 'fc2\.bias'\)"):
        export_checkpoint(tmp_path / "nan.pt", tmp_path / "out")
    state = torch.load(trained_run.checkpoint, weights_only=True)  # the plain data, to doctor
    state["artifact"]["std"] = [0.5, 0.0, 0.5]
    torch.save(state, tmp_path / "std.pt")
    with pytest.raises(CifarkitError, match="'std' must be positive"):
        export_checkpoint(tmp_path / "std.pt", tmp_path / "out")
    state = torch.load(trained_run.checkpoint, weights_only=True)  # the plain data, to doctor
    state["model_state"]["fc2.weight"] *= 1e38  # finite weights, infinite logits
    torch.save(state, tmp_path / "inf.pt")
    with pytest.raises(CifarkitError, match="gives NaN or Inf logits"):
        export_checkpoint(tmp_path / "inf.pt", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_non_finite_outputs_are_per_image_errors_and_json_stays_json(model, pictures, tmp_path):
    proto = onnx.load(str(model))
    for init in proto.graph.initializer:
        if init.name.endswith("fc2.bias") or init.name == "net.fc2.bias":
            init.CopyFrom(onnx.numpy_helper.from_array(np.full(10, np.nan, np.float32), init.name))
            break
    else:
        pytest.skip("no fc2.bias initializer in this export")
    onnx.save(proto, str(tmp_path / "nan.onnx"))
    proc = infer(pictures, "--model", tmp_path / "nan.onnx", "--format", "json")
    assert proc.returncode in (1, 2)
    if proc.returncode == 1:  # loaded, then every image refused
        assert json.loads(proc.stdout) == []
        assert proc.stderr.count(b"the model's output is not finite") == 4


# ---------------------------------------------------------------------------------------------------------
# 8. Ambiguous output
# ---------------------------------------------------------------------------------------------------------

ODD_NAMES = [b"car\rriage.png", b"new\nline.png", b"esc\x1b[31mred.png", b"caf\xe9 latin1.png", b"back\\slash.png"]


@pytest.fixture(scope="module")
def odd_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("odd")
    img = synthetic_images(1, seed=5)[0][0]
    for name in ODD_NAMES:
        Image.fromarray(img).save(os.path.join(os.fsencode(folder), name), format="PNG")
    return folder


def _names(folder: Path) -> set[str]:
    return {os.fsdecode(os.path.join(os.fsencode(folder), n)) for n in ODD_NAMES}


@pytest.mark.parametrize("fmt", ["csv", "table", "json", "jsonl"])
def test_every_file_name_round_trips_and_no_control_character_is_written(model, odd_folder, fmt, tmp_path):
    """Before: CSV did not quote \\r, names broke tables, non-UTF-8 bytes went raw into JSON/CSV."""
    proc = infer(odd_folder, "--model", model, "--format", fmt)
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout.decode("utf-8")  # strict: the output is valid UTF-8
    assert not any(ch != "\n" and not ch.isprintable() for ch in text)
    if fmt == "csv":
        rows = list(csv.reader(io.StringIO(text)))[1:]
        got = {unescape_name(r[0]) for r in rows}
    elif fmt == "table":
        got = {unescape_name(line.split("  ")[-1]) for line in text.splitlines()[1:]}
    elif fmt == "json":
        got = {row["path"] for row in json.loads(text)}
    else:
        got = {json.loads(line)["path"] for line in text.splitlines()}
    assert got == _names(odd_folder)
    assert {os.fsencode(p) for p in got} == {os.path.join(os.fsencode(odd_folder), n) for n in ODD_NAMES}


def test_error_lines_escape_names_too(model, tmp_path):
    bad = os.path.join(os.fsencode(tmp_path), b"evil\x1b]0;title\x07\n.jpg")
    with open(bad, "wb") as f:
        f.write(b"not an image")
    proc = infer(bad, "--model", model)
    assert proc.returncode == 1
    err = proc.stderr.decode()
    assert "\x1b" not in err and "\x07" not in err
    assert escape_name(os.fsdecode(bad)) in err and len(err.strip().splitlines()) == 2  # the line and the summary


def test_class_names_are_escaped_in_tables(model, pictures, tmp_path):
    names = json.dumps(["ca\x1bt", "d\nog", *[f"c{i}" for i in range(8)]])
    odd = with_metadata(model, tmp_path / "odd.onnx", class_names=names)
    proc = infer(pictures, "--model", odd, "--top-k", "10")
    assert proc.returncode == 0
    text = proc.stdout.decode()
    assert "\x1b" not in text and "ca\\u001bt" in text and "d\\nog" in text


# ---------------------------------------------------------------------------------------------------------
# 9. Artifacts that disagree with each other
# ---------------------------------------------------------------------------------------------------------


def test_a_set_interrupted_after_commit_is_finished_by_the_next_reader(tmp_path, monkeypatch):
    """Before: a kill between renames left a new model.onnx beside a stale model.json."""
    folder = tmp_path / "set"
    folder.mkdir()
    write_set(folder, {"a.bin": b"old a", "b.json": b"old b"})
    real_replace = os.replace
    calls = []

    def crash_after_first(src, dst):
        if calls and str(dst).endswith(("a.bin", "b.json")):
            raise KeyboardInterrupt  # the process dies here
        calls.append(dst)
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crash_after_first)
    with pytest.raises(KeyboardInterrupt):
        write_set(folder, {"a.bin": b"new a", "b.json": b"new b"})
    monkeypatch.setattr(os, "replace", real_replace)
    assert (folder / SET_JOURNAL).exists()  # committed, half applied
    assert finish_pending_set(folder)
    assert (folder / "a.bin").read_bytes() == b"new a" and (folder / "b.json").read_bytes() == b"new b"
    assert sorted(p.name for p in folder.iterdir()) == ["a.bin", "b.json"]


def test_a_set_interrupted_before_commit_keeps_the_old_set(tmp_path, monkeypatch):
    folder = tmp_path / "set"
    folder.mkdir()
    write_set(folder, {"a.bin": b"old a", "b.json": b"old b"})
    real_fsync = os.fsync
    calls = []

    def die_on_second(fd):
        calls.append(fd)
        if len(calls) == 2:
            raise KeyboardInterrupt
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", die_on_second)
    with pytest.raises(KeyboardInterrupt):
        write_set(folder, {"a.bin": b"new a", "b.json": b"new b"})
    assert (folder / "a.bin").read_bytes() == b"old a" and (folder / "b.json").read_bytes() == b"old b"
    assert sorted(p.name for p in folder.iterdir()) == ["a.bin", "b.json"]  # staged files removed


def test_a_reader_reads_an_interrupted_export_where_it_lies_and_changes_nothing(model, tmp_path):
    """Before: opening the model finished the export's renames (a reader that writes; on a read-only folder it
    failed). Now the reader reads the committed set's staged file, and the next writer finishes the set."""
    folder = tmp_path / "m"
    shutil.copytree(model.parent, folder)
    new_onnx = with_metadata(model, tmp_path / "new.onnx", model_name="blog_cnn_v2")
    staged = folder / f".model.onnx.{999999999}-abc.tmp"  # as a killed export left it, after its commit
    shutil.copy(new_onnx, staged)
    (folder / SET_JOURNAL).write_text(json.dumps({"staged": [staged.name], "remove": []}))
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in folder.iterdir()}
    folder.chmod(0o555)  # a read-only model folder is readable
    try:
        clf = Classifier.from_file(folder / "model.onnx")
    finally:
        folder.chmod(0o755)
    assert clf.meta.model_name == "blog_cnn_v2"  # the committed set: all new
    assert {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in folder.iterdir()} == before
    assert finish_pending_set(folder)  # the next writer finishes it
    assert not staged.exists() and Classifier.from_file(folder / "model.onnx").meta.model_name == "blog_cnn_v2"


def test_a_journal_cannot_reach_outside_its_folder(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    (tmp_path / "victim").write_text("keep me")
    (folder / SET_JOURNAL).write_text(json.dumps({"staged": [".x.1-a.tmp"], "remove": ["../victim"]}))
    with pytest.raises(CifarkitError, match="is damaged"):
        finish_pending_set(folder)
    assert (tmp_path / "victim").read_text() == "keep me"


def test_export_with_fewer_formats_removes_the_stale_file(trained_run, tmp_path):
    both = export_checkpoint(trained_run.checkpoint, tmp_path, format="all")
    assert set(both.paths) == {"onnx", "torchscript", "json"}
    onnx_only = export_checkpoint(trained_run.checkpoint, tmp_path, format="onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.json", "model.onnx"]
    assert any("removed the older model.pt" in n for n in onnx_only.notes)


# ---------------------------------------------------------------------------------------------------------
# 10. Misleading errors and exit codes
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"resize_filter": "sinc"}, "'resize_filter' is 'sinc', expected one of"),
        ({"class_names": json.dumps(["a", "b", "c"])}, "outputs 10 classes but its metadata names 3"),
        ({"class_names": "[" * 100_000 + "]" * 100_000}, "'class_names' is not valid JSON"),
        ({"mean": '[0.5, "x", 0.5]'}, "'mean' must have 3 finite numbers"),
        ({"image_size": "[32, true]"}, "'image_size' must be"),
    ],
)
def test_bad_metadata_is_refused_at_load_not_blamed_on_every_image(model, pictures, tmp_path, changes, message):
    bad = with_metadata(model, tmp_path / "bad.onnx", **changes)
    with pytest.raises(CifarkitError, match=message):
        Classifier.from_file(bad)
    proc = infer(pictures, "--model", bad)
    assert proc.returncode == 2
    one_error_line(proc)


def test_a_dynamic_class_dimension_is_checked_at_load(model):
    """Before: a model whose class count hides behind a dynamic dimension crashed after classifying. The
    metadata names 3 classes; the session declares [N, "classes"] and returns 10 columns."""
    from types import SimpleNamespace

    real = Classifier.from_file(model)

    class DynamicSession:
        def get_inputs(self):
            return real.session.get_inputs()

        def get_outputs(self):
            return [SimpleNamespace(name=n, shape=["batch", "classes"]) for n in ("logits", "probabilities")]

        def get_providers(self):
            return real.session.get_providers()

        def run(self, names, feeds, options=None):
            return real.session.run(names, feeds)

    from dataclasses import replace

    meta = replace(real.meta, class_names=("a", "b", "c"))
    with pytest.raises(CifarkitError, match=r"returned outputs of shape \[1, 10\] .* names 3 classes"):
        Classifier(DynamicSession(), meta, source="dynamic.onnx")


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("model_state", [1, 2, 3], "field 'model_state' is list, expected dict"),
        ("model_state", {"conv1.weight": torch.zeros(2, 2)}, "weights do not fit model 'blog_cnn'"),
        ("artifact", "blog_cnn", "field 'artifact' is str"),
        ("epoch", "many", "field 'epoch' is str"),
        ("history", {"loss": []}, "field 'history' is dict"),
        ("model_kwargs", {"widths": "wide"}, "cannot be built"),
    ],
)
def test_foreign_checkpoint_fields_are_one_line(trained_run, tmp_path, field, value, message):
    state = torch.load(trained_run.checkpoint, weights_only=True)  # the plain data, to doctor
    state[field] = value
    torch.save(state, tmp_path / "odd.pt")
    proc = subprocess.run(
        [BIN / "cifar-export", tmp_path / "odd.pt", "--out", tmp_path / "out"], capture_output=True, timeout=120
    )
    assert proc.returncode == 2
    assert message in one_error_line(proc)
    assert not (tmp_path / "out").exists()


def test_a_full_disk_during_a_checkpoint_write_is_one_line(tmp_path, monkeypatch, trained_run):
    ckpt = Checkpoint.load(trained_run.checkpoint)

    def no_space(obj, f):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", no_space)
    with pytest.raises(CifarkitError, match=r"cannot write .*checkpoint\.pt \(No space left on device\)"):
        ckpt.save(tmp_path / "checkpoint.pt")
    assert list(tmp_path.iterdir()) == []


def test_a_refused_pickle_is_one_complete_sentence(tmp_path):
    torch.save({"x": _Payload(tmp_path / "PWNED")}, tmp_path / "evil.pt", _use_new_zipfile_serialization=True)
    with pytest.raises(CifarkitError) as info:
        Checkpoint.load(tmp_path / "evil.pt")
    assert str(info.value).endswith("holds pickled Python objects, not plain data (refusing to unpickle them)")
    assert not (tmp_path / "PWNED").exists()


def test_first_line_never_cuts_mid_word():
    text = first_line(ValueError("word " * 100), limit=50)
    assert len(text) <= 50 and text.endswith("word...")


@pytest.mark.skipif(ROOT_USER, reason="root reads folders whatever their permissions")
def test_unreadable_class_folder_is_one_line(tmp_path):
    from conftest import write_imagefolder

    root = write_imagefolder(tmp_path / "root", per_class_train=2, per_class_test=1, num_classes=2)
    (root / "train" / "class1").chmod(0)
    try:
        with pytest.raises(CifarkitError, match="class1: cannot list folder"):
            load_data(str(root), tmp_path / "cache")
    finally:
        (root / "train" / "class1").chmod(0o755)


# ---------------------------------------------------------------------------------------------------------
# 11. Litter
# ---------------------------------------------------------------------------------------------------------


def test_temporary_files_of_dead_writers_are_removed_by_the_next_write(tmp_path):
    """Before: kill -9 left hidden .tmp files beside outputs and checkpoints that nothing cleaned."""
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".out.csv.{int(dead.stdout)}-x1y2.tmp"
    stale.write_text("half")
    mine = tmp_path / f".out.csv.{os.getpid()}-live.tmp"  # a live writer's file stays
    mine.write_text("busy")
    with atomic_path(tmp_path / "out.csv") as tmp:
        Path(tmp).write_text("done\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["out.csv", mine.name])


def test_a_failed_out_leaves_no_empty_parents(tmp_path):
    """Before: a failed --out a/b/c left a/b behind."""
    with pytest.raises(CifarkitError):
        train(TrainConfig(data=str(tmp_path / "nowhere"), out=str(tmp_path / "a" / "b" / "c"), device="cpu"))
    assert not (tmp_path / "a").exists()


# ---------------------------------------------------------------------------------------------------------
# The escaping, as a property
# ---------------------------------------------------------------------------------------------------------


def test_escaping_round_trips_every_byte_string():
    from hypothesis import given, settings
    from hypothesis import strategies as st

    @settings(max_examples=300, deadline=None)
    @given(st.binary(min_size=1, max_size=40).filter(lambda b: b"/" not in b and b"\0" not in b))
    def check(raw: bytes) -> None:
        name = os.fsdecode(raw)
        text = escape_name(name)
        assert text.isprintable() or text == ""
        assert os.fsencode(unescape_name(text)) == raw

    check()


def test_predictions_and_failures_keep_their_types(model, pictures):
    clf = Classifier.from_file(model)
    results = list(clf.predict_paths([str(pictures / "0.png"), "/nonexistent.png"]))
    assert isinstance(results[0], Prediction) and isinstance(results[1], Failure)
