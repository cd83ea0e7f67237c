"""Fault injection: kill -9 and SIGTERM at random moments of cifar-infer --output, cifar-export and
cifar-train, then check that nothing is partial or mixed, no temporary file is left behind (after kill -9:
once the next run of the same command has passed), and that a resumed run reaches the uninterrupted final
state bit for bit.

Moments are drawn from a seeded generator as fractions of the uninterrupted run's duration. The default run
tries one moment per process and signal; `make faults` (CIFARKIT_FAULTS=long) tries eight and prints the
matrix (process x signal x moment: outcome)."""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import onnx
import pytest
import torch

from cifarkit.atomic import finish_pending_set
from cifarkit.model.checkpoint import Checkpoint
from conftest import synthetic_images

BIN = Path(sys.executable).parent
MOMENTS = 8 if os.environ.get("CIFARKIT_FAULTS") == "long" else 1
SIGNALS = {"KILL": signal.SIGKILL, "TERM": signal.SIGTERM}
# The default suite sends kill -9 to export and training (the hard case: nothing runs on the way out) and
# both signals to cifar-infer; `make test-all` and `make faults` add SIGTERM for export and training.
KILL_THEN_TERM = ["KILL", pytest.param("TERM", marks=pytest.mark.slow)]
MATRIX: list[tuple[str, str, str, str]] = []  # (process, signal, moment, outcome)


def moments(name: str) -> list[float]:
    rng = random.Random(f"{name}-faults")
    return [round(rng.uniform(0.05, 0.95), 2) for _ in range(MOMENTS)]


