"""The evaluation stage: metric maths on hand-made predictions with known counts, the labelled data sources, the
three model kinds, cifar-eval's report, outputs and errors, the bundled sample and make demo's offline fallback.

CPU-only and synthetic except the opt-in real-data test (CIFARKIT_DATA)."""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import json
import math
import os
import re
import socket
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cifarkit.cli.eval import main
from cifarkit.errors import CifarkitError
from cifarkit.evaluation import (
    LoadedModel,
    accuracy,
    bootstrap_interval,
    brier_score,
    calibration_counts,
    column_order,
    confusion_matrix,
    expected_calibration_error,
    macro_average,
    mcnemar_exact,
    most_confused,
    negative_log_likelihood,
    open_labelled,
    per_class_scores,
    top_k_hits,
)
from cifarkit.evaluation.config import EvalConfig
from cifarkit.evaluation.run import Evaluation
from cifarkit.spec import CIFAR10_CLASSES, ArtifactMeta
from conftest import REAL_DATA, needs_real_data, synthetic_images

ROOT = Path(__file__).resolve().parents[1]


def evaluate_model(model, data, *, on_batch=None, model_b=None, **settings):
    """An Evaluation of `model` (and `model_b`) on `data`, run; on_batch sees every batch."""
    cfg = EvalConfig(model=str(model), data=str(data), model_b=str(model_b) if model_b else None, **settings)
    return Evaluation(cfg).run(on_batch)


# ---------------------------------------------------------------------------------------------------------
# Metrics on a hand-made confusion: 3 classes, 10 images
#
#   true \ predicted   0  1  2
#   0                  3  1  0
#   1                  1  2  0
#   2                  0  2  1
# ---------------------------------------------------------------------------------------------------------

Y_TRUE = np.array([0, 0, 0, 0, 1, 1, 1, 2, 2, 2])
Y_PRED = np.array([0, 0, 0, 1, 1, 1, 0, 2, 1, 1])
NAMES = ("cat", "dog", "fox")


def test_confusion_accuracy_and_per_class_scores_from_known_counts():
    cm = confusion_matrix(Y_TRUE, Y_PRED, 3)
    assert cm.tolist() == [[3, 1, 0], [1, 2, 0], [0, 2, 1]]
    assert accuracy(cm) == pytest.approx(6 / 10)
    scores = per_class_scores(cm, NAMES)
    # precision = diagonal / column sum, recall = diagonal / row sum, F1 = 2PR / (P + R), worked by hand
    assert [s.precision for s in scores] == pytest.approx([3 / 4, 2 / 5, 1 / 1])
    assert [s.recall for s in scores] == pytest.approx([3 / 4, 2 / 3, 1 / 3])
    assert [s.f1 for s in scores] == pytest.approx([0.75, 0.5, 0.5])
    assert [(s.support, s.correct, s.predicted) for s in scores] == [(4, 3, 4), (3, 2, 5), (3, 1, 1)]
    assert macro_average(scores) == pytest.approx(((0.75 + 0.4 + 1) / 3, (0.75 + 2 / 3 + 1 / 3) / 3, 1.75 / 3))
    pairs = most_confused(cm, NAMES)
    assert [(p.true, p.predicted, p.count) for p in pairs] == [("fox", "dog", 2), ("cat", "dog", 1), ("dog", "cat", 1)]
    assert pairs[0].fraction == pytest.approx(2 / 3)


def test_per_class_scores_without_images_or_predictions_are_undefined_not_zero():
    cm = confusion_matrix(np.array([0, 0, 1]), np.array([0, 1, 1]), 3)  # class 2: no images, never predicted
    s = per_class_scores(cm, NAMES)
    assert (s[2].precision, s[2].recall, s[2].f1) == (None, None, None)
    assert macro_average(s)[1] == pytest.approx((1 / 2 + 1) / 2)  # over the classes that have images only
    never = per_class_scores(confusion_matrix(np.array([0, 1]), np.array([1, 1]), 2), NAMES[:2])
    assert never[0].precision is None and never[0].recall == 0.0 and never[0].f1 is None
    assert macro_average(never)[0] == pytest.approx((0.0 + 0.5) / 2)  # never predicted counts as 0


