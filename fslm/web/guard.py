"""What the server answers before and instead of a route: the Host check (against DNS rebinding) and the OpenAI-style
error (`{"error": {"message", "type", "param", "code"}}`) every refusal is sent as."""

from __future__ import annotations

from typing import Any

from fastapi.responses import JSONResponse


def host_name(header: str) -> str:
    """The host part of a Host header, lower-case, without port, IPv6 brackets or a trailing dot."""
    header = header.strip().lower()
    if header.startswith("["):
        name = header[1 : header.find("]")] if "]" in header else header
    elif header.count(":") == 1:
        name = header.partition(":")[0]
    else:
        name = header
    return name.rstrip(".")


class HostCheck:
    """ASGI middleware: refuse a request whose Host header is not an allowed name (421, OpenAI-style body)."""

    def __init__(self, app: Any, allowed: tuple[str, ...]) -> None:
        self.app = app
        self.any = "*" in allowed
        self.allowed = {host_name(h) for h in allowed}

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] in ("http", "websocket") and not self.any:
            raw = next((v for k, v in scope.get("headers", ()) if k == b"host"), b"").decode("latin-1")
            if host_name(raw) not in self.allowed:
                allowed = ", ".join(sorted(self.allowed))
                e = ApiError(421, f"Host {raw[:100]!r} is not served here (allowed: {allowed}; the server's "
                                  "--allowed-host adds names)", code="untrusted_host")  # fmt: skip
                await JSONResponse(e.body(), status_code=421)(scope, receive, send)
                return
        await self.app(scope, receive, send)


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


class ClientGone(Exception):
    """The client closed the connection before its answer was ready."""
