"""Reaching the services from the CLI, and saying what to do when we cannot.

The monitoring API is read with the standard library (no event loop for a one-shot GET);
every URL shown to the user goes through ``mask_url`` first.
"""

from __future__ import annotations

import argparse
import json
import socket
import urllib.error
import urllib.request
from typing import Any
from urllib.parse import urlsplit

from coordinator_agent.exceptions import ConfigError, CoordinatorError, TransportError
from coordinator_agent.settings import Settings


def describe_error(exc: BaseException) -> str:
    """A few words for an operator: ``connection refused``, not ``[Errno 111] ...``."""
    if isinstance(exc, urllib.error.URLError) and not isinstance(exc, urllib.error.HTTPError):
        if not isinstance(exc.reason, BaseException):
            return str(exc.reason)
        exc = exc.reason
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, socket.gaierror):
        return "cannot resolve the host name"
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, ConnectionResetError):
        return "connection reset"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror[:1].lower() + exc.strerror[1:]
    return str(exc) or type(exc).__name__


def require_broker(url: str, timeout: float = 3.0) -> None:
    """Fail fast, and helpfully, when nothing listens where the broker should be.

    Only for interactive commands: ``run`` and ``worker`` give the broker the connect timeout
    (15 s) to come up, as it may a little later in a container or at boot, and reconnect on
    their own once they have connected.
    """
    from coordinator_agent.wire.messaging import mask_url

    parts = urlsplit(url)
    try:
        port = parts.port or (5671 if parts.scheme == "amqps" else 5672)
    except ValueError:
        raise ConfigError(f"broker URL {mask_url(url)} has an invalid port") from None
    try:
        with socket.create_connection((parts.hostname or "localhost", port), timeout=timeout):
            pass
    except OSError as exc:
        raise TransportError(
            f"cannot reach RabbitMQ at {mask_url(url)} ({describe_error(exc)}) — start it with "
            "`make services`, or point --broker-url / COORDINATOR_BROKER_URL at a running broker"
        ) from None


def monitoring_url(args: argparse.Namespace, settings: Settings) -> str:
    if args.url:
        return str(args.url).rstrip("/")
    return f"http://{settings.monitoring_client_host}:{settings.monitoring_port}"


def origin(url: str) -> str:
    from coordinator_agent.wire.messaging import mask_url

    parts = urlsplit(url)
    return mask_url(f"{parts.scheme}://{parts.netloc}")


def http_get(url: str, timeout: float = 5.0) -> tuple[int, Any]:
    """GET a JSON document from the monitoring API: (HTTP status, body)."""
    return http_request(urllib.request.Request(url), timeout)  # noqa: S310 - scheme checked


def http_request(request: urllib.request.Request, timeout: float = 5.0) -> tuple[int, Any]:
    """Send a request to the monitoring API and read its JSON answer: (HTTP status, body)."""
    url = request.full_url
    if urlsplit(url).scheme not in ("http", "https"):
        raise ConfigError(f"{origin(url)} is not an http(s) URL — check --url / COORDINATOR_URL")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310
            code, raw = response.status, response.read()
    except urllib.error.HTTPError as exc:
        code, raw = exc.code, exc.read()
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise CoordinatorError(
            f"cannot reach the coordinator's monitoring API at {origin(url)} "
            f"({describe_error(exc)}) — is `coordinator-agent run` running? "
            "(--url or COORDINATOR_URL say where it listens)"
        ) from None
    try:
        return code, json.loads(raw or b"{}")
    except ValueError:
        raise CoordinatorError(
            f"{origin(url)} answered {urlsplit(url).path} with HTTP {code} but no JSON — "
            "does --url / COORDINATOR_URL point at the coordinator's monitoring port?"
        ) from None


def api_get(base: str, path: str) -> Any:
    """A GET that must succeed (the read-only API answers 200 or something is wrong)."""
    code, body = http_get(base + path)
    if code != 200:
        detail = body.get("error") if isinstance(body, dict) else None
        raise CoordinatorError(
            f"the coordinator at {origin(base)} answered {path} with HTTP {code}"
            f"{f' ({detail})' if detail else ''} — is it the same version as this command?"
        )
    return body


def api_post(base: str, path: str, body: Any, *, token: str) -> Any:
    """A POST with an operator's bearer token that must be accepted (HTTP 2xx).

    The token goes in the Authorization header only: never in a message or the URL.
    """
    request = urllib.request.Request(  # noqa: S310 - http_request checks the scheme
        base + path, data=json.dumps(body).encode(), method="POST",
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    code, answer = http_request(request)
    if not 200 <= code < 300:
        detail = answer.get("error") if isinstance(answer, dict) else None
        raise CoordinatorError(f"the coordinator at {origin(base)} refused {path}: HTTP {code}"
                               f"{f' ({detail})' if detail else ''}")
    return answer