def test_ece_by_hand_and_bin_edges():
    # Two images at 0.9 (one right) in bin (13/15, 14/15]; two at 0.3 (both right) in bin (4/15, 5/15].
    conf = np.array([0.9, 0.9, 0.3, 0.3])
    correct = np.array([True, False, True, True])
    assert expected_calibration_error(conf, correct) == pytest.approx(0.5 * abs(0.5 - 0.9) + 0.5 * abs(1.0 - 0.3))
    counts = calibration_counts(conf, correct)
    assert counts[0, 13] == 2 and counts[0, 4] == 2 and counts[0].sum() == 4
    edges = calibration_counts(np.array([0.0, 1 / 15, 1 / 15 + 1e-9, 1.0]), np.ones(4, bool))
    assert edges[0].tolist() == [2, 1] + [0] * 12 + [1]  # (m-1)/15 < conf <= m/15; 0 in the first bin
    assert expected_calibration_error(np.ones(3), np.ones(3, bool)) == 0.0


def test_nll_and_brier_by_hand():
    probs = np.array([[0.5, 0.25, 0.25], [0.1, 0.8, 0.1]])
    y = np.array([0, 0])
    assert negative_log_likelihood(np.log(probs), y) == pytest.approx((math.log(2) + math.log(10)) / 2)
    # (0.5 - 1)^2 + 0.25^2 + 0.25^2 = 0.375 and (0.1 - 1)^2 + 0.8^2 + 0.1^2 = 1.46
    assert brier_score(probs, y) == pytest.approx((0.375 + 1.46) / 2)
    # a mistake so confident that its probability rounds to 0 in float32 still costs its real value
    assert negative_log_likelihood(np.array([[0.0, 200.0]], np.float32), np.array([0])) == pytest.approx(200.0)


def test_mcnemar_exact_by_hand():
    assert mcnemar_exact(1, 9) == pytest.approx(2 * (1 + 10) / 2**10)  # 2 * P(X <= 1), X ~ Bin(10, 1/2)
    assert mcnemar_exact(0, 6) == pytest.approx(2 / 2**6)
    assert mcnemar_exact(9, 1) == mcnemar_exact(1, 9)
    assert mcnemar_exact(5, 5) == 1.0 and mcnemar_exact(0, 0) == 1.0


def test_mcnemar_exact_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    for b, c in [(1, 9), (3, 17), (0, 25), (12, 13), (480, 530), (4_000, 4_180), (50_000, 50_600)]:
        assert mcnemar_exact(b, c) == pytest.approx(stats.binomtest(min(b, c), b + c, 0.5).pvalue, rel=1e-9, abs=1e-300)


def test_bootstrap_interval_is_seeded_and_matches_index_resampling():
    lo, hi = bootstrap_interval(6_937, 10_000)
    assert (lo, hi) == bootstrap_interval(6_937, 10_000)
    assert lo < 0.6937 < hi
    half = 1.96 * math.sqrt(0.6937 * 0.3063 / 10_000)  # the normal approximation's half width
    assert hi - lo == pytest.approx(2 * half, rel=0.05)
    outcomes = np.arange(1_000) < 700  # 700 of 1,000 right: the slow way, resampling indices
    idx = np.random.default_rng(1).integers(0, 1_000, size=(4_000, 1_000))
    slow = np.quantile(outcomes[idx].mean(axis=1), [0.025, 0.975])
    assert bootstrap_interval(700, 1_000) == pytest.approx(tuple(slow), abs=0.006)
    assert bootstrap_interval(0, 0) == (0.0, 0.0)


def test_top_k_ties_go_to_the_lower_index():
    logits = np.array([[1.0, 1.0, 0.0], [0.0, 2.0, 1.0]])
    assert top_k_hits(logits, np.array([1, 2]), 1).tolist() == [False, False]
    assert top_k_hits(logits, np.array([1, 2]), 2).tolist() == [True, True]


def _fake(names: tuple[str, ...], path: str = "m.onnx") -> LoadedModel:
    meta = ArtifactMeta(class_names=names, model_name="blog_cnn", mean=(0.5,) * 3, std=(0.5,) * 3)
    return LoadedModel(path, "onnx", meta, run=lambda b: (b, b))


def test_model_b_columns_are_put_in_model_a_class_order():
    assert column_order(_fake(NAMES), _fake(NAMES)) is None
    order = column_order(_fake(NAMES), _fake(("fox", "cat", "dog")))
    assert np.array([["fox", "cat", "dog"]])[:, order].tolist() == [list(NAMES)]
    with pytest.raises(CifarkitError, match="same classes"):
        column_order(_fake(NAMES), _fake(("cat", "dog", "owl"), "b.onnx"))


