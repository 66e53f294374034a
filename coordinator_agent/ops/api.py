"""MonitoringSystem's HTTP side: /metrics, /healthz, /readyz and the task/agent API (aiohttp).

Write endpoints (submit a task, drain an agent) need an operator's bearer token
(``Authorization: Bearer <token>``). A refused token is logged and counted, never shown.
"""

from __future__ import annotations

import errno
import logging
import math
import time
import uuid
from typing import Any, Protocol

import orjson
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import ValidationError

from coordinator_agent.coordinator.leadership import STANDBY
from coordinator_agent.coordinator.tasks import TaskRecord
from coordinator_agent.exceptions import (
    ConfigError,
    SecurityError,
    StoreError,
    SubmissionRefused,
    TransportError,
    UnknownTask,
    UnstorableTask,
)
from coordinator_agent.ops.desk_api import DeskView, desk_routes
from coordinator_agent.ops.metrics import Metrics
from coordinator_agent.ops.statuspage import status_page
from coordinator_agent.ops.waiting import why_waiting
from coordinator_agent.wire import protocol

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 256 * 1024
#: The latest tasks the status page shows (and embeds in its first answer).
PAGE_TASKS = 50


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


def _error(status: int, message: str) -> web.Response:
    return _json({"error": message}, status)


class CoordinatorView(Protocol):
    """What the HTTP side needs of the coordinator: reads, submit, drain, the operator check."""

    @property
    def metrics(self) -> Metrics: ...

    @property
    def accepting(self) -> bool: ...

    @property
    def role(self) -> str: ...

    @property
    def registry_state(self) -> str: ...

    def readiness(self) -> dict[str, bool]: ...

    def render_metrics(self) -> bytes: ...

    def status_view(self) -> dict[str, Any]: ...

    def agents_view(self) -> list[dict[str, Any]]: ...

    def recent_tasks(self, limit: int) -> list[TaskRecord]: ...

    async def intake_turn(self, principal: str) -> None: ...

    def get_task(self, task_id: str) -> TaskRecord: ...

    def queue_position(self, task_id: str) -> dict[str, float] | None: ...

    def routing_view(self) -> dict[str, Any]: ...

    def explain_route(self, description: str, *, kind: str | None,
                      required_capabilities: list[str],
                      labels: list[str] | None = None) -> dict[str, Any]: ...

    def submit(self, spec: protocol.TaskSubmit, *, submitted_by: str,
               default_id: str) -> tuple[TaskRecord, bool]: ...

    def operator_for_token(self, token: str) -> str | None: ...

    @property
    def desk(self) -> DeskView: ...

    async def drain_agent(self, agent_id: str, reason: str = "") -> None: ...

    async def forward_submit(self, spec: protocol.TaskSubmit, *, submitted_by: str) -> None: ...

    async def durable(self) -> None: ...


