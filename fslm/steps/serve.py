"""`fslm serve`: load a stack and serve it over HTTP until interrupted (the app itself is fslm.web).

The backend is the chooser's (fslm.backends.choose): `--backend`, else llama.cpp when the manifest says torch and
the GGUF export is current, else the manifest's own.
"""

from __future__ import annotations

import os
from pathlib import Path

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
    the stack is loaded."""
    options = options or ServeOptions()
    loaded = Stack.load(stack, backend=options.backend or "auto")
    url = f"http://{options.host}:{options.port}/"
    emit(on_event, Progress("serve", "serving", 1, 1, {"backend": loaded.backend.name, "url": url}))
    run_server(loaded, options=options)
    return ServeResult(stack=Path(stack), backend=loaded.backend.name, url=url)


def run_server(stack: Stack, options: ServeOptions) -> None:
    """Serve a loaded stack in the foreground until interrupted (an API key from $FSLM_API_KEY unless one is given)."""
    import uvicorn

    from fslm.web.app import create_app  # FastAPI: imported when a server starts, not with the CLI

    if options.api_key is None and os.environ.get("FSLM_API_KEY"):
        options = options.model_copy(update={"api_key": os.environ["FSLM_API_KEY"]})
    app = create_app(stack, options)
    uvicorn.run(app, host=options.host, port=options.port, log_level="warning", timeout_graceful_shutdown=5)
