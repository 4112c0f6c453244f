"""A streamed response whose generator is closed when the response ends, however it ends.

Starlette iterates a sync generator in worker threads and, when the client goes away mid-stream, stops without
closing it: the generator stays suspended until the garbage collector finds it, holding what its ``with`` blocks
hold (the ledger export: a pooled database connection, its open transaction and server-side cursor), for as long
as no collection runs. Here it is closed as soon as the response ends: finished, failed or disconnected.
"""

from __future__ import annotations

from collections.abc import Generator, Mapping
from itertools import chain

import anyio
from fastapi.responses import StreamingResponse
from starlette.types import Receive, Scope, Send


class ClosingStream(StreamingResponse):
    """``first`` (already read, so a failing query is an error answer, not a cut-off body), then ``rest``."""

    def __init__(
        self, first: str, rest: Generator[str, None, None], *, media_type: str, headers: Mapping[str, str]
    ) -> None:
        super().__init__(chain((first,), rest), media_type=media_type, headers=headers)
        self._rest = rest

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):  # also when the request was cancelled
                await anyio.to_thread.run_sync(self._rest.close)
