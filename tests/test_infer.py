"""The inference stage: Classifier (library) and cifar-infer (CLI) on a briefly trained, exported model.

Everything here is CPU-only and synthetic except the opt-in real-data test (CIFARKIT_DATA)."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cifarkit.cli.infer import main, resolve_model_path
from cifarkit.errors import CifarkitError
from cifarkit.infer import Classifier, Failure, Prediction, iter_image_files
from cifarkit.preprocess import ImageError, load_image
from conftest import REAL_DATA, needs_real_data, synthetic_images

# ---------------------------------------------------------------------------------------------------------
# Fixtures
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_path(exported) -> Path:
    return Path(exported.paths["onnx"])


@pytest.fixture(scope="module")
def clf(model_path) -> Classifier:
    return Classifier.from_file(model_path)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """A folder of 12 synthetic images in assorted formats and sizes, one of them in a sub-folder."""
    root = tmp_path_factory.mktemp("images")
    x, _ = synthetic_images(12, seed=11, size=48)
    names = ["a.png", "b.jpg", "C.JPG", "d.bmp", "e.webp", "f.tiff", "g.gif", "h.PNG", "i.jpeg", "j.png", "k.png"]
    for img, name in zip(x, names, strict=False):
        Image.fromarray(img).save(root / name)
    (root / "sub").mkdir()
    Image.fromarray(x[11][:32, :32]).save(root / "sub" / "z.png")
    return root


def image_files(root: Path) -> list[str]:
    return [p for p in iter_image_files([root]) if isinstance(p, str)]


def write_bad_files(folder: Path) -> dict[str, str]:
    """Unreadable files of each kind -> the reason the error line must give."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "text.png").write_text("not an image\n" * 20)
    buf = io.BytesIO()
    Image.fromarray(synthetic_images(1, size=64)[0][0]).save(buf, "JPEG")
    (folder / "truncated.jpg").write_bytes(buf.getvalue()[:300])
    return {"empty.jpg": "empty file", "text.png": "not an image", "truncated.jpg": "cannot decode"}


# ---------------------------------------------------------------------------------------------------------
# Loading a model
# ---------------------------------------------------------------------------------------------------------


def test_labels_and_preprocessing_come_from_the_model(clf, exported):
    assert clf.labels == tuple(exported.meta.class_names)
    assert clf.image_size == tuple(exported.meta.image_size)
    assert clf.meta.resize_mode == exported.meta.resize_mode
    assert "blog_cnn" in repr(clf)


def test_a_folder_holding_model_onnx_is_accepted(model_path):
    assert Classifier.from_file(model_path.parent).labels


def _onnx_copy(model_path: Path, out: Path, edit) -> Path:
    import onnx

    proto = onnx.load(str(model_path))
    edit(proto)
    onnx.save(proto, str(out))
    return out


def _set_meta(proto, **changes) -> None:
    for entry in proto.metadata_props:
        if entry.key in changes:
            entry.value = changes[entry.key]


def test_resize_rule_is_read_from_the_model_metadata(model_path, tmp_path):
    squash = Classifier.from_file(
        _onnx_copy(model_path, tmp_path / "m.onnx", lambda p: _set_meta(p, resize_mode="squash"))
    )
    crop = Classifier.from_file(model_path)
    wide = tmp_path / "wide.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 90, 3), dtype=np.uint8)).save(wide)
    assert np.array_equal(squash.pixels(wide), load_image(wide, mode="squash"))
    assert np.array_equal(crop.pixels(wide), load_image(wide, mode="center_crop"))
    assert not np.array_equal(squash.pixels(wide), crop.pixels(wide))


def test_missing_model(tmp_path):
    with pytest.raises(CifarkitError, match="does not exist"):
        Classifier.from_file(tmp_path / "nope.onnx")


def test_not_an_onnx_file(tmp_path):
    bad = tmp_path / "model.onnx"
    bad.write_bytes(b"this is not a protobuf at all" * 10)
    with pytest.raises(CifarkitError, match="not a valid ONNX model"):
        Classifier.from_file(bad)


