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
from coordinator_agent.exceptions import TransportError
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
        harness.require_peer(principal, "operator")
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
        if heard.message_id != (heard.batch_id or heard.envelope.id):
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
        """Everything that must not end the client's wait comes before the outcome, so that a
        client that leaves once it has its outcome (``submit --wait``) is judged fairly."""
        task_id = submit.task_id or envelope_id
        accepted = protocol.TaskAccepted(task_id=task_id, status="pending")
        done = protocol.TaskCompleted(task_id=task_id, status="succeeded",
                                      output={"echo": submit.input})
        stranger = protocol.TaskCompleted(task_id=f"conformance-{self.run_id}-not-yours",
                                          status="succeeded", output=None)
        valid: list[str] = []
        wanted: dict[str, str] = {}
        try:
            valid.append(await self._send(reply_to, accepted))
            if twists:
                forged = await self._send(reply_to, done, key=Fernet(Fernet.generate_key()))
                wanted[forged] = "invalid_token"
                message_id, body, headers = self.h.seal(accepted, self.principal)
                for _ in range(2):
                    await self.h.publish("", reply_to, body, headers, message_id=message_id,
                                         message_type="task.accepted")
                valid.append(message_id)  # its first copy is valid
                wanted[message_id] = "replayed"
                stale = int(time.time()) - self.h.security.durable_ttl_s - 300
                wanted[await self._send(reply_to, done, stamped_at=stale)] = "expired"
            valid.append(await self._send(reply_to, stranger))
            valid.append(await self._send(reply_to, protocol.TaskAccepted(
                task_id=task_id, status="pending", duplicate=True)))
            before = await self._drained(reply_to)
            parked = await self.h.wait_for_dead_letters(wanted, REPLY_WAIT_S if wanted else 0)
            valid.append(await self._send(reply_to, done))
            valid.append(await self._send(reply_to, done))  # a repeated notice
        except TransportError as exc:
            self.found.note("replies", f"the kit could not reply: {exc}")
            return
        after = await self._drained(reply_to, or_left=True)
        dead = {d.message_id: d.reason for d in await self.h.read_dead_letters()}
        problems = []
        if before is None or before[0]:
            problems.append("replies before the outcome left unacked" if before else
                            "the reply queue vanished")
        elif before[1] == 0:
            problems.append("the client stopped consuming before its outcome (did it crash on "
                            "a bad or unknown notice?)")
        if after is not None and after[0] and after[1]:
            problems.append("the outcome or its repeat left unacked while the client consumes")
        problems += [f"a valid reply was dead-lettered as {dead[i]}"
                     for i in valid if i in dead and i not in wanted]
        self.found.note("replies", "; ".join(problems) or None)
        if twists:
            for rule, reason in (("forged", "invalid_token"), ("replayed", "replayed"),
                                 ("expired", "expired")):
                message_id = next(i for i, r in wanted.items() if r == reason)
                got = parked.get(message_id)
                self.found.note(rule, None if got == reason else
                                f"{got or 'not dead-lettered'}, expected {reason}")

    async def _drained(self, queue: str, *, or_left: bool = False) -> tuple[int, int] | None:
        """(messages, consumers) once the client has taken every reply (or, with ``or_left``,
        has gone), or after REPLY_WAIT_S."""
        deadline = time.monotonic() + REPLY_WAIT_S
        while True:
            state = await self.h.queue_state(queue)
            settled = state is None or state[0] == 0 or (or_left and state[1] == 0)
            if settled or time.monotonic() > deadline:
                return state
            await asyncio.sleep(0.1)

    async def _send(self, reply_to: str, payload: protocol.Model, *, key: Fernet | None = None,
                    stamped_at: int | None = None) -> str:
        message_id, body, headers = self.h.seal(payload, self.principal, key=key,
                                                stamped_at=stamped_at)
        await self.h.publish("", reply_to, body, headers, message_id=message_id,
                             message_type=protocol.TYPE_OF_PAYLOAD[type(payload)])
        return message_id