# ---------------------------------------------------------------------------------------------------------
# Labelled data sources
# ---------------------------------------------------------------------------------------------------------


def write_class_folders(root: Path, classes: dict[str, int], size: int = 32, seed: int = 0) -> Path:
    for k, (name, count) in enumerate(classes.items()):
        x, _ = synthetic_images(count, seed=seed + k, size=size)
        (root / name).mkdir(parents=True, exist_ok=True)
        for i, img in enumerate(x):
            Image.fromarray(img).save(root / name / f"{i:03d}.png")
    return root


def test_class_folders_subset_unknown_skip_and_empty(tmp_path):
    root = write_class_folders(tmp_path / "labelled", {"dog": 3, "cat": 2})
    data = open_labelled(str(root), NAMES)
    assert (data.kind, data.split, data.count, data.classes) == ("class-folders", None, 5, ("cat", "dog"))
    assert [(Path(name).parent.name, label) for name, _, label in data.items()] == [("cat", 0)] * 2 + [("dog", 1)] * 3
    write_class_folders(root, {"zebra": 1})
    with pytest.raises(CifarkitError, match=r"class folder .*zebra is not one of the model's classes.*--skip-unknown"):
        open_labelled(str(root), NAMES)
    skipped = open_labelled(str(root), NAMES, skip_unknown=True)
    assert skipped.count == 5 and any("zebra" in note for note in skipped.notes)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CifarkitError, match="is empty"):
        open_labelled(str(tmp_path / "empty"), NAMES)
    (tmp_path / "hollow" / "cat").mkdir(parents=True)
    with pytest.raises(CifarkitError, match="no images in the class folders"):
        open_labelled(str(tmp_path / "hollow"), NAMES)
    with pytest.raises(CifarkitError, match="does not exist"):
        open_labelled(str(tmp_path / "missing"), NAMES)


def test_imagefolder_root_split_and_batches_py(tmp_path, batches_py):
    root = tmp_path / "root"
    write_class_folders(root / "train", {"cat": 4, "dog": 4})
    write_class_folders(root / "test", {"cat": 2, "dog": 1})
    assert open_labelled(str(root), NAMES).count == 3
    train = open_labelled(str(root), NAMES, split="train")
    assert (train.kind, train.split, train.count) == ("imagefolder", "train", 8)
    with pytest.raises(CifarkitError, match="--split must be test or train"):
        open_labelled(str(root), NAMES, split="valid")
    arrays = open_labelled(str(batches_py), CIFAR10_CLASSES)
    name, pixels, label = next(arrays.items())
    assert (arrays.kind, arrays.count, name, pixels.shape) == ("batches-py", 200, "test[0]", (32, 32, 3))
    with pytest.raises(CifarkitError, match="class 'airplane'"):
        open_labelled(str(batches_py), NAMES)


# ---------------------------------------------------------------------------------------------------------
# Models: ONNX, TorchScript and the checkpoint on the same images
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def labelled(tmp_path_factory) -> Path:
    """Five of the ten CIFAR-10 classes, 48x48 PNGs (the models' resize rule applies), and one unreadable file."""
    root = write_class_folders(
        tmp_path_factory.mktemp("labelled"), {c: 7 for c in CIFAR10_CLASSES[:5]}, size=48, seed=3
    )
    (root / "bird" / "broken.png").write_bytes(b"not a png")
    return root