def test_torchscript_file_is_named(exported):
    with pytest.raises(CifarkitError, match="TorchScript"):
        Classifier.from_file(exported.paths["torchscript"])


def test_onnx_without_cifarkit_metadata(model_path, tmp_path):
    bare = _onnx_copy(model_path, tmp_path / "bare.onnx", lambda p: p.ClearField("metadata_props"))
    with pytest.raises(CifarkitError, match="no cifarkit metadata"):
        Classifier.from_file(bare)


def test_onnx_with_another_input_contract(exported, tmp_path):
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 32, 32])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3, 32, 32])
    graph = helper.make_graph([helper.make_node("Identity", ["input"], ["logits"])], "g", [x], [y])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    proto.ir_version = 9
    for key, value in exported.meta.to_props().items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    path = tmp_path / "nchw.onnx"
    onnx.save(proto, str(path))
    with pytest.raises(CifarkitError, match=r"takes input 'input' tensor\(float\).*expected one input 'images' uint8"):
        Classifier.from_file(path)


def test_model_path_resolution(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("CIFARKIT_MODEL", raising=False)
    assert resolve_model_path("given.onnx") == "given.onnx"
    with pytest.raises(CifarkitError, match="no model"):
        resolve_model_path(None)
    (tmp_path / "model.onnx").write_bytes(b"")
    assert resolve_model_path(None) == "model.onnx"
    monkeypatch.setenv("CIFARKIT_MODEL", "/models/env.onnx")
    assert resolve_model_path(None) == "/models/env.onnx"


# ---------------------------------------------------------------------------------------------------------
# The Python API
# ---------------------------------------------------------------------------------------------------------


def test_matches_the_eager_model(clf, trained_run):
    from cifarkit.model.checkpoint import Checkpoint

    state = Checkpoint.load(trained_run.checkpoint)
    x, _ = synthetic_images(300, seed=7)
    eager, _ = state.deployed().run_numpy(x)  # [300, 10]
    logits, probs = clf.run(x)
    assert np.array_equal(logits.argmax(1), eager.argmax(1))
    assert np.abs(logits - eager).max() < 1e-4
    assert np.allclose(probs.sum(1), 1.0, atol=1e-5)
    preds = clf.predict(x)
    assert [p.index for p in preds] == eager.argmax(1).tolist()


def test_paths_pil_images_and_arrays_agree(clf, images):
    files = image_files(images)
    arrays = [clf.pixels(f) for f in files]
    by_path = clf.predict(files)
    by_pil = clf.predict([Image.open(f) for f in files])
    by_array = clf.predict([np.asarray(Image.open(f).convert("RGB")) for f in files])
    by_batch = clf.predict(np.stack(arrays))
    for a, b, c, d in zip(by_path, by_pil, by_array, by_batch, strict=True):
        assert a.index == b.index == c.index == d.index
        assert abs(a.probability - d.probability) < 1e-6
    assert [p.source for p in by_path] == files
    assert by_pil[0].source == files[0]  # a PIL image opened from a file keeps its name
    assert by_array[0].source == "<array 0>" and by_batch[3].source == "<array 3>"


def test_single_items_and_batches(clf, images):
    f = image_files(images)[0]
    [one] = clf.predict(f)
    assert isinstance(one, Prediction)
    assert clf.predict(f) == [one]  # a lone path is not iterated character by character
    assert clf.predict(Path(f)) == [one]
    batch = np.stack([clf.pixels(f)] * 3)
    assert [p.index for p in clf.predict(batch)] == [one.index] * 3  # a 4-D array is a batch


def test_other_array_kinds(clf):
    rng = np.random.default_rng(1)
    gray = rng.integers(0, 256, (50, 60), dtype=np.uint8)
    rgba = rng.integers(0, 256, (20, 20, 4), dtype=np.uint8)
    assert len(clf.predict([gray, rgba, gray[..., None]])) == 3
    with pytest.raises(ImageError, match="dtype is float32"):
        clf.predict([np.zeros((32, 32, 3), np.float32)])
    with pytest.raises(ImageError, match="array shape"):
        clf.predict([np.zeros((32, 32, 5), np.uint8)])
    with pytest.raises(TypeError, match="expected a path"):
        clf.predict([12345])


def test_top_k(clf, images):
    preds = clf.predict(image_files(images), top_k=3)
    for p in preds:
        assert len(p.top_k) == 3
        assert p.top_k[0] == (p.label, p.probability)
        probs = [q for _, q in p.top_k]
        assert probs == sorted(probs, reverse=True) and sum(probs) <= 1 + 1e-6
        assert len({label for label, _ in p.top_k}) == 3
    assert len(clf.predict(image_files(images)[:1], top_k=99)[0].top_k) == len(clf.labels)  # clamped


def test_run_checks_and_splits_batches(clf):
    x, _ = synthetic_images(70, seed=2)
    whole = clf.run(x, batch_size=1000)[0]
    split = clf.run(x, batch_size=16)[0]
    assert np.allclose(whole, split, atol=1e-5)
    assert clf.run(x[:0])[0].shape == (0, len(clf.labels))
    with pytest.raises(CifarkitError, match=r"expected a uint8 \[N, 32, 32, 3\] RGB batch, got float32"):
        clf.run(x.astype(np.float32))
    with pytest.raises(CifarkitError, match=r"got uint8 \[70, 3, 32, 32\]"):
        clf.run(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def test_predict_raises_on_a_bad_file_and_predict_paths_carries_on(clf, images, tmp_path):
    reasons = write_bad_files(tmp_path)
    good = image_files(images)[:3]
    bad = [str(tmp_path / n) for n in reasons]
    with pytest.raises(ImageError, match="empty file"):
        clf.predict([good[0], bad[0]])
    mixed = [good[0], bad[0], good[1], bad[1], bad[2], good[2]]
    results = list(clf.predict_paths(mixed, batch_size=2, threads=2))
    assert [r.source for r in results] == mixed  # input order, failures in place
    assert [type(r) for r in results] == [Prediction, Failure, Prediction, Failure, Failure, Prediction]
    for r, name in zip([results[1], results[3], results[4]], reasons, strict=True):
        assert r.message.startswith(str(tmp_path / name)) and reasons[name] in r.message
    assert [r.index for r in results if isinstance(r, Prediction)] == [p.index for p in clf.predict(good)]


@pytest.mark.parametrize(("threads", "batch_size"), [(0, 5), (1, 1), (3, 4)])
def test_predict_paths_is_the_same_whatever_the_threads_and_batches(clf, images, threads, batch_size):
    files = image_files(images)
    want = [(p.source, p.index) for p in clf.predict(files)]
    got = [(r.source, r.index) for r in clf.predict_paths(files, threads=threads, batch_size=batch_size)]
    assert got == want


def test_predict_paths_streams_with_a_bounded_window(clf, images):
    f = image_files(images)[0]
    pulled = 0

    def endless():
        nonlocal pulled
        while True:
            pulled += 1
            yield f

    stream = clf.predict_paths(endless(), batch_size=4, threads=2)
    first = next(stream)
    assert isinstance(first, Prediction)
    assert pulled <= (2 + 2) * 4  # threads + 1 batches in flight, plus the one being gathered
    for _ in range(50):
        next(stream)
    assert pulled <= 50 + 1 + (2 + 2) * 4  # still only a small window ahead of what was consumed
    stream.close()
    assert not [t for t in threading.enumerate() if t.name.startswith("cifarkit-decode")]


def test_bad_arguments(clf):
    with pytest.raises(CifarkitError, match="batch size"):
        list(clf.predict_paths([], batch_size=0))
    with pytest.raises(CifarkitError, match="threads"):
        list(clf.predict_paths([], threads=-1))


# ---------------------------------------------------------------------------------------------------------
# Finding images
# ---------------------------------------------------------------------------------------------------------


def test_walk_is_recursive_sorted_and_skips_hidden_and_other_files(tmp_path):
    for rel in [
        "b.png",
        "a.PNG",
        "Z.JPEG",
        "notes.txt",
        ".hidden.png",
        "sub/c.jpg",
        "sub/.d.png",
        ".git/e.png",
        "x.Tif",
    ]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    got = list(iter_image_files([tmp_path]))
    rel = [os.path.relpath(p, tmp_path) for p in got]
    assert rel == ["Z.JPEG", "a.PNG", "b.png", "x.Tif", os.path.join("sub", "c.jpg")]


def test_walk_yields_explicit_files_whatever_their_name_and_reports_missing_paths(tmp_path):
    (tmp_path / "photo.dat").write_bytes(b"x")
    (tmp_path / "empty").mkdir()
    got = list(iter_image_files([tmp_path / "photo.dat", tmp_path / "missing.jpg", tmp_path / "empty"]))
    assert got[0] == str(tmp_path / "photo.dat")
    assert isinstance(got[1], Failure) and got[1].message.endswith("missing.jpg: no such file or folder")
    assert isinstance(got[2], Failure) and "no image files found" in got[2].message
    assert len(got) == 3


def test_walk_is_lazy(tmp_path):
    for i in range(5):
        (tmp_path / f"{i}.png").write_bytes(b"x")
    it = iter_image_files([tmp_path, tmp_path / "never-looked-at"])
    assert next(it).endswith("0.png")  # the second path is not touched yet: nothing raised, nothing listed


@pytest.mark.skipif(not hasattr(os, "symlink"), reason="needs symlinks")
def test_walk_reports_symlink_loops_once(tmp_path, clf):
    Image.new("RGB", (32, 32)).save(tmp_path / "a.png")
    os.symlink(".", tmp_path / "again")  # a folder that contains itself
    os.symlink("self.jpg", tmp_path / "self.jpg")  # a file link that points at itself
    os.symlink("gone.png", tmp_path / "broken.png")
    got = list(iter_image_files([tmp_path]))
    assert len(got) == 4  # not an endless walk
    results = list(clf.predict_paths(got))
    assert [r.source for r in results if isinstance(r, Prediction)] == [str(tmp_path / "a.png")]
    msgs = [r.message for r in results if isinstance(r, Failure)]
    assert any("self.jpg: symlink loop" in m for m in msgs)
    assert any("again: symlink loop" in m for m in msgs)
    assert any("broken.png: broken symlink" in m for m in msgs)
    assert len(msgs) == 3


# ---------------------------------------------------------------------------------------------------------
# cifar-infer
# ---------------------------------------------------------------------------------------------------------


@dataclass
class CliResult:
    exit_code: int
    stdout: str
    stderr: str


def infer(*args: str, env: dict | None = None) -> CliResult:
    """Run cifar-infer's entry point in-process, capturing its output and exit status."""
    out, err = io.StringIO(), io.StringIO()
    saved = {k: os.environ.get(k) for k in (env or {})}
    os.environ.update(env or {})
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main([str(a) for a in args])
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return CliResult(code, out.getvalue(), err.getvalue())


def test_cli_table(model_path, images):
    r = infer(images, "--model", model_path)
    assert r.exit_code == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].split() == ["label", "prob", "path"]
    assert len(lines) == 1 + 12
    label, prob, path = lines[1].split()
    assert label in Classifier.from_file(model_path).labels and prob.endswith("%") and path.endswith("C.JPG")
    assert r.stderr == ""


def test_cli_formats_parse(model_path, images):
    files = image_files(images)
    out = infer(images, "-m", model_path, "--format", "csv", "--top-k", "3")
    assert out.exit_code == 0
    rows = list(csv.DictReader(io.StringIO(out.stdout)))
    assert [r["path"] for r in rows] == files
    assert set(rows[0]) == {
        "path",
        "label",
        "index",
        "probability",
        "label_2",
        "probability_2",
        "label_3",
        "probability_3",
    }
    assert float(rows[0]["probability"]) >= float(rows[0]["probability_2"]) >= float(rows[0]["probability_3"])

    js = json.loads(infer(images, "-m", model_path, "-f", "json", "-k", "2").stdout)
    assert [d["path"] for d in js] == files and all(len(d["top_k"]) == 2 for d in js)

    lines = infer(images, "-m", model_path, "-f", "jsonl").stdout.splitlines()
    assert [json.loads(line)["path"] for line in lines] == files
    sub = json.loads(infer(images / "sub", "-m", model_path, "-f", "json").stdout)
    assert [d["path"] for d in sub] == [str(images / "sub" / "z.png")]


def test_cli_and_api_agree(model_path, images, clf):
    files = image_files(images)
    rows = [json.loads(line) for line in infer(images, "-m", model_path, "-f", "jsonl", "-k", "3").stdout.splitlines()]
    for row, pred in zip(rows, clf.predict(files, top_k=3), strict=True):
        assert row == json.loads(json.dumps(pred.to_dict()))


def test_cli_some_inputs_fail_exit_1(model_path, images, tmp_path):
    reasons = write_bad_files(tmp_path / "bad")
    good = image_files(images)[:2]
    r = infer(good[0], tmp_path / "bad", tmp_path / "missing", good[1], "-m", model_path, "-f", "csv")
    assert r.exit_code == 1
    assert [row["path"] for row in csv.DictReader(io.StringIO(r.stdout))] == good  # the others still classified
    err = r.stderr.splitlines()
    for name, why in reasons.items():
        assert any(line.startswith("error: ") and name in line and why in line for line in err), (name, err)
    assert any("missing: no such file or folder" in line for line in err)
    assert err[-1] == "4 of 6 input(s) failed; see the lines above"
    assert "Traceback" not in r.stderr


def test_cli_decompression_bomb_and_symlink_loop(model_path, images, tmp_path, monkeypatch):
    import cifarkit.preprocess as pp

    big = tmp_path / "big.png"
    Image.new("RGB", (300, 300)).save(big)
    monkeypatch.setattr(pp, "MAX_PIXELS", 50_000)
    os.symlink("loop.jpg", tmp_path / "loop.jpg")
    r = infer(image_files(images)[0], big, tmp_path / "loop.jpg", "-m", model_path)
    assert r.exit_code == 1
    assert "big.png: refused, 300x300 pixels" in r.stderr and "decompression bomb" in r.stderr
    assert "loop.jpg: symlink loop" in r.stderr
    assert len(r.stdout.splitlines()) == 2


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--format", "xml"], "--format must be one of"),
        (["--top-k", "0"], "--top-k must be at least 1"),
        (["--top-k", "11"], "--top-k 11 is more than the model's 10 classes"),
        (["--batch-size", "0"], "--batch-size must be 1 to 4096"),
        (["--threads", "-2"], "--threads must be 0 to 256"),
        (["--progress", "loud"], "--progress must be one of"),
        (["--output", "/no/such/folder/out.csv"], "--output: folder /no/such/folder does not exist"),
    ],
)
def test_cli_usage_errors_exit_2(model_path, images, args, message):
    r = infer(images, "-m", model_path, *args)
    assert r.exit_code == 2
    assert r.stderr.startswith("error: ") and message in r.stderr and len(r.stderr.splitlines()) == 1
    assert r.stdout == ""


