"""Fetch an input image from a user-supplied URL without becoming an SSRF proxy.

Only http(s). The host is resolved once and EVERY address it resolves to is checked with `ipaddress`
(private, loopback, link-local — 169.254.169.254 is the cloud metadata service —, reserved, multicast,
unspecified, and IPv4 carried in IPv6: mapped, 6to4, Teredo, NAT64 — are refused, naming the reason, unless
`allow_private`). The connection then goes to the checked address itself (the Host header and TLS SNI keep the
name), so a DNS answer that changes between check and connect (rebinding) cannot redirect it. Redirects are
followed by hand, at most a few, each re-checked the same way. A timeout bounds the whole fetch and a size cap
bounds the body. A malformed URL (bad port, unclosed IPv6 bracket, control characters) is refused like the rest.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import time
from urllib.parse import urljoin, urlsplit, urlunsplit

import httpx

from qwen_image_lora.errors import InputError

MAX_REDIRECTS = 3


class URLRefused(InputError):
    """The URL is not allowed or could not be fetched; `too_large` when it went over the size cap."""

    def __init__(self, message: str, too_large: bool = False):
        super().__init__(message)
        self.too_large = too_large


NAT64 = ipaddress.ip_network("64:ff9b::/96")  # RFC 6052: a NAT64 gateway forwards to the IPv4 in the low 32 bits


def refusal_reason(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    """Why a URL may not be fetched from this address (None: a public address). An IPv6 address that carries an
    IPv4 one (mapped, 6to4, Teredo, NAT64) is judged by the IPv4 address it reaches."""
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = {
            "IPv4-mapped": ip.ipv4_mapped,
            "6to4": ip.sixtofour,
            "Teredo": ip.teredo[1] if ip.teredo else None,
            "NAT64": ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF) if ip in NAT64 else None,
        }
        for form, inner in embedded.items():
            reason = refusal_reason(inner) if inner is not None else None
            if reason:
                return f"{form} address of {inner}, {reason}"
        if ip.is_site_local:  # fec0::/10: deprecated, but still routed inside some networks
            return "site-local"
    checks = [("unspecified", ip.is_unspecified), ("loopback", ip.is_loopback), ("link-local", ip.is_link_local),
              ("multicast", ip.is_multicast), ("reserved", ip.is_reserved), ("private", ip.is_private),
              ("not globally routable", not ip.is_global)]  # fmt: skip
    return next((name for name, hit in checks if hit), None)


def resolve_checked(host: str, port: int, allow_private: bool) -> str:
    """Resolve `host` and return one address to connect to, after checking every address it resolves to."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as e:
        raise URLRefused(f"cannot resolve host {host!r}: {e}") from e
    addresses = sorted({info[4][0] for info in infos})
    if not addresses:
        raise URLRefused(f"host {host!r} resolves to no address")
    if not allow_private:
        for address in addresses:
            reason = refusal_reason(ipaddress.ip_address(address.split("%", 1)[0]))
            if reason:
                raise URLRefused(f"host {host!r} resolves to {address} ({reason}); such URLs are refused "
                                 "(serve.allow_private_urls)")  # fmt: skip
    return addresses[0]


def _split_url(url: str):
    """(urlsplit parts, port or None). urlsplit raises ValueError for a port that is not a number in 0..65535 or an
    unclosed IPv6 bracket; such a URL, or port 0, is refused as malformed."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as e:
        raise URLRefused(f"malformed URL: {e}") from None
    if port == 0:  # `port or 80` would fetch port 80 while the Host header names port 0
        raise URLRefused("malformed URL: port 0")
    return parts, port


def fetch(url: str, *, allow_private: bool = False, timeout_s: float = 10.0, max_bytes: int = 20 * 2**20,
          deadline: float | None = None) -> bytes:  # fmt: skip
    """`deadline` (time.monotonic()) is shared by every URL of one request: `timeout_s` apiece let 11 slow URLs hold
    a queue slot for 11 times as long."""
    deadline = time.monotonic() + timeout_s if deadline is None else deadline
    too_slow = f"fetching {url} took longer than {timeout_s:g} s (serve.url_timeout_s, for all of a request's URLs)"
    for _ in range(MAX_REDIRECTS + 1):
        parts, port = _split_url(url)
        if parts.scheme not in ("http", "https"):
            raise URLRefused(f"only http and https URLs are fetched (got {parts.scheme or 'no'} scheme)")
        if not parts.hostname:
            raise URLRefused("the URL has no host")
        if parts.username or parts.password:
            raise URLRefused("URLs with credentials are refused")
        port = port or (443 if parts.scheme == "https" else 80)
        address = resolve_checked(parts.hostname, port, allow_private)
        pinned = f"[{address}]" if ":" in address else address
        target = urlunsplit((parts.scheme, f"{pinned}:{port}", parts.path or "/", parts.query, ""))
        # identity: the body arrives as stored, so the size cap counts what is kept (a gzip inside a gzip of 496
        # bytes unpacked to 200 MB before the cap saw it).
        headers = {"Host": parts.netloc.rsplit("@", 1)[-1], "Accept": "image/*", "Accept-Encoding": "identity"}
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise URLRefused(too_slow)
        try:  # the deadline bounds the whole exchange: httpx's timeout bounds each read, and a server that sent a
            # header byte a second held the request (and its queue slot) for as long as it liked
            location, body = asyncio.run(
                asyncio.wait_for(_get(url, target, headers, parts.hostname, max_bytes), remaining)
            )
        except TimeoutError:
            raise URLRefused(too_slow) from None
        except httpx.InvalidURL as e:  # not an HTTPError: control characters, or over httpx's length limit
            raise URLRefused(f"malformed URL: {e}") from None
        except httpx.HTTPError as e:
            raise URLRefused(f"fetching {url} failed: {type(e).__name__}: {e}") from e
        if body is not None:
            return body
        try:
            url = urljoin(url, location)
        except ValueError as e:  # urljoin splits the Location as urlsplit does
            raise URLRefused(f"{url} redirects to a malformed URL: {e}") from None
    raise URLRefused(f"{url}: more than {MAX_REDIRECTS} redirects")


async def _get(url: str, target: str, headers: dict, sni: str, max_bytes: int) -> tuple[str, bytes | None]:
    """One GET of `target` (the checked address): (a redirect's Location, None) or ("", the body as stored)."""
    async with httpx.AsyncClient(timeout=None, follow_redirects=False, trust_env=False) as client:  # the deadline's
        request = client.build_request("GET", target, headers=headers, extensions={"sni_hostname": sni})
        response = await client.send(request, stream=True)
        try:
            if response.is_redirect:
                return response.headers.get("location", ""), None
            if response.status_code != 200:
                raise URLRefused(f"fetching {url} gave HTTP {response.status_code}")
            encoding = response.headers.get("content-encoding", "identity").strip().lower()
            if encoding not in ("", "identity"):
                raise URLRefused(f"{url} was sent compressed (Content-Encoding: {encoding}); image URLs are fetched as "
                                 "stored: serve the file without compression")  # fmt: skip
            declared = response.headers.get("content-length", "")
            if declared.isdigit() and int(declared) > max_bytes:
                raise URLRefused(f"{url} is {int(declared):,} bytes; the limit is {max_bytes:,}", too_large=True)
            body = bytearray()
            async for chunk in response.aiter_raw():
                body += chunk
                if len(body) > max_bytes:
                    raise URLRefused(f"{url} is over the {max_bytes:,}-byte limit", too_large=True)
            return "", bytes(body)
        finally:
            await response.aclose()
