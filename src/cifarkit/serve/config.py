"""What a serving run needs: `ServeConfig` and its checks. Pure Python (no numpy, no Ray): `cifar-serve` builds its
options from this dataclass and answers a bad option before it imports anything heavy.

    cfg = ServeConfig(model="runs/blog/model.onnx", port=8080, replicas=2)
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from cifarkit.errors import CifarkitError
from cifarkit.pack import parse_size
from cifarkit.stage import argument, option

# How HTTP reaches the replicas (docs/serving.md, "Where the time goes"):
#   direct: each replica serves HTTP itself on --host:--port (SO_REUSEPORT shares the port between the replicas
#           of a node); Ray Serve places, health-checks, restarts and scales them, and batches with @serve.batch.
#           Measured on 2 busy cores, 64 clients: ~3,200 requests/s, 0.2 ms of replica CPU a request.
#   proxy:  Ray Serve's own HTTP proxy in front (one per node), which forwards each request to a replica as an
#           actor call, and the replica calls the proxy back for the body: ~3 ms of proxy CPU and ~3 ms of
#           replica CPU a request, ~250 requests/s on the same machine. For clusters that want one proxy per
#           node in front of replicas anywhere, and requests queued (not refused) while a replica restarts.
INGRESS = ("direct", "proxy")
MAX_REPLICA_BATCH = 4096  # images per model call at most (cifarkit.infer.config.MAX_BATCH_SIZE)
MAX_BODY_BYTES = 1 << 30  # --max-bytes at most: a request body is held in memory while it is decoded
MIN_BODY_BYTES = 1 << 10
MAX_WAIT_MS = 10_000.0
_APP_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


@dataclass(frozen=True)
class ServeConfig:
    """One service: `model` behind HTTP on `host`:`port`, in `replicas` Ray Serve replicas of `replica_cpus` CPUs
    each (onnxruntime threads = the replica's CPUs), requests batched across clients up to `max_batch` images or
    `batch_wait_ms`, whichever comes first. Each option's flag is cifar-serve's."""

    model: str = argument(metavar="MODEL", help="Exported model.onnx, or a folder holding one.")
    host: str = option(
        "127.0.0.1",
        "--host",
        help="Interface to listen on; 0.0.0.0 for every interface (then put TLS and access control in front).",
    )
    port: int = option(8000, "--port", help="TCP port to listen on.")
    replicas: int = option(1, "--replicas", help="Replicas of the model, each one process with its own session.")
    replica_cpus: int = option(  # Ray's num_cpus per replica = onnxruntime's intra-op threads
        1,
        "--replica-cpus",
        help="CPUs Ray reserves for each replica, and its onnxruntime threads (spinning off). On 2 cores, 1 leaves "
        "the other core to HTTP, decoding and the clients.",
    )
    max_batch: int = option(64, "--max-batch", help="Images per model call at most, gathered across requests.")
    batch_wait_ms: float = option(  # milliseconds
        5.0,
        "--batch-wait-ms",
        help="Milliseconds a batch waits for more images once its first has arrived (0: run what is there).",
    )
    address: str | None = option(
        None,
        "--address",
        help="Deploy onto the running Ray cluster at HOST:PORT (`ray start --head`), ray://HOST:PORT or auto. "
        "Default: start a local Ray for this service, stopped when it ends.",
    )
    max_bytes: int = option(  # bytes of request body at most
        10 << 20,
        "--max-bytes",
        parse=parse_size,
        metavar="SIZE",
        help="Largest request body accepted (default 10M; K, M, G are binary units): a larger one is answered 413.",
    )
    ingress: str = option(
        "direct",
        "--ingress",
        help="direct (each replica answers HTTP itself: ~10x the requests/s on 2 cores) or proxy (Ray Serve's HTTP "
        "proxy in front of the replicas). See docs/serving.md.",
    )
    name: str = option("cifarkit", "--name", help="The Ray Serve application's name (one per model on a cluster).")
    quiet: bool = True  # library only: Ray's start-up notes and the replicas' logs are left out (cifar-serve --debug)

    def validate(self) -> None:
        """The options' own rules, before Ray or the model is loaded (CifarkitError naming the option)."""
        if not self.model:
            raise CifarkitError("no model: give the exported model.onnx (or a folder holding one)")
        if not self.host or any(c.isspace() for c in self.host):
            raise CifarkitError(f"--host must be an interface address or name, got {self.host!r}")
        if not 1 <= self.port <= 65_535:
            raise CifarkitError(f"--port must be 1 to 65535, got {self.port}")
        if not 1 <= self.replicas <= 1024:
            raise CifarkitError(f"--replicas must be 1 to 1024, got {self.replicas}")
        if not 1 <= self.replica_cpus <= 256:
            raise CifarkitError(f"--replica-cpus must be 1 to 256, got {self.replica_cpus}")
        if not 1 <= self.max_batch <= MAX_REPLICA_BATCH:
            raise CifarkitError(f"--max-batch must be 1 to {MAX_REPLICA_BATCH}, got {self.max_batch}")
        if not (math.isfinite(self.batch_wait_ms) and 0 <= self.batch_wait_ms <= MAX_WAIT_MS):
            raise CifarkitError(f"--batch-wait-ms must be 0 to {MAX_WAIT_MS:,.0f}, got {self.batch_wait_ms}")
        if not MIN_BODY_BYTES <= self.max_bytes <= MAX_BODY_BYTES:
            raise CifarkitError(f"--max-bytes must be 1K to 1G, got {self.max_bytes:,} bytes")
        if self.ingress not in INGRESS:
            raise CifarkitError(f"--ingress must be one of {', '.join(INGRESS)}, got {self.ingress!r}")
        if not _APP_NAME.fullmatch(self.name):
            raise CifarkitError(
                f"--name must be 1 to 64 letters, digits, '_', '.' or '-' (starting with a letter or digit), got "
                f"{self.name!r}"
            )
        if self.address is not None and not self.address.strip():
            raise CifarkitError("--address is empty: give HOST:PORT, ray://HOST:PORT or auto")

    @property
    def url(self) -> str:
        """Where clients reach the service on this machine (a wildcard host is reached on the loopback)."""
        host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(self.host, self.host)
        return f"http://[{host}]:{self.port}" if ":" in host else f"http://{host}:{self.port}"