def test_cli_model_errors_exit_2(model_path, images, tmp_path, exported):
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x00\x01junk" * 50)
    for model, message in [
        (tmp_path / "none.onnx", "does not exist"),
        (garbage, "not a valid ONNX model"),
        (exported.paths["torchscript"], "TorchScript"),
    ]:
        r = infer(images, "-m", model)
        assert r.exit_code == 2 and message in r.stderr and "Traceback" not in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1


def test_cli_without_any_model_and_with_the_env_var(model_path, images, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("CIFARKIT_MODEL", raising=False)
    r = infer(images)
    assert r.exit_code == 2 and "no model" in r.stderr
    r = infer(images, env={"CIFARKIT_MODEL": str(model_path)})
    assert r.exit_code == 0 and len(r.stdout.splitlines()) == 13


def test_cli_no_paths_is_a_usage_error(model_path):
    assert infer("-m", model_path).exit_code == 2


def test_cli_debug_shows_the_traceback(tmp_path, images):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"junk")
    assert "Traceback" in infer(images, "-m", bad, "--debug").stderr


def test_cli_output_file_is_atomic(model_path, images, tmp_path, monkeypatch):
    out = tmp_path / "preds.csv"
    r = infer(images, "-m", model_path, "-f", "csv", "-o", out)
    assert r.exit_code == 0 and r.stdout == ""
    assert len(list(csv.DictReader(out.open()))) == 12
    assert sorted(p.name for p in tmp_path.iterdir()) == ["preds.csv"]  # no temporary file left behind

    # A run that dies half-way (here: after 5 rows) keeps the old file and leaves no partial one.
    original = Classifier.predict_paths

    def dies_halfway(self, paths, **kw):
        for i, r in enumerate(original(self, paths, **kw)):
            if i == 5:
                raise RuntimeError("disk on fire")
            yield r

    monkeypatch.setattr(Classifier, "predict_paths", dies_halfway)
    before = out.read_bytes()
    r = infer(images, "-m", model_path, "-f", "csv", "-o", out, "--batch-size", "2")
    assert r.exit_code == 1 and "RuntimeError: disk on fire" in r.stderr and "--debug" in r.stderr
    assert out.read_bytes() == before
    fresh = tmp_path / "fresh.jsonl"
    r = infer(images, "-m", model_path, "-f", "jsonl", "-o", fresh)
    assert r.exit_code == 1 and not fresh.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["preds.csv"]


