"""What an inference run needs: `InferConfig` and its checks. No numpy, no onnxruntime: `cifar-infer` builds its
options from this dataclass and answers a bad option before it loads anything.

    cfg = InferConfig(inputs=("photos/",), model="model.onnx", format="csv", output="predictions.csv")
"""

from __future__ import annotations

from dataclasses import dataclass

from cifarkit.errors import CifarkitError
from cifarkit.files import MAX_THREADS
from cifarkit.infer.providers import DEVICES
from cifarkit.stage import argument, option

# Images per onnxruntime call and per decoding task. Measured on the 2 shared cores of the development machine
# (5,000 real test JPEGs, 3 decoding threads): 310-330 us of CPU per image at batch 16-32, 175-235 us at 64-512,
# where the differences were within the noise. 128 rather than 512: a short run still splits into enough
# batches to keep every decoding thread busy, and the first rows come out sooner.
DEFAULT_BATCH_SIZE = 128
MAX_BATCH_SIZE = 4096  # images per call at most: the blog CNN's activations are ~100 KB an image
# Seconds a model may take to answer its load-time check (one image): airbench with its 6-pass TTA takes ~0.02 s
# on a 2-core CPU; a graph that spins for ever (a crafted Loop) is refused after this long instead of hanging.
DEFAULT_LOAD_TIMEOUT_S = 30.0
LOAD_TIMEOUT_HELP = "Seconds the model may take to answer one image when it is loaded (its check); 0: no limit."
FORMATS = ("table", "csv", "json", "jsonl", "parquet")
ENGINES = ("local", "ray", "http")


