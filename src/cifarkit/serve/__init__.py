"""Serving stage: ServeConfig -> serve(cfg, reporter) -> ServeResult: an exported model behind HTTP on Ray Serve,
requests from many clients batched into one model call (`cifar-serve`, docs/serving.md).

    from cifarkit.serve import ServeConfig, serve, start
    serve(ServeConfig(model="model.onnx", port=8080))          # blocks until Ctrl-C or SIGTERM
    with start(ServeConfig(model="model.onnx")) as service:    # or runs beside a program
        ...  # POST images to service.url + "/v1/classify"

    config.py     ServeConfig and its checks (pure Python)
    handler.py    the routes, checks, decoding and JSON answers, whatever server carries them (no Ray)
    (cifarkit.multipart: the multipart/form-data bodies of the batch endpoint, shared with the HTTP client)
    direct.py     --ingress direct: a replica's own HTTP server (aiohttp; no Ray)
    app.py        the Ray Serve deployment: replicas, @serve.batch, the direct server or Serve's proxy
    processes.py  the local Ray's processes, found and ended on every way out
    run.py        serve() / start(): Ray, Serve, readiness and a clean shutdown on every way out

Names are imported lazily: `import cifarkit.serve.config` loads neither numpy nor Ray.
"""

from __future__ import annotations

from cifarkit.stage import lazy_exports

_EXPORTS = {
    "ServeConfig": "config",
    "INGRESS": "config",
    "ServeResult": "run",
    "Service": "run",
    "serve": "run",
    "start": "run",
    "Handler": "handler",
}

__all__ = sorted(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
