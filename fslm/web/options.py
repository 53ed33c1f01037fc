"""What `fslm serve` can be told besides the stack directory: where to listen, on which backend, and the limits
every request is held to. The CLI's flags and defaults come from here."""

from __future__ import annotations

from pydantic import Field

from fslm.options import Options

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


class ServeOptions(Options):
    """Everything `fslm serve` can be told besides the directory; the CLI's flags and defaults come from here."""

    host: str = Field("127.0.0.1", description="Address to bind; the default serves this machine only.")
    port: int = Field(8000, ge=0, le=65535, description="TCP port.")
    backend: str | None = Field(
        None,
        description="Backend: torch, llamacpp or openai (default: llamacpp when the GGUF export is current and the "
        "manifest says torch, else the manifest's base.backend).",
    )
    api_key: str | None = Field(None, description="Require Authorization: Bearer KEY (env FSLM_API_KEY).")
    max_queue: int = Field(64, ge=1, description="Requests in flight before answering 503.")
    max_batch: int = Field(32, ge=1, description="Most requests generated together at one stage.")
    max_tokens: int = Field(4096, ge=1, description="Largest max_tokens a request may ask for.")
    max_body: int = Field(1 << 20, ge=1, description="Largest request body in bytes (413 beyond).")
    timeout: float = Field(300.0, ge=0.1, description="Seconds a request may take, queueing included.")
    cors_origins: tuple[str, ...] = Field((), description="Allow browser calls from this origin (repeat).")
    # Host header names accepted (any port); "*" accepts any. A page on another site that makes its own name
    # resolve to 127.0.0.1 (DNS rebinding) sends its own name here, so only names of this machine pass.
    allowed_hosts: tuple[str, ...] = LOOPBACK_HOSTS
    retry_after: int = Field(2, ge=0, description="Seconds a 503 asks the client to wait.")


def default_allowed_hosts(bind: str) -> tuple[str, ...]:
    """The loopback names, plus the address the server binds when it is a specific one (not 0.0.0.0 / ::)."""
    extra = () if bind in ("", "0.0.0.0", "::") or bind in LOOPBACK_HOSTS else (bind,)
    return (*LOOPBACK_HOSTS, *extra)