@dataclass(frozen=True)
class InferConfig:
    """One inference run: `inputs` classified by `model` on `engine`, written in `format` to `output` (None: the
    caller's stream). Each option's flag is cifar-infer's."""

    inputs: tuple[str, ...] = argument(
        metavar="PATH",
        help="Image files and folders (folders are walked recursively, sorted), Parquet shards from cifar-pack (a "
        ".parquet file or a folder of them), or URIs pyarrow reads (s3://, gs://, hdfs://, file://).",
    )
    model: str | None = option(  # the command line's default: $CIFARKIT_MODEL, else ./model.onnx
        None,
        "--model",
        "-m",
        help="Exported model.onnx, or a folder holding one. Default: $CIFARKIT_MODEL, else ./model.onnx.",
    )
    top_k: int = option(1, "--top-k", "-k", help="Show the K most likely classes for each image.")
    format: str = option(  # noqa: A003
        "table",
        "--format",
        "-f",
        help="table (readable, the default), csv, json, jsonl, or parquet (a folder of part files, --output "
        "FOLDER, with a row for every input, failed ones included).",
    )
    output: str | None = option(  # None: stdout
        None,
        "--output",
        "-o",
        help="Write results to FILE (atomically; a device, a FIFO or stdout itself is written directly) instead of "
        "stdout; with --format parquet, a new FOLDER.",
    )
    batch_size: int = option(DEFAULT_BATCH_SIZE, "--batch-size", help="Images per model call.")
    threads: int | None = option(  # decoding threads; None: cores + 1
        None, "--threads", help="Decoding threads; 0 decodes in the main thread. Default: cores + 1."
    )
    device: str = option(
        "auto",
        "--device",
        help="Where onnxruntime runs the model: auto (TensorRT, then CUDA, then the CPU, as the installed "
        "onnxruntime offers; the CPU with the standard onnxruntime package), cpu, cuda or tensorrt (cuda and "
        "tensorrt need onnxruntime-gpu in place of onnxruntime).",
    )
    engine: str = option(
        "local",
        "--engine",
        help="local (this process, the default), ray (actors on a Ray cluster: pip install 'cifarkit[ray]') or http "
        "(a running cifar-serve at --url).",
    )
    ray_address: str | None = option(
        None,
        "--ray-address",
        help="With --engine ray: the cluster (HOST:PORT of `ray start --head`, ray://HOST:PORT, or auto). "
        "Default: $RAY_ADDRESS, else a cluster started on this machine, else a new local Ray.",
    )
    ray_actors: int | None = option(
        None, "--ray-actors", help="With --engine ray: actors, 1 CPU each. Default: one per CPU."
    )
    url: str | None = option(
        None,
        "--url",
        help="With --engine http: the running cifar-serve, e.g. http://127.0.0.1:8000 (--threads: requests in flight, "
        "default 4; --batch-size: images per request).",
    )
    load_timeout: float = option(DEFAULT_LOAD_TIMEOUT_S, "--load-timeout", help=LOAD_TIMEOUT_HELP)  # seconds

    def validate(self) -> None:
        """The options' own rules, before the model is loaded (CifarkitError naming the option)."""
        if not self.inputs:
            raise CifarkitError("no inputs: give image files, folders, shards or URIs")
        if self.model is None and self.engine != "http":  # with http, the model is the server's
            raise CifarkitError("no model: give the exported model.onnx (or a folder holding one)")
        if self.format not in FORMATS:
            raise CifarkitError(f"--format must be one of {', '.join(FORMATS)}, got {self.format!r}")
        if not 1 <= self.batch_size <= MAX_BATCH_SIZE:
            raise CifarkitError(f"--batch-size must be 1 to {MAX_BATCH_SIZE}, got {self.batch_size}")
        if self.threads is not None and not 0 <= self.threads <= MAX_THREADS:
            raise CifarkitError(f"--threads must be 0 to {MAX_THREADS}, got {self.threads}")
        if self.top_k < 1:
            raise CifarkitError(f"--top-k must be at least 1, got {self.top_k}")
        check_load_timeout(self.load_timeout)
        if self.device not in DEVICES:
            raise CifarkitError(f"--device must be one of {', '.join(DEVICES)}, got {self.device!r}")
        self._check_engine()
        from cifarkit.infer.outputs import check_output, check_output_folder

        if self.format == "parquet":
            check_output_folder(self.output)
        elif self.output is not None:
            check_output(self.output, self.inputs)

    def _check_engine(self) -> None:
        if self.engine not in ENGINES:
            raise CifarkitError(f"--engine must be one of {', '.join(ENGINES)}, got {self.engine!r}")
        if self.engine != "ray" and (self.ray_address is not None or self.ray_actors is not None):
            raise CifarkitError("--ray-address and --ray-actors go with --engine ray")
        if self.ray_actors is not None and self.ray_actors < 1:
            raise CifarkitError(f"--ray-actors must be at least 1, got {self.ray_actors}")
        if self.engine in ("ray", "http") and self.device not in ("auto", "cpu"):
            where = "the actors' CPUs" if self.engine == "ray" else "the server"
            raise CifarkitError(
                f"--engine {self.engine} runs the model on {where}; --device {self.device} is for the local engine"
            )
        if self.engine == "http" and self.url is None:
            raise CifarkitError("--engine http needs --url, the running cifar-serve (e.g. http://127.0.0.1:8000)")
        if self.url is not None:
            if self.engine != "http":
                raise CifarkitError("--url goes with --engine http")
            check_url(self.url)


def check_url(url: str) -> tuple[str, str, int]:
    """(scheme, host, port) of a cifar-serve URL (http:// or https://, a host, an optional port, no query), or a
    CifarkitError naming --url."""
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError as exc:
        raise CifarkitError(f"--url {url!r}: {exc}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment:
        raise CifarkitError(f"--url must look like http://HOST:PORT (the cifar-serve address), got {url!r}")
    if parts.path.strip("/"):
        raise CifarkitError(f"--url is the server's address without a path (http://HOST:PORT), got {url!r}")
    return parts.scheme, parts.hostname, port


def check_load_timeout(seconds: float) -> None:
    if not (0 <= seconds <= 86_400):  # NaN fails both
        raise CifarkitError(f"--load-timeout must be 0 (no limit) to 86,400 seconds, got {seconds}")
