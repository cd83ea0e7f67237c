"""Fuzzing: random and mutated images, model metadata and checkpoints. Property: every case ends in a
result or one CifarkitError (or, for images, a Failure / ImageError) whose message is one line, within a
time bound; no other exception type ever escapes.

The default profile keeps this file to tens of seconds. `make fuzz` (CIFARKIT_FUZZ=long) runs the long
profile: many more cases per target, printed statistics."""

from __future__ import annotations

import io
import json
import os
import random
import shutil

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
CHECKPOINT_FIELDS = ["format_version", "artifact", "model_kwargs", "model_state", "epoch", "history", "train_config"]


def test_fuzz_checkpoints(trained_run, tmp_path):
    state = torch.load(trained_run.checkpoint, weights_only=True)  # the plain data, to mutate
    counts = {"loaded": 0, "refused": 0}
    rng = random.Random(0)

    @FUZZ
    @given(
        st.dictionaries(st.sampled_from(CHECKPOINT_FIELDS), plain_values, min_size=1, max_size=3),
        st.sampled_from(["replace", "artifact_key", "weight"]),
    )
    def check(changes: dict, how: str) -> None:
        doc = dict(state)
        if how == "replace":
            doc.update(changes)
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
