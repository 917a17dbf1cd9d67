"""The HTTP/1.1 listener of `glmkit serve`: uvicorn with the read deadline it lacks.

    from glmkit.server.http import serve
    serve(app, "127.0.0.1", 8000, header_timeout=10, timeout_keep_alive=5)

uvicorn (0.29 to 0.54 at least) times out idle keep-alive connections and nothing else: a client
that opens a connection and sends nothing, or half a request head, holds it for good, and has no
option for it. `DeadlineH11Protocol` is uvicorn's h11 protocol with two changes:
- a request head must be complete `header_timeout` seconds after the connection opened, or after
  the first byte of a later request on it arrived; else the connection is closed, without an answer
  (there is no request yet to answer). Between requests uvicorn's keep-alive timeout applies as
  before (`timeout_keep_alive`, default 5 s);
- a connection whose response went out before its request body was read to the end (a 401, 404,
  408 or 413 answered without reading it) is closed at once, instead of reading what a client may
  go on trickling in.
Request bodies of the metered routes are read by `metering.MeterMiddleware` before the request is
admitted, within its own size limit and deadline, so a stalled body never holds a slot.

The protocol is always h11 (httptools, when installed, is not used): the deadline hooks into
uvicorn's h11 protocol, and h11 is what uvicorn uses here anyway. No HTTP/2, no websockets.
"""

from __future__ import annotations

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

HEADER_TIMEOUT_S = 10.0  # a request head is a few hundred bytes: any client sends it in well under a second


class DeadlineH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline for request heads and no draining of unread bodies."""

    header_timeout = HEADER_TIMEOUT_S
    head_timer = None  # the pending deadline of the request head being received, if any

    def _arm(self):
        if self.head_timer is None:
            self.head_timer = self.loop.call_later(self.header_timeout, self._head_timed_out)

    def _disarm(self):
        if self.head_timer is not None:
            self.head_timer.cancel()
            self.head_timer = None

    def _head_timed_out(self):
        self.head_timer = None
        if not self.transport.is_closing():
            self.transport.close()

    def connection_made(self, transport):
        super().connection_made(transport)
        self._arm()  # a connection that never sends a byte

    def data_received(self, data: bytes):
        if self.conn.their_state is h11.IDLE:  # bytes of a request head (the first, or a keep-alive one's)
            self._arm()
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:  # the head is complete
            self._disarm()

    def on_response_complete(self):
        if self.conn.their_state is h11.SEND_BODY and not self.transport.is_closing():
            self.transport.close()  # answered without reading the body: the rest would only be drained
        super().on_response_complete()  # (returns early for a closing transport)

    def connection_lost(self, exc):
        self._disarm()
        super().connection_lost(exc)


def protocol(header_timeout: float = HEADER_TIMEOUT_S) -> type[DeadlineH11Protocol]:
    """The protocol class for `uvicorn.Config(http=...)` with this head deadline."""
    if not header_timeout > 0:
        raise ValueError(f"header_timeout={header_timeout!r}: give the seconds a client has to send a request head (> 0)")
    return type("DeadlineH11Protocol", (DeadlineH11Protocol,), {"header_timeout": float(header_timeout)})


def config(app, host: str = "127.0.0.1", port: int = 8000, header_timeout: float = HEADER_TIMEOUT_S,
           timeout_keep_alive: float = 5.0, log_level: str = "info", **kw) -> uvicorn.Config:
    """uvicorn's Config for `app` with the deadline protocol; other keywords go to uvicorn.Config."""
    if not timeout_keep_alive > 0:
        raise ValueError(f"timeout_keep_alive={timeout_keep_alive!r}: give the seconds an idle connection stays open "
                         "between requests (> 0)")
    return uvicorn.Config(app, host=host, port=port, http=protocol(header_timeout), timeout_keep_alive=timeout_keep_alive,
                          log_level=log_level, **kw)


def serve(app, host: str = "127.0.0.1", port: int = 8000, header_timeout: float = HEADER_TIMEOUT_S,
          timeout_keep_alive: float = 5.0, log_level: str = "info", sockets=None, **kw) -> None:
    """Serve `app` until interrupted (uvicorn.run with the deadline protocol); `sockets`: already bound."""
    uvicorn.Server(config(app, host, port, header_timeout, timeout_keep_alive, log_level, **kw)).run(sockets=sockets)
