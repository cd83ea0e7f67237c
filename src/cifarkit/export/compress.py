"""Compact artifacts made from a verified fp32 ONNX model: fp16 weights (half the download, fp32 arithmetic) and
int8 static quantization (onnxruntime's QDQ format: int8 per-channel weights, uint8 activations, calibrated on
training images). Neither can match fp32 to 1e-4: cifarkit.export.run measures each against the fp32 model on
labelled test images before it is written.

    payload, how = fp16_bytes(fp32_payload)
    payload, how = int8_bytes(fp32_payload, calibration_images)     # uint8 [N, H, W, 3]
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import tempfile
from collections.abc import Iterator
from typing import Any

import numpy as np

from cifarkit.spec import INPUT_NAME

FP16_MIN_ELEMENTS = 16  # smaller float constants (a normalization's mean and std, scalars) stay fp32: no saving
CALIBRATION_BATCH = 64  # images per calibration run


def fp16_bytes(payload: bytes) -> tuple[bytes, dict[str, Any]]:
    """The model with every float initializer of FP16_MIN_ELEMENTS or more stored as fp16 and cast back to fp32
    where it is used (a Cast node ahead of the graph): about half the bytes, the same fp32 arithmetic (CPU
    kernels, and onnxruntime-web's, run fp32; fp16 compute would be slower there), weights rounded to fp16."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    proto = onnx.load_from_string(payload)
    graph = proto.graph
    casts, kept, converted = [], [], 0
    for init in graph.initializer:
        if init.data_type != TensorProto.FLOAT or int(np.prod(init.dims)) < FP16_MIN_ELEMENTS:
            kept.append(init)
            continue
        half = numpy_helper.from_array(numpy_helper.to_array(init).astype(np.float16), f"{init.name}.fp16")
        kept.append(half)
        casts.append(helper.make_node("Cast", [half.name], [init.name], to=TensorProto.FLOAT))
        converted += int(np.prod(init.dims))
    del graph.initializer[:]
    graph.initializer.extend(kept)
    nodes = casts + list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes)
    how = {"weights": "fp16, cast to fp32 where used", "compute": "fp32", "fp16_values": converted}
    return proto.SerializeToString(), how