def test_three_model_kinds_give_the_same_figures_as_a_direct_computation(exported, trained_run, labelled):
    from cifarkit.infer import Classifier

    onnx = evaluate_model(exported.paths["onnx"], str(labelled), batch_size=8)
    files = sorted(p for p in labelled.rglob("*.png") if p.name != "broken.png")
    clf = Classifier.from_file(exported.paths["onnx"])
    logits, probs = clf.run(np.stack([clf.pixels(f) for f in files]))
    y = np.array([CIFAR10_CLASSES.index(f.parent.name) for f in files])
    pred = logits.argmax(1)
    a = onnx.models[0]
    assert (onnx.images, onnx.failed, a.kind) == (35, 1, "onnx") and "broken.png" in onnx.failures[0]
    assert np.array_equal(a.confusion, confusion_matrix(y, pred, 10))
    assert a.topk == pytest.approx(top_k_hits(logits, y, 5).mean())
    conf = probs[np.arange(len(y)), pred]
    assert a.calibration.ece == pytest.approx(expected_calibration_error(conf, pred == y), abs=1e-9)
    assert a.calibration.nll == pytest.approx(negative_log_likelihood(logits, y), rel=1e-9)
    assert a.calibration.brier == pytest.approx(brier_score(probs, y), rel=1e-9)
    assert [s.name for s in a.per_class if s.support] == list(CIFAR10_CLASSES[:5])
    assert len(a.mistakes) == min(24, 35 - a.correct)
    assert all(m.pixels.shape == (32, 32, 3) for m in a.mistakes)
    assert [m.probability for m in a.mistakes] == sorted((m.probability for m in a.mistakes), reverse=True)
    for path, kind in ((exported.paths["torchscript"], "torchscript"), (trained_run.checkpoint, "checkpoint")):
        other = evaluate_model(path, str(labelled), batch_size=8).models[0]
        assert other.kind == kind and np.array_equal(other.confusion, a.confusion)
        assert other.calibration.nll == pytest.approx(a.calibration.nll, abs=1e-5)


def test_compare_onnx_with_its_checkpoint(exported, trained_run, labelled):
    batches = []
    model, checkpoint = exported.paths["onnx"], str(trained_run.checkpoint)
    r = evaluate_model(model, str(labelled), model_b=checkpoint, on_batch=batches.append)
    c = r.comparison
    assert (c.images, c.agree, c.a_right_b_wrong, c.a_wrong_b_right, c.mcnemar_p) == (35, 35, 0, 0, 1.0)
    assert c.max_abs_dprob < 1e-4
    assert sum(len(b.sources) for b in batches) == 35 and sum(len(b.failures) for b in batches) == 1
    assert all(len(b.predicted) == 2 for b in batches if b.sources)
    d = json.loads(json.dumps(r.to_dict(), allow_nan=False))
    assert d["comparison"]["agreement"] == 1.0 and len(d["models"]) == 2 and "torch" in d["versions"]


# ---------------------------------------------------------------------------------------------------------
# The CLI
# ---------------------------------------------------------------------------------------------------------


def test_cli_prints_the_report_and_writes_every_output(exported, labelled, tmp_path, capsys):
    out = tmp_path / "deep" / "eval"
    code = main([str(exported.paths["onnx"]), "--data", str(labelled), "--out", str(out), "--progress", "none"])
    stdout, stderr = capsys.readouterr()
    assert code == 1  # the unreadable file is counted, named, and not fatal
    assert re.search(r"error: .*broken\.png", stderr) and "1 of 36 input(s) failed" in stderr
    assert re.search(r"top-1 accuracy +\d+\.\d\d %  \(95 % CI \d+\.\d\d-\d+\.\d\d %\)", stdout)
    assert "top-5 accuracy" in stdout and "macro average" in stdout and "ECE" in stdout and "Brier" in stdout
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["report.json", "predictions.csv", "confusion.png", "reliability.png", "mistakes.png"]
    )
    report = json.loads((out / "report.json").read_text())
    assert report["images"] == 35 and report["failed"] == 1 and report["data"]["kind"] == "class-folders"
    assert report["models"][0]["metadata"]["model_name"] == "blog_cnn" and report["versions"]["onnxruntime"]
    rows = list(csv.DictReader((out / "predictions.csv").open()))
    assert len(rows) == 35 and set(rows[0]) == {"path", "true", "predicted", "probability"}
    correct = sum(r["true"] == r["predicted"] for r in rows)
    assert correct == report["models"][0]["correct"]
    for name in ("confusion.png", "reliability.png", "mistakes.png"):
        with Image.open(out / name) as im:
            assert im.format == "PNG" and min(im.size) > 500
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temporary folder left


def _other_classes_onnx(src: Path, dest: Path) -> Path:
    import onnx

    model = onnx.load(str(src))
    for prop in model.metadata_props:
        if prop.key == "class_names":
            prop.value = json.dumps([f"thing{i}" for i in range(10)])
    onnx.save(model, str(dest))
    return dest


