"""Parquet in and out (cifarkit.shards): cifar-pack's shards (bounded, in walk order, exact bytes and names,
atomic), the local engine reading them and URIs, and `--format parquet` (a row for every input, failed ones
included; the folder appears only when complete). The Ray engine reads the same shards (tests/test_ray.py)."""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from cifarkit import pack as pack_module
from cifarkit import shards
from cifarkit.cli import infer as infer_cli
from cifarkit.cli import pack as pack_cli
from cifarkit.errors import CifarkitError
from cifarkit.escape import escape_name, unescape_name
from cifarkit.files import Failure, iter_image_files
from cifarkit.infer import Prediction
from cifarkit.infer.sinks import PredictionParts, PredictionRows
from cifarkit.pack import PackConfig, pack
from conftest import run_cli, synthetic_images

NON_UTF8 = os.fsdecode(b"caf\xe9 \xff.jpg")  # a file name that is not UTF-8: Python carries it as surrogates


@pytest.fixture(scope="module")
def model_path(exported) -> Path:
    return Path(exported.paths["onnx"])


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    """Nested folders of images in assorted formats and sizes, a broken and an empty image, a hidden file, a
    text file, and a name that is not UTF-8."""
    root = tmp_path_factory.mktemp("tree") / "photos"
    x, _ = synthetic_images(20, seed=5, size=40)
    for i, img in enumerate(x):
        folder = root / ("a" if i < 8 else "b/c" if i < 14 else "b")
        folder.mkdir(parents=True, exist_ok=True)
        ext = ("jpg", "png", "jpeg", "bmp")[i % 4]
        Image.fromarray(img if i % 3 else np.kron(img, np.ones((3, 2, 1), np.uint8))).save(folder / f"{i:02d}.{ext}")
    (root / "a" / "broken.jpg").write_text("not an image\n" * 10)
    (root / "a" / "empty.png").write_bytes(b"")
    (root / "a" / ".hidden.jpg").write_bytes((root / "a" / "00.jpg").read_bytes())
    (root / "a" / "notes.txt").write_text("skipped: not an image extension")
    (root / "b" / NON_UTF8).write_bytes((root / "a" / "00.jpg").read_bytes())
    return root


def pack_into(inputs, out, **settings):
    return pack(PackConfig(inputs=tuple(map(str, inputs)), out=str(out), **settings))


def walk(root: Path) -> list[str]:
    return [p for p in iter_image_files([root]) if isinstance(p, str)]


cli = run_cli  # (main, *args) -> (exit status, stdout, stderr)


def read_shards(folder: Path) -> tuple[list[str], list[bytes]]:
    names, blobs = [], []
    for f in sorted(folder.glob("*.parquet")):
        t = pq.read_table(f)
        names += [os.fsdecode(p) for p in t["path"].to_pylist()]
        blobs += t["bytes"].to_pylist()
    return names, blobs


# ---------------------------------------------------------------------------------------------------------
# cifar-pack
# ---------------------------------------------------------------------------------------------------------


def test_pack_writes_bounded_shards_in_walk_order_with_exact_names_and_bytes(tree, tmp_path):
    summary = pack_into([tree], tmp_path / "shards", shard_rows=7, group_rows=3)
    files = walk(tree)
    assert summary.files == len(files) == 23 and summary.failed == 0
    names, blobs = read_shards(tmp_path / "shards")
    assert names == files  # walk order; the non-UTF-8 name round-trips exactly
    assert blobs == [Path(f).read_bytes() for f in files]
    parts = sorted((tmp_path / "shards").glob("*.parquet"))
    assert len(parts) == 4  # 23 images, 7 a shard
    for part in parts:
        meta = pq.ParquetFile(part).metadata
        assert meta.num_rows <= 7 and all(meta.row_group(i).num_rows <= 3 for i in range(meta.num_row_groups))
        assert pq.ParquetFile(part).schema_arrow.field("path").type == pa.binary()
    manifest = json.loads((tmp_path / "shards" / shards.MANIFEST).read_text())
    assert manifest["files"] == 23 and [s["rows"] for s in manifest["shards"]] == [7, 7, 7, 2]


def test_shard_and_group_byte_limits(tree, tmp_path):
    sizes = [os.path.getsize(f) for f in walk(tree)]
    limit = 3 * max(sizes)
    pack_into([tree], tmp_path / "shards", shard_bytes=limit, group_bytes=max(sizes))
    parts = sorted((tmp_path / "shards").glob("*.parquet"))
    assert len(parts) >= 2
    for part in parts:
        assert sum(map(len, pq.read_table(part)["bytes"].to_pylist())) <= limit
        f = pq.ParquetFile(part)
        for i in range(f.metadata.num_row_groups):
            assert sum(map(len, f.read_row_group(i)["bytes"].to_pylist())) <= max(sizes)


