"""Trust: what a stack.yaml may ask for only when the user agrees.

A stack directory is data someone else may have written. Three manifest fields could make fslm do something the
user never asked for: run Python code shipped with the model, send every prompt to a server elsewhere, or send the
value of an environment variable of the manifest's choosing there as an API key. Each needs the user's consent:
a CLI flag, a `Trust` passed to `Stack.load`, or (servers and key variables only) the user's own environment.
The manifest (fslm.config) records where each of these fields was read from, so a refusal names the file and line.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from fslm.errors import FslmError

# The environment variable that holds an OpenAI-compatible server's key unless the user names another.
DEFAULT_API_KEY_ENV = "FSLM_API_KEY"
TRUSTED_SERVERS_ENV = "FSLM_TRUSTED_SERVERS"  # URLs (or origins) the user trusts, separated by spaces or commas
TRUSTED_KEY_ENVS_ENV = "FSLM_TRUSTED_KEY_ENVS"  # environment variable names a manifest may name as api_key_env
# The manifest fields that need consent (paths under `base`).
TRUST_FIELDS = ("trust_remote_code", "server.url", "server.api_key_env")
_LOOPBACK_NAMES = {"localhost"}


@dataclass(frozen=True)
class Trust:
    """What the user (never the manifest) allows: remote code, servers beyond this machine, API key variables.

    remote_code: let transformers run Python code shipped with the model (`trust_remote_code: true`).
    servers: URLs or origins (scheme://host:port) stages may be sent to besides this machine.
    api_key_env: read the server's API key from this variable, whatever the manifest names.
    api_key_envs: variables a manifest may name as `api_key_env`.
    """

    remote_code: bool = False
    servers: tuple[str, ...] = ()
    api_key_env: str | None = None
    api_key_envs: tuple[str, ...] = ()

    @classmethod
    def from_user(
        cls, remote_code: bool = False, servers: tuple[str, ...] | list[str] = (), api_key_env: str | None = None
    ) -> Trust:
        """The CLI flags plus the user's environment (FSLM_TRUSTED_SERVERS, FSLM_TRUSTED_KEY_ENVS)."""
        return cls(
            remote_code=remote_code,
            servers=(*servers, *_env_list(TRUSTED_SERVERS_ENV)),
            api_key_env=api_key_env or None,
            api_key_envs=_env_list(TRUSTED_KEY_ENVS_ENV),
        )

    def allows_server(self, url: str) -> bool:
        return is_loopback_url(url) or any(_origin(url) == _origin(s) for s in self.servers if _origin(s))

    def key_env(self, server: Any) -> str:
        """The variable the API key is read from: the user's choice, else the manifest's (checked by check_trust)."""
        return self.api_key_env or server.api_key_env


_TRUST: ContextVar[Trust | None] = ContextVar("fslm_trust", default=None)


def current_trust() -> Trust:
    """The trust in force: the innermost `trusting(...)`, else only what the user's environment lists."""
    return _TRUST.get() or Trust.from_user()


@contextmanager
def trusting(trust: Trust | None) -> Iterator[Trust]:
    """Run a block with `trust` in force (None: leave the current trust as it is)."""
    if trust is None:
        yield current_trust()
        return
    token = _TRUST.set(trust)
    try:
        yield trust
    finally:
        _TRUST.reset(token)


def grant(trust: Trust) -> None:
    """Put `trust` in force for the rest of the current context (the CLI runs each command in a context of its own)."""
    _TRUST.set(trust)


def check_trust(base: Any, *, code: bool = True, server: bool = False) -> None:
    """Raise FslmError naming each trust-sensitive field the settings ask for without the user's consent.

    base: the manifest's `base` (fslm.config.BaseModelSettings). code: the settings are about to load a model or
    tokenizer; server: about to send requests to base.server (none named: the default server, this machine, and the
    default key variable, which need no consent).
    """
    trust = current_trust()
    problems = []
    origin = base._origin

    def where(key: str) -> str:
        return f"{origin[key]}: " if key in origin else ""

    if code and base.trust_remote_code and not trust.remote_code:
        problems.append(
            f"{where('trust_remote_code')}base.trust_remote_code: the manifest asks to run Python code shipped with "
            "the model; fslm runs it only with --trust-remote-code (Python: Stack.load(..., trust=Trust(remote_code=True)))"
        )
    s = base.server
    if server and s is not None:
        if not trust.allows_server(s.url):
            problems.append(
                f"{where('server.url')}base.server.url: the manifest sends every prompt to {s.url}, which is not this "
                f"machine; allow it with --allow-server {s.url} (or list it in ${TRUSTED_SERVERS_ENV})"
            )
        if (
            trust.api_key_env is None
            and s.api_key_env != DEFAULT_API_KEY_ENV
            and s.api_key_env not in trust.api_key_envs
        ):
            problems.append(
                f"{where('server.api_key_env')}base.server.api_key_env: the manifest asks to send the value of "
                f"${s.api_key_env} as the API key; allow it with --api-key-env {s.api_key_env} "
                f"(or list it in ${TRUSTED_KEY_ENVS_ENV})"
            )
    if problems:
        raise FslmError("; ".join(problems))


def is_loopback_url(url: str) -> bool:
    """True when the URL's host is this machine (localhost or a loopback address)."""
    try:
        host = urlsplit(url).hostname
    except ValueError:
        return False
    return host is not None and is_loopback_host(host)


def is_loopback_host(host: str) -> bool:
    host = host.strip("[]").lower()
    if host in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _origin(url: str) -> tuple[str, str, int | None] | None:
    """(scheme, host, port) with the scheme's default port filled in; None for something that is not a URL."""
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError:
        return None
    if not parts.scheme or not parts.hostname:
        return None
    default = {"http": 80, "https": 443}.get(parts.scheme.lower())
    return parts.scheme.lower(), parts.hostname.lower(), port if port is not None else default


def _env_list(name: str) -> tuple[str, ...]:
    return tuple(x for x in re.split(r"[\s,]+", os.environ.get(name, "")) if x)