class MonitoringServer:
    def __init__(self, coordinator: CoordinatorView, host: str, port: int) -> None:
        self.coordinator = coordinator
        self.host = host
        self.port = port
        self._runner: web.AppRunner | None = None
        app = web.Application(client_max_size=MAX_BODY_BYTES)
        app.add_routes([
            web.get("/", self.page),
            web.get("/metrics", self.metrics),
            web.get("/healthz", self.healthz),
            web.get("/readyz", self.readyz),
            web.get("/api/status", self.status),
            web.get("/api/agents", self.agents),
            web.post("/api/agents/{agent_id}/drain", self.drain),
            web.post("/api/tasks", self.submit),
            web.get("/api/tasks", self.recent_tasks),
            web.get("/api/tasks/{task_id}", self.task),
            web.get("/api/routing", self.routing),
            web.get("/api/route", self.route),
        ])
        app.add_routes(desk_routes(lambda: self.coordinator.desk, self._operator,
                                   self.coordinator.durable))
        self.app = app

    async def start(self) -> None:
        self._runner = web.AppRunner(self.app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        try:
            await site.start()
        except OSError as exc:
            await self.stop()
            taken = exc.errno == errno.EADDRINUSE
            raise ConfigError(
                f"monitoring port {self.port} on {self.host} is "
                f"{'already in use (is another coordinator running?)' if taken else 'unusable'}"
                f"{'' if taken else f' ({exc.strerror})'}: choose another with "
                "--monitoring-port or COORDINATOR_MONITORING_PORT (0 picks a free one)"
            ) from None
        server = site._server
        if self.port == 0 and server is not None:
            self.port = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
        log.info("monitoring on http://%s:%d", self.host, self.port)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # --- probes and metrics -------------------------------------------------------------------

    async def metrics(self, request: web.Request) -> web.Response:
        body = self.coordinator.render_metrics()
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def healthz(self, request: web.Request) -> web.Response:
        return _json({"status": "ok"})

    async def readyz(self, request: web.Request) -> web.Response:
        checks = self.coordinator.readiness()
        ready = all(checks.values())
        # Without its registry the coordinator still works (on heartbeats): degraded, not unready.
        registry = self.coordinator.registry_state
        body = {"ready": ready, "role": self.coordinator.role, "checks": checks,
                "registry": registry,
                "status": "ready" if ready and registry != "degraded" else
                ("degraded" if ready else "not_ready")}
        return _json(body, 200 if ready else 503)

    # --- API ----------------------------------------------------------------------------------

    async def status(self, request: web.Request) -> web.Response:
        return _json(self.coordinator.status_view())

    async def agents(self, request: web.Request) -> web.Response:
        return _json({"agents": self.coordinator.agents_view()})

    async def page(self, request: web.Request) -> web.Response:
        """The status page, with its first state inside: a one-shot look shows real data."""
        first = {
            "status": self.coordinator.status_view(),
            "agents": {"agents": self.coordinator.agents_view()},
            "tasks": {"tasks": self._task_views(self.coordinator.recent_tasks(PAGE_TASKS))},
        }
        return status_page(first)

    async def recent_tasks(self, request: web.Request) -> web.Response:
        try:
            limit = max(1, min(int(request.query.get("limit", "50")), 500))
        except ValueError:
            return _error(400, "limit must be an integer")
        tasks = self.coordinator.recent_tasks(limit)
        return _json({"tasks": self._task_views(tasks)})

    async def task(self, request: web.Request) -> web.Response:
        try:
            task = self.coordinator.get_task(request.match_info["task_id"])
        except UnknownTask:
            return _error(404, "no such task")
        return _json(self._task_views([task])[0])

    def _task_views(self, tasks: list[TaskRecord]) -> list[dict[str, Any]]:
        """Tasks as the API shows them; a pending one also says why it waits (``waiting``)
        and where it stands in the queue (``queue``: its band, the priority aging has given it
        so far, and how long it has waited)."""
        views = [t.public_view() for t in tasks]
        if any(v.get("status") == "pending" for v in views):
            agents, now = self.coordinator.agents_view(), time.time()
            for view in views:
                waiting = why_waiting(view, agents, now)
                if waiting is not None:
                    view["waiting"] = waiting
                if view.get("status") == "pending":
                    view["queue"] = self.coordinator.queue_position(view["id"])
        return views

    async def routing(self, request: web.Request) -> web.Response:
        """What the router has learned: accuracy, fallback rate, confidence, per-kind success."""
        return _json(self.coordinator.routing_view())

    async def route(self, request: web.Request) -> web.Response:
        """Explain the decision for ``?description=`` (read-only: nothing is submitted)."""
        description = request.query.get("description", "").strip()
        if not description or len(description) > protocol.MAX_DESCRIPTION_CHARS:
            return _error(400, "give ?description= (1 to "
                          f"{protocol.MAX_DESCRIPTION_CHARS} characters)")
        capabilities = [c for c in request.query.getall("capability", []) if c]
        try:
            labels = protocol.task_labels([x for x in request.query.getall("label", []) if x])
        except ValueError as exc:
            return _error(400, f"?label=: {exc}")
        explained = self.coordinator.explain_route(
            description, kind=request.query.get("kind") or None,
            required_capabilities=capabilities, labels=labels)
        return _json(explained)

    async def drain(self, request: web.Request) -> web.Response:
        """Ask an agent to drain: it takes no new work, finishes what it runs, says goodbye."""
        operator = self._operator(request)
        if isinstance(operator, web.Response):
            return operator  # 401
        if self.coordinator.role == STANDBY:
            return _error(503, "this coordinator is a standby: send directives to the leader")
        agent_id = request.match_info["agent_id"]
        known = {a["id"]: a for a in self.coordinator.agents_view()}.get(agent_id)
        if known is None:
            return _error(404, "no such agent")
        if known.get("liveness") in ("dead", "left"):
            return _error(409, f"agent is {known['liveness']}: there is nothing to drain")
        reason: object = ""
        body = await request.read()
        if body.strip():
            try:
                parsed = orjson.loads(body)
            except orjson.JSONDecodeError:
                return _error(400, 'body must be JSON: {"reason": "..."}')
            reason = parsed.get("reason", "") if isinstance(parsed, dict) else None
            try:
                protocol.AgentDrain.model_validate({"reason": reason})  # the directive's rule
            except ValidationError:
                return _error(422, "reason must be a short string (at most 1024 characters)")
        await self.coordinator.drain_agent(agent_id, str(reason))
        log.info("operator %s asked agent %s to drain", operator, agent_id)
        return _json({"agent_id": agent_id, "status": "draining_requested"}, 202)

    async def submit(self, request: web.Request) -> web.Response:
        operator = self._operator(request)
        if isinstance(operator, web.Response):
            return operator  # 401
        standby = self.coordinator.role == STANDBY
        if not standby and not self.coordinator.accepting:
            return _error(503, "coordinator is not accepting tasks right now")
        try:
            body = await request.read()
            spec = protocol.TaskSubmit.model_validate_json(body)
        except web.HTTPRequestEntityTooLarge:
            return _error(413, f"body larger than {MAX_BODY_BYTES} bytes")
        except ValidationError as exc:
            problems = [
                {"field": ".".join(str(p) for p in e["loc"]), "error": e["msg"]}
                for e in exc.errors(include_url=False, include_input=False)
            ]
            return _json({"error": "invalid task", "problems": problems}, 422)
        if spec.reply_to is not None:
            return _error(422, "reply_to is for AMQP clients; poll GET /api/tasks/{id} instead")
        if standby:
            return await self._forward(spec, operator)
        await self.coordinator.intake_turn(operator)  # held while far ahead of others
        try:
            task, duplicate = self.coordinator.submit(
                spec, submitted_by=operator, default_id=uuid.uuid4().hex
            )
        except SubmissionRefused as exc:
            refused = _error(429, str(exc))
            if exc.retry_after_s is not None:  # whole seconds, as RFC 9110 wants
                refused.headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after_s)))
            return refused
        except UnstorableTask as exc:
            return _error(422, f"the task store cannot hold this task: {exc.detail}")
        except StoreError:
            return _error(503, "the task store is not writable; nothing was accepted, "
                          "submit again later")
        try:
            await self.coordinator.durable()  # 2xx only once the store (HA: the log) holds it
        except TransportError:
            return _error(503, "the replicated log did not confirm the task; submit it again "
                          "(with the same task_id) to the leader")
        except StoreError:
            return _error(503, "the task store did not commit the task; submit it again "
                          "(with the same task_id) later")
        return _json({"task_id": task.id, "status": task.status.value, "duplicate": duplicate},
                     200 if duplicate else 202)

    async def _forward(self, spec: protocol.TaskSubmit, operator: str) -> web.Response:
        """A standby puts the task on the tasks queue, as the operator, for the leader to take."""
        if spec.task_id is None:
            spec = spec.model_copy(update={"task_id": uuid.uuid4().hex})
        try:
            await self.coordinator.forward_submit(spec, submitted_by=operator)
        except TransportError as exc:
            return _error(503, f"the task could not be queued for the leader: {exc}")
        except SecurityError:
            return _error(503, "this standby holds no key for the operator; submit to the leader")
        return _json({"task_id": spec.task_id, "status": "queued_for_leader",
                      "duplicate": None, "role": STANDBY}, 202)

    def _operator(self, request: web.Request) -> str | web.Response:
        """The operator a request's bearer token belongs to, or the 401 to answer with."""
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            reason, text = "missing", ("an operator bearer token is required (Authorization: "
                                       "Bearer ...; `coordinator-agent keys token`)")
        else:
            operator = self.coordinator.operator_for_token(token)
            if operator is not None:
                return operator
            reason, text = "invalid", ("invalid token: it belongs to no operator in the "
                                       "coordinator's keyring (`coordinator-agent keys token`)")
        self.coordinator.metrics.api_auth_failures.labels(reason).inc()
        # Who and what, never the token itself.
        log.warning("refused %s %s from %s: %s bearer token", request.method, request.path,
                    request.remote, reason)
        return _error(401, text)