def test_pack_folder_appears_only_when_complete(tree, tmp_path, monkeypatch):
    calls = []
    real = pack_module._ShardWriter._write_group

    def failing(self):
        calls.append(1)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        real(self)

    monkeypatch.setattr(pack_module._ShardWriter, "_write_group", failing)
    with pytest.raises(CifarkitError, match=r"^--out: cannot write into .*shards \(No space left on device\)$"):
        pack_into([tree], tmp_path / "shards", group_rows=2)
    assert sorted(os.listdir(tmp_path)) == []  # no output folder, no temporary folder left

    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    with pytest.raises(CifarkitError, match="already exists"):
        pack_into([tree], tmp_path / "taken")
    assert os.listdir(tmp_path / "taken") == ["keep.txt"]


def test_cifar_pack_cli(tree, tmp_path):
    fifo = tmp_path / "in" / "pipe.jpg"
    fifo.parent.mkdir()
    os.mkfifo(fifo)  # read_regular refuses it at once: packing never blocks on a FIFO
    Image.new("RGB", (32, 32), (1, 2, 3)).save(tmp_path / "in" / "ok.png")
    code, out, err = cli(pack_cli.main, tmp_path / "in", tree / "a", "--out", tmp_path / "s", "--shard-size", "1M")
    assert code == 1, err
    assert out.startswith("packed 11 files") and "1 shard(s)" in out  # broken images are packed as they are
    lines = err.splitlines()
    assert lines[0] == f"error: {fifo}: is a FIFO (named pipe), expected a regular file" and len(lines) == 2

    for nothing, why in ((tmp_path / "nothing", "no such file or folder"), (tmp_path / "in" / "pipe.jpg", "FIFO")):
        code, out, err = cli(pack_cli.main, nothing, "--out", tmp_path / "s2")
        assert code == 2 and err.startswith(f"error: nothing to pack: {nothing}: ") and why in err
        assert len(err.splitlines()) == 1 and not (tmp_path / "s2").exists()
    code, _, err = cli(pack_cli.main, tree, "--out", tmp_path / "s3", "--shard-size", "lots")
    assert code == 2 and "--shard-size" in err and len(err.splitlines()) == 1
    code, _, err = cli(pack_cli.main, tree, "--out", tmp_path / "s")  # exists
    assert code == 2 and "already exists" in err


# ---------------------------------------------------------------------------------------------------------
# Reading shards and URIs with the local engine
# ---------------------------------------------------------------------------------------------------------


def test_shards_classify_exactly_like_the_folder(model_path, tree, tmp_path):
    pack_into([tree], tmp_path / "shards", shard_rows=5, group_rows=2)
    code_a, out_a, err_a = cli(infer_cli.main, tree, "-m", model_path, "-f", "csv", "-k", "3")
    code_b, out_b, err_b = cli(infer_cli.main, tmp_path / "shards", "-m", model_path, "-f", "csv", "-k", "3")
    assert code_a == code_b == 1  # the broken and the empty image
    assert out_a == out_b and err_a == err_b
    assert "broken.jpg: not an image" in err_a and "empty.png: empty file" in err_a
    # one shard file named directly, and shards mixed with a folder, in the order given
    first = sorted((tmp_path / "shards").glob("*.parquet"))[0]
    code, out, _ = cli(infer_cli.main, first, tree / "a", "-m", model_path, "-f", "csv")
    paths = [row["path"] for row in csv.DictReader(io.StringIO(out))]
    readable = [p for p in walk(tree / "a") if not p.endswith(("broken.jpg", "empty.png"))]
    assert code == 1 and paths == [p for p in walk(tree)[:5] if p in readable] + readable


def test_uri_inputs_read_through_pyarrow_filesystems(model_path, tree):
    # pyarrow cannot list a non-UTF-8 name (object store keys are UTF-8): one line, exit 2, nothing else
    code, out, err = cli(infer_cli.main, f"file://{tree}/", "-m", model_path, "-f", "csv")
    assert code == 2 and out == "" and "not UTF-8" in err and len(err.splitlines()) == 1
    tree = tree / "a"
    uri = f"file://{tree}/"
    code, out, err = cli(infer_cli.main, uri, "-m", model_path, "-f", "csv")
    local = cli(infer_cli.main, tree, "-m", model_path, "-f", "csv")[1]
    rows, want = list(csv.DictReader(io.StringIO(out))), list(csv.DictReader(io.StringIO(local)))
    assert [r["path"] for r in rows] == [f"file://{r['path']}" for r in want]
    assert [(r["label"], r["probability"]) for r in rows] == [(r["label"], r["probability"]) for r in want]
    assert code == 1 and f"file://{tree}/broken.jpg: not an image" in err
    code, _, err = cli(infer_cli.main, f"file://{tree}/01.png", "-m", model_path, "-f", "csv")  # one object
    assert code == 0 and f"file://{tree}/01.png," in _
    code, _, err = cli(infer_cli.main, "nosuchscheme://x/y", "-m", model_path)
    assert code == 2 and len(err.splitlines()) == 1 and "nosuchscheme://x/y: cannot open" in err


