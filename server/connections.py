"""The one module that reaches into uvicorn's HTTP protocol (uvicorn 0.55, httptools).

uvicorn counts every open connection against --max-connections (its limit_concurrency) from
the moment it is accepted, and gives a connection unlimited time to send its first request:
64 idle TCP connections made straight to a replica gave every request, /health included, 503
for as long as they stayed open. Here a connection counts once its first request starts to
arrive, and one that has not sent a whole request head within --header-timeout seconds is
closed. uvicorn takes the protocol class as its public `http=` option; the members used here
(connections, loop, transport, cycle, data_received, connection_lost) are uvicorn's, and
tests/test_server_connections.py fails if they change.
"""
from __future__ import annotations

import asyncio
from typing import Optional

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol


def with_header_deadline(seconds: float) -> type:
    """uvicorn's httptools protocol with a deadline of `seconds` for the first request head."""

    class HeaderDeadlineProtocol(HttpToolsProtocol):
        _deadline: Optional[asyncio.TimerHandle] = None
        _counted = False

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self.connections.discard(self)  # counted from its first bytes (data_received)
            self._deadline = self.loop.call_later(seconds, self._head_late)

        def data_received(self, data: bytes) -> None:
            if not self._counted:
                self._counted = True
                self.connections.add(self)
            super().data_received(data)

        def _head_late(self) -> None:
            if self.cycle is None:  # no request head completed on this connection
                self.transport.close()

        def connection_lost(self, exc: Optional[Exception]) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
            super().connection_lost(exc)

    return HeaderDeadlineProtocol
