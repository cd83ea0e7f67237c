"""Export: the artifacts give the eager model's answers, describe themselves, and fail closed."""

from __future__ import annotations

import json
import os
from dataclasses import replace

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from cifarkit.errors import CifarkitError
from cifarkit.export import formats as export_formats
from cifarkit.export import load_torchscript
from cifarkit.export import run as export_run
from cifarkit.model.checkpoint import Checkpoint
from cifarkit.model.deployed import DeployedModel
from cifarkit.spec import (
    ARTIFACT_JSON_NAME,
    BLOG_MEAN,
    BLOG_STD,
    IMAGE_SIZE,
    INPUT_NAME,
    OUTPUT_NAMES,
    ArtifactMeta,
)
from conftest import export_checkpoint, synthetic_images

BATCH_SIZES = (1, 2, 7, 64, 200)


def _onnx_logits(path, images, batch_size):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    parts = [session.run(None, {INPUT_NAME: images[i : i + batch_size]}) for i in range(0, len(images), batch_size)]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def _torchscript_logits(path, images, batch_size):
    module, _ = load_torchscript(path)
    with torch.no_grad():
        parts = [module(torch.from_numpy(images[i : i + batch_size])) for i in range(0, len(images), batch_size)]
    return np.concatenate([p[0].numpy() for p in parts]), np.concatenate([p[1].numpy() for p in parts])


def _parity(checkpoint, paths, images, labels, batch_sizes):
    model = Checkpoint.load(checkpoint).deployed()
    ref_logits, _ = model.run_numpy(images)
    ref_acc = float(np.mean(ref_logits.argmax(1) == labels))
    for bs in batch_sizes:
        for runner, path in ((_onnx_logits, paths["onnx"]), (_torchscript_logits, paths["torchscript"])):
            logits, probs = runner(path, images, bs)
            assert np.array_equal(logits.argmax(1), ref_logits.argmax(1)), f"{path.name} at batch {bs}"
            assert np.abs(logits - ref_logits).max() <= 1e-4, f"{path.name} at batch {bs}"
            assert float(np.mean(logits.argmax(1) == labels)) == ref_acc
            np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
    return ref_acc


def test_parity_on_the_whole_synthetic_test_set(trained_run, exported):
    x, y = synthetic_images(1200)  # the fixture's test split is images 1000..1199
    acc = _parity(trained_run.checkpoint, exported.paths, x[1000:], y[1000:], BATCH_SIZES)
    assert acc == pytest.approx(trained_run.metrics.accuracy)


def test_onnx_is_one_checked_file_with_the_contract(exported):
    path = exported.paths["onnx"]
    assert sorted(os.listdir(path.parent)) == ["model.json", "model.onnx", "model.pt"]  # no .onnx.data
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    assert [o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")] == [export_formats.DEFAULT_OPSET]
    (inp,) = proto.graph.input
    assert inp.name == INPUT_NAME
    assert inp.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    dims = inp.type.tensor_type.shape.dim
    assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [*IMAGE_SIZE, 3]
    assert [o.name for o in proto.graph.output] == list(OUTPUT_NAMES)


def test_metadata_round_trips_and_agrees_with_the_spec(trained_run, exported):
    session = ort.InferenceSession(str(exported.paths["onnx"]), providers=["CPUExecutionProvider"])
    props = session.get_modelmeta().custom_metadata_map
    meta = ArtifactMeta.from_props(props)
    assert meta == exported.meta
    state = Checkpoint.load(trained_run.checkpoint)
    assert list(meta.class_names) == json.loads(props["class_names"]) == list(state.class_names)
    assert meta.image_size == IMAGE_SIZE and meta.mean == BLOG_MEAN and meta.std == BLOG_STD
    # Export copies the checkpoint's contract and adds only its own provenance.
    copied = {k: v for k, v in meta.to_dict().items() if k not in ("checkpoint_sha256", "versions")}
    original = state.artifact.to_dict()
    assert copied == {k: v for k, v in original.items() if k not in ("checkpoint_sha256", "versions")}
    assert meta.input_layout == "NHWC" and meta.input_dtype == "uint8" and meta.color_order == "RGB"
    assert meta.model_name == "blog_cnn" and meta.tta == "none"
    assert meta.test_accuracy == pytest.approx(trained_run.metrics.accuracy)
    assert len(meta.checkpoint_sha256) == 64 and meta.versions["torch"] == str(torch.__version__)
    sidecar = json.loads(exported.paths["json"].read_text())
    assert ArtifactMeta.from_json(json.dumps({k: v for k, v in sidecar.items() if k in props})) == meta
    assert {c["format"] for c in sidecar["verification"]} == {"onnx", "torchscript"}
    _, ts_meta = load_torchscript(exported.paths["torchscript"])
    assert ts_meta == meta


def test_uint8_contract_equals_the_blog_transforms(trained_run, exported):
    """The graph's cast/scale/normalize equals the blog's ToTensor + Normalize on the same pixels."""
    import torchvision.transforms as T
    from PIL import Image

    net = Checkpoint.load(trained_run.checkpoint).deployed().net
    x, _ = synthetic_images(16, seed=9)
    blog = T.Compose([T.ToTensor(), T.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))])
    with torch.no_grad():
        want = net(torch.stack([blog(Image.fromarray(img)) for img in x])).numpy()
    got, _ = _onnx_logits(exported.paths["onnx"], x, 16)
    assert np.abs(got - want).max() <= 1e-4
    assert np.array_equal(got.argmax(1), want.argmax(1))