def calibration_indices(labels: np.ndarray, count: int, seed: int = 0) -> np.ndarray:
    """Which training images calibrate: `count` of them, as even over the classes as the data allows, each class's
    share drawn by a seeded permutation; sorted."""
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    per_class = -(-count // max(len(classes), 1))
    picked = [rng.permutation(np.flatnonzero(labels == c))[:per_class] for c in classes]
    chosen = np.concatenate(picked) if picked else np.zeros(0, np.int64)
    return np.sort(rng.permutation(chosen)[:count])


def int8_bytes(payload: bytes, images: np.ndarray) -> tuple[bytes, dict[str, Any]]:
    """Static int8 quantization (QDQ format, which onnxruntime fuses into integer kernels, VNNI where the CPU has
    it) of every op onnxruntime quantizes (Conv, Gemm, MaxPool, ...; only Conv and Gemm was measured slower, the
    blog CNN 11,300 against 14,700 images/s, with float Relu and pooling between them) up to the last weighted
    ops: weights int8 per output channel and symmetric, activations uint8 per tensor with ranges from running
    `images` (uint8 [N, H, W, 3]) through the fp32 model (MinMax). The uint8 input and the head after the last
    weights (head_nodes: scaling, TTA mean, softmax) stay fp32, so logits and probabilities keep full resolution."""
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.starts = iter(range(0, len(images), CALIBRATION_BATCH))

        def get_next(self) -> dict[str, np.ndarray] | None:
            start = next(self.starts, None)
            return None if start is None else {INPUT_NAME: images[start : start + CALIBRATION_BATCH]}

    head = head_nodes(onnx.load_from_string(payload))
    with tempfile.TemporaryDirectory(prefix="cifarkit-int8-") as tmp, _quiet_quantizer():
        src, dst = os.path.join(tmp, "fp32.onnx"), os.path.join(tmp, "int8.onnx")
        with open(src, "wb") as f:
            f.write(payload)
        quantize_static(
            src,
            dst,
            Reader(),
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=None,
            nodes_to_exclude=sorted(head),
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
            extra_options={"WeightSymmetric": True, "ActivationSymmetric": False},
        )
        proto = onnx.load(dst)
    _unround_head(proto, head)
    dequantized = {n.output[0] for n in proto.graph.node if n.op_type == "DequantizeLinear"}
    ops = sorted({n.op_type for n in proto.graph.node if set(n.input) & dequantized} - {"QuantizeLinear"})
    how = {
        "method": "onnxruntime static quantization, QDQ format",
        "weights": "int8, per output channel, symmetric",
        "activations": "uint8, per tensor, asymmetric, MinMax calibration",
        "ops": ops,  # the ops that read int8 values
        "fp32_head": sorted({n.op_type for n in proto.graph.node if n.name in head}),  # after the last weights
    }
    return proto.SerializeToString(), how


@contextlib.contextmanager
def _quiet_quantizer() -> Iterator[None]:
    """onnxruntime.quantization advises through the root logger ("Please consider to run pre-processing before
    quantization", the model being folded and shape-checked already); the module-level logging.warning would also
    install a handler on the root logger for good. For the call: a handler that drops, a filter for its records."""
    root = logging.getLogger()
    null = logging.NullHandler()

    def not_quantizer(record: logging.LogRecord) -> bool:
        return "onnxruntime" not in record.pathname

    root.addHandler(null)
    root.addFilter(not_quantizer)
    try:
        yield
    finally:
        root.removeFilter(not_quantizer)
        root.removeHandler(null)


WEIGHTED_OPS = frozenset({"Conv", "Gemm", "MatMul", "ConvTranspose"})


def head_nodes(proto: Any) -> set[str]:
    """The names of the nodes between the last weighted ops (Conv, Gemm, MatMul) and the graph's outputs: the
    logits' scaling, the test-time augmentation's mean, the softmax. Quantized, they would hand out logits and
    probabilities in 256 steps (measured: every probability a multiple of 1/255, ties among the top classes);
    they cost nothing in fp32."""
    producer = {out: node for node in proto.graph.node for out in node.output}
    head: set[str] = set()
    todo = [o.name for o in proto.graph.output]
    while todo:
        node = producer.get(todo.pop())
        if node is None or node.name in head or node.op_type in WEIGHTED_OPS:
            continue
        head.add(node.name)
        todo.extend(node.input)
    return head


def _unround_head(proto: Any, head: set[str]) -> None:
    """Take out the QuantizeLinear -> DequantizeLinear pairs the quantizer puts on the tensors the head reads and
    on the graph's outputs (the last Gemm's output, the logits): those values stay fp32, in place."""
    nodes = list(proto.graph.node)
    producer = {out: node for node in nodes for out in node.output}
    readers: dict[str, int] = {}
    for node in nodes:
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1
    wanted = {name for node in nodes if node.name in head for name in node.input}
    wanted |= {o.name for o in proto.graph.output}
    dropped, renamed = set(), {}
    for tensor in wanted:
        dq = producer.get(tensor)
        q = producer.get(dq.input[0]) if dq is not None and dq.op_type == "DequantizeLinear" else None
        if q is None or q.op_type != "QuantizeLinear" or readers.get(q.output[0]) != 1:
            continue
        dropped |= {id(q), id(dq)}
        renamed[q.input[0]] = tensor  # the fp32 tensor takes the dequantized one's name
    kept = [node for node in nodes if id(node) not in dropped]
    for node in kept:
        node.output[:] = [renamed.get(name, name) for name in node.output]
        node.input[:] = [renamed.get(name, name) for name in node.input]
    del proto.graph.node[:]
    proto.graph.node.extend(kept)


def calibration_record(source: str, indices: np.ndarray) -> dict[str, Any]:
    """What calibrated an int8 model, for its metadata: the data, the split, how many images and which."""
    return {
        "data": source,
        "split": "train",
        "images": int(len(indices)),
        "selection": "even over classes, each class's share by a seeded permutation (numpy default_rng, seed 0)",
        "indices_sha256": hashlib.sha256(np.asarray(indices, np.int64).tobytes()).hexdigest(),
        "first_indices": [int(i) for i in indices[:8]],
    }
