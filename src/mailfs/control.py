"""The control channel: a 0600 Unix socket that admin commands talk JSON lines over.

Only root (the socket's owner) can connect, so the channel needs no further auth.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import trio

from mailfs.errors import UserError

log = logging.getLogger(__name__)

MAX_REQUEST = 64 * 1024
Handler = Callable[[dict[str, Any]], Awaitable[Any]]


class ControlServer:
    def __init__(self, path: Path, handlers: dict[str, Handler]) -> None:
        self.path = path
        self.handlers = handlers

    async def serve(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        if self.path.exists():
            self.path.unlink()
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o177)
        try:
            await sock.bind(str(self.path))
        finally:
            os.umask(old_umask)
        os.chmod(self.path, 0o600)
        sock.listen(16)
        listener = trio.SocketListener(sock)
        task_status.started()
        try:
            await trio.serve_listeners(self._client, [listener])
        finally:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()

    async def _client(self, stream: trio.abc.Stream) -> None:
        async with stream:
            try:
                request = await self._read_request(stream)
                handler = self.handlers.get(str(request.get("cmd")))
                if handler is None:
                    reply: dict[str, Any] = {"ok": False,
                                             "error": f"unknown command {request.get('cmd')!r}"}
                else:
                    reply = {"ok": True, "result": await handler(request)}
            except (ValueError, UserError, OSError) as exc:
                reply = {"ok": False, "error": str(exc)}
            except Exception as exc:
                log.exception("control command failed")
                reply = {"ok": False, "error": f"internal error: {exc}"}
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await stream.send_all(json.dumps(reply).encode() + b"\n")

    @staticmethod
    async def _read_request(stream: trio.abc.Stream) -> dict[str, Any]:
        data = b""
        while b"\n" not in data:
            chunk = await stream.receive_some(4096)
            if not chunk:
                break
            data += chunk
            if len(data) > MAX_REQUEST:
                raise ValueError("control request too large")
        request = json.loads(data.decode() or "{}")
        if not isinstance(request, dict):
            raise ValueError("control request must be a JSON object")
        return request


def call(path: Path, cmd: str, timeout: float = 600.0, **args: Any) -> Any:
    """Send one command to a running mount and return its result (blocking client)."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(str(path))
            sock.sendall(json.dumps({"cmd": cmd, **args}).encode() + b"\n")
            data = b""
            while not data.endswith(b"\n"):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
    except FileNotFoundError:
        raise UserError("no mailfs mount is running there (no control socket)") from None
    except ConnectionRefusedError:
        raise UserError("the mailfs daemon for that mount is not answering "
                        "(it may have crashed; see its log)") from None
    except TimeoutError:
        raise UserError(f"the mailfs daemon did not answer {cmd!r} within {timeout:.0f}s"
                        ) from None
    if not data:
        raise UserError("the mailfs daemon closed the control connection without an answer")
    reply = json.loads(data)
    if not reply.get("ok"):
        raise UserError(str(reply.get("error")))
    return reply.get("result")