def test_unreadable_shards_are_a_usage_error_and_nothing_is_written(model_path, tree, tmp_path):
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 this is not parquet PAR1")
    pq.write_table(pa.table({"file": ["a"], "data": [b"x"]}), tmp_path / "other.parquet")
    for shard, message in (("bad.parquet", "cannot be read"), ("other.parquet", "has columns ['file', 'data']")):
        code, out, err = cli(infer_cli.main, tree, tmp_path / shard, "-m", model_path, "-o", tmp_path / "out.csv")
        assert code == 2 and out == ""
        assert err.splitlines() == [err.strip()] and message in err and shard in err
        assert not (tmp_path / "out.csv").exists()


# ---------------------------------------------------------------------------------------------------------
# --format parquet
# ---------------------------------------------------------------------------------------------------------


def test_parquet_output_has_every_input_once_with_its_error(model_path, tree, tmp_path):
    out = tmp_path / "preds"
    code, stdout, err = cli(
        infer_cli.main, tree, tmp_path / "missing.jpg", "-m", model_path, "-f", "parquet", "-o", out, "-k", "2"
    )
    assert code == 1 and stdout == ""
    table = pq.read_table(out)
    rows = table.to_pylist()
    assert [r["path"] for r in rows] == [escape_name(p) for p in walk(tree)] + [str(tmp_path / "missing.jpg")]
    failed = {unescape_name(r["path"]): r["error"] for r in rows if r["error"] is not None}
    assert set(failed) == {str(tree / "a" / "broken.jpg"), str(tree / "a" / "empty.png"), str(tmp_path / "missing.jpg")}
    assert all(r["label"] is None and r["top_k"] is None for r in rows if r["error"])
    assert any(r["path"].endswith("caf\\xe9 \\xff.jpg") for r in rows)  # the csv text of a non-UTF-8 name
    # the same answers as csv, to the float32 the model computed
    code, text, _ = cli(infer_cli.main, tree, "-m", model_path, "-f", "csv", "-k", "2")
    by_path = {r["path"]: r for r in rows}
    for row in csv.DictReader(io.StringIO(text)):
        got = by_path[row["path"]]
        assert got["label"] == row["label"] and got["index"] == int(row["index"])
        assert abs(got["probability"] - float(row["probability"])) < 1e-6
        assert [t["label"] for t in got["top_k"]] == [row["label"], row["label_2"]]
    assert table.schema.field("probability").type == pa.float32()


def test_parquet_output_usage_errors(model_path, tree, tmp_path):
    code, _, err = cli(infer_cli.main, tree, "-m", model_path, "-f", "parquet")
    assert code == 2 and "--output FOLDER" in err
    (tmp_path / "exists").mkdir()
    code, _, err = cli(infer_cli.main, tree, "-m", model_path, "-f", "parquet", "-o", tmp_path / "exists")
    assert code == 2 and "already exists" in err and len(err.splitlines()) == 1
    assert os.listdir(tmp_path / "exists") == []


def test_parquet_folder_appears_only_when_complete(model_path, tree, tmp_path, monkeypatch):
    seen = []
    real = PredictionParts.table

    def crash_late(self, t):
        seen.append(t)
        if len(seen) == 2:
            raise RuntimeError("simulated crash")
        real(self, t)

    monkeypatch.setattr(PredictionParts, "table", crash_late)
    monkeypatch.setattr("cifarkit.infer.protocol.TABLE_ROWS", 8)  # tables of 8 rows: the crash comes mid-run
    code, _, err = cli(infer_cli.main, tree, "-m", model_path, "-f", "parquet", "-o", tmp_path / "preds")
    assert code == 1 and "simulated crash" in err
    assert os.listdir(tmp_path) == []


def test_prediction_parts_roll_over(tmp_path):
    parts = PredictionParts(tmp_path, part_rows=5, group_rows=2)
    rows = PredictionRows(pa)
    for i in range(12):
        if i % 4 == 3:
            rows.add(Failure(f"f{i}", f"f{i}: broken"))
        else:
            rows.add(Prediction(f"f{i}", "cat", 3, 0.5, (("cat", 0.5),)))
        if i % 3 == 2:  # tables of 3 rows, as an engine hands them in
            parts.table(rows.table())
    parts.close()
    files = sorted(tmp_path.glob("*.parquet"))
    assert [pq.ParquetFile(f).metadata.num_rows for f in files] == [5, 5, 2]
    rows = pq.read_table(tmp_path).to_pylist()
    assert [r["path"] for r in rows] == [f"f{i}" for i in range(12)]
    assert [r["error"] is not None for r in rows] == [i % 4 == 3 for i in range(12)]
    empty = tmp_path / "empty"
    empty.mkdir()
    PredictionParts(empty).close()
    assert pq.read_table(empty).num_rows == 0  # an empty run still has the schema


def test_input_plan_without_shards_does_not_import_pyarrow():
    import subprocess
    import sys

    code = (
        "import sys; from cifarkit.infer.inputs import InputPlan; InputPlan.resolve(['.']); "
        "print('pyarrow' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
