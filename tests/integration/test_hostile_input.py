"""Hostile and broken messages sent over the wire are dead-lettered with a reason and counted,
while valid traffic keeps flowing. Messages are crafted by hand, as an outside client would."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter
from typing import Any

import aio_pika
import orjson
from cryptography.fernet import Fernet

from coordinator_agent.client import CoordinatorClient
from coordinator_agent.coordinator.service import CoordinatorAgent
from coordinator_agent.settings import Settings
from coordinator_agent.wire import constants as c
from coordinator_agent.wire.keyring import Keyring

from .conftest import OPERATOR, OTHER_OPERATOR, StartWorker
from .helpers import task_is, wait_until


def envelope(sender: str, type_: str, payload: dict[str, Any], **extra: Any) -> bytes:
    return orjson.dumps({"v": 1, "id": uuid.uuid4().hex, "type": type_, "sender": sender,
                         "sent_at": time.time(), "payload": payload, **extra})


def key_of(keyring: Keyring, principal: str) -> Fernet:
    return Fernet(keyring.principals[principal].keys[0].get_secret_value())


STATUS = {"kind": "general", "capabilities": [], "max_concurrency": 1}


async def test_hostile_messages_are_dead_lettered_with_reasons_and_traffic_flows(
    coordinator: CoordinatorAgent, start_worker: StartWorker, client: CoordinatorClient,
    keyring: Keyring, settings: Settings,
) -> None:
    await start_worker("agent-1")
    await wait_until(lambda: len(coordinator.state.agents) == 1, 5, "agent")
    a1, a2 = key_of(keyring, "agent-1"), key_of(keyring, "agent-2")
    valid_status = a1.encrypt(envelope("agent-3", "agent.status", STATUS))
    a3 = key_of(keyring, "agent-3")
    replayable = a3.encrypt(envelope("agent-3", "agent.status", STATUS))
    hostile: list[tuple[str, bytes, str | None]] = [
        ("invalid_token", b"this is not a fernet token", "agent-1"),
        ("invalid_token", Fernet(Fernet.generate_key()).encrypt(
            envelope("agent-1", "agent.status", STATUS)), "agent-1"),
        ("invalid_token", a2.encrypt(envelope("agent-1", "agent.status", STATUS)), "agent-1"),
        ("unknown_sender", a1.encrypt(envelope("mallory", "agent.status", STATUS)), "mallory"),
        ("unknown_sender", a1.encrypt(envelope("agent-1", "agent.status", STATUS)), None),
        ("malformed", a1.encrypt(b"{not json"), "agent-1"),
        ("malformed", a1.encrypt(envelope("agent-1", "agent.status", {"kind": 5})), "agent-1"),
        ("unknown_type", a1.encrypt(envelope("agent-1", "agent.dance", {})), "agent-1"),
        ("unsupported_version",
         a1.encrypt(envelope("agent-1", "agent.status", STATUS, v=2)), "agent-1"),
        ("sender_mismatch", valid_status, "agent-1"),
        # An hour-old heartbeat (telemetry lives minutes), a two-day-old result (work: a day).
        ("expired", a1.encrypt_at_time(
            envelope("agent-1", "agent.status", STATUS, sent_at=time.time() - 3600),
            int(time.time()) - 3600), "agent-1"),
        ("expired", a1.encrypt_at_time(envelope(
            "agent-1", "task.result", {"task_id": "t1", "attempt": 1, "success": True}),
            int(time.time()) - 2 * 86_400), "agent-1"),
        ("oversized", b"x" * (settings.limits.max_message_bytes + 1), "agent-1"),
        ("forbidden", key_of(keyring, OPERATOR).encrypt(envelope(
            OPERATOR, "task.result", {"task_id": "t1", "attempt": 1, "success": True})),
         OPERATOR),
        ("forbidden", a1.encrypt(envelope("agent-1", "task.submit", {"description": "x"})),
         "agent-1"),
        ("not_assigned", a1.encrypt(envelope(
            "agent-1", "task.result", {"task_id": "someone-else", "attempt": 1,
                                       "success": True})), "agent-1"),
        ("replayed", replayable, "agent-3"),  # the first copy below is accepted
    ]

    connection = await aio_pika.connect(settings.broker_url.get_secret_value())
    async with connection:
        channel = await connection.channel()
        exchange = await channel.get_exchange(c.COORDINATOR_EXCHANGE)

        async def send(body: bytes, sender: str | None, lane: str) -> None:
            headers = {c.HEADER_SENDER: sender} if sender else {}
            await exchange.publish(aio_pika.Message(body, headers=headers), lane)

        await send(replayable, "agent-3", c.status_key(settings.name))
        ids = []
        for i, (_, body, sender) in enumerate(hostile):
            lane = c.tasks_key(settings.name) if i % 2 else c.status_key(settings.name)
            await send(body, sender, lane)
            ids.append(await client.submit(f"valid task {i}"))

        results = await asyncio.gather(*(client.wait(task_id, 20) for task_id in ids))
        assert [r.status for r in results] == ["succeeded"] * len(hostile)

        expected = Counter(reason for reason, _, _ in hostile)
        rejected = coordinator.metrics.messages_rejected
        await wait_until(
            lambda: sum(rejected.labels(r)._value.get() for r in expected) == len(hostile), 10,
            "every hostile message counted")
        for reason, count in expected.items():
            assert rejected.labels(reason)._value.get() == count, reason

        dead_letters = await channel.get_queue(c.dead_letter_queue(settings.name))
        seen: Counter[str] = Counter()
        for _ in range(200):
            message = await dead_letters.get(fail=False, no_ack=True)
            if message is None:
                if sum(seen.values()) >= len(hostile):
                    break
                await asyncio.sleep(0.05)
                continue
            headers = message.headers or {}
            seen[str(headers[c.HEADER_REJECT_REASON])] += 1
            assert headers[c.HEADER_ORIGINAL_EXCHANGE] == c.COORDINATOR_EXCHANGE
            assert headers[c.HEADER_REJECT_DETAIL]
        assert seen == expected
    # The agent that was impersonated is still fine, and so is the coordinator.
    assert coordinator.ready
    assert coordinator.state.agents["agent-1"].liveness.value == "healthy"


async def test_clients_cannot_redirect_replies_or_reuse_another_clients_task_id(
    coordinator: CoordinatorAgent, start_worker: StartWorker, client: CoordinatorClient,
    keyring: Keyring, settings: Settings,
) -> None:
    await start_worker("agent-1")
    mine = await client.submit("mine", task_id="shared-id", input={"op": "stats", "text": "a"})
    assert (await client.wait(mine, 10)).status == "succeeded"

    async with CoordinatorClient(settings, keyring, OTHER_OPERATOR) as other:
        await other.submit("take over", task_id="shared-id")
        refused = await other.wait("shared-id", 10)
    assert refused.status == "rejected" and refused.output is None
    assert "another client" in (refused.error or "")

    # A reply queue that is not the sender's own (here: the coordinator's tasks queue).
    operator_key = key_of(keyring, OPERATOR)
    body = operator_key.encrypt(envelope(OPERATOR, "task.submit", {
        "description": "x", "reply_to": c.tasks_queue(settings.name)}))
    connection = await aio_pika.connect(settings.broker_url.get_secret_value())
    async with connection:
        channel = await connection.channel()
        exchange = await channel.get_exchange(c.COORDINATOR_EXCHANGE)
        await exchange.publish(aio_pika.Message(body, headers={c.HEADER_SENDER: OPERATOR}),
                               c.tasks_key(settings.name))
    forbidden = coordinator.metrics.messages_rejected.labels("forbidden")
    await wait_until(lambda: forbidden._value.get() == 1, 10, "the redirect rejected")
    assert coordinator.state.totals["submitted"] == 1


def hand_written(sender: str, type_: str, payload: str, **fields: str) -> bytes:
    """An envelope as raw JSON text, so it can hold what no JSON library writes (NaN, 1e999)."""
    values = {"v": "1", "id": f'"{uuid.uuid4().hex}"', "type": f'"{type_}"',
              "sender": f'"{sender}"', "sent_at": repr(time.time()), "correlation_id": "null",
              "payload": payload, **fields}
    return ("{" + ",".join(f'"{k}":{v}' for k, v in values.items()) + "}").encode()


async def test_the_wire_is_strict_about_json_types_and_numbers(
    coordinator: CoordinatorAgent, start_worker: StartWorker, client: CoordinatorClient,
    keyring: Keyring, settings: Settings,
) -> None:
    """What an outside trial got accepted: each is now refused, counted and dead-lettered."""
    await start_worker("agent-1")
    await wait_until(lambda: "agent-1" in coordinator.state.agents, 5, "agent")
    agent, operator = key_of(keyring, "agent-1"), key_of(keyring, OPERATOR)
    status = '{"kind":"general","capabilities":[],"max_concurrency":1}'
    submit = '{"task_id":"%s","description":"strict","input":%s}'
    cases: list[tuple[str, str, bytes, str]] = [  # (reason, lane, body, sender)
        # "v": true created a task that ran; "v": "1" was refused: both are now refused alike.
        ("unsupported_version", "tasks", operator.encrypt(hand_written(
            OPERATOR, "task.submit", submit % ("v-true", "null"), v="true")), OPERATOR),
        ("unsupported_version", "tasks", operator.encrypt(hand_written(
            OPERATOR, "task.submit", submit % ("v-string", "null"), v='"1"')), OPERATOR),
        ("unsupported_version", "tasks", operator.encrypt(hand_written(
            OPERATOR, "task.submit", submit % ("v-float", "null"), v="1.0")), OPERATOR),
        # Non-finite sent_at (NaN also slipped past the age check) and a numeric string.
        ("malformed", "status", agent.encrypt(hand_written(
            "agent-1", "agent.status", status, sent_at="NaN")), "agent-1"),
        ("malformed", "status", agent.encrypt(hand_written(
            "agent-1", "agent.status", status, sent_at="1e999")), "agent-1"),
        ("malformed", "status", agent.encrypt(hand_written(
            "agent-1", "agent.status", status, sent_at="Infinity")), "agent-1"),
        ("malformed", "tasks", operator.encrypt(hand_written(
            OPERATOR, "task.submit", submit % ("sent-at-string", "null"),
            sent_at=f'"{time.time():.0f}"')), OPERATOR),
        # Infinity and NaN in agent metrics.
        ("malformed", "status", agent.encrypt(hand_written(
            "agent-1", "agent.metrics", '{"values":{"cpu":Infinity}}')), "agent-1"),
        ("malformed", "status", agent.encrypt(hand_written(
            "agent-1", "agent.metrics", '{"values":{"cpu":NaN}}')), "agent-1"),
        # A boolean where an integer belongs, a string where a number belongs.
        ("malformed", "tasks", operator.encrypt(hand_written(
            OPERATOR, "task.submit",
            '{"task_id":"retries-bool","description":"d","max_retries":true}')), OPERATOR),
        ("malformed", "tasks", operator.encrypt(hand_written(
            OPERATOR, "task.submit",
            '{"task_id":"timeout-string","description":"d","timeout_s":"5"}')), OPERATOR),
        # An integer beyond 64 bits in the input, and a non-finite number inside it.
        ("malformed", "tasks", operator.encrypt(hand_written(
            OPERATOR, "task.submit",
            submit % ("huge-int", '{"n":123456789012345678901234567890}'))), OPERATOR),
        ("malformed", "tasks", operator.encrypt(hand_written(
            OPERATOR, "task.submit", submit % ("nan-input", "[1,NaN]"))), OPERATOR),
        # A heartbeat stamped an hour ahead would outlive the replay window.
        ("expired", "status", agent.encrypt(hand_written(
            "agent-1", "agent.status", status, sent_at=repr(time.time() + 3600))), "agent-1"),
    ]
    metrics_before = dict(coordinator.state.agents["agent-1"].metrics)
    connection = await aio_pika.connect(settings.broker_url.get_secret_value())
    async with connection:
        channel = await connection.channel()
        exchange = await channel.get_exchange(c.COORDINATOR_EXCHANGE)
        for _, lane, body, sender in cases:
            key = c.tasks_key(settings.name) if lane == "tasks" else c.status_key(settings.name)
            await exchange.publish(aio_pika.Message(body, headers={c.HEADER_SENDER: sender}), key)
        # The same valid traffic still flows, hand-written the same way (the helper is sound).
        valid = submit % ("well-formed", '{"op":"noop","n":9223372036854775807}')
        await exchange.publish(aio_pika.Message(
            operator.encrypt(hand_written(OPERATOR, "task.submit", valid)),
            headers={c.HEADER_SENDER: OPERATOR}), c.tasks_key(settings.name))
        await wait_until(task_is(coordinator, "well-formed", "succeeded"), 10, "valid task")

        expected = Counter(reason for reason, _, _, _ in cases)
        rejected = coordinator.metrics.messages_rejected
        await wait_until(
            lambda: sum(rejected.labels(r)._value.get() for r in expected) == len(cases), 10,
            "every strict-wire case counted")
        for reason, count in expected.items():
            assert rejected.labels(reason)._value.get() == count, reason

        dead_letters = await channel.get_queue(c.dead_letter_queue(settings.name))
        seen: Counter[str] = Counter()
        deadline = time.monotonic() + 10
        while sum(seen.values()) < len(cases) and time.monotonic() < deadline:
            message = await dead_letters.get(fail=False, no_ack=True)
            if message is None:
                await asyncio.sleep(0.05)
                continue
            seen[str((message.headers or {})[c.HEADER_REJECT_REASON])] += 1
        assert seen == expected
    # None of the refused submissions created a task; no bad number reached the agent record.
    refused = {"v-true", "v-string", "v-float", "sent-at-string", "retries-bool",
               "timeout-string", "huge-int", "nan-input"}
    assert all(coordinator.state.find_task(task_id) is None for task_id in refused)
    assert coordinator.state.totals["submitted"] == 1
    assert coordinator.state.agents["agent-1"].metrics == metrics_before


async def test_agents_and_clients_are_as_strict_as_the_coordinator(
    start_worker: StartWorker, client: CoordinatorClient, keyring: Keyring, settings: Settings,
    cleanup_namespace: None,
) -> None:
    """The SDK shares the codec: directives and replies that bend JSON types are dead-lettered
    by the agent and the client, and nothing runs or completes because of them."""
    worker = await start_worker("agent-1")
    agent_key, operator_key = key_of(keyring, "agent-1"), key_of(keyring, OPERATOR)
    coordinator = settings.name
    assign = '{"task_id":"%s","attempt":%s,"description":"d","input":%s,"timeout_s":%s}'
    to_agent = [
        ("unsupported_version", hand_written(coordinator, "task.assign",
                                             assign % ("v-true", "1", "null", "5"), v="true")),
        ("malformed", hand_written(coordinator, "task.assign",
                                   assign % ("attempt-true", "true", "null", "5"))),
        ("malformed", hand_written(coordinator, "task.assign",
                                   assign % ("timeout-nan", "1", "null", "NaN"))),
        ("malformed", hand_written(coordinator, "task.assign",
                                   assign % ("timeout-string", "1", "null", '"5"'))),
        ("malformed", hand_written(coordinator, "task.assign", assign % (
            "huge-input", "1", '{"op":"noop","n":123456789012345678901234567890}', "5"))),
    ]
    completed = '{"task_id":"%s","status":"succeeded","output":%s}'
    to_client = [
        ("unsupported_version", hand_written(coordinator, "task.completed",
                                             completed % ("c-v-true", "null"), v="true")),
        ("malformed", hand_written(coordinator, "task.completed",
                                   completed % ("c-inf", "[Infinity]"))),
        ("malformed", hand_written(coordinator, "task.completed",
                                   completed % ("c-sent-at", "null"), sent_at='"1"')),
    ]
    connection = await aio_pika.connect(settings.broker_url.get_secret_value())
    async with connection:
        channel = await connection.channel()
        agents = await channel.get_exchange(c.AGENTS_EXCHANGE)
        for _, body in to_agent:
            await agents.publish(aio_pika.Message(agent_key.encrypt(body), headers={
                c.HEADER_SENDER: coordinator}), c.agent_key(coordinator, "agent-1"))
        for _, body in to_client:
            await channel.default_exchange.publish(aio_pika.Message(
                operator_key.encrypt(body), headers={c.HEADER_SENDER: coordinator}),
                client.reply_queue)

        dead_letters = await channel.get_queue(c.dead_letter_queue(coordinator))
        seen: Counter[tuple[str, str]] = Counter()
        expected = Counter([(reason, c.agent_queue(coordinator, "agent-1"))
                            for reason, _ in to_agent]
                           + [(reason, client.reply_queue) for reason, _ in to_client])
        deadline = time.monotonic() + 10
        while sum(seen.values()) < sum(expected.values()) and time.monotonic() < deadline:
            message = await dead_letters.get(fail=False, no_ack=True)
            if message is None:
                await asyncio.sleep(0.05)
                continue
            headers = message.headers or {}
            # Where it was headed tells whose check refused it.
            routed = str(headers[c.HEADER_ORIGINAL_ROUTING_KEY])
            queue = (c.agent_queue(coordinator, "agent-1")
                     if routed == c.agent_key(coordinator, "agent-1") else routed)
            seen[(str(headers[c.HEADER_REJECT_REASON]), queue)] += 1
        assert seen == expected
    assert worker.completed == worker.failed == 0 and worker.in_flight == 0
    assert client.notices == []
