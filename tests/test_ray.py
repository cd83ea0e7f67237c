"""The Ray engine (cifarkit.infer.ray): the same answers as the local engine, row for row, on a local Ray
(one session-scoped `ray.init(num_cpus=2)`) and on an emulated two-node cluster; nothing lost or duplicated
when a worker process is killed mid-run; bad input is one line and exit 2."""

from __future__ import annotations

import csv
import io
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cifarkit.cli import infer as infer_cli
from cifarkit.files import Failure, iter_image_files
from cifarkit.infer import Classifier, Prediction
from cifarkit.infer.inputs import InputPlan
from cifarkit.pack import PackConfig, pack
from conftest import REAL_DATA, needs_real_data, run_cli, synthetic_images

ray = pytest.importorskip("ray")
BIN = Path(sys.executable).parent


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the whole session (it starts in ~5 s here), shut down at the end."""
    # address="local": a new Ray of our own, whatever cluster /tmp/ray records (a running or a stale one)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def model_path(exported) -> Path:
    return Path(exported.paths["onnx"])


@pytest.fixture(scope="module")
def odd(tmp_path_factory) -> Path:
    """Images that take every path of the decoder (fast JPEG path, Pillow for the rest) and broken files."""
    root = tmp_path_factory.mktemp("odd")
    x, _ = synthetic_images(12, seed=9, size=48)
    for i, img in enumerate(x[:6]):
        Image.fromarray(img).save(root / f"plain{i}.jpg", quality=90)
    Image.fromarray(np.kron(x[6], np.ones((15, 20, 1), np.uint8))).save(root / "big.jpg", quality=90)  # draft 1/8
    Image.fromarray(x[7]).save(root / "progressive.jpg", progressive=True)
    Image.fromarray(x[8]).convert("L").save(root / "gray.jpg")
    Image.fromarray(x[9]).convert("CMYK").save(root / "cmyk.jpg")
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(x[10][:, :30]).save(root / "rotated.jpg", exif=exif.tobytes())
    Image.fromarray(np.dstack([x[11], np.full((48, 48), 128, np.uint8)])).save(root / "alpha.png")
    Image.fromarray(x[0]).save(root / "anim.gif")
    (root / "broken.jpg").write_text("not an image\n" * 10)
    (root / "empty.png").write_bytes(b"")
    data = (root / "plain0.jpg").read_bytes()
    (root / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (root / os.fsdecode(b"na\xefve.jpg")).write_bytes(data)  # not UTF-8
    (root / ".hidden.jpg").write_bytes(data)
    return root


def cli(*args: object) -> tuple[int, str, str]:
    return run_cli(infer_cli.main, *args)


def same_results(got: list, want: list) -> None:
    """Row for row: the same source, label and top-k labels, probabilities within 1e-6; failures the same."""
    assert [r.source for r in got] == [r.source for r in want]
    for g, w in zip(got, want, strict=True):
        assert type(g) is type(w), (g, w)
        if isinstance(w, Failure):
            assert g.message == w.message
        else:
            assert (g.label, g.index) == (w.label, w.index) and abs(g.probability - w.probability) <= 1e-6
            assert [label for label, _ in g.top_k] == [label for label, _ in w.top_k]


def local_results(model_path: Path, paths: list) -> list:
    clf = Classifier.from_file(model_path)
    return list(clf.predict_paths(InputPlan.resolve(paths).items(), top_k=3))


def ray_engine(model_path: Path, actors: int = 2):
    from cifarkit.infer.ray import RayEngine

    return RayEngine.connect(Classifier.from_file(model_path), actors=actors)


# ---------------------------------------------------------------------------------------------------------
# The same answers as the local engine
# ---------------------------------------------------------------------------------------------------------


def test_ray_engine_equals_the_local_engine_on_folders_and_shards(ray_local, model_path, odd, tmp_path):
    pack(PackConfig(inputs=(str(odd),), out=str(tmp_path / "shards"), group_rows=4))
    paths = [odd, tmp_path / "shards", tmp_path / "missing.jpg"]
    want = local_results(model_path, paths)
    assert sum(isinstance(r, Failure) for r in want) == 7  # broken, empty, truncated (twice each), missing
    got = list(ray_engine(model_path).predict(InputPlan.resolve(paths), top_k=3, batch_size=5))
    same_results(got, want)


def test_cli_engine_ray_writes_what_the_local_engine_writes(ray_local, model_path, odd, tmp_path):
    local = cli(odd, "-m", model_path, "-f", "jsonl", "-k", "2")
    remote = cli(odd, "-m", model_path, "-f", "jsonl", "-k", "2", "--engine", "ray")
    assert remote == local and local[0] == 1  # the same rows, error lines and exit status
    import pyarrow.parquet as pq

    # --format parquet: the actors build the output tables; the folder must equal the local engine's
    code, _, err = cli(odd, "-m", model_path, "-f", "parquet", "-o", tmp_path / "ray", "-k", "3", "--engine", "ray")
    code_local, _, err_local = cli(odd, "-m", model_path, "-f", "parquet", "-o", tmp_path / "local", "-k", "3")
    assert (code, err) == (code_local, err_local) == (1, err_local) and err.count("error: ") == 3
    got, want = pq.read_table(tmp_path / "ray"), pq.read_table(tmp_path / "local")
    assert got.num_rows == len(list(iter_image_files([odd]))) and got.equals(want)


def test_dataset_api_paths_and_bytes(ray_local, model_path, odd, tmp_path):
    from cifarkit.infer.ray import classify_dataset

    files = [p for p in iter_image_files([odd]) if isinstance(p, str) and "na" not in os.path.basename(p)]
    want = {r.source: r for r in local_results(model_path, files)}
    by_path = classify_dataset(ray.data.from_items([{"path": f} for f in files]), model_path, top_k=3, actors=1)
    pack(PackConfig(inputs=tuple(map(str, files)), out=str(tmp_path / "shards")))
    by_bytes = classify_dataset(ray.data.read_parquet(str(tmp_path / "shards")), model_path.read_bytes(), top_k=3)
    for ds in (by_path, by_bytes):
        rows = ds.take_all()
        assert len(rows) == len(files)
        for row in rows:
            path = row["path"].decode() if isinstance(row["path"], bytes) else row["path"]
            w = want[path]
            if isinstance(w, Failure):
                assert row["error"] == w.message and row["label"] is None
            else:
                assert row["label"] == w.label and abs(row["probability"] - w.probability) <= 1e-6
                assert [t["label"] for t in row["top_k"]] == [label for label, _ in w.top_k]


@needs_real_data
def test_real_test_set(ray_local, model_path):
    test = Path(REAL_DATA, "test")
    want = local_results(model_path, [test])
    assert len(want) == 10_000 and all(isinstance(r, Prediction) for r in want)
    same_results(list(ray_engine(model_path).predict(InputPlan.resolve([test]), top_k=3, batch_size=128)), want)


# ---------------------------------------------------------------------------------------------------------
# Faults
# ---------------------------------------------------------------------------------------------------------


def test_a_killed_worker_process_loses_and_duplicates_nothing(ray_local, model_path, odd, tmp_path, monkeypatch):
    from cifarkit.infer import ray as re_

    marker = str(tmp_path / "killed-once")

    class KillOnce(re_.UnitPredictor):
        """Kills its own process (SIGKILL: no cleanup, as the OOM killer or a lost node would) the first time
        it is handed the third unit; Ray restarts the actor and retries the task."""

        def __call__(self, batch):
            import pickle

            unit = pickle.loads(batch.column("unit")[0].as_py())
            if unit[0] == "files" and str(unit[2][0]).endswith("plain2.jpg") and not os.path.exists(marker):
                Path(marker).write_text(str(os.getpid()))
                os.kill(os.getpid(), signal.SIGKILL)
            return super().__call__(batch)

    monkeypatch.setattr(re_, "UNIT_IMAGES", 2)  # 10 units, so that the kill lands mid-run
    want = local_results(model_path, [odd])
    got = list(ray_engine(model_path).predict(InputPlan.resolve([odd]), top_k=3, batch_size=4, predictor=KillOnce))
    assert os.path.exists(marker)  # the worker did die
    same_results(got, want)  # every input once, in order


# ---------------------------------------------------------------------------------------------------------
# An emulated two-node cluster, reached with --ray-address
# ---------------------------------------------------------------------------------------------------------


def test_two_node_cluster_through_ray_address(model_path, odd, tmp_path):
    out = tmp_path / "cluster.csv"
    # Its own short temp folder (sockets live there): the cluster must not record itself in /tmp/ray, where a
    # later `ray.init()` on this machine would find it gone.
    ray_tmp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    script = textwrap.dedent(
        f"""
        import subprocess, sys
        from ray.cluster_utils import Cluster
        head = {{"num_cpus": 1, "temp_dir": {ray_tmp!r}}}
        cluster = Cluster(initialize_head=True, connect=False, head_node_args=head)
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        try:
            cmd = [{str(BIN / "cifar-infer")!r}, {str(odd)!r}, "-m", {str(model_path)!r}, "-f", "csv", "-k", "2",
                   "--engine", "ray", "--ray-address", cluster.address, "--ray-actors", "2", "-o", {str(out)!r}]
            sys.exit(subprocess.run(cmd).returncode)
        finally:
            cluster.shutdown()
        """
    )
    try:
        proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert proc.returncode == 1, proc.stderr[-2000:]  # the broken files
    local = cli(odd, "-m", model_path, "-f", "csv", "-k", "2")[1]
    assert out.read_text() == local
    assert len(list(csv.DictReader(io.StringIO(local)))) == 14  # and 3 broken files


# ---------------------------------------------------------------------------------------------------------
# Bad input: one line, exit 2, nothing written
# ---------------------------------------------------------------------------------------------------------


def test_bad_engine_options(model_path, odd, tmp_path):
    for args, message in (
        (["--engine", "spark"], "--engine must be one of local, ray, http, got 'spark'"),
        (["--ray-address", "localhost:6379"], "--ray-address and --ray-actors go with --engine ray"),
        (["--engine", "ray", "--ray-actors", "0"], "--ray-actors must be at least 1"),
        (["--engine", "ray", "--device", "cuda"], "--engine ray runs the model on the actors' CPUs"),
    ):
        code, out, err = cli(odd, "-m", model_path, *args)
        assert code == 2 and out == "" and err.splitlines() == [f"error: {err[7:].strip()}"] and message in err


def test_unreachable_ray_address(model_path, odd, tmp_path):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = (odd, "-m", model_path, "--engine", "ray", "--ray-address", f"127.0.0.1:{port}")
    code, out, err = cli(*args, "-f", "parquet", "-o", tmp_path / "p")
    assert code == 2 and out == "" and len(err.splitlines()) == 1
    assert f"--ray-address 127.0.0.1:{port}: cannot reach" in err and not (tmp_path / "p").exists()
    code, _, err = cli(odd, "-m", model_path, "--engine", "ray", "--ray-address", "nonsense")
    assert code == 2 and "expected HOST:PORT" in err


def test_ray_not_installed(model_path, odd, tmp_path):
    fake = tmp_path / "fake" / "ray"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('No module named ray')\n")
    env = {**os.environ, "PYTHONPATH": str(fake.parent)}
    cmd = [BIN / "cifar-infer", odd, "-m", model_path, "--engine", "ray", "-o", tmp_path / "out.csv"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr == "error: --engine ray needs Ray: pip install 'cifarkit[ray]'\n"
    assert not (tmp_path / "out.csv").exists()


def test_output_folder_exists_and_unreadable_shard_with_ray(ray_local, model_path, odd, tmp_path):
    (tmp_path / "p").mkdir()
    code, _, err = cli(odd, "-m", model_path, "--engine", "ray", "-f", "parquet", "-o", tmp_path / "p")
    assert code == 2 and "already exists" in err and os.listdir(tmp_path / "p") == []
    (tmp_path / "bad.parquet").write_bytes(b"not parquet at all")
    code, _, err = cli(odd, tmp_path / "bad.parquet", "-m", model_path, "--engine", "ray", "-o", tmp_path / "o.csv")
    assert code == 2 and "bad.parquet cannot be read" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "o.csv").exists()


def test_the_local_engine_never_imports_ray_or_pyarrow():
    code = "import sys, cifarkit.cli.infer; print(sorted({'ray', 'pyarrow'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
