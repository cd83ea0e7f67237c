"""Fuzzing: random and mutated images, model metadata, checkpoints (fields alone and combined), CIFAR batch pickles
(numpy array headers: shapes, dtypes, strides, offsets) and output targets (--output and standard output).
Property: every case ends in a result or one CifarkitError (or, for images, a Failure / ImageError) whose message is
one line, within a time bound and, for batch files, a memory bound; no other exception type ever escapes.

The default profile keeps this file to tens of seconds. `make fuzz` (CIFARKIT_FUZZ=long) runs the long
profile: many more cases per target, printed statistics."""

from __future__ import annotations

import io
import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from cifarkit.errors import CifarkitError
from cifarkit.infer import Classifier, Failure, Prediction
from cifarkit.model.checkpoint import Checkpoint
from cifarkit.preprocess import ImageError, load_image
from conftest import synthetic_images

LONG = os.environ.get("CIFARKIT_FUZZ") == "long"
settings.register_profile(
    "cifarkit",
    max_examples=600 if LONG else 60,
    deadline=5000,  # ms per case: a hang or a runaway allocation fails the property
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
    derandomize=not LONG,  # the default run is repeatable; the long one explores
    print_blob=True,
)
FUZZ = settings.get_profile("cifarkit")


def one_line(message: str) -> None:
    assert message and "\n" not in message and len(message) < 600, repr(message[:300])


# ---------------------------------------------------------------------------------------------------------
# Images: random bytes and mutations of real JPEG, PNG, GIF and WebP files
# ---------------------------------------------------------------------------------------------------------


def _seeds() -> list[bytes]:
    img = Image.fromarray(synthetic_images(1, seed=8, size=40)[0][0])
    out = []
    for fmt, kwargs in (("JPEG", {"quality": 75}), ("PNG", {}), ("GIF", {}), ("WEBP", {"quality": 80})):
        buf = io.BytesIO()
        img.save(buf, fmt, **kwargs)
        out.append(buf.getvalue())
    buf = io.BytesIO()
    img.convert("RGBA").save(buf, "PNG")
    out.append(buf.getvalue())
    return out


SEEDS = _seeds()


@st.composite
def image_bytes(draw) -> bytes:
    if draw(st.integers(0, 4)) == 0:
        return draw(st.binary(max_size=2048))
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 8))):
        kind = draw(st.sampled_from(["flip", "truncate", "insert", "overwrite_header_int"]))
        pos = draw(st.integers(0, max(0, len(data) - 1)))
        if kind == "flip" and data:
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif kind == "truncate":
            del data[pos:]
        elif kind == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=64))
        elif data:  # a big number where sizes and counts live in headers
            data[pos : pos + 4] = draw(st.sampled_from([b"\xff\xff\xff\xff", b"\x7f\xff\xff\xff", b"\x00\x00\x00\x00"]))
    return bytes(data)


@pytest.fixture(scope="module")
def clf(exported) -> Classifier:
    return Classifier.from_file(exported.paths["onnx"])


def test_fuzz_image_bytes(clf, tmp_path):
    counts = {"prediction": 0, "failure": 0}

    @FUZZ
    @given(image_bytes())
    def check(data: bytes) -> None:
        path = tmp_path / "fuzz.img"
        path.write_bytes(data)
        try:
            pixels = load_image(path)
            assert pixels.shape == (32, 32, 3) and pixels.dtype == np.uint8
        except ImageError as exc:
            one_line(str(exc))
        (result,) = list(clf.predict_paths([str(path)], threads=0))
        assert isinstance(result, (Prediction, Failure))
        if isinstance(result, Failure):
            one_line(result.message)
            counts["failure"] += 1
        else:
            assert 0.0 <= result.probability <= 1.0
            counts["prediction"] += 1

    check()
    print(f"image fuzz: {counts}")
    assert counts["failure"] > 0  # the generator does reach the error paths


# ---------------------------------------------------------------------------------------------------------
# Model metadata: random JSON in an otherwise valid model
# ---------------------------------------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(10**12), 10**12) | st.floats(allow_nan=True) | st.text(max_size=30),
    lambda children: st.lists(children, max_size=6) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)
VALID = {  # other values that a model may legitimately carry: some cases must load and classify
    "resize_mode": ["squash", "center_crop"],
    "resize_filter": ["bicubic", "lanczos", "nearest", "box"],
    "model_name": ["x", "é" * 50],
    "mean": ["[0, 0, 0]", "[0.1, 0.2, 0.3]"],
    "std": ["[1, 1, 1]", "[0.01, 2, 300]"],
    "test_accuracy": ["null", "0", "1"],
    "versions": ["{}", '{"torch": "9"}'],
}
METADATA_KEYS = [
    "class_names", "model_name", "mean", "std", "image_size", "pixel_scale", "resize_mode", "resize_filter",
    "input_name", "output_names", "tta", "test_accuracy", "versions", "schema",
]  # fmt: skip


