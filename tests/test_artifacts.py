"""Compact and fast artifacts (cifar-export --quantize int8, --precision fp16, --tta, --format triton): each keeps
the artifact contract, is gated on labelled accuracy against the fp32 model, says what it is in its metadata, runs
unchanged in cifar-infer and cifar-eval, and ends the export with a table. Bad input is one line, exit 2, nothing
written; a variant over --max-drop is one line with the figures, exit 1, nothing written."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from cifarkit.cli.export import main as export_main
from cifarkit.errors import CifarkitError, GateError
from cifarkit.infer import Classifier
from conftest import export_checkpoint, run_cli, synthetic_images, write_imagefolder

BIN = Path(sys.executable).parent


def cli(*args: object) -> tuple[int, str, str]:
    return run_cli(export_main, *args)


def test_every_variant_keeps_the_contract_and_says_what_it_is(variants):
    fp32_size = variants["fp32"].paths["onnx"].stat().st_size
    for name, result in variants.items():
        path = result.paths["onnx"]
        clf = Classifier.from_file(path)  # the contract check at load: uint8 NHWC in, logits [N, C] out
        proto = onnx.load(str(path))
        (inp,) = proto.graph.input
        assert inp.type.tensor_type.elem_type == onnx.TensorProto.UINT8
        assert [o.type.tensor_type.elem_type for o in proto.graph.output] == [onnx.TensorProto.FLOAT] * 2
        variant = clf.meta.variant
        if name == "fp32":
            assert variant == {} and result.accuracy is None
            continue
        acc = variant["verification"]
        assert acc["images"] == 200 and acc["drop_points"] <= 0.5 and result.accuracy.drop_points <= 0.5
        assert json.loads(result.paths["json"].read_text())["labelled_verification"] == acc
        if name == "int8":
            how = variant["quantization"]
            assert variant["precision"] == "int8" and "Conv" in how["ops"]
            assert how["calibration"]["images"] == 512 and len(how["calibration"]["indices_sha256"]) == 64
            assert any(n.op_type == "DequantizeLinear" for n in proto.graph.node)
        elif name == "fp16":
            assert variant["precision"] == "fp16" and path.stat().st_size <= 0.55 * fp32_size
            assert any(i.data_type == onnx.TensorProto.FLOAT16 for i in proto.graph.initializer)
        else:
            assert clf.meta.tta == variant["tta"] == "hflip"


def test_variants_answer_like_the_fp32_model(variants):
    x, _ = synthetic_images(64, seed=21)
    want = Classifier.from_file(variants["fp32"].paths["onnx"]).run(x)[1].argmax(1)
    for name in ("int8", "fp16", "tta-hflip"):
        got = Classifier.from_file(variants[name].paths["onnx"]).run(x)[1].argmax(1)
        assert (got == want).mean() >= 0.95, name


def test_int8_logits_and_probabilities_keep_full_resolution(variants):
    # The quantizer would put 8-bit steps on the outputs too (every probability a multiple of 1/255, ties among
    # the top classes); the head after the last Gemm stays fp32.
    x, _ = synthetic_images(64, seed=22)
    path = variants["int8"].paths["onnx"]
    logits, probs = Classifier.from_file(path).run(x)
    assert not np.allclose(probs * 255, np.round(probs * 255), atol=1e-3)
    assert len(np.unique(logits)) > 0.9 * logits.size
    proto = onnx.load(str(path))
    producer = {out: n.op_type for n in proto.graph.node for out in n.output}
    assert {producer[o.name] for o in proto.graph.output} == {"Gemm", "Softmax"}
    assert Classifier.from_file(path).meta.variant["quantization"]["fp32_head"] == ["Softmax"]  # the blog CNN's


def test_the_export_ends_with_a_table(trained_run, batches_py, tmp_path):
    # as README and docs/artifacts.md write it: no --format, which is then onnx (the only kind an int8 model is)
    code, out, err = cli(trained_run.checkpoint, "--quantize", "int8", "--data", batches_py,
                         "--out", tmp_path / "int8", "--progress", "none")  # fmt: skip
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "int8").iterdir()) == ["model.json", "model.onnx"]
    lines = out.splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("artifact"))
    assert lines[head].split()[:5] == ["artifact", "size", "accuracy", "images/s", "vs", "fp32", "file"][:5]
    assert lines[head + 1].startswith("fp32 onnx") and "1.00x" in lines[head + 1]
    assert lines[head + 2].startswith("int8 onnx") and str(tmp_path / "int8" / "model.onnx") in lines[head + 2]
    assert "accuracy on 200 test images" in out
    ratio = float(lines[head + 2].split()[-2].rstrip("x"))
    assert ("int8 onnx is slower than fp32 on this machine" in out) == (ratio < 1)


def test_cifar_infer_and_cifar_eval_run_every_variant_unchanged(variants, batches_py, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    from PIL import Image

    for i, img in enumerate(synthetic_images(4, seed=2)[0]):
        Image.fromarray(img).save(images / f"{i}.png")
    for name in ("int8", "fp16"):
        model = variants[name].paths["onnx"]
        proc = subprocess.run([BIN / "cifar-infer", images, "-m", model, "-f", "csv"], capture_output=True, text=True)
        assert proc.returncode == 0 and len(proc.stdout.splitlines()) == 5, proc.stderr
        proc = subprocess.run([BIN / "cifar-eval", model, "--data", batches_py, "--progress", "none"],
                              capture_output=True, text=True)  # fmt: skip
        assert proc.returncode == 0 and "top-1 accuracy" in proc.stdout, proc.stderr


def test_a_variant_over_max_drop_is_one_line_exit_1_and_nothing_written(trained_run, batches_py, tmp_path, monkeypatch):
    from cifarkit.export import verify

    real = verify.labelled_check

    def worse(*args, **kwargs):  # the same check, the variant answering 3 % of the images wrong
        acc = real(*args, **kwargs)
        acc.artifact -= 0.03
        return acc

    monkeypatch.setattr("cifarkit.export.run.labelled_check", worse)
    with pytest.raises(GateError, match=r"loses 3\.00 accuracy points on 200 test images .* over --max-drop 0\.5"):
        export_checkpoint(trained_run.checkpoint, tmp_path / "int8", format="onnx", data=str(batches_py),
                          quantize="int8", speed=False)  # fmt: skip
    code, _, err = cli(trained_run.checkpoint, "--precision", "fp16", "-f", "onnx", "--data", batches_py,
                       "--out", tmp_path / "fp16", "--no-speed", "--progress", "none")  # fmt: skip
    assert code == 1 and len(err.strip().splitlines()) == 1 and "over --max-drop 0.5; nothing written" in err
    assert not (tmp_path / "int8").exists() and not (tmp_path / "fp16").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--quantize", "int8", "-f", "onnx"], "give them with --data"),
        (["--quantize", "int4", "-f", "onnx"], "--quantize must be none or int8"),
        (["--precision", "bf16", "-f", "onnx"], "--precision must be fp32 or fp16"),
        (["--max-drop", "-1", "--tta", "none", "--data", "{data}"], "--max-drop must be 0 to 100"),
        (["--quantize", "int8", "--format", "torchscript", "--data", "{data}"], "make ONNX models"),
        (["--precision", "fp16", "--format", "all", "--data", "{data}"], "make ONNX models"),
        (["--quantize", "int8", "--precision", "fp16", "-f", "onnx", "--data", "{data}"], "exclude each other"),
        (["--quantize", "int8", "-f", "onnx", "--data", "{three}"], "verification and calibration need the model's"),
    ],
    ids=[
        "no-data",
        "unknown-quantization",
        "unknown-precision",
        "negative-max-drop",
        "torchscript",
        "fp16-all",
        "both",
        "classes",
    ],
)
def test_bad_variant_options_are_one_line_exit_2_and_nothing_written(trained_run, batches_py, tmp_path, args, message):
    three = write_imagefolder(tmp_path / "three", per_class_train=4, per_class_test=2)  # classes class0..class2
    argv = [a.format(data=batches_py, three=three) for a in args]
    code, _, err = cli(trained_run.checkpoint, *argv, "--out", tmp_path / "out", "--no-speed")
    assert code == 2 and len(err.strip().splitlines()) == 1 and message in err, err
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------------------
# Triton
# ---------------------------------------------------------------------------------------------------------


def model_config_pb2():
    """Triton's own ModelConfig schema, from tritonclient (loaded from its file: tritonclient.grpc's package
    imports grpcio, which the config schema does not need)."""
    import tritonclient

    path = Path(tritonclient.__file__).parent / "grpc" / "model_config_pb2.py"
    spec = importlib.util.spec_from_file_location("model_config_pb2", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_triton_repository_matches_the_onnx_graph(trained_run, tmp_path):
    from google.protobuf import text_format

    repo = tmp_path / "repo"
    result = export_checkpoint(trained_run.checkpoint, repo, format="triton", speed=False)
    folder = repo / "blog_cnn"
    assert sorted(p.name for p in folder.iterdir()) == ["1", "config.pbtxt", "labels.txt", "model.json"]
    assert result.paths["triton"] == folder / "1" / "model.onnx"
    pb2 = model_config_pb2()
    config = text_format.Parse((folder / "config.pbtxt").read_text(), pb2.ModelConfig())
    graph = onnx.load(str(folder / "1" / "model.onnx")).graph
    types = {onnx.TensorProto.UINT8: pb2.TYPE_UINT8, onnx.TensorProto.FLOAT: pb2.TYPE_FP32}

    def dims(value_info):  # without the batch dimension, which is Triton's (max_batch_size)
        return [d.dim_value for d in value_info.type.tensor_type.shape.dim][1:]

    assert config.name == "blog_cnn" and config.backend == "onnxruntime" and config.max_batch_size == 256
    assert [(i.name, i.data_type, list(i.dims)) for i in config.input] == [
        (i.name, types[i.type.tensor_type.elem_type], dims(i)) for i in graph.input
    ]
    assert [(o.name, o.data_type, list(o.dims)) for o in config.output] == [
        (o.name, types[o.type.tensor_type.elem_type], dims(o)) for o in graph.output
    ]
    assert list(config.input[0].dims) == [32, 32, 3] and list(config.output[0].dims) == [10]
    assert config.HasField("dynamic_batching") and max(config.dynamic_batching.preferred_batch_size) <= 256
    assert len(config.instance_group) == 1 and config.instance_group[0].count == 1
    labels = (folder / "labels.txt").read_text().splitlines()
    assert labels == list(result.meta.class_names)
    assert config.output[1].label_filename == "labels.txt"


def test_triton_repository_refuses_another_model_of_the_same_name(trained_run, batches_py, tmp_path):
    repo = tmp_path / "repo"
    export_checkpoint(trained_run.checkpoint, repo, format="triton", speed=False)
    before = (repo / "blog_cnn" / "1" / "model.onnx").read_bytes()
    export_checkpoint(trained_run.checkpoint, repo, format="triton", speed=False)  # the same model: replaced
    other = tmp_path / "other.pt"
    import torch

    state = torch.load(trained_run.checkpoint, weights_only=True)
    state["epoch"] += 1  # another checkpoint, another hash
    torch.save(state, other)
    with pytest.raises(CifarkitError, match="already holds a model named 'blog_cnn'"):
        export_checkpoint(other, repo, format="triton", speed=False)
    assert (repo / "blog_cnn" / "1" / "model.onnx").read_bytes() == before
    export_checkpoint(other, repo, format="triton", triton_name="blog_cnn_v2", speed=False)
    assert sorted(os.listdir(repo)) == ["blog_cnn", "blog_cnn_v2"]
