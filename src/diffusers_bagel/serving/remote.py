"""
Remote image URLs of chat messages (`bagel serve --allow_remote_images`), fetched without turning the server into a
window on its own network: the host is resolved here and refused unless every address it resolves to is public, the
connection goes to the checked address (no second lookup), redirects are followed here (a few at most), each one
checked again, the download is capped in bytes and time, and every failure is the same 400: the client never learns
the remote status, body, or whether a port was open.
"""

from __future__ import annotations

import ipaddress
import socket
import time

from diffusers.utils import logging

from .errors import APIError
from .requests import EncodedImage, ServerLimits, check_image_bytes


logger = logging.get_logger(__name__)

__all__ = ["fetch_remote_image", "is_public_address"]

_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


class _Refused(Exception):
    """Why a remote image was not fetched; logged on the server, never told to the client."""


def is_public_address(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """
    Whether `address` is a public unicast address the server may connect to: not loopback, private, link-local
    (cloud metadata), shared (CGNAT), multicast, reserved or unspecified, nor an IPv6 address carrying such an IPv4
    one (IPv4-mapped, 6to4, Teredo, NAT64).
    """
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:  # ::ffff:a.b.c.d reaches a.b.c.d
            return is_public_address(address.ipv4_mapped)
        if address.is_site_local:
            return False
        embedded = [address.sixtofour, address.teredo[1] if address.teredo else None]
        if address in _NAT64:
            embedded.append(ipaddress.IPv4Address(int(address) & 0xFFFFFFFF))
        if any(inner is not None and not is_public_address(inner) for inner in embedded):
            return False
    return address.is_global and not (
        address.is_multicast or address.is_reserved or address.is_unspecified or address.is_loopback
        or address.is_link_local or address.is_private
    )  # fmt: skip


def _address_allowed(address) -> bool:
    # One seam for the policy (tests let 127.0.0.1 stand for a public host to exercise redirects).
    return is_public_address(address)


def _resolve(host: str, port: int) -> str:
    """The address to connect to for `host`: every address it resolves to must be allowed; the first one is used
    (IPv4 first, the more often routable)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError, OSError) as error:
        raise _Refused(f"{host!r} does not resolve ({error})") from None
    addresses = [ipaddress.ip_address(str(info[4][0]).split("%")[0]) for info in infos]
    refused = [str(address) for address in addresses if not _address_allowed(address)]
    if not addresses or refused:
        raise _Refused(f"{host!r} resolves to non-public address(es) {refused}")
    return str(min(addresses, key=lambda address: address.version))


def _target(url):
    """`url` as an `httpx.URL` of a fetchable shape: http(s), a host, no credentials."""
    import httpx

    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, TypeError, ValueError) as error:
        raise _Refused(f"unparsable URL ({error})") from None
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise _Refused(f"scheme {parsed.scheme!r} or empty host")
    if parsed.userinfo:
        raise _Refused("credentials in the URL")
    return parsed


def _read_capped(response, limit: int, deadline: float) -> bytes:
    declared = response.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise _Refused(f"declared {declared} bytes, over {limit}")
    if response.headers.get("content-encoding", "identity").lower() not in ("identity", ""):
        raise _Refused("a content-encoding was used although identity was asked for")
    data = bytearray()
    for chunk in response.iter_raw():
        data += chunk
        if len(data) > limit:
            raise _Refused(f"more than {limit} bytes")
        if time.monotonic() > deadline:
            raise _Refused("too slow")
    return bytes(data)


def _download(url: str, limits: ServerLimits) -> bytes:
    """The body of `url` (following checked redirects), within the limits; raises `_Refused` otherwise."""
    import httpx

    deadline = time.monotonic() + limits.remote_image_timeout
    # trust_env=False: no proxy from the environment may fetch on the server's behalf.
    with httpx.Client(trust_env=False, follow_redirects=False) as client:
        for _ in range(limits.max_redirects + 1):
            target = _target(url)
            host = target.raw_host.decode("ascii")
            port = target.port or (443 if target.scheme == "https" else 80)
            address = _resolve(host, port)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise _Refused("too slow")
            pinned = target.copy_with(host=address)  # connect to the checked address, not to a second lookup
            headers = {"Host": target.netloc.decode("ascii"), "Accept": "image/*", "Accept-Encoding": "identity"}
            extensions = {"sni_hostname": host} if target.scheme == "https" else {}  # TLS checks the name
            with client.stream("GET", pinned, headers=headers, extensions=extensions,
                               timeout=httpx.Timeout(remaining)) as response:  # fmt: skip
                if response.status_code in _REDIRECTS and "location" in response.headers:
                    url = str(target.join(response.headers["location"]))
                    continue
                if response.status_code != 200:
                    raise _Refused(f"HTTP {response.status_code}")
                return _read_capped(response, limits.max_image_bytes, deadline)
    raise _Refused(f"more than {limits.max_redirects} redirects")


def fetch_remote_image(url: str, param: str, limits: ServerLimits) -> EncodedImage:
    """
    The image at the http(s) `url` of a chat message as an [`EncodedImage`], fetched under the rules of this module
    (public addresses only, checked at every redirect; `limits.max_image_bytes`, `limits.remote_image_timeout`,
    `limits.max_redirects`). Any failure is one generic 400 naming `param`; the reason is logged on the server.
    """
    import httpx

    try:
        data = _download(url, limits)
        return check_image_bytes(data, param, limits)
    except (_Refused, httpx.HTTPError, APIError, OSError, ValueError) as error:
        reason = error.message if isinstance(error, APIError) else f"{type(error).__name__}: {error}"
        logger.info(f"Remote image of `{param}` not fetched: {reason}")
    raise APIError(
        400, f"`{param}`: the image could not be fetched from its URL. This server fetches images from public http(s) "
        f"addresses only, up to {limits.max_image_bytes} bytes within {limits.remote_image_timeout:g} seconds; "
        "or send the image as a base64 data URL.", param=param, code="invalid_image_url",
    )  # fmt: skip
