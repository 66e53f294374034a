"""The operator's desk over HTTP: cancel, redirect, and the escalation desk (coordinator/desk.py).

Every endpoint here changes state, so each needs an operator's bearer token. Answers: 200 with
the task's view; 404 for an unknown task; 409 when the task's state rules the action out (an
ended task, a task that is not escalated); 422 for a bad body.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Annotated, Any, Protocol

import orjson
from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, JsonValue, ValidationError

from coordinator_agent.coordinator.tasks import TaskRecord
from coordinator_agent.exceptions import StoreError, TaskConflict, TransportError, UnknownTask
from coordinator_agent.wire.protocol import Identifier, Label

Reason = Annotated[str, Field(max_length=1024)]


class DeskView(Protocol):
    """What the HTTP side needs of ``coordinator.desk.OperatorDesk``."""

    def escalated(self) -> list[TaskRecord]: ...

    def cancel(self, task_id: str, operator: str, reason: str = "") -> TaskRecord: ...

    def redirect(self, task_id: str, operator: str, kind: str) -> TaskRecord: ...

    def retry(self, task_id: str, operator: str, *, kind: str | None = None,
              agent_id: str | None = None) -> TaskRecord: ...

    def resolve(self, task_id: str, operator: str, output: Any) -> TaskRecord: ...

    def fail(self, task_id: str, operator: str, reason: str) -> TaskRecord: ...


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CancelBody(_Body):
    reason: Reason = ""


class RedirectBody(_Body):
    kind: Label


class RetryBody(_Body):
    kind: Label | None = None
    agent_id: Identifier | None = None


class ResolveBody(_Body):
    output: JsonValue = None


class FailBody(_Body):
    reason: Annotated[str, Field(min_length=1, max_length=1024)]


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


def desk_routes(desk: Callable[[], DeskView],
                operator: Callable[[web.Request], str | web.Response],
                durable: Callable[[], Awaitable[None]] | None = None) -> list[web.RouteDef]:
    """The routes, bound to the coordinator's desk and its operator check (``api.py``: the
    operator's id, or the 401 to answer with, logged and counted there). ``durable``: until
    the change is committed (HA: in the log); a 200 is never sent before."""

    async def act(request: web.Request, body_model: type[_Body],
                  action: Callable[[str, str, Any], TaskRecord]) -> web.Response:
        who = operator(request)
        if isinstance(who, web.Response):
            return who
        raw = await request.read()
        try:
            body = body_model.model_validate_json(raw or b"{}")
        except ValidationError as exc:
            problems = [{"field": ".".join(str(p) for p in e["loc"]), "error": e["msg"]}
                        for e in exc.errors(include_url=False, include_input=False)]
            return _json({"error": "invalid request", "problems": problems}, 422)
        try:
            task = action(request.match_info["task_id"], who, body)
        except UnknownTask:
            return _json({"error": "no such task"}, 404)
        except TaskConflict as exc:
            return _json({"error": str(exc)}, 409)
        except StoreError:  # memory was rolled back: the action did not happen
            return _json({"error": "the task store is not writable; nothing was changed, "
                          "try again later"}, 503)
        if durable is not None:
            try:
                await durable()
            except (StoreError, TransportError):
                return _json({"error": "the change was not confirmed durable; look at the "
                              "task and try again"}, 503)
        return _json(task.public_view())

    async def cancel(request: web.Request) -> web.Response:
        return await act(request, CancelBody,
                         lambda t, who, b: desk().cancel(t, who, b.reason))

    async def redirect(request: web.Request) -> web.Response:
        return await act(request, RedirectBody,
                         lambda t, who, b: desk().redirect(t, who, b.kind))

    async def retry(request: web.Request) -> web.Response:
        return await act(request, RetryBody, lambda t, who, b: desk().retry(
            t, who, kind=b.kind, agent_id=b.agent_id))

    async def resolve(request: web.Request) -> web.Response:
        return await act(request, ResolveBody,
                         lambda t, who, b: desk().resolve(t, who, b.output))

    async def fail(request: web.Request) -> web.Response:
        return await act(request, FailBody, lambda t, who, b: desk().fail(t, who, b.reason))

    async def escalated(request: web.Request) -> web.Response:
        return _json({"tasks": [t.public_view() for t in desk().escalated()]})

    return [
        web.get("/api/escalations", escalated),
        web.post("/api/tasks/{task_id}/cancel", cancel),
        web.post("/api/tasks/{task_id}/redirect", redirect),
        web.post("/api/tasks/{task_id}/retry", retry),
        web.post("/api/tasks/{task_id}/resolve", resolve),
        web.post("/api/tasks/{task_id}/fail", fail),
    ]
