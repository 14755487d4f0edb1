"""
Start-up checks of `bagel serve`, each raising `ValueError` with a message naming the option, meant to run before
the model loads: the API key (an empty `--api_key ''` or `BAGEL_API_KEY=` never means "no authentication"), the
timing options, and the host and port (bound once, briefly, then released).
"""

from __future__ import annotations

import errno
import math
import os
import socket
from collections.abc import Mapping


__all__ = ["API_KEY_ENV", "check_api_key", "check_port", "check_timing", "resolve_api_key"]

API_KEY_ENV = "BAGEL_API_KEY"


def check_api_key(key: str | None, source: str = "--api_key") -> None:
    """
    Refuses an API key no client could use: empty or only whitespace (an unset shell variable expands to ''), or
    with whitespace around it (an `Authorization` header never carries it). `None` (no key) passes.

    Args:
        key (`str`, *optional*): the key.
        source (`str`, defaults to `"--api_key"`): where it came from, named by the error.
    """
    if key is None:
        return
    if not isinstance(key, str) or not key.strip():
        raise ValueError(
            f"{source} is empty (an unset shell variable?): the server would run without authentication. Give a "
            f"non-empty key, or leave {source} out to serve without one."
        )
    if key != key.strip():
        raise ValueError(f"{source} starts or ends with whitespace, which no Authorization header carries; remove it.")


def resolve_api_key(option: str | None, environ: Mapping[str, str] | None = None) -> str | None:
    """
    The API key of `bagel serve`: `--api_key` when given, else `BAGEL_API_KEY` when set, else `None` (no
    authentication). A given but empty or blank key (from either) is refused by [`check_api_key`], never read as
    "no key".

    Args:
        option (`str`, *optional*): the value of `--api_key` (`None` when the option was not given).
        environ (`Mapping`, *optional*): the environment (`os.environ` by default).
    """
    if option is not None:
        check_api_key(option, "--api_key")
        return option
    value = (os.environ if environ is None else environ).get(API_KEY_ENV)
    check_api_key(value, API_KEY_ENV)
    return value


def check_timing(request_timeout: float, batch_wait: float) -> None:
    """Refuses a `--request_timeout` that is not a positive finite number of seconds, and a `--batch_wait_ms` that
    is negative or not shorter than it (every request that waited for companions would time out)."""
    if not isinstance(request_timeout, (int, float)) or not math.isfinite(request_timeout) or request_timeout <= 0:
        raise ValueError(f"--request_timeout must be a positive number of seconds, got {request_timeout!r}.")
    if not isinstance(batch_wait, (int, float)):
        raise ValueError(f"--batch_wait_ms must be a number of milliseconds, got {batch_wait!r}.")
    if not math.isfinite(batch_wait) or batch_wait < 0:
        raise ValueError(f"--batch_wait_ms must be a finite number >= 0, got {batch_wait * 1000:g}.")
    if batch_wait >= request_timeout:
        raise ValueError(
            f"--batch_wait_ms ({batch_wait * 1000:g} ms) must be shorter than --request_timeout "
            f"({request_timeout:g} s): every request waiting for companions would time out."
        )


_BIND_ERRORS = {
    errno.EADDRINUSE: "is already in use (another server?)",
    errno.EACCES: "needs privileges this process lacks (ports below 1024 usually do)",
    errno.EADDRNOTAVAIL: "cannot be bound: the address is not one of this machine's",
}


def _bind_all(infos: list, host: str, port: int) -> None:
    """Binds every resolved address at once (as uvicorn's asyncio server does), then releases them."""
    sockets = []
    try:
        for family, kind, proto, _, address in infos:
            probe = socket.socket(family, kind, proto)
            sockets.append(probe)
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: a port in TIME_WAIT is free
            if family == socket.AF_INET6 and hasattr(socket, "IPPROTO_IPV6"):
                probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                probe.bind(address)
            except OSError as error:
                why = _BIND_ERRORS.get(error.errno, f"cannot be bound ({error.strerror})")
                raise ValueError(f"--port {port} on --host {host} {why}.") from None
    finally:
        for probe in sockets:
            probe.close()


def check_port(host: str, port: int) -> None:
    """
    Refuses a `--port` outside [1, 65535], a `--host` that does not resolve, and an address the server could not
    bind (in use, privileged, not this machine's), by binding every address of `host` once with `SO_REUSEADDR`, as
    uvicorn will, and releasing it at once.

    Args:
        host (`str`): the `--host` to bind.
        port (`int`): the `--port`.
    """
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise ValueError(f"--port must be an integer in [1, 65535], got {port!r}.")
    if not isinstance(host, str) or not host.strip():
        raise ValueError(f"--host must be an address or a host name, got {host!r}.")
    try:
        infos = socket.getaddrinfo(host, port, socket.AF_UNSPEC, socket.SOCK_STREAM, 0, socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError) as error:
        raise ValueError(f"--host {host!r} does not resolve to an address of this machine ({error}).") from None
    unique = list(dict.fromkeys((family, kind, proto, "", address) for family, kind, proto, _, address in infos))
    _bind_all(unique, host, port)
