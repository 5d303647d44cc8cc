"""First come, first served access to one model shared by several users.

Two generations at once on a CPU only make both slow (they share the cores and the memory
bandwidth); a queue makes each one as fast as alone and lets the waiting ones say so.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager


class FairGate:
    """One holder at a time; waiters are admitted in arrival order."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._queue: deque[object] = deque()

    def enter(self) -> object:
        """Join the queue; returns the ticket to `wait` on and to `leave` with."""
        ticket = object()
        with self._cond:
            self._queue.append(ticket)
        return ticket

    def wait(self, ticket: object, timeout: float | None = None) -> int:
        """Wait up to `timeout` seconds for the turn; return how many are still ahead (0 =
        this ticket holds the gate)."""
        with self._cond:
            self._cond.wait_for(lambda: self._queue[0] is ticket, timeout)
            return self._queue.index(ticket)

    def leave(self, ticket: object) -> None:
        """Release the gate, or give up a place in the queue."""
        with self._cond:
            self._queue.remove(ticket)
            self._cond.notify_all()

    @contextmanager
    def hold(self) -> Iterator[None]:
        """Block until it is this thread's turn; release on exit."""
        ticket = self.enter()
        try:
            self.wait(ticket)
            yield
        finally:
            self.leave(ticket)


class OpenGate(FairGate):
    """Every request is admitted at once: for a model server, which schedules (and, like
    vLLM, batches) concurrent requests itself; a queue here would only serialise them."""

    def wait(self, ticket: object, timeout: float | None = None) -> int:
        return 0