def test_fuzz_model_metadata(exported, tmp_path):
    proto = onnx.load(str(exported.paths["onnx"]))
    base = {p.key: p.value for p in proto.metadata_props}
    counts = {"loaded": 0, "refused": 0}

    values = json_values | st.text(max_size=40) | st.sampled_from([v for vs in VALID.values() for v in vs])
    valid_change = st.sampled_from(sorted(VALID)).flatmap(lambda k: st.tuples(st.just(k), st.sampled_from(VALID[k])))

    @FUZZ
    @given(
        st.dictionaries(st.sampled_from(METADATA_KEYS), values, max_size=3)
        | st.lists(valid_change, min_size=1, max_size=3).map(dict)
    )
    def check(changes: dict) -> None:
        props = dict(base)
        for key, value in changes.items():
            props[key] = value if isinstance(value, str) else json.dumps(value)
        del proto.metadata_props[:]
        for key, value in props.items():
            entry = proto.metadata_props.add()
            entry.key, entry.value = key, value
        path = tmp_path / "fuzz.onnx"
        path.write_bytes(proto.SerializeToString())
        try:
            clf = Classifier.from_file(path)
        except CifarkitError as exc:
            one_line(str(exc))
            counts["refused"] += 1
            return
        counts["loaded"] += 1
        results = clf.predict([np.zeros((20, 30, 3), np.uint8)])
        assert len(results) == 1

    check()
    print(f"metadata fuzz: {counts}")
    assert counts["refused"] > 0


# ---------------------------------------------------------------------------------------------------------
# Checkpoints: random plain data in place of a valid checkpoint's fields
# ---------------------------------------------------------------------------------------------------------

plain_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(10**6), 10**6)
    | st.floats(allow_nan=True)
    | st.text(max_size=20)
    | st.builds(lambda n, v: torch.full((n,), v), st.integers(0, 4), st.floats(allow_nan=True, width=32)),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=15,
)
CHECKPOINT_FIELDS = [
    "format_version",
    "artifact",
    "model_kwargs",
    "model_state",
    "epoch",
    "step",
    "plan",
    "history",
    "train_config",
    "optimizer_state",
    "metrics",
]
# Values that are each plausible alone and wrong together: an image size the net cannot take, arguments the
# net does not take or that cifarkit sets itself, another net's name for these weights.
COMBINED = {
    "image_size": [[32, 32], [64, 64], [16, 16], [32, 64], [1, 1], [1024, 1024]],
    "model_kwargs": [{}, {"num_classes": 10}, {"widths": [8, 8, 8]}, {"scaling_factor": 2.0}],
    "model_name": ["blog_cnn", "airbench"],
    "class_names": [[str(i) for i in range(10)], ["a", "b"], [str(i) for i in range(11)]],
}


def test_fuzz_checkpoints(trained_run, tmp_path):
    state = torch.load(trained_run.checkpoint, weights_only=True)  # the plain data, to mutate
    counts = {"loaded": 0, "refused": 0}
    rng = random.Random(0)

    @FUZZ
    @given(
        st.dictionaries(st.sampled_from(CHECKPOINT_FIELDS), plain_values, min_size=1, max_size=3),
        st.sampled_from(["replace", "artifact_key", "weight", "combined"]),
    )
    def check(changes: dict, how: str) -> None:
        doc = dict(state)
        if how == "replace":
            doc.update(changes)
        elif how == "combined":  # two or three fields of the contract and the model, each plausible alone
            artifact = dict(state["artifact"])
            for key in rng.sample(sorted(COMBINED), rng.randint(2, 3)):
                value = rng.choice(COMBINED[key])
                if key == "model_kwargs":
                    doc["model_kwargs"] = value
                else:
                    artifact[key] = value
            doc["artifact"] = artifact
        elif how == "artifact_key":  # one key of the contract replaced
            artifact = dict(state["artifact"])
            artifact[rng.choice(sorted(artifact))] = next(iter(changes.values()))
            doc["artifact"] = artifact
        else:  # one weight replaced by a random plain value
            weights = dict(state["model_state"])
            weights[rng.choice(sorted(weights))] = next(iter(changes.values()))
            doc["model_state"] = weights
        path = tmp_path / "fuzz.pt"
        torch.save(doc, path)
        try:
            deployed = Checkpoint.load(path).deployed()
        except CifarkitError as exc:
            one_line(str(exc))
            counts["refused"] += 1
            return
        counts["loaded"] += 1
        logits, _ = deployed.run_numpy(synthetic_images(2, seed=1)[0])
        assert logits.shape == (2, 10) and np.isfinite(logits).all()

    check()
    print(f"checkpoint fuzz: {counts}")
    assert counts["refused"] > 0 and counts["loaded"] > 0


