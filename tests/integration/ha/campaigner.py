"""A process that campaigns and prints what happens to it, one JSON line per event.

    python -m tests.integration.ha.campaigner CONSUL_URL NAME HOLDER TTL_S
    python -m tests.integration.ha.campaigner AMQP_URL NAME HOLDER TTL_S   (broker-only lease)
"""

from __future__ import annotations

import asyncio
import json
import sys
import time

from coordinator_agent.ha.broker_lease import BrokerLease
from coordinator_agent.ha.election import Campaign, Lease
from coordinator_agent.ha.lease import ConsulLease, Term


def say(event: str, **fields: object) -> None:
    print(json.dumps({"event": event, "at": time.time(), **fields}), flush=True)


async def main(url: str, name: str, holder: str, ttl_s: float) -> None:
    async def elected(term: Term) -> None:
        say("elected", epoch=term.epoch)

    async def deposed(reason: str) -> None:
        say("deposed", reason=reason)

    lease: Lease = (BrokerLease(url, name, holder, ttl_s=ttl_s) if url.startswith("amqp")
                    else ConsulLease(url, name, holder, ttl_s=ttl_s))
    campaign = Campaign(lease, on_elected=elected, on_deposed=deposed)
    say("started")
    try:
        await campaign.run()
    finally:
        await campaign.close()


if __name__ == "__main__":
    url, name, holder, ttl = sys.argv[1:5]
    asyncio.run(main(url, name, holder, float(ttl)))
