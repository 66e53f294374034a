"""Raw aio-pika processes for the request/reply baselines of bench/e2e_tasks.py.

Responder: consumes QUEUE with manual acks (prefetch PREFETCH), publishes a reply to each
message's reply_to (persistent, publisher-confirmed) and acks the request once the reply is
confirmed: the same per-hop guarantees as the coordinator's agents, without encryption,
validation or state.

Relay (``--relay-to AGENT_QUEUE --results RESULTS``): the coordinator's four hops without its
work. It consumes QUEUE (a quorum queue, like a submission lane), forwards each request to
AGENT_QUEUE (classic, like an agent's queue) with reply_to RESULTS (quorum, like the tasks
queue), consumes RESULTS and forwards each reply to the client's own reply queue; every
forward is persistent and confirmed before the message it carries is acked.

    python bench/raw_responder.py QUEUE [--prefetch 64]
    python bench/raw_responder.py QUEUE --relay-to AGENT_QUEUE --results RESULTS [--prefetch 64]

Prints "ready" once consuming; stops on SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from collections.abc import Awaitable, Callable
from typing import Any

import aio_pika
from aio_pika.abc import AbstractExchange, AbstractIncomingMessage

BROKER_URL = "amqp://guest:guest@127.0.0.1:5672/"
QUORUM = {"x-queue-type": "quorum"}
#: Where the relay keeps the client's reply queue while the agent holds the request.
CLIENT_REPLY_HEADER = "x-client-reply-to"


def _forward(message: AbstractIncomingMessage, body: bytes, **properties: Any
             ) -> aio_pika.Message:
    return aio_pika.Message(body, correlation_id=message.correlation_id,
                            content_type="application/json",
                            delivery_mode=aio_pika.DeliveryMode.PERSISTENT, **properties)


def responder(exchange: AbstractExchange
              ) -> Callable[[AbstractIncomingMessage], Awaitable[None]]:
    async def on_request(message: AbstractIncomingMessage) -> None:
        if message.reply_to:
            reply = _forward(message, b'{"status":"succeeded","output":null}',
                             headers=dict(message.headers or {}))
            await exchange.publish(reply, routing_key=message.reply_to, timeout=10)
        await message.ack()
    return on_request


async def serve(queue_name: str, prefetch: int, relay_to: str | None, results: str | None
                ) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    connection = await aio_pika.connect(BROKER_URL, timeout=10,
                                        client_properties={"connection_name": "bench-raw"})
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        await channel.set_qos(prefetch_count=prefetch)
        exchange = channel.default_exchange
        consuming = []
        if relay_to is None or results is None:
            queue = await channel.declare_queue(queue_name, durable=True)
            consuming.append((queue, await queue.consume(responder(exchange))))
        else:
            requests = await channel.declare_queue(queue_name, durable=True, arguments=QUORUM)
            replies = await channel.declare_queue(results, durable=True, arguments=QUORUM)
            await channel.declare_queue(relay_to, durable=True)

            async def on_request(message: AbstractIncomingMessage) -> None:
                await exchange.publish(
                    _forward(message, message.body, reply_to=results,
                             headers={CLIENT_REPLY_HEADER: message.reply_to or ""}),
                    routing_key=relay_to, timeout=10)
                await message.ack()

            async def on_result(message: AbstractIncomingMessage) -> None:
                client = str((message.headers or {}).get(CLIENT_REPLY_HEADER) or "")
                if client:
                    await exchange.publish(_forward(message, message.body),
                                           routing_key=client, timeout=10)
                await message.ack()

            consuming.append((requests, await requests.consume(on_request)))
            consuming.append((replies, await replies.consume(on_result)))
        print("ready", flush=True)
        await stop.wait()
        for queue, tag in consuming:
            await queue.cancel(tag)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("queue")
    parser.add_argument("--prefetch", type=int, default=64)
    parser.add_argument("--relay-to", metavar="AGENT_QUEUE",
                        help="relay mode: forward requests to this (classic) queue")
    parser.add_argument("--results", metavar="QUEUE",
                        help="relay mode: the (quorum) queue the agent replies to")
    args = parser.parse_args()
    if (args.relay_to is None) != (args.results is None):
        parser.error("--relay-to and --results go together")
    asyncio.run(serve(args.queue, args.prefetch, args.relay_to, args.results))


if __name__ == "__main__":
    main()
