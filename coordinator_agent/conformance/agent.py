"""``conformance agent``: play the coordinator against a running agent (PROTOCOL.md §19.1).

The agent must implement the example operations ``noop`` and ``sleep`` (§18): ``sleep`` takes
a known time and reports progress, which is what lets a black-box check see concurrency, cancels
and deadlines from outside.
"""

from __future__ import annotations

import asyncio
import itertools
import time
import uuid
from typing import Any

from cryptography.fernet import Fernet

from coordinator_agent.conformance.harness import Harness, Heard
from coordinator_agent.conformance.report import Report
from coordinator_agent.wire import batch, protocol
from coordinator_agent.wire import constants as c

RULES = ("hello", "heartbeat", "concurrency", "progress", "duplicate", "cancel", "deadline",
         "forged", "replayed", "expired", "wrong_epoch", "batch", "own_tasks", "drain")
#: Above this, max_concurrency + 1 sleeping tasks make the run too long to be worth it.
MAX_CONCURRENCY_CHECKED = 16
#: How long each of the concurrency check's tasks sleeps.
SLEEP_S = 1.5
#: Result latency the concurrency check forgives (publish, confirm, delivery).
LATENCY_S = 0.25
#: Slack on every "within" of the rules, for a loaded machine.
GRACE_S = 2.0
#: A timed-out attempt must be reported within its timeout_s plus this.
DEADLINE_SLACK_S = 2.0
#: The leadership epoch the kit plays from the wrong_epoch rule on; one below it is stale.
KIT_EPOCH = 1000


def max_overlap(intervals: list[tuple[float, float]]) -> int:
    """Most intervals open at one instant (an end and a start at the same time do not meet)."""
    events = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals],
                    key=lambda e: (e[0], e[1]))
    most = running = 0
    for _, step in events:
        running += step
        most = max(most, running)
    return most


def running_intervals(result_times: list[float], sleep_s: float,
                      latency_s: float = LATENCY_S) -> list[tuple[float, float]]:
    """When each sleep surely ran: it ended before its result arrived and lasted ``sleep_s``;
    shrunk by the latency a result may take to arrive, so a compliant agent never overlaps."""
    return [(t - sleep_s + latency_s, t - latency_s) for t in result_times]


