"""The live status page at ``GET /`` of the monitoring port.

One static file, ``static/status.html``, with inline CSS and JavaScript and no external assets,
so it works offline. The server fills in its first state (the answers of ``/api/status``,
``/api/agents`` and ``/api/tasks``) as an inert JSON block, so the first paint shows real data;
then the page polls the JSON API and builds its DOM with ``textContent`` only. The
Content-Security-Policy allows exactly the page's own inline script
and style, by hash: an injected ``<script>`` or ``onerror=`` attribute would not run even if a
rendering bug let one through.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import re
from importlib import resources
from typing import Any

import orjson
from aiohttp import web

PAGE = "static/status.html"
#: Where the first state goes: a JSON block the browser never runs (CSP hashes skip it).
FIRST_STATE = b'<script type="application/json" id="first-state">null</script>'

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


def embed_json(data: Any) -> bytes:
    """JSON that cannot end the block it sits in: ``<``, ``>`` and ``&`` become escapes."""
    return (orjson.dumps(data).replace(b"<", b"\\u003c").replace(b">", b"\\u003e")
            .replace(b"&", b"\\u0026"))


def status_page(first_state: Any = None) -> web.Response:
    """``GET /``: the status page (read-only; it only calls the GET endpoints)."""
    template, policy = page()
    body = template.replace(FIRST_STATE, FIRST_STATE.replace(b">null<",
                                                             b">" + embed_json(first_state) + b"<"))
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
