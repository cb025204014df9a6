"""A synchronous face on `qemu.qmp.QMPClient`, with events always collected.

The async client runs on its own event-loop thread, so events (SHUTDOWN,
DEVICE_DELETED, GUEST_PANICKED...) are received while the caller is busy
elsewhere, and every call takes a deadline.

With an event log, every command goes there as it is sent (its name and key
arguments) and again when its reply comes (ok or QEMU's error, and how long it
took), and every asynchronous event as it is received, stamped with QEMU's own
timestamp (the host's wall clock at emission).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import socket
import threading
import time
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from qemu.qmp import QMPClient

from harness.errors import InfraError
from harness.events import EventLog, Source

T = TypeVar("T")
Event = dict[str, Any]


def _short(value: Any) -> Any:
    """An argument as the event log keeps it: scalars as they are, long text and structures cut."""
    if isinstance(value, (bool, int, float)) or value is None:
        return value
    text = value if isinstance(value, str) else json.dumps(value, separators=(",", ":"), default=str)
    return text if len(text) <= 120 else text[:117] + "..."


def describe(name: str, arguments: dict[str, Any] | None) -> str:
    """`device_add driver=edu id=tio0 bus=hp0`: a command or event with its arguments, on one line."""
    return " ".join([name, *(f"{k}={_short(v)}" for k, v in (arguments or {}).items())])


def event_time(event: dict[str, Any]) -> float | None:
    """QEMU's timestamp of an event (seconds and microseconds of the host's wall clock), if it has one."""
    stamp = event.get("timestamp")
    if not isinstance(stamp, dict):
        return None
    seconds, micro = stamp.get("seconds"), stamp.get("microseconds")
    if not isinstance(seconds, int) or not isinstance(micro, int) or seconds < 0:
        return None    # QEMU sends -1/-1 when it could not read the clock
    return seconds + micro / 1e6


class QmpChannel:
    def __init__(self, name: str, events: EventLog | None = None) -> None:
        self.name = name
        self._log = events
        self._seq = itertools.count(1)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=f"qmp-{name}", daemon=True)
        self._thread.start()
        self._client = QMPClient(name)
        self._events: list[Event] = []
        self._cond = threading.Condition()
        self._pump: asyncio.Task[None] | None = None
        self.negotiated = False   # QEMU connected and the handshake completed (once)

    def _call(self, coro: Coroutine[Any, Any, T], timeout: float) -> T:
        future = asyncio.run_coroutine_threadsafe(asyncio.wait_for(coro, timeout), self._loop)
        try:
            return future.result(timeout + 1)
        except TimeoutError:
            future.cancel()
            raise InfraError(f"QMP: no answer within {timeout:.0f} s") from None

    def open(self, sock: socket.socket, timeout: float) -> None:
        """Negotiate over QEMU's connection (its `-chardev socket` client, accepted by the
        machine). Raises InfraError on timeout."""
        self._call(self._client.connect(sock), timeout)
        self._call(self._start_pump(), 5)
        self.negotiated = True

    async def _start_pump(self) -> None:
        self._pump = asyncio.create_task(self._collect())

    async def _collect(self) -> None:
        async for event in self._client.events:
            received = time.time()
            with self._cond:
                self._events.append(dict(event))
                self._cond.notify_all()
            if self._log is not None:
                name = str(event.get("event", "?"))
                raw = event.get("data")
                data: dict[str, Any] = raw if isinstance(raw, dict) else {}
                stamp = event_time(dict(event))
                self._log.emit(Source.QMP, "event", describe(name, data),
                               {"channel": self.name, "event": name, "data": {k: _short(v) for k, v in data.items()},
                                "received": round(received, 6)},
                               t=stamp if stamp is not None else received)

    def execute(self, command: str, arguments: dict[str, Any] | None = None, timeout: float = 30) -> Any:
        """Run a QMP command; raises qemu.qmp.ExecuteError or InfraError (timeout)."""
        if self._log is None:
            return self._call(self._client.execute(command, arguments), timeout)
        seq = next(self._seq)
        short = {k: _short(v) for k, v in (arguments or {}).items()}
        self._log.emit(Source.QMP, "command", describe(command, short),
                       {"channel": self.name, "id": seq, "execute": command, "arguments": short})
        sent = time.monotonic()
        reply: dict[str, Any] = {"channel": self.name, "id": seq, "execute": command}
        try:
            result = self._call(self._client.execute(command, arguments), timeout)
        except BaseException as e:
            reply.update(ok=False, error=f"{type(e).__name__}: {e}"[:300],
                         seconds=round(time.monotonic() - sent, 6))
            self._log.emit(Source.QMP, "reply", f"{command}: {reply['error']}", reply)
            raise
        reply.update(ok=True, seconds=round(time.monotonic() - sent, 6))
        self._log.emit(Source.QMP, "reply", f"{command}: ok", reply)
        return result

    def events(self) -> list[Event]:
        with self._cond:
            return list(self._events)

    def wait_event(
        self, name: str, timeout: float, match: Callable[[Event], bool] | None = None, since: int = 0,
    ) -> Event | None:
        """The first event `name` (index >= since) that matches, or None at the deadline."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for event in self._events[since:]:
                    if event.get("event") == name and (match is None or match(event)):
                        return event
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._cond.wait(left)

    async def _stop(self) -> None:
        if self._pump is not None:
            self._pump.cancel()
            await asyncio.gather(self._pump, return_exceptions=True)
        await self._client.disconnect()

    def close(self) -> None:
        """Disconnect and stop the loop thread; safe to call twice."""
        if not self._loop.is_running():
            return
        try:
            self._call(self._stop(), 5)
        except Exception:  # noqa: BLE001 - closing must not mask the real error
            pass
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        if not self._loop.is_running():
            self._loop.close()
