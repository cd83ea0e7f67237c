"""The Ray Serve application: replicas of one model, each with its own onnxruntime session (intra-op threads = the
replica's CPUs), requests batched across clients with @serve.batch, answered by cifarkit.serve.handler.

Imported only where Ray Serve runs (cifarkit.serve.run, and the replicas themselves): `pip install
'cifarkit[serve]'`.

    app = build_app(cfg, model_bytes, "model.onnx")
    serve.run(app, name=cfg.name, route_prefix=None if cfg.ingress == "direct" else "/")

With --ingress direct (the default) each replica answers HTTP itself, on an aiohttp server in its own event loop
bound to --host:--port with SO_REUSEPORT (the kernel spreads connections over the replicas of a node); Ray Serve
still places the replicas, checks their health, restarts a dead one and batches. With --ingress proxy, Ray
Serve's HTTP proxy forwards each request to a replica's __call__. Why both: docs/serving.md.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from ray import serve
from ray.serve.schema import LoggingConfig

from cifarkit.infer.classifier import Result
from cifarkit.serve.config import ServeConfig
from cifarkit.serve.direct import SHUTDOWN_S, DirectServer
from cifarkit.serve.handler import JSON_TYPE, Handler, run_batch


def deployment_options(cfg: ServeConfig) -> dict[str, Any]:
    """Ray Serve options for the replicas: their CPUs, how many requests Serve sends each (proxy ingress: at least
    two full batches, so that @serve.batch can gather one while the other runs, and 64+ clients are not queued in
    the proxy), quiet logs (no access log: a line per request in the replica's log file is work for nobody)."""
    return {
        "num_replicas": cfg.replicas,
        "ray_actor_options": {"num_cpus": cfg.replica_cpus},
        "max_ongoing_requests": max(256, 2 * cfg.max_batch),
        "logging_config": LoggingConfig(log_level="WARNING", enable_access_log=False),
        "graceful_shutdown_wait_loop_s": 0.5,
        "graceful_shutdown_timeout_s": SHUTDOWN_S + 5,
    }


def build_app(cfg: ServeConfig, model: bytes, model_file: str) -> Any:
    """The application to serve.run: `model` (the model file's bytes, shipped with the deployment, so the file
    need not exist where the replicas run)."""
    return ClassifierReplica.options(**deployment_options(cfg)).bind(cfg, model, model_file)


@serve.deployment
class ClassifierReplica:
    """One replica: the model, the batcher, the handler, and (direct ingress) its own HTTP server."""

    async def __init__(self, cfg: ServeConfig, model: bytes, model_file: str) -> None:
        from cifarkit.infer.ray import load_model  # the Ray engine's actors load a shipped model the same way

        self.clf = load_model(model, cfg.replica_cpus)
        self._batched.set_max_batch_size(cfg.max_batch)
        self._batched.set_batch_wait_timeout_s(cfg.batch_wait_ms / 1000)
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cifarkit-model")  # one model call at a time
        self.handler = Handler(self.clf, cfg, self.classify, replica_info(self.clf, cfg, model, model_file))
        self.server: DirectServer | None = None
        if cfg.ingress == "direct":
            self.server = await DirectServer.start(self.handler, cfg.host, cfg.port)

    async def classify(self, pixels: np.ndarray, top_k: int) -> Result:
        return await self._batched((pixels, top_k))

    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.005)  # set from the config in __init__
    async def _batched(self, items: list[tuple[np.ndarray, int]]) -> list[Result]:
        # In a thread: the event loop goes on reading and decoding the next requests while the model runs.
        return await asyncio.get_running_loop().run_in_executor(self.pool, run_batch, self.clf, items)

    async def __call__(self, request: Any) -> Any:
        """--ingress proxy: Ray Serve's proxy hands over a starlette Request."""
        from starlette.responses import Response

        url = request.url
        reply = await self.handler.handle(request.method, url.path, url.query, request.headers, request.stream())
        headers = dict(reply.headers)
        if reply.close:
            headers["Connection"] = "close"
        return Response(reply.body, status_code=reply.status, headers=headers, media_type=JSON_TYPE)

    def check_health(self) -> None:
        """Ray Serve's periodic check (every 10 s): a replica whose HTTP server has stopped is replaced."""
        if self.server is not None and not self.server.serving:
            raise RuntimeError("the replica's HTTP server has stopped")

    async def __del__(self) -> None:  # Ray Serve calls it when the replica stops (serve.shutdown, serve.delete)
        if getattr(self, "server", None) is not None:
            await self.server.close()


def replica_info(clf: Any, cfg: ServeConfig, model: bytes, model_file: str) -> dict[str, Any]:
    """What GET /v1/model answers: the model's own metadata (cifarkit.spec.ArtifactMeta.to_dict(): class names,
    input contract, resize rule, accuracy, export versions), the file, how it is served, and which process answers
    (`replica.pid`: the process to kill in a fault test)."""
    import ray

    from cifarkit.spec import versions

    return {
        **clf.meta.to_dict(),
        "model_file": model_file,
        "model_sha256": hashlib.sha256(model).hexdigest(),
        "model_bytes": len(model),
        "serving": {
            "max_batch": cfg.max_batch,
            "batch_wait_ms": cfg.batch_wait_ms,
            "max_bytes": cfg.max_bytes,
            "replicas": cfg.replicas,
            "replica_cpus": cfg.replica_cpus,
            "ingress": cfg.ingress,
            "endpoints": ["POST /v1/classify", "POST /v1/classify-batch", "GET /v1/model", "GET /healthz"],
        },
        "runtime": versions("onnxruntime", "numpy", "ray", "python"),
        "replica": {
            "pid": os.getpid(),
            "node": ray.util.get_node_ip_address(),
            "onnxruntime_threads": cfg.replica_cpus,
        },
    }