class AgentConformance:
    def __init__(self, harness: Harness, agent_id: str, *, kind: str | None = None,
                 wait_s: float = 30.0) -> None:
        harness.require_peer(agent_id, "agent")
        self.h = harness
        self.agent = agent_id
        self.kind = kind
        self.wait_s = wait_s
        self.interval = harness.settings.liveness.heartbeat_interval_s
        self.run_id = uuid.uuid4().hex[:8]
        self.assigned: set[tuple[str, int]] = set()
        self.sleep_tasks: list[str] = []
        #: The epoch the kit's directives carry: none until the wrong_epoch rule, as a coordinator
        #: without high availability sends (so the earlier rules hold for any agent).
        self.epoch: int | None = None
        self.report = Report("agent", agent_id)

    # --- helpers ------------------------------------------------------------------------------

    def _assign_payload(self, label: str, op: dict[str, Any], timeout_s: float = 30.0, *,
                        epoch: int | None = None) -> protocol.TaskAssign:
        task_id = f"conformance-{self.run_id}-{label}"
        self.assigned.add((task_id, 1))
        if op.get("op") == "sleep":
            self.sleep_tasks.append(task_id)
        return protocol.TaskAssign(task_id=task_id, attempt=1, description=f"conformance {label}",
                                   input=op, timeout_s=timeout_s,
                                   epoch=self.epoch if epoch is None else epoch)

    async def _assign(self, label: str, op: dict[str, Any], timeout_s: float = 30.0,
                      **seal: Any) -> tuple[str, str]:
        payload = self._assign_payload(label, op, timeout_s)
        return payload.task_id, await self.h.to_agent(self.agent, payload, **seal)

    def _of(self, message_type: str, task_id: str) -> list[Heard]:
        return [m for m in self.h.messages(self.agent, message_type)
                if m.envelope.payload.task_id == task_id]

    def _statuses(self, since: float) -> list[Heard]:
        return [m for m in self.h.messages(self.agent, "agent.status") if m.at >= since]

    async def _pause(self, seconds: float) -> None:
        await asyncio.sleep(max(0.0, seconds))

    # --- the run ------------------------------------------------------------------------------

    async def run(self) -> Report:
        hello = await self._hello()
        if hello is None:
            for rule in RULES[1:]:
                self.report.add(rule, False, "not run: the agent never said hello")
            return self.report
        await self._heartbeat(hello)
        await self._concurrency(hello)
        await self._duplicate()
        await self._cancel()
        await self._deadline()
        self._progress()
        await self._forged_replayed_expired()
        await self._wrong_epoch()
        await self._batch(hello)
        drained = await self._drain()
        self._own_tasks()
        self.report.add("drain", *drained)
        self.report.results.sort(key=lambda r: RULES.index(r.rule))  # the order of §19.1
        return self.report

    async def _hello(self) -> protocol.AgentHello | None:
        heard = await self.h.wait_for(lambda: bool(self.h.messages(self.agent, "agent.hello")),
                                      self.wait_s)
        if not heard:
            refused = [r for r in self.h.refused if r.sender == self.agent]
            why = f" (the kit refused {len(refused)} of its messages: {refused[0].reason})" \
                if refused else ""
            self.report.add("hello", False, f"no agent.hello from {self.agent} within "
                            f"{self.wait_s:g}s{why}")
            return None
        message = self.h.messages(self.agent, "agent.hello")[-1]
        self.h.session = message.envelope.id  # its assignments name this process
        hello: protocol.AgentHello = message.envelope.payload
        problems = []
        if message.routing_key != c.tasks_key(self.h.name):
            problems.append(f"sent with routing key {message.routing_key!r}, not the tasks lane")
        if self.kind is not None and hello.kind != self.kind:
            problems.append(f"kind {hello.kind!r}, expected {self.kind!r}")
        self.report.add("hello", not problems, "; ".join(problems) or
                        f"kind {hello.kind}, max_concurrency {hello.max_concurrency}")
        return hello

    async def _heartbeat(self, hello: protocol.AgentHello) -> None:
        start = time.monotonic()
        window = max(4 * self.interval, 2.0)
        await self._pause(window)
        end = time.monotonic()
        beats = self._statuses(start)
        longest = self.h.settings.liveness.suspect_after * self.interval + LATENCY_S
        problems = []
        times = [start, *(b.at for b in beats), end]
        gap = max(b - a for a, b in itertools.pairwise(times))
        if len(beats) < 2:
            problems.append(f"{len(beats)} heartbeat(s) in {window:.1f}s "
                            f"(interval {self.interval:g}s)")
        elif gap > longest:
            problems.append(f"a gap of {gap:.2f}s between heartbeats (at most {longest:.2f}s)")
        elif (end - start) / len(beats) > 1.5 * self.interval:
            problems.append(f"one heartbeat every {(end - start) / len(beats):.2f}s on average, "
                            f"expected every {self.interval:g}s")
        for beat in beats:
            status: protocol.AgentStatus = beat.envelope.payload
            if beat.routing_key != c.status_key(self.h.name):
                problems.append("a heartbeat not on the status lane")
            if (status.kind, set(status.capabilities), status.max_concurrency) != (
                    hello.kind, set(hello.capabilities), hello.max_concurrency):
                problems.append("a heartbeat whose kind, capabilities or max_concurrency "
                                "differ from the hello")
            if status.state not in ("ready", "busy") or status.in_flight != 0:
                problems.append(f"idle, yet state {status.state!r} and in_flight "
                                f"{status.in_flight}")
            if problems:
                break
        self.report.add("heartbeat", not problems, "; ".join(problems) or
                        f"{len(beats)} heartbeats in {end - start:.1f}s, longest gap {gap:.2f}s")

    async def _concurrency(self, hello: protocol.AgentHello) -> None:
        limit = hello.max_concurrency
        if limit > MAX_CONCURRENCY_CHECKED:
            self.report.add("concurrency", False, f"max_concurrency {limit} > "
                            f"{MAX_CONCURRENCY_CHECKED}: start the agent with a smaller one")
            return
        payloads = [self._assign_payload(f"concurrency-{i}", {"op": "sleep", "seconds": SLEEP_S})
                    for i in range(limit + 1)]
        for payload in payloads:
            await self.h.to_agent(self.agent, payload)
        ids = [p.task_id for p in payloads]
        await self.h.wait_for(lambda: all(self._of("task.result", t) for t in ids),
                              2 * SLEEP_S + 10)
        results = [self._of("task.result", t) for t in ids]
        missing = sum(not r for r in results)
        failed = sum(1 for r in results if r and not r[0].envelope.payload.success)
        most = max_overlap(running_intervals([r[0].at for r in results if r], SLEEP_S))
        problems = []
        if missing or failed:
            problems.append(f"of {len(ids)} sleep tasks, {missing} got no result and {failed} "
                            "failed")
        if most > limit:
            problems.append(f"{most} tasks ran at once, max_concurrency is {limit}")
        self.report.add("concurrency", not problems, "; ".join(problems) or
                        f"{len(ids)} sleep tasks of {SLEEP_S:g}s: at most {most} at once "
                        f"(limit {limit})")

    def _progress(self) -> None:
        reports = self.h.messages(self.agent, "task.progress")
        strangers = sorted({(m.envelope.payload.task_id, m.envelope.payload.attempt)
                            for m in reports} - self.assigned)
        silent, backwards = [], []
        for task_id in self.sleep_tasks:
            values = [m.envelope.payload.progress for m in self._of("task.progress", task_id)]
            ran = any(m.envelope.payload.success for m in self._of("task.result", task_id))
            if ran and not values:
                silent.append(task_id)
            if values != sorted(values):
                backwards.append(f"{task_id}: {values}")
        problems = []
        if strangers:
            task_id, attempt = strangers[0]
            problems.append(f"progress for {len(strangers)} attempt(s) never assigned, e.g. "
                            f"{task_id} attempt {attempt}")
        if backwards:
            problems.append(f"progress went backwards in {len(backwards)} task(s), e.g. "
                            f"{backwards[0]}")
        if silent:
            problems.append(f"no progress from {len(silent)} sleep task(s), e.g. {silent[0]}")
        self.report.add("progress", not problems, "; ".join(problems) or
                        f"{len(reports)} reports, all within 0-1, increasing, for assigned "
                        "attempts")

    async def _duplicate(self) -> None:
        payload = self._assign_payload("duplicate", {"op": "sleep", "seconds": 1.0})
        await self.h.to_agent(self.agent, payload)
        await self._pause(0.3)
        await self.h.to_agent(self.agent, payload)  # same attempt, new envelope id
        await self.h.wait_for(lambda: bool(self._of("task.result", payload.task_id)), 1.0 + 10)
        await self.h.to_agent(self.agent, payload)  # after its result
        await self._pause(1.0 + GRACE_S)
        count = len(self._of("task.result", payload.task_id))
        self.report.add("duplicate", count == 1,
                        f"{count} result(s) for one attempt delivered three times")

    async def _cancel(self) -> None:
        sleep_s = max(4.0, 3 * self.interval)
        sent = time.monotonic()
        task_id, _ = await self._assign("cancel", {"op": "sleep", "seconds": sleep_s})
        if not await self.h.wait_for(lambda: bool(self._of("task.progress", task_id)),
                                     sleep_s / 4 + 5):
            self.report.add("cancel", False, "no progress before the cancel, so the kit cannot "
                            "tell the task was running")
            return
        await self.h.to_agent(self.agent, protocol.TaskCancel(task_id=task_id, attempt=1,
                                                              reason="cancelled"))
        cancelled = time.monotonic()
        dropped = await self.h.wait_for(
            lambda: any(s.envelope.payload.in_flight == 0 for s in self._statuses(cancelled)),
            sent + sleep_s - time.monotonic())
        await self._pause(sent + sleep_s + 1.0 - time.monotonic())
        results = self._of("task.result", task_id)
        problems = []
        if not dropped:
            problems.append(f"in_flight still counted it {sleep_s:g}s after it was assigned")
        if results:
            problems.append("it sent a result for a cancelled attempt")
        self.report.add("cancel", not problems, "; ".join(problems) or
                        "stopped: no result, in_flight back to 0")

    async def _deadline(self) -> None:
        timeout_s, sleep_s = 1.0, 4.0
        sent = time.monotonic()
        task_id, _ = await self._assign("deadline", {"op": "sleep", "seconds": sleep_s},
                                        timeout_s=timeout_s)
        await self.h.wait_for(lambda: bool(self._of("task.result", task_id)),
                              timeout_s + DEADLINE_SLACK_S)
        first = self._of("task.result", task_id)
        await self._pause(sent + sleep_s + 1.0 - time.monotonic())
        results = self._of("task.result", task_id)
        problems = []
        if not first:
            problems.append(f"no result within timeout_s {timeout_s:g}s + {DEADLINE_SLACK_S:g}s")
        elif first[0].envelope.payload.success:
            problems.append("reported success for an attempt that outran its timeout")
        if any(r.envelope.payload.success for r in results):
            problems.append("a success after the deadline")
        self.report.add("deadline", not problems, "; ".join(problems) or
                        f"failure reported {first[0].at - sent:.2f}s after the assignment "
                        f"(timeout_s {timeout_s:g}s)")

    async def _forged_replayed_expired(self) -> None:
        noop = {"op": "noop"}
        now = int(time.time())
        durable = self.h.security.durable_ttl_s
        forged_key, forged_key_id = await self._assign(
            "forged-key", noop, key=Fernet(Fernet.generate_key()))
        forged_sender, forged_sender_id = await self._assign(
            "forged-sender", noop, sender_header=f"{self.h.name}-impostor")
        replay = self._assign_payload("replayed", noop)
        replay_id, body, headers = self.h.seal(replay, self.agent)
        for _ in range(2):
            await self.h.publish(c.AGENTS_EXCHANGE, c.agent_key(self.h.name, self.agent),
                                 body, headers, message_id=replay_id, message_type="task.assign")
            await self._pause(0.3)
        past, past_id = await self._assign("expired-past", noop, stamped_at=now - durable - 300)
        future, future_id = await self._assign("expired-future", noop, stamped_at=now + 300)
        wanted = {forged_key_id: "invalid_token", forged_sender_id: "unknown_sender",
                  replay_id: "replayed", past_id: "expired", future_id: "expired"}
        parked = await self.h.wait_for_dead_letters(wanted, 5 + GRACE_S)
        await self._pause(1.0)  # a noop that ran has reported by now

        def verdict(cases: dict[str, tuple[str, str]], ran_once: str | None = None
                    ) -> tuple[bool, str]:
            """cases: label -> (task id, envelope id); ``ran_once`` must run exactly once."""
            problems = []
            for label, (task, message_id) in cases.items():
                runs = len(self._of("task.result", task))
                if runs != (1 if task == ran_once else 0):
                    problems.append(f"{label}: {runs} result(s)")
                if parked[message_id] != wanted[message_id]:
                    problems.append(f"{label}: {parked[message_id] or 'not dead-lettered'}, "
                                    f"expected {wanted[message_id]}")
            return not problems, "; ".join(problems)

        ok, detail = verdict({"wrong key": (forged_key, forged_key_id),
                              "wrong sender": (forged_sender, forged_sender_id)})
        self.report.add("forged", ok, detail or "wrong key: invalid_token; wrong sender: "
                        "unknown_sender; neither ran")
        ok, detail = verdict({"replayed copy": (replay.task_id, replay_id)},
                             ran_once=replay.task_id)
        self.report.add("replayed", ok, detail or "the copy was dead-lettered as replayed; ran "
                        "once")
        ok, detail = verdict({"stamped in the past": (past, past_id),
                              "stamped in the future": (future, future_id)})
        self.report.add("expired", ok, detail or "stale and future tokens dead-lettered as "
                        "expired; neither ran")

    async def _wrong_epoch(self) -> None:
        noop = {"op": "noop"}
        self.epoch = KIT_EPOCH  # from now on, as a leader of that term
        current, _ = await self._assign("epoch-current", noop)
        await self.h.wait_for(lambda: bool(self._of("task.result", current)), 5 + GRACE_S)
        since = time.monotonic()
        stale = self._assign_payload("epoch-stale", noop, epoch=KIT_EPOCH - 1)
        stale_id = await self.h.to_agent(self.agent, stale)
        drain_id = await self.h.to_agent(self.agent, protocol.AgentDrain(
            reason="conformance: a deposed leader", epoch=KIT_EPOCH - 1))
        wanted = {stale_id: "stale_epoch", drain_id: "stale_epoch"}
        parked = await self.h.wait_for_dead_letters(wanted, 5 + GRACE_S)
        await self._pause(max(1.0, 2 * self.interval + LATENCY_S))  # a run or a drain shows
        problems = []
        if len(self._of("task.result", current)) != 1:
            problems.append(f"the epoch-{KIT_EPOCH} assignment gave "
                            f"{len(self._of('task.result', current))} result(s), expected 1")
        if self._of("task.result", stale.task_id) or self._of("task.progress", stale.task_id):
            problems.append(f"the epoch-{KIT_EPOCH - 1} assignment ran")
        for label, message_id in (("task.assign", stale_id), ("agent.drain", drain_id)):
            if parked[message_id] != "stale_epoch":
                problems.append(f"stale {label}: {parked[message_id] or 'not dead-lettered'}, "
                                "expected stale_epoch")
        if self.h.messages(self.agent, "agent.goodbye") or any(
                m.envelope.payload.state == "draining" for m in self._statuses(since)):
            problems.append("it drained on the stale agent.drain")
        self.report.add("wrong_epoch", not problems, "; ".join(problems) or
                        f"epoch {KIT_EPOCH} ran; epoch {KIT_EPOCH - 1} assign and drain were "
                        "dead-lettered as stale_epoch and not acted on")

    async def _batch(self, hello: protocol.AgentHello) -> None:
        """Batches (§9.13), for an agent that announced ``batch:N``: a batch of assignments
        with one malformed item, then one that repeats an item id."""
        limit = batch.limit_of(hello.capabilities)
        if limit <= 1:
            self.report.not_applicable("batch", "the agent did not announce batch:N: it is "
                                       "sent single messages only")
            return
        good = max(1, min(limit - 1, hello.max_concurrency))
        session = self.h.session
        payloads = [self._assign_payload(f"batch-{i}", {"op": "noop"}) for i in range(good)]
        items = [batch.item_of(p, correlation_id=session) for p in payloads]
        bad_index = min(1, len(items))
        bad_task = f"conformance-{self.run_id}-batch-bad"
        items.insert(bad_index, {"id": protocol.new_message_id(), "type": "task.assign",
                                 "correlation_id": session,
                                 "payload": {"task_id": bad_task, "attempt": 1,
                                             "timeout_s": 30.0}})  # no description
        first = await self.h.batch_to_agent(self.agent, items)
        ids = [p.task_id for p in payloads]
        await self.h.wait_for(lambda: all(self._of("task.result", t) for t in ids), 5 + GRACE_S)
        # The same item again (its id seen before), beside a new one.
        fresh = self._assign_payload("batch-fresh", {"op": "noop"})
        second = await self.h.batch_to_agent(
            self.agent, [items[0], batch.item_of(fresh, correlation_id=session)])
        await self.h.wait_for(lambda: bool(self._of("task.result", fresh.task_id)),
                              5 + GRACE_S)
        deadline = time.monotonic() + 5 + GRACE_S
        wanted = {(first, bad_index): "malformed", (second, 0): "replayed"}
        while True:
            parked = {(d.message_id, d.item): d.reason for d in await self.h.read_dead_letters()}
            if all(k in parked for k in wanted) or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.1)
        await self._pause(1.0)  # a repeated item that ran has reported by now
        problems = []
        for task_id in [*ids, fresh.task_id]:
            results = self._of("task.result", task_id)
            if len(results) != 1 or not results[0].envelope.payload.success:
                problems.append(f"{task_id}: {len(results)} result(s), expected one success")
        if self._of("task.result", bad_task):
            problems.append("the malformed item ran")
        for (batch_id, index), reason in wanted.items():
            got = parked.get((batch_id, index))
            if got != reason:
                problems.append(f"item {index} of a batch: {got or 'not dead-lettered alone'}, "
                                f"expected {reason}")
        for sent in self.h.batches:
            if len(sent.types) > limit:
                problems.append(f"it sent a batch of {len(sent.types)} items, over its "
                                f"batch:{limit}")
            if "task.result" in sent.types and sent.routing_key != c.tasks_key(self.h.name):
                problems.append("it sent results in a batch off the tasks lane")
        self.report.add("batch", not problems, "; ".join(problems[:3]) or
                        f"{good} assignments in one batch ran once each; the malformed item "
                        f"and the repeated one were dead-lettered alone; it sent "
                        f"{len(self.h.batches)} batch(es) of its own")

    def _own_tasks(self) -> None:
        strangers = sorted({(m.envelope.payload.task_id, m.envelope.payload.attempt)
                            for m in self.h.messages(self.agent, "task.progress", "task.result")
                            } - self.assigned)
        refused = [r for r in self.h.refused if r.sender == self.agent]
        problems = [f"reported on {t} attempt {a}, never assigned to it" for t, a in strangers]
        problems += [f"the kit refused a message of it: {r.reason} ({r.detail})"
                     for r in refused[:3]]
        self.report.add("own_tasks", not problems, "; ".join(problems[:3]) or
                        f"every report concerned one of its {len(self.assigned)} assignments")

    async def _drain(self) -> tuple[bool, str]:
        task_id, _ = await self._assign("drain", {"op": "sleep", "seconds": 1.0})
        await self.h.wait_for(lambda: bool(self._of("task.progress", task_id)), 5)
        await self.h.to_agent(self.agent, protocol.AgentDrain(reason="conformance",
                                                              epoch=self.epoch))
        limit = self.h.settings.limits.drain_timeout_s + 5
        if not await self.h.wait_for(
                lambda: bool(self.h.messages(self.agent, "agent.goodbye")), limit):
            return False, f"no agent.goodbye within {limit:g}s of agent.drain"
        goodbye = self.h.messages(self.agent, "agent.goodbye")[-1].envelope
        await self._pause(2 * self.interval + LATENCY_S)  # any heartbeat after it shows now
        statuses = [m.envelope for m in self.h.messages(self.agent, "agent.status")]
        draining = [s for s in statuses if s.payload.state == "draining"]
        result = [m.envelope for m in self._of("task.result", task_id)]
        problems = []
        if not draining or draining[0].sent_at > goodbye.sent_at:
            problems.append("no agent.status with state draining before the goodbye")
        if not result or not result[0].payload.success or result[0].sent_at > goodbye.sent_at:
            problems.append("the running task's success was not reported before the goodbye")
        if any(s.sent_at > goodbye.sent_at for s in statuses):
            problems.append("heartbeats after the goodbye")
        return not problems, "; ".join(problems) or \
            "draining, the running task finished, then goodbye"