def test_hflip_tta_is_inside_the_graph(trained_run, tmp_path):
    state = Checkpoint.load(trained_run.checkpoint)
    net = state.deployed().net
    model = DeployedModel(net, BLOG_MEAN, BLOG_STD, tta="hflip").eval()
    x, _ = synthetic_images(8, seed=4)
    meta = replace(export_run.artifact_meta(state, str(trained_run.checkpoint)), tta="hflip")
    payload, _ = export_formats.onnx_bytes(model, meta)
    session = ort.InferenceSession(payload, providers=["CPUExecutionProvider"])
    got = session.run([OUTPUT_NAMES[0]], {INPUT_NAME: x})[0]
    plain = DeployedModel(net, BLOG_MEAN, BLOG_STD).eval()
    with torch.no_grad():
        a = plain(torch.from_numpy(x))[0]
        b = plain(torch.from_numpy(np.ascontiguousarray(x[:, :, ::-1])))[0]
    np.testing.assert_allclose(got, (0.5 * (a + b)).numpy(), atol=1e-4)


def test_a_mismatch_writes_nothing(trained_run, tmp_path, monkeypatch):
    real_runner = export_run.onnx_runner
    monkeypatch.setattr(export_run, "onnx_runner", lambda payload: lambda b: real_runner(payload)(b) + 1e-3)
    out = tmp_path / "out"
    with pytest.raises(CifarkitError, match=r"onnx artifact does not match.*1e-03|onnx artifact does not match"):
        export_checkpoint(trained_run.checkpoint, out)
    assert not out.exists()


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("missing", "does not exist"),
        ("corrupt", "cannot be read"),
        ("foreign", "not a cifarkit checkpoint"),
        ("format", "unknown format"),
        ("unwritable", "cannot write"),
    ],
)
def test_bad_input(trained_run, tmp_path, case, message):
    checkpoint = trained_run.checkpoint
    out = tmp_path / "out"
    fmt = "onnx"
    if case == "missing":
        checkpoint = tmp_path / "nope.pt"
    elif case == "corrupt":
        checkpoint = tmp_path / "corrupt.pt"
        checkpoint.write_bytes(trained_run.checkpoint.read_bytes()[:5000])
    elif case == "foreign":
        checkpoint = tmp_path / "foreign.pt"
        torch.save({"state_dict": {}}, checkpoint)
    elif case == "format":
        fmt = "tflite"
    elif case == "unwritable":
        out = tmp_path / "file"
        out.write_text("a file, not a folder")
    with pytest.raises(CifarkitError, match=message):
        export_checkpoint(checkpoint, out, format=fmt)
    if case != "unwritable":
        assert not out.exists()


def test_real_data_parity_over_the_full_test_set(real_run, tmp_path):
    """The acceptance check: eager, TorchScript and onnxruntime agree on every real test image."""
    from cifarkit.data import load_data

    data = load_data(os.environ["CIFARKIT_DATA"])
    result = export_checkpoint(real_run.checkpoint, tmp_path, images=data.test_x)
    acc = _parity(real_run.checkpoint, result.paths, data.test_x, data.test_y, (1000,))
    assert acc == pytest.approx(real_run.metrics.accuracy)
    assert result.meta.test_accuracy == pytest.approx(real_run.metrics.accuracy)
    _parity(real_run.checkpoint, result.paths, data.test_x[:300], data.test_y[:300], (1, 7))
    assert ARTIFACT_JSON_NAME in os.listdir(tmp_path)