@pytest.fixture(autouse=True)
def _clean(tmp_path):
    yield
    shutil.rmtree(tmp_path, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------------
# CIFAR batch pickles: numpy array headers (shapes, dtypes, strides, offsets) inside data_batch files
# ---------------------------------------------------------------------------------------------------------


class _Reduced:
    """Pickles as `callable(*args)` (then `__setstate__(state)` when a state is given)."""

    def __init__(self, fn, args, state=None):
        self.fn, self.args, self.state = fn, args, state

    def __reduce__(self):
        return (self.fn, self.args) if self.state is None else (self.fn, self.args, self.state)


_DTYPES = ["u1", "i8", "f4", "O", "V7", "u1,u1", "(3072,)u1", "(1000000,)u1", "S1"]
_sizes = st.integers(0, 12_000) | st.sampled_from([2**31, 2**40 // 3072, 2**62])
_shapes = st.lists(_sizes, min_size=0, max_size=3).map(tuple) | st.tuples(_sizes, st.sampled_from([3072, 3071, 0]))


def _array_headers():
    """A pickled "array" built by one of the three ways the unpickler may meet: numpy's reconstruction with a
    state (shape, dtype, raw bytes), numpy.ndarray called with a buffer, offset and strides, or _frombuffer."""
    from numpy._core.multiarray import _reconstruct
    from numpy._core.numeric import _frombuffer

    raw = st.binary(max_size=64) | st.integers(0, 40_000).map(lambda n: bytes(n))

    def rebuilt(shape, dtype, fortran, data):
        return _Reduced(_reconstruct, (np.ndarray, (0,), b"b"), (1, shape, np.dtype(dtype), fortran, data))

    reconstructed = st.builds(rebuilt, _shapes, st.sampled_from(_DTYPES), st.booleans(), raw)
    called = st.builds(
        lambda shape, dtype, data, offset, strides: _Reduced(np.ndarray, (shape, dtype, data, offset, strides)),
        _shapes, st.sampled_from(_DTYPES), st.binary(min_size=1, max_size=16), st.integers(0, 8),
        st.lists(st.sampled_from([0, 1, 3072, -1, 2**40]), max_size=3).map(tuple),
    )  # fmt: skip
    framed = st.builds(
        lambda data, dtype, shape, order: _Reduced(_frombuffer, (data, np.dtype(dtype), shape, order)),
        raw, st.sampled_from(["u1", "u2", "(3072,)u1"]), _shapes, st.sampled_from(["C", "F"]),
    )  # fmt: skip
    valid = st.integers(0, 40).map(lambda n: np.zeros((n, 3072), np.uint8))  # what a real batch holds
    return reconstructed | called | framed | valid


def test_fuzz_batch_pickles(tmp_path):
    """Batch files whose `data` is any array header: each is read into a checked array or refused in one line,
    and reading never holds much more than the file itself (tracemalloc sees numpy's allocations)."""
    import pickle
    import tracemalloc

    from cifarkit.batches_py import read_arrays

    counts = {"read": 0, "refused": 0}

    @FUZZ
    @given(
        _array_headers(),
        st.integers(0, 40).map(lambda n: [n % 10] * n) | st.lists(st.integers(0, 9), max_size=20) | st.integers(0, 10),
        st.sampled_from([2, 4, 5]),
    )
    def check(data, labels, protocol) -> None:
        path = tmp_path / "data_batch_1"
        with open(path, "wb") as f:
            pickle.dump({b"data": data, b"labels": labels}, f, protocol=protocol)
        tracemalloc.start()
        try:
            x, y = read_arrays(path)
        except CifarkitError as exc:
            one_line(str(exc))
            assert str(path) in str(exc)
            counts["refused"] += 1
            return
        finally:
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
            assert peak < 64 << 20, f"{peak / 2**20:.0f} MiB for a {path.stat().st_size:,}-byte file"
        assert x.dtype == np.uint8 and x.shape[1:] == (32, 32, 3) and len(x) == len(y) <= 10_000
        counts["read"] += 1

    check()
    print(f"batch pickle fuzz: {counts}")
    assert counts["refused"] > 0


# ---------------------------------------------------------------------------------------------------------
# Output targets: --output and standard output
# ---------------------------------------------------------------------------------------------------------

_TARGETS = ["new", "existing", "link", "dangling-link", "devnull", "devfull", "fifo-read", "fifo-unread", "folder",
            "no-parent", "model", "input", "stdout-full", "stdout-closed", "stdout"]  # fmt: skip


def test_fuzz_output_targets(exported, tmp_path):
    """cifar-infer writing to every kind of target, in every format and with failures among its inputs: exit 0,
    1 (some inputs failed) or 2 with one line; the model and the inputs unchanged; no temporary file left."""
    import contextlib

    from cifarkit.cli.infer import main
    from cifarkit.streams import GuardedStream

    model = tmp_path / "model.onnx"
    shutil.copy(exported.paths["onnx"], model)
    inputs = tmp_path / "in"
    inputs.mkdir()
    for i, img in enumerate(synthetic_images(3, seed=2)[0]):
        Image.fromarray(img).save(inputs / f"{i}.png")
    (inputs / "broken.jpg").write_bytes(b"not a jpeg")
    frozen = {p: p.read_bytes() for p in [model, *inputs.iterdir()]}
    counts: dict[int, int] = {}

    @FUZZ
    @given(st.sampled_from(_TARGETS), st.sampled_from(["table", "csv", "json", "jsonl"]), st.booleans())
    def check(target: str, fmt: str, with_broken: bool) -> None:
        work = tmp_path / "work"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir()
        out, stream, reader = _target(target, work, model, inputs)
        args = [str(inputs if with_broken else inputs / "0.png"), "-m", str(model), "-f", fmt, "--progress", "none"]
        args += ["--output", str(out)] if out is not None else []
        err = io.StringIO()
        saved = sys.stdout
        sys.stdout = GuardedStream(stream)
        try:
            with contextlib.redirect_stderr(err):
                try:
                    code = main(args)
                except SystemExit as exc:
                    code = exc.code
        finally:
            sys.stdout = saved
            if reader is not None:
                reader.join(timeout=10)
        counts[code] = counts.get(code, 0) + 1
        lines = [line for line in err.getvalue().splitlines() if line.startswith("error: ")]
        if code == 2:  # the last line says why; only inputs that failed before it are named above it
            assert lines and lines == err.getvalue().splitlines(), err.getvalue()
            assert all("broken.jpg" in line for line in lines[:-1]) and "broken.jpg" not in lines[-1]
        else:
            assert code == (1 if with_broken else 0), err.getvalue()
        assert {p: p.read_bytes() for p in frozen} == frozen
        assert not [p for p in work.rglob(".*.tmp")]

    import sys

    check()
    print(f"output target fuzz: exit statuses {dict(sorted(counts.items()))}")
    assert {0, 1, 2} <= set(counts)


def _target(kind: str, work: Path, model: Path, inputs: Path):
    """(--output or None, the stream standing for stdout, a reader thread to join or None) for a target kind."""
    import threading

    stdout = io.StringIO()
    reader = None
    if kind == "new":
        return work / "out.txt", stdout, None
    if kind == "existing":
        (work / "out.txt").write_text("old\n")
        return work / "out.txt", stdout, None
    if kind == "link":
        (work / "real.txt").write_text("old\n")
        (work / "out.txt").symlink_to(work / "real.txt")
        return work / "out.txt", stdout, None
    if kind == "dangling-link":
        (work / "out.txt").symlink_to(work / "missing" / "x.txt")
        return work / "out.txt", stdout, None
    if kind in ("devnull", "devfull"):
        return Path(f"/dev/{kind[3:]}"), stdout, None
    if kind.startswith("fifo"):
        os.mkfifo(work / "out.fifo")
        if kind == "fifo-read":
            reader = threading.Thread(target=lambda: (work / "out.fifo").read_bytes(), daemon=True)
            reader.start()
        return work / "out.fifo", stdout, reader
    if kind == "folder":
        return work, stdout, None
    if kind == "no-parent":
        return work / "missing" / "out.txt", stdout, None
    if kind == "model":
        return model, stdout, None
    if kind == "input":
        return inputs / "0.png", stdout, None
    if kind == "stdout-full":
        return None, open("/dev/full", "w"), None  # noqa: SIM115 (the GuardedStream's; closed with the process)
    if kind == "stdout-closed":
        return None, None, None
    return None, stdout, None
