"""A metering process to be killed: runs the rewrite extension through ctx.llm in a loop.

Prints ``ack <event_id>`` once ``create_message`` has returned (the event is spooled), and keeps going
until it is killed. The flusher delivers to the database in the background, so the kill lands in the
middle of appends and of deliveries.

Usage: python -m tests.integration.spool_child <data_dir> <database_url>
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from metering.config import Settings, SpoolSettings
from metering.extensions.rewrite import chat as rewrite
from metering.runtime import User
from metering.wiring import open_services


async def main(data_dir: Path, url: str) -> None:
    settings = Settings(
        data_dir=data_dir,
        database_url=url,
        anthropic_api_key=None,
        openai_api_key=None,
        spool=SpoolSettings(segment_bytes=64 * 1024, batch_size=50, flush_interval_s=0.01),
    )
    services = open_services(settings, run_migrations=False)
    user = User("killed-user", "acme")
    out = sys.stdout
    n = 0
    while True:
        result = await services.runtime.invoke(rewrite, "rewrite", {"text": f"message {n}", "tone": "casual"}, user)
        for event_id in result.event_ids:
            out.write(f"ack {event_id}\n")
        out.flush()
        n += 1


if __name__ == "__main__":
    asyncio.run(main(Path(sys.argv[1]), sys.argv[2]))