def test_cli_output_file_is_written_when_some_inputs_fail(model_path, images, tmp_path):
    out = tmp_path / "preds.json"
    r = infer(images, tmp_path / "missing.png", "-m", model_path, "-f", "json", "-o", out)
    assert r.exit_code == 1 and len(json.loads(out.read_text())) == 12


def test_cli_progress_bar_option_does_not_touch_stdout(model_path, images):
    r = infer(images, "-m", model_path, "-f", "jsonl", "--progress", "bar")
    assert r.exit_code == 0 and len([json.loads(x) for x in r.stdout.splitlines()]) == 12


def test_cli_never_imports_torch(model_path, images):
    """The real console script, in a fresh interpreter: -X importtime lists every module it imports."""
    script = Path(sys.executable).with_name("cifar-infer")
    if not script.exists():
        pytest.skip("the cifar-infer console script is not installed beside this interpreter")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    r = subprocess.run(
        [sys.executable, "-X", "importtime", str(script), str(image_files(images)[0]), "-m", str(model_path)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    imported = {line.split("|")[-1].strip() for line in r.stderr.splitlines() if line.startswith("import time:")}
    assert "onnxruntime" in imported and "cifarkit.infer" in imported  # the check sees real imports
    assert not {m for m in imported if m == "torch" or m.startswith("torch.")}
    assert len(r.stdout.splitlines()) == 2


def test_library_never_imports_torch(model_path, images):
    code = (
        "import sys\n"
        "from cifarkit.infer import Classifier\n"
        f"clf = Classifier.from_file({str(model_path)!r})\n"
        f"print(clf.predict([{image_files(images)[0]!r}])[0].label)\n"
        "print('torch' in sys.modules)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    label, torch_loaded = r.stdout.split()
    assert label and torch_loaded == "False"


# ---------------------------------------------------------------------------------------------------------
# Real data (opt in: CIFARKIT_DATA)
# ---------------------------------------------------------------------------------------------------------


@needs_real_data
def test_real_test_images(clf, trained_run):
    """300 real CIFAR-10 test JPEGs: the inference path sees exactly the pixels the training data loader sees,
    and the exported model agrees with the eager one on every image."""
    from cifarkit.data import decode_files
    from cifarkit.model.checkpoint import Checkpoint

    test_dir = Path(REAL_DATA) / "test"
    files = [p for d in sorted(test_dir.iterdir()) if d.is_dir() for p in sorted(d.iterdir())[:30]]
    assert len(files) == 300
    results = list(clf.predict_paths([str(f) for f in files], top_k=3))
    assert all(isinstance(r, Prediction) for r in results)
    x = decode_files(files)  # the training-side decoder
    assert np.array_equal(x, np.stack([clf.pixels(f) for f in files]))
    state = Checkpoint.load(trained_run.checkpoint)
    eager, _ = state.deployed().run_numpy(x)
    assert [r.index for r in results] == eager.argmax(1).tolist()
