"""The durable local spool between ``ctx.llm`` and the database.

``Spool`` appends one serialised event per ``write`` to segment files (survives SIGKILL from the
moment ``append`` returns); ``Flusher`` moves batches to a ``Sink`` in a background thread and records
what the sink acknowledged; ``DatabaseSink`` inserts raw events idempotently on event_id.
"""

from metering.spool.flusher import Flusher, FlusherStats
from metering.spool.sink import DatabaseSink, DeliveryResult, Sink
from metering.spool.writer import Spool

__all__ = ["DatabaseSink", "DeliveryResult", "Flusher", "FlusherStats", "Sink", "Spool"]