@pytest.mark.parametrize("case", ["unknown class", "empty data", "not an artifact", "foreign zip", "model b classes"])
def test_cli_bad_input_is_one_line_exit_2_and_nothing_written(case, exported, labelled, tmp_path, capsys):
    model, extra, data = str(exported.paths["onnx"]), [], str(labelled)
    if case == "unknown class":
        data = str(write_class_folders(tmp_path / "zoo", {"cat": 1, "zebra": 1}))
        expected = "zebra is not one of the model's classes"
    elif case == "empty data":
        (tmp_path / "nothing").mkdir()
        data, expected = str(tmp_path / "nothing"), "is empty"
    elif case == "not an artifact":
        (tmp_path / "model.onnx").write_text("hello")
        model, expected = str(tmp_path / "model.onnx"), "is not a valid ONNX model"
    elif case == "foreign zip":
        with zipfile.ZipFile(tmp_path / "model.pt", "w") as z:
            z.writestr("notes.txt", "hello")
        model, expected = str(tmp_path / "model.pt"), "not a TorchScript model.pt or a checkpoint.pt"
    else:
        extra = [str(_other_classes_onnx(exported.paths["onnx"], tmp_path / "other.onnx"))]
        expected = "two models are compared only on the same classes"
    out = tmp_path / "out"
    (tmp_path / "kept").mkdir()
    (tmp_path / "kept" / "report.json").write_text("old")
    for target in (out, tmp_path / "kept"):
        with pytest.raises(SystemExit) as exit_info:
            main([model, *extra, "--data", data, "--out", str(target), "--progress", "none"])
        assert exit_info.value.code == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], lines
    assert not out.exists() and [p.name for p in (tmp_path / "kept").iterdir()] == ["report.json"]
    assert (tmp_path / "kept" / "report.json").read_text() == "old"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_cli_failure_while_writing_leaves_nothing(exported, labelled, tmp_path, capsys, monkeypatch):
    def broken(report, folder):
        (folder / "report.json").write_text("{")
        raise RuntimeError("disk on fire")

    monkeypatch.setattr("cifarkit.evaluation.figures.write_report_files", broken)
    with pytest.raises(SystemExit) as exit_info:
        main([str(exported.paths["onnx"]), "--data", str(labelled), "--out", str(tmp_path / "eval")])
    assert exit_info.value.code == 1 and "RuntimeError: disk on fire" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_cli_interrupt_exits_130_and_removes_the_staging_folder(exported, labelled, tmp_path):
    """Ctrl-C while the files are being written (KeyboardInterrupt raised there, deterministically)."""
    code = (
        "import sys, cifarkit.cli.eval as e, cifarkit.evaluation.figures as f\n"
        "def stop(report, folder):\n"
        "    (folder / 'report.json').write_text('{')\n"
        "    raise KeyboardInterrupt\n"
        "f.write_report_files = stop\n"
        "from cifarkit.cli import console\n"
        "console(lambda: e.main(sys.argv[1:]))\n"
    )
    args = [str(exported.paths["onnx"]), "--data", str(labelled), "--out", str(tmp_path / "eval")]
    r = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120)
    assert r.returncode == 130 and r.stderr.strip().endswith("interrupted"), r.stderr[-2000:]
    assert list(tmp_path.iterdir()) == []


