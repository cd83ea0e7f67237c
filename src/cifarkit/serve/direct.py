"""--ingress direct: a replica's own HTTP server, aiohttp's low-level server (no router, no middlewares, no access
log) feeding cifarkit.serve.handler.Handler on the replica's event loop. No Ray here: bench/serve_load.py runs the
same server in a plain process as the reference for Ray Serve's overhead.

    server = await DirectServer.start(handler, "127.0.0.1", 8000)
    ...
    await server.close()
"""

from __future__ import annotations

import socket
from typing import Any

from cifarkit.serve.handler import JSON_TYPE, Handler, Reply

LISTEN_BACKLOG = 1024  # connections waiting to be accepted: 64+ clients connecting at once must not be refused
SHUTDOWN_S = 5.0  # seconds a stopping replica gives the requests it holds before it closes their connections


def listening_socket(host: str, port: int, *, reuse_port: bool = True) -> socket.socket:
    """A non-blocking TCP socket listening on host:port. SO_REUSEPORT lets every replica of a node listen on the
    same port (Linux spreads new connections over them); only processes of the same user can join."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
        sock.listen(LISTEN_BACKLOG)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


class DirectServer:
    """The server of one replica (or of the bench's plain process); `serving` until close()."""

    def __init__(self, runner: Any) -> None:
        self.runner = runner
        self.serving = True

    @classmethod
    async def start(cls, handler: Handler, host: str, port: int) -> DirectServer:
        from aiohttp import web

        async def on_request(request: Any) -> Any:
            reply: Reply = await handler.handle(
                request.method, request.path, request.query_string, request.headers, request.content.iter_any()
            )
            response = web.Response(body=reply.body, status=reply.status, headers=reply.headers, content_type=JSON_TYPE)
            if reply.close:
                response.force_close()
            return response

        sock = listening_socket(host, port)
        runner = web.ServerRunner(web.Server(on_request, access_log=None), shutdown_timeout=SHUTDOWN_S)
        await runner.setup()
        await web.SockSite(runner, sock, backlog=LISTEN_BACKLOG, shutdown_timeout=SHUTDOWN_S).start()
        return cls(runner)

    async def close(self) -> None:
        """Stop accepting, give the requests in progress SHUTDOWN_S seconds, close."""
        self.serving = False
        await self.runner.cleanup()
