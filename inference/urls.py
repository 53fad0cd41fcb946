"""Fetch an input image from a user-supplied URL without becoming an SSRF proxy.

Only http(s). The host is resolved once and EVERY address it resolves to is checked with `ipaddress`
(private, loopback, link-local — 169.254.169.254 is the cloud metadata service —, reserved, multicast,
unspecified, and IPv4 hidden in IPv6 are refused unless `allow_private`). The connection then goes to the checked
address itself (the Host header and TLS SNI keep the name), so a DNS answer that changes between check and
connect (rebinding) cannot redirect it. Redirects are followed by hand, at most a few, each re-checked the same
way. A timeout bounds the whole fetch and a size cap bounds the body.
"""

from __future__ import annotations

import ipaddress
import socket
import time
from urllib.parse import urljoin, urlsplit, urlunsplit

MAX_REDIRECTS = 3


class URLRefused(ValueError):
    """The URL is not allowed or could not be fetched; `too_large` when it went over the size cap."""

    def __init__(self, message: str, too_large: bool = False):
        super().__init__(message)
        self.too_large = too_large


def is_public(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    if isinstance(ip, ipaddress.IPv6Address):
        mapped = ip.ipv4_mapped or ip.sixtofour or (ip.teredo[1] if ip.teredo else None)
        if mapped is not None and not is_public(mapped):
            return False
    return not (
        ip.is_private or ip.is_loopback or ip.is_link_local or ip.is_reserved or ip.is_multicast
        or ip.is_unspecified or not ip.is_global
    )  # fmt: skip


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
            ip = ipaddress.ip_address(address.split("%", 1)[0])
            if not is_public(ip):
                raise URLRefused(
                    f"host {host!r} resolves to {address}, a private, loopback, link-local or reserved address; "
                    "such URLs are refused (serve.allow_private_urls)"
                )
    return addresses[0]


def fetch(url: str, *, allow_private: bool = False, timeout_s: float = 10.0, max_bytes: int = 20 * 2**20) -> bytes:
    import httpx

    deadline = time.monotonic() + timeout_s
    for _ in range(MAX_REDIRECTS + 1):
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https"):
            raise URLRefused(f"only http and https URLs are fetched (got {parts.scheme or 'no'} scheme)")
        if not parts.hostname:
            raise URLRefused("the URL has no host")
        if parts.username or parts.password:
            raise URLRefused("URLs with credentials are refused")
        port = parts.port or (443 if parts.scheme == "https" else 80)
        address = resolve_checked(parts.hostname, port, allow_private)
        pinned = f"[{address}]" if ":" in address else address
        target = urlunsplit((parts.scheme, f"{pinned}:{port}", parts.path or "/", parts.query, ""))
        headers = {"Host": parts.netloc.rsplit("@", 1)[-1], "Accept": "image/*"}
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise URLRefused(f"fetching {url} took longer than {timeout_s:g} s")
        try:
            with httpx.Client(timeout=remaining, follow_redirects=False, trust_env=False) as client:
                request = client.build_request("GET", target, headers=headers, extensions={"sni_hostname": parts.hostname})
                response = client.send(request, stream=True)
                try:
                    if response.is_redirect:
                        url = urljoin(url, response.headers.get("location", ""))
                        continue
                    if response.status_code != 200:
                        raise URLRefused(f"fetching {url} gave HTTP {response.status_code}")
                    declared = response.headers.get("content-length", "")
                    if declared.isdigit() and int(declared) > max_bytes:
                        raise URLRefused(f"{url} is {int(declared):,} bytes; the limit is {max_bytes:,}", too_large=True)
                    body = bytearray()
                    for chunk in response.iter_bytes():
                        body += chunk
                        if len(body) > max_bytes:
                            raise URLRefused(f"{url} is over the {max_bytes:,}-byte limit", too_large=True)
                        if time.monotonic() > deadline:
                            raise URLRefused(f"fetching {url} took longer than {timeout_s:g} s")
                    return bytes(body)
                finally:
                    response.close()
        except httpx.HTTPError as e:
            raise URLRefused(f"fetching {url} failed: {type(e).__name__}: {e}") from e
    raise URLRefused(f"{url}: more than {MAX_REDIRECTS} redirects")
