"""The live status page at ``GET /`` of the monitoring port.

One static file, ``static/status.html``, with inline CSS and JavaScript and no external assets,
so it works offline. It reads the JSON API from the browser and builds its DOM with
``textContent`` only. The Content-Security-Policy allows exactly the page's own inline script
and style, by hash: an injected ``<script>`` or ``onerror=`` attribute would not run even if a
rendering bug let one through.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import re
from importlib import resources

from aiohttp import web

PAGE = "static/status.html"

_INLINE = re.compile(r"<(script|style)>(.*?)</\1>", re.DOTALL)


def _source_hash(source: str) -> str:
    digest = hashlib.sha256(source.encode("utf-8")).digest()
    return f"'sha256-{base64.b64encode(digest).decode('ascii')}'"


def content_security_policy(html: str) -> str:
    """A policy that admits the inline blocks of ``html`` by hash, and nothing else inline."""
    hashes: dict[str, list[str]] = {"script": [], "style": []}
    for tag, source in _INLINE.findall(html):
        hashes[tag].append(_source_hash(source))
    return "; ".join([
        "default-src 'self'",
        "script-src " + (" ".join(hashes["script"]) or "'none'"),
        "style-src " + (" ".join(hashes["style"]) or "'none'"),
        "connect-src 'self'",
        "img-src 'self'",
        "object-src 'none'",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
    ])


@functools.cache
def page() -> tuple[bytes, str]:
    """The page's bytes and the Content-Security-Policy that goes with them (read once)."""
    body = resources.files(__package__).joinpath(PAGE).read_bytes()
    return body, content_security_policy(body.decode("utf-8"))


async def status_page(request: web.Request) -> web.Response:
    """``GET /``: the status page (read-only; it only calls the GET endpoints)."""
    body, policy = page()
    return web.Response(
        body=body,
        content_type="text/html",
        charset="utf-8",
        headers={
            "Content-Security-Policy": policy,
            "X-Content-Type-Options": "nosniff",
            "X-Frame-Options": "DENY",
            "Referrer-Policy": "no-referrer",
            "Cache-Control": "no-store",
        },
    )