def run_and_signal(cmd: list, sig: int, after_s: float, started: Callable[[], bool] | None = None) -> tuple[int, str]:
    """Start `cmd`; once `started()` is true (at once if None), wait `after_s` seconds more and send `sig`
    unless it ended first. Returns (exit status, stderr)."""
    proc = subprocess.Popen([str(c) for c in cmd], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.perf_counter() + 60
    while started is not None and not started() and proc.poll() is None and time.perf_counter() < deadline:
        time.sleep(0.01)
    try:
        proc.wait(timeout=after_s)
    except subprocess.TimeoutExpired:
        proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    return proc.returncode, err.decode("utf-8", "replace")


def temps(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob(".*.tmp"))


def timed(cmd: list, env: dict | None = None) -> float:
    t0 = time.perf_counter()
    subprocess.run([str(c) for c in cmd], check=True, capture_output=True, env=env)
    return time.perf_counter() - t0


@pytest.fixture(scope="module", autouse=True)
def _print_matrix():
    yield
    if MATRIX:
        print("\nfault-injection matrix (process x signal x moment: outcome)")
        for row in MATRIX:
            print("  {:<12} {:<5} {:>5}  {}".format(*row))


# ---------------------------------------------------------------------------------------------------------
# cifar-infer --output
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def many_images(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("many")
    img = synthetic_images(1, seed=6, size=300)[0][0]
    from PIL import Image

    for i in range(300):
        Image.fromarray(img).save(folder / f"{i:03d}.png", compress_level=0)
    return folder


@pytest.mark.parametrize("sig", sorted(SIGNALS))
@pytest.mark.parametrize("moment", moments("infer"))
def test_infer_output_is_all_or_nothing(exported, many_images, tmp_path, sig, moment):
    out = tmp_path / "predictions.csv"
    cmd = [BIN / "cifar-infer", many_images, "--model", exported.paths["onnx"], "--format", "csv", "--output", out]
    full = timed(cmd)
    reference = out.read_text()
    out.write_text("old results\n")
    # The moment is a fraction of the classification itself, counted from when the output is being written.
    status, err = run_and_signal(cmd, SIGNALS[sig], moment * full / 2, started=lambda: bool(temps(tmp_path)))
    text = out.read_text()
    assert text in ("old results\n", reference)  # never a partial file
    if sig == "TERM" and status == 143:
        assert err.strip() == "terminated" and not temps(tmp_path)
    subprocess.run([str(c) for c in cmd], check=True, capture_output=True)  # the next run cleans up after kill -9
    assert out.read_text() == reference and not temps(tmp_path)
    outcome = "finished" if text == reference else "old file kept"
    MATRIX.append(("cifar-infer", sig, f"{moment:.2f}", f"exit {status}, {outcome}, no temp left"))


# ---------------------------------------------------------------------------------------------------------
# cifar-export
# ---------------------------------------------------------------------------------------------------------


def _set_hashes(folder: Path) -> set[str]:
    """The checkpoint hash each file of the set names: one value when the set is consistent."""
    from cifarkit.export import load_torchscript

    finish_pending_set(folder)  # what every reader does first
    hashes = {json.loads((folder / "model.json").read_text())["checkpoint_sha256"]}
    props = {p.key: p.value for p in onnx.load(str(folder / "model.onnx")).metadata_props}
    hashes.add(props["checkpoint_sha256"])
    hashes.add(load_torchscript(folder / "model.pt")[1].checkpoint_sha256)
    return hashes


@pytest.mark.parametrize("sig", KILL_THEN_TERM)
@pytest.mark.parametrize("moment", moments("export"))
def test_export_set_is_all_old_or_all_new(trained_run, tmp_path, sig, moment):
    old_ck, new_ck = tmp_path / "old.pt", tmp_path / "new.pt"
    shutil.copy(trained_run.checkpoint, old_ck)
    state = torch.load(trained_run.checkpoint, weights_only=True)
    state["artifact"]["model_name"] = "blog_cnn"
    state["epoch"] += 1  # another checkpoint: another hash
    torch.save(state, new_ck)
    out = tmp_path / "art"
    full = timed([BIN / "cifar-export", old_ck, "--out", out])  # the old set; a new export takes as long
    old_hash = hashlib.sha256(old_ck.read_bytes()).hexdigest()
    status, err = run_and_signal([BIN / "cifar-export", new_ck, "--out", out], SIGNALS[sig], moment * full)
    hashes = _set_hashes(out)
    assert len(hashes) == 1, f"a mixed set: {hashes}"
    which = "old set" if hashes == {old_hash} else "new set"
    if sig == "TERM":
        # 143 with one line; or the export had finished (0), or it had and the signal came during the
        # interpreter's own shutdown, where Python restores the default handler (-15): the new set, whole.
        assert status == 143 and err.strip() == "terminated" or status in (0, -15) and which == "new set"
    else:  # after kill -9 the next export cleans up
        subprocess.run([BIN / "cifar-export", new_ck, "--out", out], check=True, capture_output=True)
    assert not temps(out) and sorted(p.name for p in out.iterdir()) == ["model.json", "model.onnx", "model.pt"]
    MATRIX.append(("cifar-export", sig, f"{moment:.2f}", f"exit {status}, {which}, no temp left"))


# ---------------------------------------------------------------------------------------------------------
# cifar-train, then --resume
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def straight_run(batches_py, tmp_path_factory) -> tuple[Path, float]:
    out = tmp_path_factory.mktemp("straight") / "run"
    subprocess.run([str(c) for c in _train_cmd(batches_py, out)], check=True, capture_output=True)
    metrics = json.loads((out / "metrics.json").read_text())
    elapsed = metrics["elapsed_seconds_per_epoch"]  # cumulative
    return out, elapsed[-1] - elapsed[0]


def _train_cmd(data: Path, out: Path) -> list:
    return [BIN / "cifar-train", "--data", data, "--epochs", "3", "--out", out, "--progress", "none", "--device", "cpu"]


@pytest.mark.parametrize("sig", KILL_THEN_TERM)
@pytest.mark.parametrize("moment", moments("train"))
def test_killed_training_resumes_to_the_uninterrupted_state(batches_py, straight_run, tmp_path, sig, moment):
    reference, epochs_s = straight_run
    out = tmp_path / "run"
    # The moment is a fraction of the two epochs that follow the first checkpoint.
    started = (out / "checkpoint.pt").exists
    status, err = run_and_signal(_train_cmd(batches_py, out), SIGNALS[sig], moment * epochs_s, started=started)
    if sig == "TERM" and status == 143:
        assert err.strip().endswith("terminated") and not temps(tmp_path)
    checkpoint = out / "checkpoint.pt"
    if status == 0:
        how = "finished"
    elif checkpoint.exists():
        done = Checkpoint.load(checkpoint).epoch
        cmd = [
            BIN / "cifar-train",
            "--resume",
            checkpoint,
            "--data",
            batches_py,
            "--progress",
            "none",
            "--device",
            "cpu",
        ]
        subprocess.run([str(c) for c in cmd], check=True, capture_output=True)
        how = f"resumed after epoch {done}"
    else:  # killed before the first checkpoint: nothing to resume, the folder is not a run
        subprocess.run([str(c) for c in _train_cmd(batches_py, out)], check=True, capture_output=True)
        how = "no checkpoint yet, ran again"
    a = Checkpoint.load(reference / "checkpoint.pt")
    b = Checkpoint.load(checkpoint)
    assert b.epoch == 3
    assert all(torch.equal(a.model_state[k], b.model_state[k]) for k in a.model_state)
    assert [r["losses"] for r in a.history] == [r["losses"] for r in b.history]
    assert (out / "metrics.json").exists() and not temps(tmp_path)
    MATRIX.append(("cifar-train", sig, f"{moment:.2f}", f"exit {status}, {how}, same final weights"))
