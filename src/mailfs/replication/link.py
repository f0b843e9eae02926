"""One replication connection: a TLS stream carrying the frames of a protocol.Session.

The session decides what may be sent and received; this class only moves bytes, so the
rules live in one I/O-free place and are tested there.
"""

from __future__ import annotations

import contextlib
import ssl

import trio

from mailfs.replication.protocol import Message, ProtocolError, Session

RECEIVE_SIZE = 256 << 10
HANDSHAKE_TIMEOUT = 10.0


class ConnectionClosed(Exception):
    """The peer closed the connection, or went silent for too long."""


class Refused(Exception):
    """We refuse the peer: wrong identity, unknown node, or a change we cannot accept."""


class Link:
    def __init__(self, stream: trio.abc.Stream, session: Session) -> None:
        self.stream = stream
        self.session = session
        self._send_lock = trio.Lock()

    async def send(self, message: Message) -> None:
        # The session's view of what was sent must follow the order bytes leave in.
        async with self._send_lock:
            await self.stream.send_all(self.session.send(message))

    async def send_frame(self, frame: bytes) -> None:
        async with self._send_lock:
            await self.stream.send_all(frame)

    async def receive(self) -> list[Message]:
        """The next validated messages; raises ConnectionClosed at the end of the stream."""
        while True:
            data = await self.stream.receive_some(RECEIVE_SIZE)
            if not data:
                self.session.eof()
                raise ConnectionClosed("the peer closed the connection")
            messages = self.session.receive(data)
            if messages:
                return messages

    async def aclose(self) -> None:
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            with trio.move_on_after(1) as scope:
                scope.shield = True
                await self.stream.aclose()


def describe(exc: BaseException) -> str:
    """One line for the log: TLS errors hide their reason in the cause."""
    cause = exc.__cause__ or exc.__context__
    if isinstance(exc, trio.BrokenResourceError) and cause is not None:
        exc = cause
    if isinstance(exc, ssl.SSLError):
        return f"TLS error: {exc.reason or exc}"
    if isinstance(exc, ProtocolError):
        return f"protocol error: {exc.reason}"
    if isinstance(exc, trio.TooSlowError):
        return "timed out"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


# What a broken or hostile connection can raise; anything else is a bug and propagates.
CONNECTION_ERRORS: tuple[type[Exception], ...] = (
    OSError, trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError,
    ProtocolError, ConnectionClosed, Refused,
)


def connection_error(exc: BaseException) -> Exception | None:
    """The connection error behind `exc` (unwrapping nursery exception groups), or None
    if anything in it is not a connection error (a bug, which must not be swallowed)."""
    if isinstance(exc, BaseExceptionGroup):
        leaves = [connection_error(inner) for inner in exc.exceptions]
        if leaves and all(leaf is not None for leaf in leaves):
            return leaves[0]
        return None
    if isinstance(exc, CONNECTION_ERRORS):
        return exc
    return None
