"""Serving stage: ServeConfig -> serve(cfg, reporter) -> ServeResult. Loads and checks the model, starts a local Ray
(or joins the cluster at --address), deploys the application (cifarkit.serve.app), tells the reporter the URL once
the service answers, and blocks until it is interrupted or `stop` is set; then shuts down Serve (or deletes only
its own application on a cluster that already ran Serve) and stops the Ray it started, on every way out.

    from cifarkit.serve import ServeConfig, serve, start
    serve(ServeConfig(model="model.onnx", port=8080))        # blocks; Ctrl-C ends it cleanly
    with start(ServeConfig(model="model.onnx")) as service:  # or in the background of a program
        requests.post(service.url + "/v1/classify", data=open("cat.jpg", "rb"))

Ray and Ray Serve are imported here only, after the options and the model have been checked.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from cifarkit.errors import CifarkitError, first_line
from cifarkit.serve.config import ServeConfig
from cifarkit.serve.processes import end_processes, ray_processes
from cifarkit.stage import Reporter, Silent

INSTALL_HINT = "pip install 'cifarkit[serve]'"
DEPLOY_TIMEOUT_S = 180.0  # replicas that are not running by then (no CPUs for them, a constructor that hangs)
READY_TIMEOUT_S = 60.0  # the first answer to GET /healthz after the application runs (the proxy's route table)
POLL_S = 0.25
SHUTDOWN_TIMEOUT_S = 15.0  # Serve's graceful shutdown at most (replicas finish their requests within 5 s)
RAY_GONE_TIMEOUT_S = 3.0  # ray.shutdown() at most once the local Ray's processes have died under it
HELD_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@dataclass
class ServeResult:
    url: str  # where the service answered
    seconds: float = 0.0  # how long it served
    replicas: int = 0
    started_ray: bool = False  # a local Ray was started for it (and stopped at the end)
    notes: list[str] = field(default_factory=list)


def import_serve() -> tuple[Any, Any]:
    """(ray, ray.serve), or a CifarkitError saying what to install."""
    import importlib

    try:
        ray = importlib.import_module("ray")
        serve = importlib.import_module("ray.serve")
    except ImportError:
        raise CifarkitError(f"cifar-serve needs Ray Serve: {INSTALL_HINT}") from None
    return ray, serve


def check_port(host: str, port: int) -> None:
    """host:port can be listened on here: nothing else holds it (a replica joins it with SO_REUSEPORT, which would
    quietly share the port with another service's replicas; this plain bind refuses while any socket listens)."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except OSError as exc:
        raise CifarkitError(f"--host {host}: cannot resolve it ({exc.strerror or exc})") from None
    with socket.socket(family, kind, proto) as sock:
        # SO_REUSEADDR: connections of an earlier run in TIME_WAIT do not count; on Linux it still refuses a port
        # that a socket listens on.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(address)
        except OSError as exc:
            raise CifarkitError(f"--port {port}: cannot listen on {host}:{port} ({exc.strerror or exc})") from None


class Service:
    """A running service: its URL, and close() (also on leaving a `with` block)."""

    def __init__(self, cfg: ServeConfig, ray: Any, serve_api: Any, *, started_ray: bool, owns_serve: bool) -> None:
        self.cfg, self.ray, self.serve_api = cfg, ray, serve_api
        self.url = cfg.url
        self.started_ray, self.owns_serve = started_ray, owns_serve
        self.deployed = False  # Serve was started or the application sent: close() undoes it
        self.closed = False

    def close(self) -> None:
        """Shut down what this service started, never half-way: SIGINT and SIGTERM that arrive meanwhile are held
        until it is done (then they act). Serve first (replicas finish the requests they hold, up to 5 s), then the
        local Ray, which ends every process it started (controller, replicas, raylet, GCS)."""
        if self.closed:
            return
        self.closed = True
        with held_signals():
            pids = ray_processes() if self.started_ray else set()
            try:
                if not self.deployed:
                    pass
                elif not self.started_ray:
                    _bounded(self._stop_serve, SHUTDOWN_TIMEOUT_S)
                elif _local_ray_alive():  # (not after a SIGTERM to the whole process group: see _local_ray_alive)
                    _bounded(self._stop_serve, SHUTDOWN_TIMEOUT_S, give_up=lambda: not _local_ray_alive())
            finally:
                if self.started_ray:
                    self._stop_ray(pids)

    def _stop_ray(self, pids: set[int]) -> None:
        """Every process of the local Ray ends here. ray.shutdown() stops them in order; once some have died (a
        SIGTERM to the whole process group) it would wait ~8 s for a GCS that is gone, so the rest are ended first
        and the driver's side of Ray is let go within a bounded time."""
        if _local_ray_alive():
            self.ray.shutdown()
            end_processes(pids | ray_processes())  # workers that outlived it (re-parented here: processes.py)
        else:
            end_processes(pids | ray_processes())
            _bounded(self.ray.shutdown, RAY_GONE_TIMEOUT_S)

    def _stop_serve(self) -> None:
        if self.owns_serve:
            self.serve_api.shutdown()
        else:  # a cluster that ran Serve before: other applications stay
            self.serve_api.delete(self.cfg.name)

    def __enter__(self) -> Service:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def start(cfg: ServeConfig, reporter: Reporter | None = None) -> Service:
    """Deploy the service and return once it answers. Raises CifarkitError (one line) for a bad model, a port in
    use, Ray Serve not installed, a cluster that cannot be reached or has too few CPUs, or replicas that fail."""
    cfg.validate()
    rep = reporter or Silent()
    from cifarkit.atomic import committed_member
    from cifarkit.infer.classifier import Classifier
    from cifarkit.infer.session import read_model_bytes

    clf = Classifier.from_file(cfg.model, device="cpu")  # the model is checked here, before any Ray starts
    model = read_model_bytes(os.fspath(committed_member(clf.source)))  # what the replicas load
    ray, serve_api = import_serve()
    check_port(cfg.host, cfg.port)
    service = Service(cfg, ray, serve_api, started_ray=_connect(ray, cfg, rep), owns_serve=False)
    try:
        with held_signals():  # a signal mid-way through Serve's start-up would leave its controller half-made
            service.owns_serve = not _serve_running(ray)
            _check_cluster(ray, serve_api, cfg)
            service.deployed = True  # from here on, close() stops Serve (or deletes the application)
            _start_serve(serve_api, cfg, service.owns_serve)
        rep.note(f"deploying {clf.meta.model_name} ({len(clf.labels)} classes): {_plan(cfg)}", "info")
        _deploy(serve_api, cfg, model, os.path.basename(clf.source), rep)
        _wait_answering(cfg)
    except BaseException:
        service.close()
        raise
    return service


def serve(cfg: ServeConfig, reporter: Reporter | None = None, *, stop: threading.Event | None = None) -> ServeResult:
    """Run the service until Ctrl-C or SIGTERM (raised through here after the shutdown: the command line exits
    130 or 143) or until `stop` is set (then the result comes back)."""
    rep = reporter or Silent()
    t0 = time.perf_counter()
    with start(cfg, rep) as service:
        model = os.path.basename(cfg.model.rstrip("/")) or cfg.model
        rep.note(f"ready: {service.url} serves {model} ({_plan(cfg)}); Ctrl-C stops it", "info")
        stop = stop or threading.Event()
        while not stop.wait(1.0):  # Event.wait returns early for a signal: Ctrl-C raises here at once
            pass
    return ServeResult(
        url=service.url, seconds=time.perf_counter() - t0, replicas=cfg.replicas, started_ray=service.started_ray
    )


# ---------------------------------------------------------------------------------------------------------
# Steps
# ---------------------------------------------------------------------------------------------------------


def _plan(cfg: ServeConfig) -> str:
    replicas = f"{cfg.replicas} replica{'s' if cfg.replicas > 1 else ''} x {cfg.replica_cpus} CPU"
    return f"{replicas}, max batch {cfg.max_batch}, wait {cfg.batch_wait_ms:g} ms, {cfg.ingress} ingress"


def _connect(ray: Any, cfg: ServeConfig, rep: Reporter) -> bool:
    """ray.init: a new local Ray (True: stop it at the end) or the cluster at --address (False)."""
    from cifarkit.infer.ray import probe

    if ray.is_initialized():  # a caller's own Ray session (a Ray program embedding the service)
        return False
    kwargs: dict[str, Any] = {"include_dashboard": False}
    if cfg.quiet:  # Ray's start-up notes and the replicas' logs are for --debug
        kwargs.update(logging_level=logging.ERROR, log_to_driver=False)
    address = cfg.address or "local"  # "local": a new Ray of our own, whatever /tmp/ray records
    if address not in ("local", "auto"):
        probe(address, "--address")
    rep.note("starting a local Ray" if address == "local" else f"connecting to the Ray cluster at {address}", "info")
    try:
        with held_signals():  # a signal mid-way through ray.init would leave its processes running
            ray.init(address=address, **kwargs)
    except (ConnectionError, RuntimeError, ValueError, TimeoutError) as exc:
        where = "a local Ray" if address == "local" else f"--address {address}"
        raise CifarkitError(f"{where}: cannot connect ({first_line(exc, 160)})") from None
    if cfg.quiet:
        for name in ("ray", "ray.serve"):
            logging.getLogger(name).setLevel(logging.ERROR)
    return address == "local"


def _serve_running(ray: Any) -> bool:
    """Whether Ray Serve already runs on the cluster (its controller is a named actor)."""
    from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

    try:
        ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
    except ValueError:
        return False
    return True


def _check_cluster(ray: Any, serve_api: Any, cfg: ServeConfig) -> None:
    cpus = int(ray.cluster_resources().get("CPU", 0))
    need = cfg.replicas * cfg.replica_cpus
    if need > cpus:
        raise CifarkitError(
            f"--replicas {cfg.replicas} x --replica-cpus {cfg.replica_cpus} need {need} CPUs; the Ray cluster has "
            f"{cpus}"
        )
    if cfg.name in serve_api.status().applications:
        raise CifarkitError(
            f"an application named {cfg.name!r} already runs on this Ray cluster (another cifar-serve?); pass --name"
        )


def _start_serve(serve_api: Any, cfg: ServeConfig, owns_serve: bool) -> None:
    from ray.serve.schema import LoggingConfig

    if not owns_serve:
        return  # its proxies and HTTP options are the cluster's
    quiet = LoggingConfig(log_level="WARNING", enable_access_log=False)
    if cfg.ingress == "direct":  # no proxy at all: the replicas answer HTTP, and the proxy's process is not started
        serve_api.start(proxy_location="Disabled", logging_config=quiet)
    else:
        serve_api.start(
            proxy_location="EveryNode", http_options={"host": cfg.host, "port": cfg.port}, logging_config=quiet
        )


def _deploy(serve_api: Any, cfg: ServeConfig, model: bytes, model_file: str, rep: Reporter) -> None:
    """serve.run_many without its own wait (which has no time limit), then the application's status until it runs:
    a replica that keeps failing (a port taken on another node) is DEPLOY_FAILED, one line."""
    from cifarkit.serve.app import build_app

    route = "/" if cfg.ingress == "proxy" else None  # direct: Serve's proxies (on a cluster) do not route to it
    target = serve_api.RunTarget(build_app(cfg, model, model_file), name=cfg.name, route_prefix=route)
    serve_api.run_many([target], wait_for_ingress_deployment_creation=False, wait_for_applications_running=False)
    deadline = time.monotonic() + DEPLOY_TIMEOUT_S
    while True:
        app = serve_api.status().applications.get(cfg.name)
        status = getattr(app, "status", "NOT_STARTED")
        state = str(getattr(status, "value", status))
        if state == "RUNNING":
            return
        message = first_line(Exception(getattr(app, "message", "") or state), 300)
        if state in ("DEPLOY_FAILED", "UNHEALTHY"):
            raise CifarkitError(f"the replicas did not start: {message}")
        if time.monotonic() > deadline:
            raise CifarkitError(f"the replicas were not running after {DEPLOY_TIMEOUT_S:.0f} s ({message})")
        time.sleep(POLL_S)


def _wait_answering(cfg: ServeConfig) -> None:
    """GET /healthz until it answers 200. With --address the replicas (direct ingress) may all run on other nodes,
    where this machine's URL reaches none of them: their running status is the readiness there."""
    if cfg.ingress == "direct" and cfg.address:
        return
    deadline = time.monotonic() + READY_TIMEOUT_S
    last = ""
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(cfg.url + "/healthz", timeout=5) as answer:
                if answer.status == 200:
                    return
        except OSError as exc:  # URLError, HTTPError, refused, reset: not yet
            last = first_line(exc, 160)
        time.sleep(POLL_S)
    hint = " (Ray Serve already ran on this cluster with its own --host/--port?)" if cfg.ingress == "proxy" else ""
    raise CifarkitError(f"{cfg.url}/healthz did not answer within {READY_TIMEOUT_S:.0f} s ({last}){hint}")


def _local_ray_alive() -> bool:
    """Whether every process of the local Ray this service started still runs. A SIGTERM sent to the whole process
    group (systemd's default, `timeout`) reaches the raylet, GCS and workers too, which then exit at once; talking to
    Serve's controller would only wait for its timeouts (30 s), so the shutdown goes straight to ray.shutdown()."""
    try:
        from ray._private.worker import _global_node  # Ray's own record of the processes ray.init started

        return _global_node is None or not _global_node.dead_processes()
    except Exception:  # another Ray version: assume alive, the bounded wait still applies
        return True


def _bounded(fn: Any, seconds: float, give_up: Any = None) -> None:
    """fn() in a daemon thread, waited for at most `seconds`, or until give_up() says there is no point (a cluster
    that stopped answering mid-shutdown must not keep the process from ending); its exceptions are dropped: the
    cluster has gone, nothing is left to stop there."""
    done = threading.Event()

    def run() -> None:
        with contextlib.suppress(Exception):
            fn()
        done.set()

    threading.Thread(target=run, name="cifarkit-serve-shutdown", daemon=True).start()
    deadline = time.monotonic() + seconds
    while not done.wait(min(POLL_S, max(0.0, deadline - time.monotonic()))):
        if time.monotonic() >= deadline or (give_up is not None and give_up()):
            return


@contextlib.contextmanager
def held_signals() -> Iterator[None]:
    """SIGINT and SIGTERM are held while the block runs, then take effect (KeyboardInterrupt or Terminated), so that
    starting or stopping Ray and Serve is never cut half-way (a controller or raylet left running). In a thread
    other than the main one (where Python runs signal handlers) this changes nothing."""
    pending: list[int] = []

    def hold(signum: int, frame: object) -> None:
        pending.append(signum)

    try:
        saved = {s: signal.signal(s, hold) for s in HELD_SIGNALS}
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        for s, handler in saved.items():
            # ray.init installs a SIGTERM handler of its own (stop the local Ray, exit 1). A program's own handler
            # (cifar-serve's: raise Terminated, so that close() runs) wins over it; Python's default does not.
            if signal.getsignal(s) is hold or callable(handler):
                signal.signal(s, handler)
    if pending:  # after a clean exit of the block (an exception already on its way keeps going instead): the
        signal.raise_signal(pending[0])  # restored handler acts on it as if it came now