def test_cli_onnx_path_never_imports_torch(exported, labelled, tmp_path):
    """The real command in a fresh interpreter, with --out (so the plotting is covered): -X importtime lists
    every module it imports."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    cmd = [
        sys.executable,
        "-X",
        "importtime",
        str(Path(sys.executable).parent / "cifar-eval"),
        str(exported.paths["onnx"]),
    ]
    cmd += ["--data", str(labelled), "--out", str(tmp_path / "eval"), "--progress", "none"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env)
    assert r.returncode == 1, r.stderr[-2000:]  # the broken file
    imported = {line.split("|")[-1].strip() for line in r.stderr.splitlines() if line.startswith("import time:")}
    assert {"onnxruntime", "cifarkit.evaluation", "matplotlib.pyplot"} <= imported  # the check sees real imports
    assert not {m for m in imported if m == "torch" or m.startswith("torch.")}
    assert (tmp_path / "eval" / "mistakes.png").is_file()


# ---------------------------------------------------------------------------------------------------------
# The bundled sample and make demo's offline fallback
# ---------------------------------------------------------------------------------------------------------

SAMPLE = ROOT / "src" / "cifarkit" / "sample"


def test_sample_archive_is_what_its_readme_says():
    archive = SAMPLE / "cifar10-sample.tar.gz"
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()
    assert f"sha256  {digest}  cifar10-sample.tar.gz" in (SAMPLE / "README.md").read_text()
    assert archive.stat().st_size < 3.5e6
    with tarfile.open(archive) as tar:
        names = [m.name for m in tar.getmembers() if m.isfile()]
    for split, per in (("train", 800), ("test", 200)):
        for c in CIFAR10_CLASSES:
            assert sum(n.startswith(f"{split}/{c}/") and n.endswith(".jpg") for n in names) == per
    assert len(names) == 10_000


def test_sample_source_extracts_once_and_loads(tmp_path):
    from cifarkit.data import load_data, sample_root

    data = open_labelled("sample", CIFAR10_CLASSES, data_dir=str(tmp_path))
    assert (data.kind, data.count, data.classes) == ("sample", 2_000, CIFAR10_CLASSES)
    root = sample_root(tmp_path)
    stamp = (root / "test" / "cat" / "0000.jpg").stat().st_mtime_ns
    assert sample_root(tmp_path) == root and (root / "test" / "cat" / "0000.jpg").stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == [root.name]  # no temporary folder left
    arrays = load_data("sample", tmp_path)
    assert (arrays.train_x.shape, arrays.test_x.shape) == ((8_000, 32, 32, 3), (2_000, 32, 32, 3))
    assert arrays.classes == CIFAR10_CLASSES


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _demo_data(tmp_path: Path, **env_extra: str) -> subprocess.CompletedProcess:
    """scripts/demo_data.py with no network: every request goes through a proxy on a closed local port."""
    proxy = f"http://127.0.0.1:{_closed_port()}"
    drop = {"CIFARKIT_DATA", "no_proxy", "NO_PROXY", "PYTHONWARNINGS"}
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env |= {"CIFARKIT_CACHE": str(tmp_path / "cache"), "https_proxy": proxy, "HTTPS_PROXY": proxy} | env_extra
    script = ROOT / "scripts" / "demo_data.py"
    return subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60, env=env)


def test_demo_data_offline_falls_back_to_the_sample_with_one_line(tmp_path):
    r = _demo_data(tmp_path)
    assert r.returncode == 0 and r.stdout == "sample\n"
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "bundled sample of 10,000 real CIFAR-10 images" in lines[0]
    assert "CIFARKIT_DATA" in lines[0] and "unreachable" in lines[0]


def test_demo_data_prefers_cifarkit_data_then_a_cached_download(tmp_path):
    r = _demo_data(tmp_path, CIFARKIT_DATA="/data/cifar")
    assert (r.stdout, r.stderr) == ("/data/cifar\n", "")
    cached = tmp_path / "cache" / "torchvision" / "cifar-10-batches-py"
    cached.mkdir(parents=True)
    (cached / "data_batch_1").write_bytes(b"")
    r = _demo_data(tmp_path)
    assert (r.stdout, r.stderr) == ("torchvision\n", "")


def test_demo_data_probes_the_url_torchvision_downloads():
    from torchvision.datasets import CIFAR10

    spec = importlib.util.spec_from_file_location("demo_data", ROOT / "scripts" / "demo_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert CIFAR10.url == module.CIFAR10_URL


# ---------------------------------------------------------------------------------------------------------
# Real data (opt in: CIFARKIT_DATA)
# ---------------------------------------------------------------------------------------------------------


@needs_real_data
def test_real_test_split_matches_the_training_side_decoder_and_eager_model(exported, trained_run):
    """The 10,000 real test JPEGs streamed through cifar-eval's pipeline give the predictions of the eager model
    on the training data loader's decoded arrays."""
    from cifarkit.data import decode_files
    from cifarkit.model.checkpoint import Checkpoint

    batches = []
    r = evaluate_model(exported.paths["onnx"], REAL_DATA, on_batch=batches.append)
    assert (r.images, r.failed, r.data.kind) == (10_000, 0, "imagefolder")
    sources = [s for b in batches for s in b.sources]
    predicted = np.concatenate([b.predicted[0] for b in batches])
    eager, _ = Checkpoint.load(trained_run.checkpoint).deployed().run_numpy(decode_files(sources))
    assert predicted.tolist() == eager.argmax(1).tolist()
    assert r.models[0].correct == sum(
        CIFAR10_CLASSES[p] == Path(s).parent.name for s, p in zip(sources, predicted.tolist(), strict=True)
    )
