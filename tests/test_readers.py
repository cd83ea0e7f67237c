"""Readers never write: opening a model of any kind, a checkpoint or a data folder changes no file (names, sizes,
modification times and bytes of every file in the folder are the same before and after). And the engines:
one protocol, the same rows whichever is asked for."""

from __future__ import annotations

import shutil
from pathlib import Path

import pyarrow as pa
import pytest

from cifarkit.data import load_data
from cifarkit.evaluation.sources import open_labelled, open_model
from cifarkit.files import Failure
from cifarkit.infer import Classifier, open_engine
from cifarkit.infer.sinks import prediction_table
from cifarkit.model.checkpoint import Checkpoint
from conftest import write_imagefolder


def snapshot(folder: Path) -> dict[str, tuple[int, int, bytes]]:
    """Every file under `folder`: (size, mtime in ns, bytes); and the folder's own mtime under ''."""
    out = {"": (0, folder.stat().st_mtime_ns, b"")}
    for p in sorted(folder.rglob("*")):
        st = p.stat()
        out[str(p.relative_to(folder))] = (st.st_size, st.st_mtime_ns, p.read_bytes() if p.is_file() else b"")
    return out


@pytest.fixture
def model_folder(tmp_path, exported, trained_run) -> Path:
    """model.onnx, model.pt, model.json and checkpoint.pt in one folder, as an export into a run folder leaves."""
    folder = tmp_path / "run"
    shutil.copytree(Path(exported.paths["onnx"]).parent, folder)
    shutil.copy(trained_run.checkpoint, folder / "checkpoint.pt")
    return folder


@pytest.mark.parametrize(
    "opener",
    [
        lambda f: Classifier.from_file(f / "model.onnx"),
        lambda f: Classifier.from_file(f),  # the folder: model.onnx inside it
        lambda f: open_model(f / "model.onnx"),
        lambda f: open_model(f / "model.pt"),
        lambda f: open_model(f / "checkpoint.pt"),
        lambda f: Checkpoint.load(f / "checkpoint.pt").deployed(),
    ],
    ids=["onnx", "folder", "eval-onnx", "eval-torchscript", "eval-checkpoint", "checkpoint"],
)
def test_opening_a_model_changes_no_file(model_folder, opener):
    before = snapshot(model_folder)
    opener(model_folder)
    assert snapshot(model_folder) == before


def test_opening_a_data_folder_changes_no_file(tmp_path):
    root = write_imagefolder(tmp_path / "data", per_class_train=4, per_class_test=2)
    before = snapshot(root)
    load_data(str(root), tmp_path / "cache")  # the decoded cache goes to the cache folder, never the data's
    open_labelled(str(root), ("class0", "class1", "class2"))
    assert snapshot(root) == before and (tmp_path / "cache").is_dir()


def test_the_local_engine_gives_the_classifiers_rows_as_objects_and_as_tables(exported, tmp_path):
    """One protocol: predict() and tables() give the same rows, in input order, failures in place."""
    images = write_imagefolder(tmp_path / "imgs", per_class_train=3, per_class_test=1, fmt="jpg") / "train"
    (images / "class0" / "broken.jpg").write_bytes(b"not a jpeg")
    clf = Classifier.from_file(exported.paths["onnx"])
    want = list(clf.predict_paths(sorted(str(p) for p in images.rglob("*.jpg")), top_k=2))
    with open_engine(clf, engine="local") as engine:
        got = list(engine.predict([images], top_k=2))
        tables = list(engine.tables([images], top_k=2))
    assert [r.source for r in got] == [r.source for r in want] and sum(isinstance(r, Failure) for r in got) == 1
    assert [getattr(r, "label", None) for r in got] == [getattr(r, "label", None) for r in want]
    assert pa.concat_tables(tables).to_pylist() == prediction_table(got).to_pylist()
