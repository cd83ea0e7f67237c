"""The README's Python snippets run as printed (in a fresh interpreter, in a folder laid out as `make demo`
leaves runs/demo/): the two engines through one call give the same rows, and evaluate() writes what
`cifar-eval --out` writes."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import write_imagefolder

README = Path(__file__).resolve().parents[1] / "README.md"


def snippets() -> list[str]:
    """The python blocks of the README's section "From Python: the same stages, one call each"."""
    text = README.read_text()
    section = text[text.index("### From Python") : text.index("### Embedding the model")]
    return re.findall(r"```python\n(.*?)```", section, re.S)


@pytest.fixture
def demo(tmp_path, exported) -> Path:
    """A folder with runs/demo/model.onnx and runs/demo/samples/, as make demo leaves them."""
    run = tmp_path / "runs" / "demo"
    run.mkdir(parents=True)
    shutil.copy(exported.paths["onnx"], run / "model.onnx")
    images = write_imagefolder(tmp_path / "imgs", per_class_train=2, per_class_test=1, fmt="jpg") / "train"
    shutil.copytree(images, run / "samples")
    return tmp_path


def run_snippet(code: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, RAY_ADDRESS="")  # a local Ray of the snippet's own, stopped when it closes
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=300, env=env)


def test_the_readme_has_the_two_snippets():
    engines, evaluation = snippets()
    assert 'open_engine("runs/demo/model.onnx", engine=name)' in engines
    assert "evaluate(EvalConfig(" in evaluation


def test_both_engines_through_the_same_call(demo):
    r = run_snippet(snippets()[0], demo)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = dict(line.split(" ", 1) for line in r.stdout.strip().splitlines())
    assert set(lines) == {"local", "ray"} and lines["local"] == lines["ray"] and "samples/class0/" in lines["local"]


def test_evaluate_reproduces_cifar_eval_out(demo):
    r = run_snippet(snippets()[1], demo)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "top-1 accuracy" in r.stdout and "calibration: ECE" in r.stdout
    out = demo / "runs" / "demo" / "eval-py"
    names = ["confusion.png", "mistakes.png", "predictions.csv", "reliability.png", "report.json"]
    assert sorted(p.name for p in out.iterdir()) == names
    assert len((out / "predictions.csv").read_text().splitlines()) == 2001  # the bundled sample's test split
