"""A blocking generator consumed from the event loop: the chain's events, from a thread."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from typing import Any


class Pump:
    """Runs a blocking generator in one thread of its own (torch's per-thread state and the
    gate's turn stay with it) and hands its events to the event loop. `cancel` (the client
    went away) stops it at its next event, which gives up its place at the gate."""

    _END = object()

    def __init__(self, make: Callable[[], Iterator[Any]]) -> None:
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self._stop = threading.Event()
        threading.Thread(target=self._run, args=(make,), name="rag-generation",
                         daemon=True).start()

    def _run(self, make: Callable[[], Iterator[Any]]) -> None:
        events = make()
        try:
            for event in events:
                self._put(event)
                if self._stop.is_set():
                    break
        except Exception as e:  # raised again in the request's task
            self._put(_Failed(e))
        finally:
            close = getattr(events, "close", None)
            if close is not None:
                close()
            self._put(self._END)

    def _put(self, item: Any) -> None:
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
        except RuntimeError:  # the event loop is closed: the server is stopping
            self._stop.set()

    def cancel(self) -> None:
        self._stop.set()

    async def next(self) -> Any:
        item = await self._queue.get()
        if isinstance(item, _Failed):
            raise item.error
        if item is self._END:
            raise StopAsyncIteration
        return item

    def __aiter__(self) -> Pump:
        return self

    async def __anext__(self) -> Any:
        return await self.next()


class _Failed:
    def __init__(self, error: Exception) -> None:
        self.error = error
