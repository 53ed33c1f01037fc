"""`fslm serve`: load a stack and serve it over HTTP until interrupted (the app itself is fslm.web).

The backend is the chooser's (fslm.backends.choose): `--backend`, else llama.cpp when the manifest says torch and
the GGUF export is current, else the manifest's own. The address is bound here, before uvicorn starts, so "serving"
is said only once the port is ours, and a port already in use is one error line (exit 2), not uvicorn's.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from pathlib import Path

from fslm.errors import FslmError
from fslm.events import EventHandler, Progress, emit
from fslm.options import Result
from fslm.stack import Stack
from fslm.web.options import ServeOptions


class ServeResult(Result):
    """What was served, on which backend, and where (returned once the server stops)."""

    stack: Path
    backend: str
    url: str


def serve(stack: str | Path, options: ServeOptions | None = None, on_event: EventHandler | None = None) -> ServeResult:
    """Load the stack directory `stack` and serve it in the foreground until interrupted; one event says where, once
    the stack is loaded and the address bound."""
    options = options or ServeOptions()
    loaded = Stack.load(stack, backend=options.backend or "auto")
    where = {"url": url_of(options.host, options.port)}

    def bound(url: str) -> None:
        where["url"] = url
        emit(on_event, Progress("serve", "serving", 1, 1, {"backend": loaded.backend.name, "url": url}))

    run_server(loaded, options=options, on_bound=bound)
    return ServeResult(stack=Path(stack), backend=loaded.backend.name, url=where["url"])


def run_server(stack: Stack, options: ServeOptions, on_bound: Callable[[str], None] | None = None) -> None:
    """Serve a loaded stack in the foreground until interrupted (an API key from $FSLM_API_KEY unless one is given).
    `on_bound(url)` hears where, once the address is bound (port 0: the port the system chose)."""
    import uvicorn

    from fslm.web.app import create_app  # FastAPI: imported when a server starts, not with the CLI

    if options.api_key is None and os.environ.get("FSLM_API_KEY"):
        options = options.model_copy(update={"api_key": os.environ["FSLM_API_KEY"]})
    app = create_app(stack, options)
    sock = listen(options.host, options.port)
    try:
        config = uvicorn.Config(
            app, host=options.host, port=options.port, log_level="warning", timeout_graceful_shutdown=5
        )
        if on_bound is not None:
            on_bound(url_of(options.host, sock.getsockname()[1]))
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        sock.close()


def listen(host: str, port: int) -> socket.socket:
    """A socket bound to host:port and listening (as uvicorn binds one), or FslmError naming the flag."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except socket.gaierror as e:
        raise FslmError(f"--host {host}: not an address of this machine ({e.strerror})") from None
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as e:
        sock.close()
        raise FslmError(
            f"--port {port}: cannot listen on {url_of(host, port)} ({e.strerror or e}); "
            "choose another --port or stop what holds it"
        ) from None
    sock.set_inheritable(True)
    return sock


def url_of(host: str, port: int) -> str:
    """The server's URL (an IPv6 address in brackets)."""
    return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"
