"""Inference stage: InferConfig -> infer(cfg, reporter) -> InferResult, and the pieces for apps that embed a
model. onnxruntime, numpy and Pillow only: torch is never imported here (a test checks it).

    from cifarkit.infer import Classifier, open_engine
    clf = Classifier.from_file("model.onnx")                  # load once, reuse; thread-safe
    [pred] = clf.predict("cat.jpg")
    with open_engine("model.onnx", engine="local") as engine:  # or "ray": the same call, the same results
        for r in engine.predict(["photos/"], top_k=3): ...

    config.py      InferConfig and its checks (no numpy)
    providers.py   --device -> onnxruntime execution providers; a GPU provider that quietly fell back
    session.py     loading: the model file, the session, the contract
    classifier.py  Classifier: arrays or images in, Predictions out; the ordered decode window
    inputs.py      InputPlan: paths, folders, shards and URIs, resolved and checked
    protocol.py    the Engine protocol: what every engine takes and gives
    engines.py     the local engine, open_engine
    ray.py         the Ray engine, and Predictor / classify_dataset for Ray Data users
    sinks.py       the text formats and the Parquet prediction dataset
    outputs.py     the --output rule: stdout, a device or FIFO written directly, or a file written atomically
    run.py         infer(): plan, engine, sink, rows as they come

Names are imported lazily: `import cifarkit.infer.config` loads no numpy.
"""

from __future__ import annotations

from cifarkit.stage import lazy_exports

_EXPORTS = {
    "InferConfig": "config",
    "DEFAULT_BATCH_SIZE": "config",
    "MAX_BATCH_SIZE": "config",
    "Classifier": "classifier",
    "Prediction": "classifier",
    "Result": "classifier",
    "open_session": "session",
    "check_contract": "session",
    "InputPlan": "inputs",
    "Engine": "protocol",
    "LocalEngine": "engines",
    "open_engine": "engines",
    "InferResult": "run",
    "infer": "run",
    # cifarkit.files' names, as inputs.py imports them
    "Failure": "inputs",
    "Blob": "inputs",
    "iter_image_files": "inputs",
}

__all__ = sorted(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
