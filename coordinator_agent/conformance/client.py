"""``conformance client``: play the coordinator's tasks-queue side against a submitting client
(PROTOCOL.md §19.2). The client runs on its own; the kit answers each submission it reads."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from cryptography.fernet import Fernet

from coordinator_agent.conformance.harness import Harness, Heard
from coordinator_agent.conformance.report import Report
from coordinator_agent.exceptions import ConfigError, TransportError
from coordinator_agent.wire import constants as c
from coordinator_agent.wire import protocol

RULES = ("submission", "task_id", "reply_queue", "replies", "forged", "replayed", "expired")
#: How long the client has to take (ack) the replies sent to it.
REPLY_WAIT_S = 5.0


@dataclass
class _Findings:
    """Problems per rule, gathered over every submission."""

    problems: dict[str, list[str]] = field(default_factory=lambda: {r: [] for r in RULES})
    checked: dict[str, int] = field(default_factory=lambda: {r: 0 for r in RULES})

    def note(self, rule: str, problem: str | None) -> None:
        self.checked[rule] += 1
        if problem:
            self.problems[rule].append(problem)


class ClientConformance:
    def __init__(self, harness: Harness, principal: str, *, tasks: int = 1,
                 wait_s: float = 30.0) -> None:
        entry = harness.keyring.get(principal)
        if entry is None or entry.role != "operator":
            raise ConfigError(f"{principal!r} is not an operator in the kit's keyring: the kit "
                              "needs the coordinator's whole keyring")
        self.h = harness
        self.principal = principal
        self.tasks = tasks
        self.wait_s = wait_s
        self.run_id = uuid.uuid4().hex[:8]
        self.found = _Findings()
        self.report = Report("client", principal)

    def _submissions(self) -> list[Heard]:
        return self.h.messages(self.principal, "task.submit")

    def _more_than(self, count: int) -> Callable[[], bool]:
        return lambda: len(self._submissions()) > count

    async def run(self) -> Report:
        deadline = time.monotonic() + self.wait_s
        for index in range(self.tasks):
            if not await self.h.wait_for(self._more_than(index), deadline - time.monotonic()):
                break
            await self._answer(self._submissions()[index], first=index == 0)
        got = len(self._submissions())
        refused = [r for r in self.h.refused if r.sender == self.principal]
        for r in refused[:3]:
            self.found.note("submission", f"a message refused by the kit: {r.reason} ({r.detail})")
        if got < self.tasks:
            self.found.note("submission", f"{got} of {self.tasks} submissions arrived within "
                            f"{self.wait_s:g}s")
        for rule in RULES:
            problems = self.found.problems[rule]
            if not self.found.checked[rule]:
                self.report.add(rule, False, "not checked: no submission to answer")
            else:
                self.report.add(rule, not problems, "; ".join(problems[:3]) or
                                f"{self.found.checked[rule]} checked")
        return self.report

    async def _answer(self, heard: Heard, *, first: bool) -> None:
        submit: protocol.TaskSubmit = heard.envelope.payload
        problems = []
        if heard.routing_key != c.tasks_key(self.h.name):
            problems.append(f"routing key {heard.routing_key!r}, not the tasks lane")
        if heard.delivery_mode != 2:
            problems.append(f"delivery_mode {heard.delivery_mode}, not 2 (persistent)")
        if heard.content_type != c.CONTENT_TYPE:
            problems.append(f"content_type {heard.content_type!r}")
        if heard.message_id != heard.envelope.id:
            problems.append("message_id differs from the envelope id")
        self.found.note("submission", "; ".join(problems) or None)
        self.found.note("task_id", None if submit.task_id else
                        "a submission without task_id cannot be retried safely")

        reply_to = submit.reply_to
        prefix = f"{c.CLIENT_QUEUE_PREFIX}{self.principal}."
        state = await self.h.queue_state(reply_to) if reply_to else None
        if reply_to is None:
            problem: str | None = "no reply_to: the client cannot hear the outcome"
        elif not reply_to.startswith(prefix):
            problem = f"reply_to {reply_to!r} does not start with {prefix!r}"
        elif state is None:
            problem = f"reply queue {reply_to!r} does not exist"
        elif state[1] == 0:
            problem = f"nobody consumes reply queue {reply_to!r}"
        else:
            problem = None
        self.found.note("reply_queue", problem)
        if problem is not None or reply_to is None:
            return
        await self._reply(submit, heard.envelope.id, reply_to, twists=first)

    async def _reply(self, submit: protocol.TaskSubmit, envelope_id: str, reply_to: str, *,
                     twists: bool) -> None:
        task_id = submit.task_id or envelope_id
        done = protocol.TaskCompleted(task_id=task_id, status="succeeded",
                                      output={"echo": submit.input})
        stranger = protocol.TaskCompleted(task_id=f"conformance-{self.run_id}-not-yours",
                                          status="succeeded", output=None)
        plain: list[str] = []
        try:
            for payload in (protocol.TaskAccepted(task_id=task_id, status="pending"),
                            done, done, stranger):
                plain.append(await self._send(reply_to, payload))
            wanted: dict[str, str] = {}
            if twists:
                wanted[await self._send(reply_to, done, key=Fernet(Fernet.generate_key()))] = \
                    "invalid_token"
                message_id, body, headers = self.h.seal(done, self.principal)
                for _ in range(2):
                    await self.h.publish("", reply_to, body, headers, message_id=message_id,
                                         message_type="task.completed")
                wanted[message_id] = "replayed"
                stale = int(time.time()) - self.h.security.durable_ttl_s - 300
                wanted[await self._send(reply_to, done, stamped_at=stale)] = "expired"
        except TransportError as exc:
            self.found.note("replies", f"the kit could not reply: {exc}")
            return
        deadline = time.monotonic() + REPLY_WAIT_S
        state = await self.h.queue_state(reply_to)
        while state is not None and state[0] and time.monotonic() < deadline:
            await asyncio.sleep(0.2)  # the client takes its replies
            state = await self.h.queue_state(reply_to)
        emptied = state is not None and state[0] == 0
        parked = await self.h.wait_for_dead_letters(wanted, REPLY_WAIT_S if wanted else 0)
        dead = {d.message_id: d.reason for d in self.h.dead_letters}
        problems = []
        if state is None or not emptied:
            problems.append("replies left unacked in the reply queue" if state else
                            "the reply queue vanished")
        elif state[1] == 0:
            problems.append("the reply queue lost its consumer (did the client crash?)")
        problems += [f"a valid reply was dead-lettered as {dead[i]}" for i in plain if i in dead]
        self.found.note("replies", "; ".join(problems) or None)
        if twists:
            for rule, reason in (("forged", "invalid_token"), ("replayed", "replayed"),
                                 ("expired", "expired")):
                message_id = next(i for i, r in wanted.items() if r == reason)
                got = parked.get(message_id)
                self.found.note(rule, None if got == reason else
                                f"{got or 'not dead-lettered'}, expected {reason}")

    async def _send(self, reply_to: str, payload: protocol.Model, *, key: Fernet | None = None,
                    stamped_at: int | None = None) -> str:
        message_id, body, headers = self.h.seal(payload, self.principal, key=key,
                                                stamped_at=stamped_at)
        await self.h.publish("", reply_to, body, headers, message_id=message_id,
                             message_type=protocol.TYPE_OF_PAYLOAD[type(payload)])
        return message_id
