"""Raw aio-pika responder for the request/reply baseline of bench/e2e_tasks.py.

Consumes REQUEST_QUEUE with manual acks (prefetch PREFETCH), publishes a reply to each message's
reply_to (persistent, publisher-confirmed) and acks the request once the reply is confirmed: the
same per-hop guarantees as the coordinator's agents, without encryption, validation or state.

    python bench/raw_responder.py QUEUE [--prefetch 64]

Prints "ready" once consuming; stops on SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import signal

import aio_pika
from aio_pika.abc import AbstractIncomingMessage

BROKER_URL = "amqp://guest:guest@127.0.0.1:5672/"


async def serve(queue_name: str, prefetch: int) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    connection = await aio_pika.connect(BROKER_URL, timeout=10,
                                        client_properties={"connection_name": "bench-raw"})
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        await channel.set_qos(prefetch_count=prefetch)
        queue = await channel.declare_queue(queue_name, durable=True)
        exchange = channel.default_exchange

        async def on_request(message: AbstractIncomingMessage) -> None:
            reply = aio_pika.Message(
                b'{"status":"succeeded","output":null}',
                correlation_id=message.correlation_id,
                content_type="application/json",
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            )
            if message.reply_to:
                await exchange.publish(reply, routing_key=message.reply_to, timeout=10)
            await message.ack()

        tag = await queue.consume(on_request)
        print("ready", flush=True)
        await stop.wait()
        await queue.cancel(tag)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("queue")
    parser.add_argument("--prefetch", type=int, default=64)
    args = parser.parse_args()
    asyncio.run(serve(args.queue, args.prefetch))


if __name__ == "__main__":
    main()
